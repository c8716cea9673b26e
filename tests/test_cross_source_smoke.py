"""benchmarks/quality/cross_source.py's code path at a tiny size: split, fine-tuning, the 2-worker job, the measures.

The measures are checked against independent computations: the job's dense score matrix, the
job's own reducer (for the rescoring from stored gradients) and an enumeration of orderings (for
the random baseline).
"""

import itertools

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

import job_fixtures
from benchmarks.quality import cross_source
from distinf.config import load_job
from distinf.inputs import plan_job

pytestmark = pytest.mark.distributed



@pytest.fixture(scope="module")
def tiny_benchmark(tmp_path_factory):
    """Six sources x 4 training texts, 2 queries each; a tiny GPT-2 fine-tuned for 2 epochs; the job."""
    root = tmp_path_factory.mktemp("cross_source")
    train, queries = cross_source.write_split(root / "data", seed=0, n_train=4, n_query=2)
    base = job_fixtures.tiny_model_dir(root, "gpt2")
    overrides = cross_source.job_overrides(base, train, queries, k=256, seed=0, top_k=5, max_length=24)
    plan = plan_job(load_job(cross_source.JOB, overrides))
    facts = cross_source.fine_tune(base, plan.train.examples, plan.pad_token_id, root / "model", seed=0,
                                   epochs=2, lr=1e-3, batch_size=8)
    run_dir = cross_source.run_job(root / "run", cross_source.job_overrides(
        root / "model", train, queries, k=256, seed=0, top_k=5, max_length=24, dense=True) + [
        "runtime.batch_size=4", "runtime.chunk_examples=8"])
    return {"root": root, "base": base, "facts": facts, "run": run_dir,
            "train_source": cross_source.source_of(train), "query_source": cross_source.source_of(queries)}


def test_the_split_has_every_source_balanced_and_disjoint(tiny_benchmark):
    train, queries = tiny_benchmark["train_source"], tiny_benchmark["query_source"]
    assert not set(train) & set(queries)
    assert sorted(set(train.values())) == sorted(cross_source.SOURCES)
    assert all(list(train.values()).count(s) == 4 for s in cross_source.SOURCES)
    assert all(list(queries.values()).count(s) == 2 for s in cross_source.SOURCES)


def test_fine_tuning_lowers_the_loss_and_saves_changed_safetensors(tiny_benchmark):
    facts = tiny_benchmark["facts"]
    assert facts["last_epoch_loss"] < facts["first_epoch_loss"]
    tuned = load_file(tiny_benchmark["root"] / "model" / "model.safetensors")
    base = load_file(tiny_benchmark["base"] / "model.safetensors")
    assert set(tuned) == set(base)
    assert any(not torch.equal(tuned[name], base[name]) for name in base)


def test_fractions_from_top_k_equal_those_of_the_dense_score_matrix(tiny_benchmark):
    run, train_source, query_source = tiny_benchmark["run"], tiny_benchmark["train_source"], tiny_benchmark["query_source"]
    ours = cross_source.same_source_fractions(pq.read_table(run / "scores" / "top_k.parquet"), train_source, query_source)

    dense = pq.read_table(run / "scores" / "dense").to_pydict()
    query_ids, train_ids = sorted(query_source), sorted(train_source)
    q, t = {x: i for i, x in enumerate(query_ids)}, {x: i for i, x in enumerate(train_ids)}
    matrix = np.full((len(q), len(t)), np.nan)
    for qid, tid, score in zip(dense["query_id"], dense["train_id"], dense["score"]):
        matrix[q[qid], t[tid]] = score
    assert not np.isnan(matrix).any()
    train_sources = np.array([train_source[x] for x in train_ids])
    top3 = np.argsort(-matrix, axis=1, kind="stable")[:, :3]
    own = np.array([query_source[x] for x in query_ids])
    hits = train_sources[top3] == own[:, None]
    assert ours["top1"] == pytest.approx(hits[:, 0].mean(), abs=1e-12)
    assert ours["top3_all"] == pytest.approx(hits.all(1).mean(), abs=1e-12)
    for source in cross_source.SOURCES:
        assert ours["top1_by_source"][source] == pytest.approx(hits[own == source, 0].mean(), abs=1e-12)


def test_rescoring_the_stored_gradients_reproduces_the_jobs_top_k(tiny_benchmark):
    run = tiny_benchmark["run"]
    job = [r for r in pq.read_table(run / "scores" / "top_k.parquet").to_pylist()
           if r["rank"] <= 3 and r["kind"] == "proponent"]
    ours = cross_source.rescored_top_k(run, "gauss_newton").to_pylist()
    key = lambda r: (r["query_id"], r["rank"])  # noqa: E731
    job, ours = sorted(job, key=key), sorted(ours, key=key)
    assert [(r["query_id"], r["rank"], r["train_id"]) for r in ours] == \
        [(r["query_id"], r["rank"], r["train_id"]) for r in job]
    np.testing.assert_allclose([r["score"] for r in ours], [r["score"] for r in job], rtol=1e-4)


def test_relative_rescoring_divides_the_jobs_scores_by_the_root_of_its_self_influence(tiny_benchmark):
    run = tiny_benchmark["run"]
    dense = pq.read_table(run / "scores" / "dense").to_pydict()
    values = pq.read_table(run / "scores" / "train_values.parquet").to_pydict()
    root_self = dict(zip(values["train_id"], np.sqrt(values["self_influence"])))
    relative = {}
    for qid, tid, score in zip(dense["query_id"], dense["train_id"], dense["score"]):
        relative.setdefault(qid, []).append((-score / root_self[tid], tid))
    ours = cross_source.rescored_top_k(run, "gauss_newton", relative=True).to_pylist()
    for qid, ranked in relative.items():
        expected = [tid for _, tid in sorted(ranked)[:3]]
        assert [r["train_id"] for r in sorted((r for r in ours if r["query_id"] == qid), key=lambda r: r["rank"])] \
            == expected


def test_random_baseline_equals_an_enumeration_of_orderings():
    train = {f"t{i}": s for i, s in enumerate("aaabbc")}
    queries = {"q0": "a", "q1": "b", "q2": "c", "q3": "a"}
    first, all_top = [], []
    for ordering in itertools.permutations(train, 3):  # every top 3 of a uniformly random ranking, equally likely
        for source in queries.values():
            hits = [train[t] == source for t in ordering]
            first.append(hits[0])
            all_top.append(all(hits))
    baseline = cross_source.random_baseline(train, queries)
    assert baseline["top1"] == pytest.approx(np.mean(first))
    assert baseline["top3_all"] == pytest.approx(np.mean(all_top))
    assert baseline["top1_by_source"] == pytest.approx({"a": 0.5, "b": 1 / 3, "c": 1 / 6})


def test_too_few_ranked_proponents_are_refused():
    top = pa.table({"query_id": ["q", "q"], "rank": [1, 2], "train_id": ["t0", "t1"], "score": [2.0, 1.0]})
    with pytest.raises(ValueError, match="raise scoring.top_k"):
        cross_source.same_source_fractions(top, {"t0": "a", "t1": "a"}, {"q": "a"})


def test_attribute_method_specs_name_a_compression_and_a_curvature():
    assert cross_source.attribute_method("logra") == ("logra", {"method": "gauss_newton"})
    assert cross_source.attribute_method("dropout:kfac") == ("dropout", {"method": "kfac"})
    assert cross_source.attribute_method("dropout:kfac_mix") == ("dropout", {"method": "kfac_mix"})
    assert cross_source.attribute_method("dropout:kfac_mix=0.25") == ("dropout", {"method": "kfac_mix", "mix": 0.25})
