"""Smoke run of benchmarks/quality/mislabeled.py (paper §4.1) at a tiny size, on the real model and data.

all-MiniLM-L6-v2 + a LoRA adapter fine-tuned on 40 Rotten Tomatoes snippets with 8 labels flipped;
`distinf run jobs/mislabeled.yaml` (2 Ray workers, ZeRO-3, PEFT adapter loaded from disk) must give
the same per-example values as the one-process `distinf.attribute` on the in-memory PEFT model, and
the benchmark's AUC must equal the Mann-Whitney statistic computed pair by pair.
"""

import numpy as np

import distinf
from benchmarks.quality import mislabeled


def mann_whitney_auc(positive: np.ndarray, score: np.ndarray) -> float:
    """P(score of a random positive > score of a random negative), ties counted half."""
    pos, neg = score[positive], score[~positive]
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def test_lora_classifier_job_matches_one_process_and_auc_is_the_rank_statistic(tmp_path):
    prepared = mislabeled.prepare(seed=0, rank=2, n_train=40, n_val=8, epochs=1, lr=1e-3, folder=tmp_path / "seed0")
    assert prepared.flipped.sum() == 8  # exactly 20% flipped by the seeded draw

    values = mislabeled.run_job(prepared.folder, 512, "runtime.batch_size=8")
    assert values.column("train_id").to_pylist() == [f"train-{i}" for i in range(40)]

    reference = distinf.attribute(prepared.model, prepared.train, prepared.val, task="sequence_classification",
                                  config={"compression": {"k": 512}, "scoring": {"normalize": "none"}}, batch_size=8)
    job_mean = values.column("score_mean").to_numpy()
    scale = np.abs(reference.scores).max()
    np.testing.assert_allclose(job_mean, reference.scores.mean(0), atol=1e-3 * scale)
    np.testing.assert_allclose(values.column("self_influence").to_numpy(), reference.self_influence,
                               rtol=1e-3, atol=1e-3 * reference.self_influence.max())

    # The benchmark's reading of the stored gradients reproduces the job's own scoring.
    stored = mislabeled.hessian_scores(prepared.folder / "run", "gauss_newton", 40, 8)
    np.testing.assert_allclose(stored.mean(0), job_mean, atol=1e-4 * scale)

    harm = -job_mean
    assert abs(mislabeled.auc(prepared.flipped, harm) - mann_whitney_auc(prepared.flipped, harm)) < 1e-9


def test_curvature_rows_run_without_the_job(tmp_path):
    """--curvatures with --no-job: dropout captures by distinf.attribute with kfac_mix at a β (and
    gauss_newton), each under the asked scoring.normalize; no job runs, and the gauss_newton row is
    the AUC of distinf.attribute's own dropout scores."""
    import argparse

    args = argparse.Namespace(n_train=40, n_val=8, epochs=1, lr=1e-3, k=512, compressions=[], hessians=[],
                              curvatures=["dropout, gauss_newton", "dropout, kfac_mix β=0.25"],
                              normalize=["none", "cosine"], no_job=True)
    result = mislabeled.run_seed(0, 2, args, tmp_path)
    assert not (tmp_path / "seed0-r2" / "run").exists()
    assert "dropout (job)" not in result
    for name in args.curvatures:
        for normalize in args.normalize:
            assert 0.0 <= result[mislabeled.curvature_key(name, normalize)] <= 1.0
    prepared = mislabeled.prepare(seed=0, rank=2, n_train=40, n_val=8, epochs=1, lr=1e-3, folder=tmp_path / "again")
    reference = distinf.attribute(prepared.model, prepared.train, prepared.val, task="sequence_classification",
                                  config={"compression": {"method": "dropout", "k": 512},
                                          "scoring": {"normalize": "none", "self_influence": False}}, batch_size=32)
    assert result["dropout, gauss_newton"] == mislabeled.auc(prepared.flipped, -reference.scores.mean(0))
