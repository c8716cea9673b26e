"""The Ray + DeepSpeed ZeRO-3 job (2 workers over gloo) against the one-process core on the same inputs."""

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoModelForCausalLM

import distinf
import job_fixtures
from distinf.config import load_job
from distinf.inputs import plan_job
from distinf.runtime.driver import run_job
from distinf.tables import gradients_of

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def finished_run(request, shared_ray, tmp_path_factory):
    """A 2-worker ZeRO-3 run, and distinf.attribute on the same model, data and config."""
    root = tmp_path_factory.mktemp(request.param)
    model_dir = job_fixtures.tiny_model_dir(root, request.param)
    # damping: auto for both; GPT-2's attention key bias is a zero block and contributes nothing.
    # Llama's scores are cosines (scoring.normalize): query divisors from the reducer, each chunk's own.
    normalize = {"gpt2": "none", "llama": "cosine"}[request.param]
    cfg = load_job(job_fixtures.job_file(root, model_dir, *job_fixtures.corpus_files(root / "data"),
                                         scoring={"normalize": normalize}))
    manifest = run_job(cfg)
    plan = plan_job(cfg)
    reference = distinf.attribute(
        AutoModelForCausalLM.from_pretrained(cfg.model.path), plan.train.examples, plan.queries.examples,
        config=cfg.model_dump(include={"compression", "hessian", "scoring"}), train_ids=plan.train.ids,
        query_ids=plan.queries.ids, batch_size=3, pad_token_id=plan.pad_token_id)
    return root / "run", manifest, plan, reference


def test_scores_equal_the_one_process_core(finished_run):
    run_dir, manifest, plan, reference = finished_run
    assert manifest["status"] == "complete"
    dense = pq.read_table(run_dir / "scores" / "dense").to_pydict()
    q = {x: i for i, x in enumerate(plan.queries.ids)}
    t = {x: i for i, x in enumerate(plan.train.ids)}
    scores, influence = np.full((len(q), len(t)), np.nan), np.full((len(q), len(t)), np.nan)
    for qid, tid, s, raw in zip(dense["query_id"], dense["train_id"], dense["score"], dense["influence"]):
        scores[q[qid], t[tid]], influence[q[qid], t[tid]] = s, raw
    assert not np.isnan(scores).any()  # every (query, train) pair exactly once
    assert len(dense["score"]) == scores.size
    np.testing.assert_allclose(scores, reference.scores, rtol=1e-4, atol=1e-4 * np.abs(reference.scores).max())
    np.testing.assert_allclose(influence, reference.influence, rtol=1e-4,
                               atol=1e-4 * np.abs(reference.influence).max())


def test_top_k_is_identical_to_the_one_process_core(finished_run):
    run_dir, _, _, reference = finished_run
    ours = pq.read_table(run_dir / "scores" / "top_k.parquet").to_pylist()
    theirs = reference.top_k.to_pylist()
    assert [(r["query_id"], r["rank"], r["train_id"]) for r in ours] == \
        [(r["query_id"], r["rank"], r["train_id"]) for r in theirs]
    np.testing.assert_allclose([r["score"] for r in ours], [r["score"] for r in theirs], rtol=1e-4, atol=1e-6)
    influence = np.array([r["influence"] for r in theirs])
    np.testing.assert_allclose([r["influence"] for r in ours], influence, rtol=1e-4, atol=1e-4 * np.abs(influence).max())


def test_train_values_and_index_set_equal_the_one_process_core(finished_run):
    run_dir, _, plan, reference = finished_run
    values = pq.read_table(run_dir / "scores" / "train_values.parquet")
    assert values.column("train_id").to_pylist() == plan.train.ids
    np.testing.assert_allclose(values.column("self_influence").to_numpy(), reference.self_influence, rtol=1e-4)
    np.testing.assert_allclose(values.column("score_mean").to_numpy(),
                               reference.train_values.column("score_mean").to_numpy(), rtol=1e-4, atol=1e-6)
    mean = reference.train_values.column("influence_mean").to_numpy()
    np.testing.assert_allclose(values.column("influence_mean").to_numpy(), mean, rtol=1e-4, atol=1e-4 * np.abs(mean).max())
    np.testing.assert_allclose(values.column("loss").to_numpy(), reference.train_losses, rtol=1e-5)
    assert pq.read_table(run_dir / "index_set.parquet").equals(reference.index_set)


def test_influence_columns_equal_a_dense_solve_of_the_stored_gradients(finished_run):
    """Independent of the core: the raw influence in dense, top_k and train_values against
    G_q (Gram/n + λI)⁻¹ G_iᵀ per parameter block, from the run's own gradient files."""
    run_dir, manifest, _, _ = finished_run

    def stored(split):
        table = pa.concat_tables([pq.read_table(run_dir / c["file"]) for c in manifest["chunks"][split]])
        return table.column("example_id").to_pylist(), gradients_of(table).astype(np.float64)

    train_ids, G = stored("train")
    query_ids, Q = stored("queries")
    params = pq.read_table(run_dir / "index_set.parquet").column("param").to_pylist()
    starts = [0] + [i for i in range(1, len(params)) if params[i] != params[i - 1]] + [len(params)]
    # A block whose entries' root mean square is float32 rounding next to the largest block's
    # (GPT-2's attention key bias: exactly 0 in exact arithmetic) is a zero block and adds nothing;
    # damped by its own size it would add O(1) noise to every score.
    rms = [np.sqrt(np.square(G[:, a:b]).mean()) for a, b in zip(starts, starts[1:])]
    raw = np.zeros((len(Q), len(G)))
    for (a, b), r in zip(zip(starts, starts[1:]), rms):
        if r <= 2.0 ** -23 * max(rms):
            continue
        block = G[:, a:b]
        lam = 0.1 * np.square(block).sum() / (len(G) * (b - a))  # auto
        raw += Q[:, a:b] @ np.linalg.solve(block.T @ block / len(G) + lam * np.eye(b - a), block.T)
    q, t = {x: i for i, x in enumerate(query_ids)}, {x: i for i, x in enumerate(train_ids)}
    scale = np.abs(raw).max()
    for table in (pq.read_table(run_dir / "scores" / "dense"), pq.read_table(run_dir / "scores" / "top_k.parquet")):
        rows = table.to_pydict()
        expected = [raw[q[a], t[b]] for a, b in zip(rows["query_id"], rows["train_id"])]
        np.testing.assert_allclose(rows["influence"], expected, rtol=1e-4, atol=1e-5 * scale)
    values = pq.read_table(run_dir / "scores" / "train_values.parquet").to_pydict()
    expected = [raw[:, t[i]].mean() for i in values["train_id"]]
    np.testing.assert_allclose(values["influence_mean"], expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())


def test_each_zero3_worker_held_half_the_parameters(finished_run):
    _, manifest, _, _ = finished_run
    total = manifest["params"]["total"]
    assert len(manifest["workers"]) == 2
    for worker in manifest["workers"]:
        assert abs(worker["local_params"] - total / 2) <= 0.01 * total, worker
        # Linux reports each rank's peaks: setup, then (after a reset) the gradient pass alone.
        assert worker["memory"]["setup_peak_rss"] > 0 and worker["memory"]["gradients_peak_rss"] > 0, worker
        assert worker["setup_seconds"] > 0


VERSION_COLUMNS = [("run_id", "VARCHAR"), ("as_of", "TIMESTAMP WITH TIME ZONE")]  # every output row's version


def test_outputs_read_back_with_duckdb_with_the_documented_columns(finished_run):
    run_dir, manifest, plan, _ = finished_run
    k = manifest["k"]
    expected = {
        "scores/top_k.parquet": [("query_id", "VARCHAR"), ("rank", "INTEGER"), ("train_id", "VARCHAR"),
                                 ("score", "FLOAT"), ("influence", "FLOAT"), ("kind", "VARCHAR"), *VERSION_COLUMNS],
        "scores/train_values.parquet": [("train_id", "VARCHAR"), ("loss", "FLOAT"), ("score_mean", "FLOAT"),
                                        ("self_influence", "FLOAT"), ("influence_mean", "FLOAT"), *VERSION_COLUMNS],
        # Parquet has no fixed-size list type: DuckDB sees a list, pyarrow the fixed_size_list it wrote.
        "gradients/train/*.parquet": [("example_id", "VARCHAR"), ("loss", "FLOAT"), ("grad", "FLOAT[]")],
        "gradients/queries/*.parquet": [("example_id", "VARCHAR"), ("loss", "FLOAT"), ("grad", "FLOAT[]")],
        "index_set.parquet": [("param", "VARCHAR"), ("flat_index", "BIGINT")],
        "scores/dense/*.parquet": [("query_id", "VARCHAR"), ("train_id", "VARCHAR"), ("score", "FLOAT"),
                                   ("influence", "FLOAT"), *VERSION_COLUMNS],
        "rejected.parquet": [("example_id", "VARCHAR"), ("split", "VARCHAR"), ("row", "BIGINT"),
                             ("reason", "VARCHAR"), ("file", "VARCHAR"), *VERSION_COLUMNS],
    }
    con = duckdb.connect()
    for pattern, columns in expected.items():
        described = con.sql(f"DESCRIBE SELECT * FROM read_parquet('{run_dir / pattern}')").fetchall()
        assert [(row[0], row[1]) for row in described] == columns, pattern
    n_train = con.sql(f"SELECT count(DISTINCT example_id) FROM read_parquet('{run_dir}/gradients/train/*.parquet')")
    assert n_train.fetchall() == [(len(plan.train.ids),)]
    lengths = con.sql(f"SELECT DISTINCT len(grad) FROM read_parquet('{run_dir}/gradients/*/*.parquet')")
    assert lengths.fetchall() == [(k,)]
    grad_type = pq.read_schema(next((run_dir / "gradients" / "train").glob("*.parquet"))).field("grad").type
    assert grad_type.list_size == k and grad_type.value_type == "float"
    top = con.sql(f"SELECT query_id, kind, count(*) FROM read_parquet('{run_dir}/scores/top_k.parquet') GROUP BY 1, 2")
    assert sorted(top.fetchall()) == sorted((q, kind, 5) for q in plan.queries.ids for kind in ("opponent", "proponent"))
