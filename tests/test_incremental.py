"""Nightly appends and queries against a stored run, each against a from-scratch run of the same
data (scores to 1e-5, identical top-k, rows in input order), with real Ray workers on ZeRO-3.

The stored run holds rows 0-15 of a 24-row training file; the night's file holds rows 8-23, so
8 of its rows are stored already, 8 are new, and 8 stored rows are absent from it (and kept).
The union is then rows 0-23 in file order, which is what the from-scratch run computes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

import job_fixtures
from distinf.cli import main
from distinf.config import load_job
from distinf.runtime.driver import run_job
from distinf.runtime.query import query_run
from distinf.runtime.errors import JobError
from distinf.runtime.run_dir import RunDir
from distinf.runtime.versions import committed_root

pytestmark = pytest.mark.distributed

RUNTIME = {"batch_size": 2, "chunk_examples": 4}  # 16 stored rows: chunks 0 and 1 on each of 2 ranks


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("incremental_inputs")
    data = root / "data"
    train, queries = job_fixtures.corpus_files(data)
    table = pq.read_table(train)
    assert table.num_rows == 24
    pq.write_table(table.slice(0, 16), data / "day1.parquet")
    pq.write_table(table.slice(8, 16), data / "day2.parquet")
    asked = pq.read_table(queries)
    pq.write_table(asked.take([4, 1, 3]), data / "later.parquet")  # 3 of the 6 queries, in another order
    return {"model": job_fixtures.tiny_model_dir(root, "gpt2"), "train": train, "queries": queries,
            "day1": data / "day1.parquet", "day2": data / "day2.parquet", "later": data / "later.parquet"}


def write_job(root: Path, inputs: dict, train: str = "train", **sections) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    return job_fixtures.job_file(root, inputs["model"], inputs[train], inputs["queries"],
                                 runtime={**RUNTIME, **sections.pop("runtime", {})}, **sections)


@pytest.fixture(scope="module")
def from_scratch(shared_ray, inputs, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("from_scratch")
    run_job(load_job(write_job(root, inputs)))
    return root / "run"


def ledger(run_dir: Path) -> dict[tuple[int, int], tuple[dict, int]]:
    """{(chunk, rank): (record, mtime_ns)} of the committed training parts."""
    out = {}
    for path in (run_dir / "ledger" / "train").glob("part-*.json"):
        record = json.loads(path.read_text())
        out[(record["chunk"], record["rank"])] = (record, path.stat().st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def appended(shared_ray, inputs, tmp_path_factory):
    """Day 1 into a new run, day 2 appended to it (the first try killed mid-pass, the second
    finishing it): the same command every night, as a schedule runs it."""
    root = tmp_path_factory.mktemp("appended")
    run_dir = root / "run"
    first = run_job(load_job(write_job(root / "day1", inputs, "day1")), run_dir, append=True)  # nothing there yet
    assert first["status"] == "complete" and first["counts"]["train"] == 16 and "appends" not in first
    before = ledger(run_dir)
    day2 = write_job(root / "day2", inputs, "day2")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DISTINF_TEST_KILL", "rank1:batch1")  # rank 1 dies in its first batch of the append
        with pytest.raises(JobError, match="gradient pass"):
            run_job(load_job(day2, ["runtime.max_restarts=0"]), run_dir, append=True)
    failed = json.loads((run_dir / "manifest.json").read_text())
    assert main(["run", str(day2), "--append-to", str(run_dir)]) == 0
    return run_dir, before, failed


def dense_scores(run_dir: Path) -> dict[tuple[str, str], float]:
    table = pq.read_table(run_dir / "scores" / "dense").to_pydict()
    pairs = list(zip(table["query_id"], table["train_id"]))
    assert len(set(pairs)) == len(pairs)  # every pair once
    return dict(zip(pairs, table["score"]))


def assert_close(ours: dict, theirs: dict) -> None:
    assert ours.keys() == theirs.keys()
    keys = sorted(theirs)
    expected = np.array([theirs[key] for key in keys])
    np.testing.assert_allclose([ours[key] for key in keys], expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_an_append_equals_a_from_scratch_run_on_the_union(appended, from_scratch, inputs):
    run_dir = appended[0]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "complete" and "append" not in manifest and RunDir(run_dir).damaged_files(manifest) == []
    assert_close(dense_scores(run_dir), dense_scores(from_scratch))

    top, ref = (pq.read_table(d / "scores" / "top_k.parquet").to_pydict() for d in (run_dir, from_scratch))
    assert list(zip(top["query_id"], top["rank"], top["train_id"])) == \
        list(zip(ref["query_id"], ref["rank"], ref["train_id"]))
    np.testing.assert_allclose(top["score"], ref["score"], rtol=1e-5, atol=1e-7)

    union = pq.read_table(inputs["train"]).column("id").to_pylist()
    values, ref_values = (pq.read_table(d / "scores" / "train_values.parquet") for d in (run_dir, from_scratch))
    assert values.column("train_id").to_pylist() == union  # the union's input order
    for column in ("loss", "score_mean", "self_influence"):
        np.testing.assert_allclose(values.column(column).to_numpy(), ref_values.column(column).to_numpy(),
                                   rtol=1e-5, atol=1e-7)
    ours, theirs = (json.loads((d / "manifest.json").read_text()) for d in (run_dir, from_scratch))
    np.testing.assert_allclose(ours["damping"], theirs["damping"], rtol=1e-9)
    assert ours["counts"]["train"] == 24 and ours["index_set_hash"] == theirs["index_set_hash"]
    # The curvature started from the stored run's Gram sums: only the append's 2 new chunks were read.
    assert ours["curvature_input"] == {"stored_gram_sums": True, "chunks_read": 2}
    assert theirs["curvature_input"] == {"stored_gram_sums": False, "chunks_read": 6}


def test_an_append_computes_only_the_new_rows_in_new_chunks_and_keeps_the_stored_ones(appended):
    run_dir, before, _ = appended
    after = ledger(run_dir)
    assert all(after[key] == before[key] for key in before)  # same record, same mtime: never recomputed
    new = {key: record for key, (record, _) in after.items() if key not in before}
    assert {chunk for chunk, _ in new} == {2} and {chunk for chunk, _ in before} == {0, 1}
    assert sum(record["rows"] for record in new.values()) == 8
    manifest = json.loads((run_dir / "manifest.json").read_text())
    [entry] = manifest["appends"]
    assert (entry["new_rows"], entry["rows_already_stored"], entry["stored_rows_not_in_file"]) == (8, 8, 8)
    assert entry["segment"] == 1 and entry["first_chunk"] == 2 and entry["new_chunks"] == 2
    files = [c["file"] for c in manifest["chunks"]["train"]]
    assert len(files) == len(set(files)) == 6
    assert sorted(p.name for p in (run_dir / "gradients" / "train").iterdir()) == sorted(Path(f).name for f in files)


def test_a_failed_append_is_recorded_and_finished_by_running_the_same_command_again(appended):
    run_dir, before, failed = appended
    assert failed["status"] == "failed" and "worker rank 1" in failed["error"]
    assert failed["append"]["first_chunk"] == 2 and failed["append"]["base"]["counts"]["train"] == 16
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert [r["stage"] for r in manifest["restarts"]] == ["gradients"]  # the failed try, kept in the record


def test_appending_a_file_whose_rows_are_all_stored_changes_nothing(appended, inputs, tmp_path):
    run_dir = appended[0]
    mtimes = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}
    manifest = run_job(load_job(write_job(tmp_path, inputs, "day1")), run_dir, append=True)
    assert manifest["status"] == "complete"
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")} == mtimes


def test_an_append_that_would_change_the_numbers_is_refused_before_any_work(from_scratch, inputs, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(from_scratch, run_dir)
    job = write_job(tmp_path / "job", inputs, "day2")
    for override, key in (("compression.k=256", "compression.k"), ("hessian.damping=0.5", "hessian.damping"),
                          ("data.max_length=32", "data.max_length"), ("scoring.top_k=3", "scoring.top_k")):
        with pytest.raises(JobError, match=f"different settings: {key}"):
            run_job(load_job(job, [override]), run_dir, append=True)
    other_model = job_fixtures.tiny_model_dir(tmp_path / "other", "gpt2", seed=1)
    with pytest.raises(JobError, match="model at model.path is not the one"):
        run_job(load_job(job, [f"model.path={other_model}"]), run_dir, append=True)
    with pytest.raises(JobError, match="data.queries differs"):
        run_job(load_job(job, [f"data.queries.path={inputs['later']}"]), run_dir, append=True)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    victim = run_dir / manifest["chunks"]["train"][1]["file"]
    victim.write_bytes(victim.read_bytes()[:100])
    with pytest.raises(JobError, match=f"damaged gradient chunks \\({manifest['chunks']['train'][1]['file']}\\)"):
        run_job(load_job(job), run_dir, append=True)
    assert json.loads((run_dir / "manifest.json").read_text()) == manifest  # refused before touching anything
    (tmp_path / "not_a_run").mkdir()
    (tmp_path / "not_a_run" / "notes.txt").write_text("not a run")
    with pytest.raises(JobError, match="no readable manifest.json"):
        run_job(load_job(job), tmp_path / "not_a_run", append=True)


@pytest.fixture(scope="module")
def queried(shared_ray, from_scratch, inputs, tmp_path_factory):
    """`distinf query` of 3 of the 6 queries against a copy of the from-scratch run, default output."""
    run_dir = tmp_path_factory.mktemp("queried") / "run"
    shutil.copytree(from_scratch, run_dir)
    mtimes = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}
    assert main(["query", str(run_dir), "--queries", str(inputs["later"])]) == 0
    return run_dir, run_dir / "queries" / "later", mtimes


def test_a_query_against_a_stored_run_equals_a_fresh_run_with_those_queries(queried, from_scratch, inputs):
    _, out, _ = queried
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and RunDir(out).damaged_files(manifest) == []
    asked = pq.read_table(inputs["later"]).column("id").to_pylist()
    reference = {key: s for key, s in dense_scores(from_scratch).items() if key[0] in asked}
    assert_close(dense_scores(out), reference)

    top, ref = (pq.read_table(d / "scores" / "top_k.parquet").to_pydict() for d in (out, from_scratch))
    # Per query its proponents, then its opponents, each by rank.
    ref_rows = sorted((asked.index(q), k == "opponent", r, t, s) for q, r, t, s, k in
                      zip(ref["query_id"], ref["rank"], ref["train_id"], ref["score"], ref["kind"]) if q in asked)
    assert list(zip(top["query_id"], top["kind"], top["rank"], top["train_id"])) == \
        [(asked[q], "opponent" if o else "proponent", r, t) for q, o, r, t, _ in ref_rows]
    np.testing.assert_allclose(top["score"], [s for *_, s in ref_rows], rtol=1e-5, atol=1e-7)

    values, ref_values = (pq.read_table(d / "scores" / "train_values.parquet") for d in (out, from_scratch))
    train_ids = values.column("train_id").to_pylist()
    assert train_ids == ref_values.column("train_id").to_pylist()
    for column in ("loss", "self_influence"):  # carried over from the run as stored
        assert values.column(column).to_pylist() == ref_values.column(column).to_pylist()
    mean = [np.mean([reference[(q, t)] for q in asked]) for t in train_ids]
    np.testing.assert_allclose(values.column("score_mean").to_numpy(), mean, rtol=1e-5, atol=1e-5 * np.abs(mean).max())

    grads, ref_grads = (pq.read_table(d / "gradients" / "queries").to_pydict() for d in (out, from_scratch))
    by_id = dict(zip(ref_grads["example_id"], ref_grads["grad"]))
    assert sorted(grads["example_id"]) == sorted(asked)
    for qid, grad in zip(grads["example_id"], grads["grad"]):
        np.testing.assert_allclose(grad, by_id[qid], rtol=1e-5, atol=1e-7)


def test_a_query_may_normalise_its_scores_by_the_runs_stored_self_influence(shared_ray, from_scratch, inputs,
                                                                             tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(from_scratch, run_dir)
    out = tmp_path / "relatif"
    assert main(["query", str(run_dir), "--queries", str(inputs["later"]), "--output", str(out),
                 "--set", "scoring.normalize=relatif"]) == 0
    values = pq.read_table(from_scratch / "scores" / "train_values.parquet").to_pydict()
    root_self = dict(zip(values["train_id"], np.sqrt(values["self_influence"])))
    asked = set(pq.read_table(inputs["later"]).column("id").to_pylist())
    raw = dense_scores(from_scratch)
    assert_close(dense_scores(out), {(q, t): s / root_self[t] for (q, t), s in raw.items() if q in asked})


def test_a_query_computes_no_training_gradient_and_leaves_the_run_as_it_was(queried):
    run_dir, out, mtimes = queried
    assert not (out / "gradients" / "train").exists() and not (out / "curvature").exists()
    now = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if not p.is_relative_to(run_dir / "queries")}
    assert now == mtimes
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["query_of"]["path"] == str(run_dir.resolve()) and manifest["counts"]["queries"] == 3
    assert set(manifest["timings"]) == {"plan", "gradients", "scoring"}
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    again, _ = query_run(run_dir, manifest["config"]["data"]["queries"]["path"])
    assert again == manifest  # scored against this very run already: nothing to do
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_a_query_refuses_a_damaged_curvature_another_model_and_keys_that_change_the_run(from_scratch, inputs,
                                                                                           tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(from_scratch, run_dir)
    with pytest.raises(JobError, match="--set compression.k would score against a different run"):
        query_run(run_dir, inputs["later"], overrides=["compression.k=64"])
    other_model = job_fixtures.tiny_model_dir(tmp_path / "other", "gpt2", seed=1)
    with pytest.raises(JobError, match="model at model.path .* is not the one"):
        query_run(run_dir, inputs["later"], overrides=[f"model.path={other_model}"])
    # The committed version's own curvature, which a query reads (the root copy may lag).
    blocks = committed_root(run_dir, json.loads((run_dir / "manifest.json").read_text())) / "curvature" / "blocks.safetensors"
    data = bytearray(blocks.read_bytes())
    data[-1] ^= 0xFF
    blocks.write_bytes(bytes(data))
    with pytest.raises(JobError, match="blocks.safetensors' does not match the checksum"):
        query_run(run_dir, inputs["later"])
    assert not (run_dir / "queries").exists()


def test_an_append_of_another_file_never_deletes_a_failed_appends_rows_unless_told(shared_ray, inputs, tmp_path,
                                                                                   capsys):
    """Night 2's append fails after committing some rows; night 3 appends another file. Its plan
    has no place for night 2's rows: it is refused, naming them, and only --discard-pending
    deletes them; the run then holds night 1 and night 3's rows."""
    table = pq.read_table(inputs["train"])
    pq.write_table(table.slice(20, 4), tmp_path / "day3.parquet")
    one_batch_chunks = {"runtime": {"chunk_examples": 2}}
    run_dir = tmp_path / "run"
    run_job(load_job(write_job(tmp_path / "day1", inputs, "day1", **one_batch_chunks)), run_dir)
    day2 = write_job(tmp_path / "day2", inputs, "day2", **one_batch_chunks)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DISTINF_TEST_KILL", "rank1:batch2")  # after the append's first chunk is committed
        with pytest.raises(JobError, match="gradient pass"):
            run_job(load_job(day2, ["runtime.max_restarts=0"]), run_dir, append=True)
    failed = json.loads((run_dir / "manifest.json").read_text())
    first = failed["append"]["first_chunk"]
    pending = [record for (chunk, _), (record, _) in ledger(run_dir).items() if chunk >= first]
    pending_ids = {i for r in pending for i in pq.read_table(run_dir / r["file"]).column("example_id").to_pylist()}
    assert pending_ids and pending_ids <= set(pq.read_table(inputs["day2"]).column("id").to_pylist())

    day3 = write_job(tmp_path / "day3", inputs, "train", **one_batch_chunks)
    day3_cfg = load_job(day3, [f"data.train.path={tmp_path / 'day3.parquet'}"])
    with pytest.raises(JobError, match=f"holds {len(pending_ids)} row\\(s\\) committed by an unfinished append") as refused:
        run_job(day3_cfg, run_dir, append=True)
    assert sum(repr(i) in str(refused.value) for i in pending_ids) == min(5, len(pending_ids))  # named
    assert all((run_dir / r["file"]).exists() for r in pending)  # nothing deleted

    manifest = run_job(day3_cfg, run_dir, append=True, discard_pending=True)
    assert manifest["status"] == "complete" and manifest["counts"]["train"] == 20
    values = pq.read_table(run_dir / "scores" / "train_values.parquet").column("train_id").to_pylist()
    expected = table.slice(0, 16).column("id").to_pylist() + table.slice(20, 4).column("id").to_pylist()
    assert values == expected
    assert not (pending_ids - set(expected)) & set(values)  # day 2's rows that day 3 lacks are gone


def test_every_version_is_kept_with_run_id_and_as_of_so_history_reads_in_duckdb(appended):
    import duckdb

    run_dir = appended[0]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    history = manifest["history"]
    assert len(history) == 2 and history[-1] == manifest["version"] == manifest["run_id"]  # night 1, night 2
    for version in history:
        assert json.loads((run_dir / "versions" / version / "manifest.json").read_text())["status"] == "complete"
    rows = duckdb.sql(f"SELECT run_id, min(as_of), count(*) FROM read_parquet('{run_dir}/versions/*/scores/"
                      "train_values.parquet') GROUP BY run_id ORDER BY 2").fetchall()
    assert [(r[0], r[2]) for r in rows] == [(history[0], 16), (history[1], 24)]
    current = pq.read_table(run_dir / "scores" / "top_k.parquet")
    assert set(current.column("run_id").to_pylist()) == {manifest["run_id"]}
    assert (run_dir / "scores" / "top_k.parquet").read_bytes() == \
        (run_dir / "versions" / manifest["run_id"] / "scores" / "top_k.parquet").read_bytes()


def test_a_failed_append_leaves_the_last_version_readable_and_queryable(shared_ray, inputs, tmp_path):
    """The append's reducer dies (no restarts left): the outputs and what the manifest vouches for
    are still night 1's, byte for byte, and `distinf query` scores against them; running the append
    again publishes night 2, and output.keep_versions bounds the history."""
    run_dir = tmp_path / "run"
    night1 = run_job(load_job(write_job(tmp_path / "day1", inputs, "day1")), run_dir)
    outputs = {name: (run_dir / name).read_bytes() for name in night1["files"]}
    day2 = write_job(tmp_path / "day2", inputs, "day2")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DISTINF_TEST_KILL", "reducer")
        with pytest.raises(JobError, match="curvature and scoring failed"):
            run_job(load_job(day2, ["runtime.max_restarts=0"]), run_dir, append=True)
    failed = json.loads((run_dir / "manifest.json").read_text())
    assert failed["status"] == "failed" and failed["append"]["base"]["run_id"] == night1["run_id"]
    assert {name: (run_dir / name).read_bytes() for name in night1["files"]} == outputs  # untouched
    manifest, out = query_run(run_dir, inputs["later"])
    assert manifest["status"] == "complete" and manifest["counts"]["train"] == 16

    night2 = run_job(load_job(day2, ["output.keep_versions=1"]), run_dir, append=True)
    assert night2["status"] == "complete" and night2["counts"]["train"] == 24
    assert sorted(p.name for p in (run_dir / "versions").iterdir()) == [night2["run_id"]] == night2["history"]
