"""The comparison methods in the distributed job (2 ZeRO-3 workers over gloo) against distinf.attribute."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from transformers import AutoModelForCausalLM

import distinf
import job_fixtures
from distinf.config import JOB_COMPRESSION_METHODS, JOB_HESSIAN_METHODS, load_job
from distinf.inputs import plan_job
from distinf.report import extremes, write_report
from distinf.runtime.driver import run_job

pytestmark = pytest.mark.distributed

CASES = [("gaussian", "datainf"), ("logra", "lissa"), ("fjlt", "identity"), ("dropout", "kfac_mix"),
         ("dropout", "ekfac"), ("dropout", "datainf")]
"""("dropout", "datainf"): under dropout the tiny GPT-2 has a zero block (layer 1's key bias), which
the job's chunked solve and `distinf.attribute` must both leave out."""


@pytest.mark.parametrize("compression, hessian", CASES)
def test_job_scores_equal_attribute(shared_ray, tmp_path, compression, hessian):
    if compression not in JOB_COMPRESSION_METHODS or hessian not in JOB_HESSIAN_METHODS:
        pytest.skip(f"the job does not run {compression}/{hessian} yet (distinf.config.JOB_*_METHODS)")
    model_dir = job_fixtures.tiny_model_dir(tmp_path, "gpt2")
    extra = {"lissa_iterations": 4, "lissa_batch_size": 5} if hessian == "lissa" else {}
    train, queries = job_fixtures.corpus_files(tmp_path / "data")
    if hessian in ("kfac_mix", "ekfac"):
        # 11 rows over 2 workers in batches of 4: rank 1's last batch has a padding slot, whose
        # example runs through the model but must add nothing to the Kronecker factors.
        pq.write_table(pq.read_table(train).slice(0, 11), train)
    cfg = load_job(job_fixtures.job_file(tmp_path, model_dir, train, queries,
                                         compression={"method": compression, "k": 256},
                                         hessian={"method": hessian, **extra}))
    manifest = run_job(cfg)
    assert manifest["status"] == "complete"
    plan = plan_job(cfg)
    if hessian in ("kfac_mix", "ekfac"):
        assert len(plan.train.ids) == 11
        factor_files = sorted((tmp_path / "run" / "factors" / "train").glob("part-*.safetensors"))
        assert len(factor_files) == 2
        # The gradients folder is Parquet only: the README's one-line read works on these runs too.
        import pandas as pd
        assert sorted(pd.read_parquet(tmp_path / "run" / "gradients" / "train").example_id) == sorted(plan.train.ids)
    reference = distinf.attribute(
        AutoModelForCausalLM.from_pretrained(cfg.model.path), plan.train.examples, plan.queries.examples,
        config=cfg.model_dump(include={"compression", "hessian", "scoring"}), train_ids=plan.train.ids,
        query_ids=plan.queries.ids, batch_size=3, pad_token_id=plan.pad_token_id)
    run_dir = tmp_path / "run"
    scores = job_fixtures.dense_scores(run_dir, plan.queries.ids, plan.train.ids)
    np.testing.assert_allclose(scores, reference.scores, rtol=1e-4, atol=1e-4 * np.abs(reference.scores).max())
    values = pq.read_table(run_dir / "scores" / "train_values.parquet")
    np.testing.assert_allclose(values.column("self_influence").to_numpy(), reference.self_influence,
                               rtol=1e-4, atol=1e-6 * np.abs(reference.self_influence).max())
    assert pq.read_table(run_dir / "index_set.parquet").equals(reference.index_set)
    top = pq.read_table(run_dir / "scores" / "top_k.parquet").to_pydict()
    np.testing.assert_allclose(top["score"], reference.top_k.column("score").to_numpy(), rtol=1e-4,
                               atol=1e-4 * np.abs(reference.scores).max())

    # The report reads this method's stored curvature back: its recomputed proponents and
    # opponents of each query shown are the extremes of the reference scores.
    shown = plan.queries.ids[:2]
    for query_id, (best, worst) in extremes(run_dir, json.loads((run_dir / "manifest.json").read_text()),
                                            shown, 3).items():
        row = reference.scores[plan.queries.ids.index(query_id)]
        np.testing.assert_allclose([s for _, s in best], np.sort(row)[::-1][:3], rtol=1e-4,
                                   atol=1e-4 * np.abs(row).max())
        np.testing.assert_allclose([s for _, s in worst], np.sort(row)[:3], rtol=1e-4, atol=1e-4 * np.abs(row).max())
    assert f"({hessian})" in write_report(run_dir).read_text()
