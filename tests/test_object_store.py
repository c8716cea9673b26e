"""A run written to object storage: a local S3-compatible server (moto) on 127.0.0.1, a 2-worker
ZeRO-3 job into s3://bucket/run whose workers write their chunks straight to the bucket, read
back with pyarrow and queried with DuckDB over the Arrow tables; then `distinf query` against
the stored run in the bucket."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import duckdb
import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from transformers import AutoModelForCausalLM

import distinf
import job_fixtures
from distinf.config import load_job
from distinf.inputs import plan_job
from distinf.runtime.driver import run_job
from distinf.runtime.query import query_run

pytestmark = pytest.mark.distributed

BUCKET = "distinf-test"
RUN = f"s3://{BUCKET}/runs/nightly"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with job_fixtures.moto_s3(tmp_path_factory.mktemp("moto"), BUCKET) as filesystem:
        yield filesystem


@pytest.fixture(scope="module")
def s3_run(s3, tmp_path_factory):
    root = tmp_path_factory.mktemp("s3_run")
    train, queries = job_fixtures.corpus_files(root / "data")
    job = job_fixtures.job_file(root, job_fixtures.tiny_model_dir(root, "gpt2"), train, queries,
                                output={"path": RUN})
    cfg = load_job(job)
    manifest = run_job(cfg)  # a local Ray started by the job, which stops with it
    plan = plan_job(cfg)
    reference = distinf.attribute(
        AutoModelForCausalLM.from_pretrained(cfg.model.path), plan.train.examples, plan.queries.examples,
        config=cfg.model_dump(include={"compression", "hessian", "scoring"}), train_ids=plan.train.ids,
        query_ids=plan.queries.ids, batch_size=3, pad_token_id=plan.pad_token_id)
    return manifest, plan, reference, root


def objects(filesystem: pafs.FileSystem, prefix: str) -> dict[str, int]:
    """{key below prefix: size} of every object there."""
    infos = filesystem.get_file_info(pafs.FileSelector(prefix, recursive=True))
    return {i.path[len(prefix) + 1:]: i.size for i in infos if i.type == pafs.FileType.File}


def test_every_output_is_in_the_bucket_whole_with_the_manifest_last_and_complete(s3, s3_run):
    manifest, plan, _, root = s3_run
    stored = objects(s3, f"{BUCKET}/runs/nightly")
    with s3.open_input_stream(f"{BUCKET}/runs/nightly/manifest.json") as stream:
        assert json.loads(stream.readall()) == json.loads(json.dumps(manifest, default=str))
    assert manifest["status"] == "complete"
    listed = dict(manifest["files"])
    for split in ("train", "queries"):
        listed.update({c["file"]: c["sha256"] for c in manifest["chunks"][split]})
    for name, sha256 in listed.items():  # every file whole: its bytes as committed, read back by pyarrow
        with s3.open_input_stream(f"{BUCKET}/runs/nightly/{name}") as stream:
            assert hashlib.sha256(stream.readall()).hexdigest() == sha256, name
    chunks = {name for name in stored if name.startswith("gradients/")}
    assert chunks == {c["file"] for s in ("train", "queries") for c in manifest["chunks"][s]}
    assert len([n for n in stored if n.startswith("ledger/train/")]) == manifest["counts"]["train_chunks"]
    assert {"index_set.parquet", "rejected.parquet", "curvature/blocks.safetensors", "curvature/blocks.json",
            "scores/top_k.parquet", "scores/train_values.parquet"} <= set(stored)
    assert not [n for n in stored if n.endswith(".tmp") or ".write-probe" in n]  # no temporary object left
    assert not (Path.cwd() / "s3:").exists() and not (root / "s3:").exists()  # nothing went to a local look-alike


def test_the_bucket_reads_back_with_pyarrow_and_duckdb_and_equals_the_one_process_core(s3, s3_run):
    manifest, plan, reference, root = s3_run
    prefix = f"{BUCKET}/runs/nightly"
    top_k = pq.read_table(f"{prefix}/scores/top_k.parquet", filesystem=s3)
    train_values = pq.read_table(f"{prefix}/scores/train_values.parquet", filesystem=s3)
    dense = pq.read_table(f"{prefix}/scores/dense", filesystem=s3)
    grads = pq.read_table(f"{prefix}/gradients/train", filesystem=s3)
    train = pq.read_table(root / "data" / "train.parquet")

    # DuckDB over the Arrow tables (its httpfs extension would be a download): the README's queries.
    proponents = duckdb.sql("""SELECT t.query_id, t.rank, t.train_id, d.text FROM top_k t
                               JOIN train d ON d.id = t.train_id WHERE t.kind = 'proponent'
                               ORDER BY t.query_id, t.rank""").fetchall()
    assert len(proponents) == top_k.num_rows / 2 == 5 * len(plan.queries.ids)
    least = duckdb.sql("SELECT train_id FROM train_values ORDER BY score_mean LIMIT 3").fetchall()
    by_mean = np.argsort(train_values.column("score_mean").to_numpy(), kind="stable")[:3]
    assert [r[0] for r in least] == [train_values.column("train_id")[int(i)].as_py() for i in by_mean]
    assert duckdb.sql("SELECT count(DISTINCT example_id), min(len(grad)), max(len(grad)) FROM grads").fetchall() == \
        [(len(plan.train.ids), manifest["k"], manifest["k"])]

    assert [(r["query_id"], r["rank"], r["train_id"]) for r in top_k.to_pylist()] == \
        [(r["query_id"], r["rank"], r["train_id"]) for r in reference.top_k.to_pylist()]
    q = {x: i for i, x in enumerate(plan.queries.ids)}
    t = {x: i for i, x in enumerate(plan.train.ids)}
    scores = np.full((len(q), len(t)), np.nan)
    for qid, tid, s in zip(*(dense.column(c).to_pylist() for c in ("query_id", "train_id", "score"))):
        scores[q[qid], t[tid]] = s
    np.testing.assert_allclose(scores, reference.scores, rtol=1e-4, atol=1e-4 * np.abs(reference.scores).max())
    assert train_values.column("train_id").to_pylist() == plan.train.ids
    np.testing.assert_allclose(train_values.column("self_influence").to_numpy(), reference.self_influence, rtol=1e-4)


def test_a_query_against_the_run_in_the_bucket_writes_beside_it_and_equals_the_run(s3, s3_run):
    manifest, plan, _, root = s3_run
    queried, out = query_run(RUN, root / "data" / "queries.parquet")  # the run's own queries, scored again
    assert str(out) == f"s3:/{BUCKET}/runs/nightly/queries/queries" and queried["status"] == "complete"
    prefix = f"{BUCKET}/runs/nightly"
    ours = pq.read_table(f"{prefix}/queries/queries/scores/top_k.parquet", filesystem=s3).to_pydict()
    theirs = pq.read_table(f"{prefix}/scores/top_k.parquet", filesystem=s3).to_pydict()
    assert list(zip(ours["query_id"], ours["rank"], ours["train_id"])) == \
        list(zip(theirs["query_id"], theirs["rank"], theirs["train_id"]))
    np.testing.assert_allclose(ours["score"], theirs["score"], rtol=1e-5, atol=1e-7)
    ours, theirs = (pq.read_table(f"{p}/scores/train_values.parquet", filesystem=s3)
                    for p in (f"{prefix}/queries/queries", prefix))
    np.testing.assert_allclose(ours.column("score_mean").to_numpy(), theirs.column("score_mean").to_numpy(),
                               rtol=1e-5, atol=1e-7)
    written = objects(s3, f"{prefix}/queries/queries")
    assert "manifest.json" in written and any(n.startswith("gradients/queries/part-") for n in written)
    assert not any(n.startswith(("gradients/train/", "curvature/")) for n in written)  # the run's, not recomputed


def test_the_lease_on_s3_is_a_conditional_put_refused_while_live_and_taken_over_once_expired(s3):
    """Two writers of one s3:// run directory: the second is refused (If-None-Match), an expired
    lease is taken over by compare-and-swap (If-Match), and the former holder then writes no manifest."""
    from distinf.runtime.lease import LeaseHeld, LeaseLost, acquire, write_manifest
    from distinf.store import read_bytes, run_path

    run_dir = run_path(f"s3://{BUCKET}/runs/leased")
    first = acquire(run_dir, "distinf run", ttl=30)
    try:
        with pytest.raises(LeaseHeld, match=f"being written by run {first.run_id}"):
            acquire(run_dir, "distinf run", ttl=30)
        write_manifest(run_dir, {"status": "running"})
        # The holder stalls past its ttl (its heartbeat thread stopped): a new run may take over.
        first._stop.set()
        later = time.time() + 120
        second = acquire(run_dir, "distinf run", ttl=30, now=lambda: later)
        try:
            with pytest.raises(LeaseLost, match=second.run_id):
                first.check()  # what the former holder does before each manifest write
            with pytest.raises(LeaseLost):
                first.renew()
            assert json.loads(read_bytes(run_dir / "manifest.json"))["run_id"] == first.run_id
            write_manifest(run_dir, {"status": "running"})
            assert json.loads(read_bytes(run_dir / "manifest.json"))["run_id"] == second.run_id
        finally:
            second.release()
    finally:
        first.release()
    acquire(run_dir, "distinf run", ttl=30).release()  # released: free again


@pytest.mark.parametrize("interruption", [ConnectionResetError("connection reset midway"), KeyboardInterrupt()])
def test_an_upload_that_fails_midway_publishes_nothing_and_leaves_no_temporary_object(s3, monkeypatch, interruption):
    """pyarrow completes an output stream's upload when it is closed, on an error too; a write that
    fails after some bytes must leave each name as it was (missing, or its old whole content)."""
    import pyarrow as pa

    from distinf import store

    prefix = f"{BUCKET}/midway-{type(interruption).__name__}"
    run = f"s3://{prefix}"
    store.atomic_write_json({"status": "complete", "version": 1}, f"{run}/manifest.json")
    old = objects(s3, prefix)

    def copy_then_fail(source, target, length=0):
        target.write(source.read(64))  # some bytes reach the store, then the copy is cut off
        raise interruption

    monkeypatch.setattr(store.shutil, "copyfileobj", copy_then_fail)
    table = pa.table({"example_id": [str(i) for i in range(500)], "grad": [[float(i)] * 16 for i in range(500)]})
    writes = [lambda: store.atomic_write_json({"status": "running", "version": 2, "pad": "x" * 4096},
                                              f"{run}/manifest.json"),
              lambda: store.atomic_write_json({"chunk": 0}, f"{run}/ledger/train/00000.json"),
              lambda: store.commit_table(table, f"{run}/gradients/train/part-00000-00000.parquet")]
    for write in writes:
        with pytest.raises(type(interruption)):
            write()
    monkeypatch.undo()

    assert objects(s3, prefix) == old  # no partial object under a name, no temporary object beside one
    with s3.open_input_stream(f"{prefix}/manifest.json") as stream:
        assert json.loads(stream.readall()) == {"status": "complete", "version": 1}
    store.atomic_write_json({"status": "complete", "version": 3}, f"{run}/manifest.json")  # and a whole one lands
    with s3.open_input_stream(f"{prefix}/manifest.json") as stream:
        assert json.loads(stream.readall())["version"] == 3
    assert set(objects(s3, prefix)) == {"manifest.json"}



class _WithoutMove:
    """The moto bucket's filesystem as one without a server-side move (pyarrow's Azure filesystem
    on blobs without a hierarchical namespace)."""

    def __init__(self, filesystem: pafs.FileSystem):
        self.filesystem, self.moves = filesystem, 0

    def __getattr__(self, name):
        return getattr(self.filesystem, name)

    def move(self, src, dest):
        self.moves += 1
        raise NotImplementedError("move is not implemented")


def test_a_store_without_server_side_move_gets_the_whole_object_and_no_temporary_one(s3, monkeypatch):
    from distinf import store

    prefix = f"{BUCKET}/without-move"
    without_move = _WithoutMove(s3)
    monkeypatch.setattr(store, "_filesystem", lambda scheme, netloc: (without_move, netloc))
    store.atomic_write_json({"whole": True}, f"s3://{prefix}/manifest.json")
    assert without_move.moves == 1 and set(objects(s3, prefix)) == {"manifest.json"}
    with s3.open_input_stream(f"{prefix}/manifest.json") as stream:
        assert json.loads(stream.readall()) == {"whole": True}


def test_temporary_objects_of_a_killed_upload_are_removed_but_not_a_nested_query_s(s3):
    from distinf.runtime.run_dir import RunDir
    from distinf.store import run_path

    run_dir = run_path(f"s3://{BUCKET}/runs/leftovers")
    key = f"{BUCKET}/runs/leftovers"
    for name in ("gradients/train/.part-00000-00000.parquet.0a1b2c3d.tmp", "queries/night/lease.json",
                 "queries/night/.manifest.json.4e5f6a7b.tmp", "gradients/train/part-00000-00000.parquet"):
        with s3.open_output_stream(f"{key}/{name}") as out:
            out.write(b"x")
    from distinf.runtime.lease import acquire

    with acquire(run_dir, "distinf run", ttl=30):  # only the lease holder removes anything
        RunDir(run_dir).remove_leftovers()
    left = sorted(info.path[len(key) + 1:] for info in s3.get_file_info(pafs.FileSelector(key, recursive=True))
                  if info.type == pafs.FileType.File)
    assert left == ["gradients/train/part-00000-00000.parquet", "queries/night/.manifest.json.4e5f6a7b.tmp",
                    "queries/night/lease.json"]


def test_the_report_of_a_run_in_the_bucket_is_written_there(s3, s3_run):
    from distinf.cli import main

    assert main(["report", RUN]) == 0
    page = s3.open_input_stream(f"{BUCKET}/runs/nightly/report.html").readall().decode()
    assert "<h2>Queries</h2>" in page and "(gauss_newton)" in page
