"""One commit point for readers, and nights that recover on their own, with real Ray workers on
ZeRO-3 (issue 27).

The run directory's manifest is the commit point: a driver killed before it switches leaves every
output that readers see as the last committed version's, and one killed after it leaves a
committed version that distinf reads whole from versions/<id>/ while the root copies lag, until
the next run finishes it. A failed first night is resumed by the next night's append.
"""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest

import job_fixtures
from distinf.cli import main
from distinf.config import load_job
from distinf.runtime.driver import run_job
from distinf.runtime.errors import JobError
from distinf.runtime.lease import Lease
from distinf.runtime.query import query_run
from distinf.runtime.run_dir import RunDir

pytestmark = pytest.mark.distributed

RUNTIME = {"batch_size": 2, "chunk_examples": 4}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("commit_inputs")
    train, queries = job_fixtures.corpus_files(root / "data")
    table = pq.read_table(train)
    pq.write_table(table.slice(0, 16), root / "data" / "day1.parquet")
    pq.write_table(table.slice(8, 16), root / "data" / "day2.parquet")
    return {"model": job_fixtures.tiny_model_dir(root, "gpt2"), "queries": queries,
            "day1": root / "data" / "day1.parquet", "day2": root / "data" / "day2.parquet"}


def write_job(root: Path, inputs: dict, train: str, **runtime) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    return job_fixtures.job_file(root, inputs["model"], inputs[train], inputs["queries"],
                                 runtime={**RUNTIME, **runtime})


def committed_history(run_dir: Path) -> list[tuple[str, int]]:
    """The README's history query: (run_id, rows) of every committed version, oldest first."""
    return duckdb.sql(
        f"SELECT run_id, count(*) FROM read_parquet('{run_dir}/versions/*/scores/train_values.parquet') "
        f"WHERE run_id IN (SELECT run_id FROM read_json('{run_dir}/versions/*/manifest.json', "
        "columns = {run_id: 'VARCHAR'})) GROUP BY run_id ORDER BY min(as_of)").fetchall()


def root_outputs(run_dir: Path, manifest: dict) -> dict[str, bytes]:
    return {name: (run_dir / name).read_bytes() for name in manifest["files"]}


def test_readers_see_one_committed_version_whether_the_driver_dies_before_or_after_the_switch(
        shared_ray, inputs, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    night1 = run_job(load_job(write_job(tmp_path / "day1", inputs, "day1")), run_dir)
    before = root_outputs(run_dir, night1)
    day2 = load_job(write_job(tmp_path / "day2", inputs, "day2"))

    # Killed just before the switch: readers see night 1 everywhere, the staged version is no history.
    switch = Lease.write_manifest

    def killed_at_the_switch(self, manifest):
        if manifest["status"] == "complete":
            raise JobError("killed at the switch")
        switch(self, manifest)

    monkeypatch.setattr(Lease, "write_manifest", killed_at_the_switch)
    with pytest.raises(JobError, match="killed at the switch"):
        run_job(day2, run_dir, append=True)
    monkeypatch.setattr(Lease, "write_manifest", switch)
    stored = json.loads((run_dir / "manifest.json").read_text())
    assert stored["status"] == "failed" and stored["append"]["base"]["run_id"] == night1["run_id"]
    assert root_outputs(run_dir, night1) == before  # not one file of the uncommitted version
    assert committed_history(run_dir) == [(night1["run_id"], 16)]
    assert len(list((run_dir / "versions").iterdir())) == 2  # the staged one is there, and read by nobody

    # Killed just after the switch: the new version is committed; the root copies lag.
    from distinf.runtime import versions

    def killed_after_the_switch(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(versions, "finish", killed_after_the_switch)
    with pytest.raises(KeyboardInterrupt):
        run_job(day2, run_dir, append=True)
    monkeypatch.undo()
    night2 = json.loads((run_dir / "manifest.json").read_text())
    assert night2["status"] == "complete" and night2["version"] == night2["run_id"] != night1["run_id"]
    assert night2["counts"]["train"] == 24 and root_outputs(run_dir, night1) == before  # lagging
    assert RunDir(run_dir).damaged_files(night2) == []  # whole, in versions/<id>/
    queried, _ = query_run(run_dir, inputs["queries"], tmp_path / "q")  # reads the committed version
    assert queried["counts"]["train"] == 24

    # The next night's same command finishes the version first: its marker, then the root copies.
    again = run_job(day2, run_dir, append=True)
    assert again["run_id"] == night2["run_id"]  # nothing to append: the committed version is kept
    assert committed_history(run_dir) == [(night1["run_id"], 16), (night2["run_id"], 24)]
    version = run_dir / "versions" / night2["run_id"]
    assert {n: (run_dir / n).read_bytes() for n in night2["files"] if n != "index_set.parquet"} == \
        {n: (version / n).read_bytes() for n in night2["files"] if n != "index_set.parquet"}


def test_a_failed_first_night_is_resumed_by_the_next_nights_append(shared_ray, inputs, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    job = write_job(tmp_path / "day1", inputs, "day1", max_restarts=0)
    monkeypatch.setenv("DISTINF_TEST_KILL", "reducer")
    assert main(["run", str(job), "--append-to", str(run_dir)]) == 1  # a failure: the scheduler retries
    monkeypatch.delenv("DISTINF_TEST_KILL")
    failed = json.loads((run_dir / "manifest.json").read_text())
    assert failed["status"] == "failed" and "append" not in failed
    chunks = {p.name: p.stat().st_mtime_ns for p in (run_dir / "ledger" / "train").iterdir()}

    assert main(["run", str(job), "--append-to", str(run_dir)]) == 0  # the next night: resumed
    done = json.loads((run_dir / "manifest.json").read_text())
    assert done["status"] == "complete" and done["counts"]["train"] == 16 and done["resumed"] == 1
    assert {p.name: p.stat().st_mtime_ns for p in (run_dir / "ledger" / "train").iterdir()} == chunks


def test_a_failed_first_night_of_another_job_stops_the_schedule_with_the_command_to_run(
        shared_ray, inputs, tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "manifest.json").write_text(json.dumps({"status": "failed", "name": "other", "run_id": "x",
                                                       "config": {"compression": {"k": 1}}}))
    job = write_job(tmp_path / "day1", inputs, "day1")
    assert main(["run", str(job), "--append-to", str(run_dir)]) == 2  # retrying cannot help: exit 2
    said = capsys.readouterr().err
    assert "holds a different job" in said and f"mv {run_dir} {run_dir}.failed-" in said


def test_workers_whose_lease_was_taken_over_mid_pass_commit_nothing_more_and_the_driver_stops(
        shared_ray, inputs, tmp_path, monkeypatch):
    """A successor takes the lease while the gradient pass runs (the holder's heartbeat had lapsed):
    each rank checks the fencing token before its next commit, so no chunk is committed after the
    ones in flight, and the driver stops with LeaseLost instead of running on to publish."""
    import threading
    import time

    from distinf.runtime.lease import LeaseLost

    run_dir = tmp_path / "run"
    job = load_job(write_job(tmp_path / "job", inputs, "day1", chunk_examples=2))  # 4 chunks per rank
    monkeypatch.setenv("DISTINF_TEST_BATCH_DELAY", "2")
    ledger, taken = run_dir / "ledger" / "train", {}

    def take_over_after_the_first_commit():
        deadline = time.time() + 300
        while not (ledger.exists() and any(ledger.glob("part-*.json"))) and time.time() < deadline:
            time.sleep(0.05)
        lease = json.loads((run_dir / "lease.json").read_text())
        taken["records"] = len(list(ledger.glob("part-*.json")))
        (run_dir / "lease.json").write_text(json.dumps({
            **lease, "run_id": "successor", "generation": lease["generation"] + 1, "pid": 1,
            "heartbeat": time.time(), "expires": time.time() + 600}))

    thread = threading.Thread(target=take_over_after_the_first_commit, daemon=True)
    thread.start()
    with pytest.raises(LeaseLost, match="successor"):
        run_job(job, run_dir)
    thread.join(timeout=10)
    committed = len(list(ledger.glob("part-*.json")))
    assert committed <= taken["records"] + 2  # at most what each of the 2 ranks had fenced already
    assert committed < 8 and not (run_dir / "versions").exists()
    assert json.loads((run_dir / "lease.json").read_text())["run_id"] == "successor"  # never released by the loser
