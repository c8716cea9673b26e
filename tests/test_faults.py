"""A job that loses nothing, with real processes: a gradient worker SIGKILLed mid-pass, the driver
SIGKILLed and resumed, a committed chunk corrupted and resumed. Each run ends with outputs equal
to an undisturbed run of the same job (scores to 1e-5, the same example ids, each exactly once),
and chunks committed before the fault are never computed again."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import job_fixtures
from distinf.cli import main
from distinf.config import load_job
from distinf.inputs import plan_job
from distinf.runtime.driver import run_job
from distinf.runtime.errors import JobError
from distinf.runtime.run_dir import RunDir
from distinf.runtime.versions import committed_root
from distinf.store import IntegrityError, read_verified_table

pytestmark = pytest.mark.distributed

# 24 training rows, 12 per rank, 2 per batch: 3 chunks of 2 batches on each rank.
RUNTIME = {"batch_size": 2, "chunk_examples": 4}
TRAIN_CHUNKS = [(c, r) for c in range(3) for r in range(2)]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fault_inputs")
    return job_fixtures.tiny_model_dir(root, "gpt2"), *job_fixtures.corpus_files(root / "data")


def write_job(root: Path, inputs) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    return job_fixtures.job_file(root, *inputs, runtime=RUNTIME)


@pytest.fixture(scope="module")
def undisturbed(shared_ray, inputs, tmp_path_factory):
    root = tmp_path_factory.mktemp("undisturbed")
    cfg = load_job(write_job(root, inputs))
    run_job(cfg)
    return root / "run", plan_job(cfg)


def ledger(run_dir: Path, split: str = "train") -> dict[tuple[int, int], dict]:
    """{(chunk, rank): (record, mtime_ns)} of the committed parts."""
    out = {}
    for path in (run_dir / "ledger" / split).glob("part-*.json"):
        record = json.loads(path.read_text())
        out[(record["chunk"], record["rank"])] = (record, path.stat().st_mtime_ns)
    return out


def assert_same_outputs(run_dir: Path, reference: tuple[Path, object]) -> None:
    ref_dir, plan = reference
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "complete" and RunDir(run_dir).damaged_files(manifest) == []
    for split, ids in (("train", plan.train.ids), ("queries", plan.queries.ids)):
        got = pq.read_table(run_dir / "gradients" / split).column("example_id").to_pylist()
        assert sorted(got) == sorted(ids) and len(set(got)) == len(got)  # none missing, none twice

    def dense(folder):
        table = pq.read_table(folder / "scores" / "dense").to_pydict()
        pairs = list(zip(table["query_id"], table["train_id"]))
        assert len(set(pairs)) == len(pairs) == len(plan.queries.ids) * len(plan.train.ids)
        return dict(zip(pairs, table["score"]))

    ours, theirs = dense(run_dir), dense(ref_dir)
    assert ours.keys() == theirs.keys()
    keys = sorted(theirs)
    expected = np.array([theirs[key] for key in keys])
    np.testing.assert_allclose([ours[key] for key in keys], expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())

    top, ref_top = (pq.read_table(d / "scores" / "top_k.parquet").to_pydict() for d in (run_dir, ref_dir))
    assert list(zip(top["query_id"], top["rank"], top["train_id"])) == \
        list(zip(ref_top["query_id"], ref_top["rank"], ref_top["train_id"]))
    np.testing.assert_allclose(top["score"], ref_top["score"], rtol=1e-5, atol=1e-7)
    values, ref_values = (pq.read_table(d / "scores" / "train_values.parquet") for d in (run_dir, ref_dir))
    assert values.column("train_id").to_pylist() == ref_values.column("train_id").to_pylist() == plan.train.ids
    for column in ("loss", "score_mean", "self_influence"):
        np.testing.assert_allclose(values.column(column).to_numpy(), ref_values.column(column).to_numpy(),
                                   rtol=1e-5, atol=1e-7)


def test_a_sigkilled_gradient_worker_is_replaced_and_the_pass_resumes_from_committed_chunks(
        undisturbed, inputs, tmp_path, monkeypatch, capsys):
    # Rank 1 dies after its 3rd batch: chunk 0 (2 batches) is committed on both ranks, chunk 1 is not.
    monkeypatch.setenv("DISTINF_TEST_KILL", "rank1:batch3")
    made = job_fixtures.recording_metrics(monkeypatch)
    manifest = run_job(load_job(write_job(tmp_path, inputs)))

    # The operator's view: one structured warning, and the restart counted in the Ray metrics.
    [warning] = [line for line in capsys.readouterr().err.splitlines() if "event=restart" in line]
    assert "level=warning logger=distinf.driver" in warning and "stage=gradients" in warning
    assert "worker rank 1 (pid " in warning and "attempt=1" in warning
    assert made["distinf_restarts"].values == {("test", "gradients"): 1}

    [restart] = manifest["restarts"]
    assert restart["stage"] == "gradients" and restart["worker"].startswith("worker rank 1 (pid ")
    assert "ActorDiedError" in restart["error"]
    attempts = {key: record["attempt"] for key, (record, _) in ledger(tmp_path / "run").items()}
    assert attempts == {(c, r): 0 if c == 0 else 1 for c, r in TRAIN_CHUNKS}  # chunk 0 never recomputed
    assert_same_outputs(tmp_path / "run", undisturbed)


def test_a_killed_reducer_is_restarted_and_gives_up_clearly_after_max_restarts(undisturbed, inputs, tmp_path,
                                                                                monkeypatch):
    run_dir = tmp_path / "run"
    shutil.copytree(undisturbed[0], run_dir)
    # A lost output of the committed version (the root copy is a convenience): curvature and
    # scores are redone, no model.
    (committed_root(run_dir, json.loads((run_dir / "manifest.json").read_text())) / "scores" / "top_k.parquet").unlink()
    monkeypatch.setenv("DISTINF_TEST_KILL", "reducer")  # the reducer SIGKILLs itself on its first attempt
    job = write_job(tmp_path, inputs)
    with pytest.raises(JobError, match=r"curvature and scoring failed on attempt 1 \(ActorDiedError.*"
                                       r"runtime.max_restarts = 0 .*--resume"):
        run_job(load_job(job, ["runtime.max_restarts=0"]), run_dir, resume=True)
    assert json.loads((run_dir / "manifest.json").read_text())["status"] == "failed"

    manifest = run_job(load_job(job), run_dir, resume=True)  # 2 restarts allowed: dies once, then completes
    assert [r["stage"] for r in manifest["restarts"]] == ["curvature and scoring"] * 2  # both sessions
    assert manifest["resumed"] == 2
    assert_same_outputs(run_dir, undisturbed)


def driver_past_its_first_chunk(job: Path, run_dir: Path, log_path: Path) -> subprocess.Popen:
    """`distinf run JOB` in a process of its own session, slowed down, returned once both ranks
    have committed chunk 0."""
    log = log_path.open("w")
    driver = subprocess.Popen([sys.executable, "-m", "distinf", "run", str(job)], stdout=log, stderr=log,
                              env={**os.environ, "DISTINF_TEST_BATCH_DELAY": "0.5"}, start_new_session=True)
    deadline = time.time() + 300
    try:
        while len(ledger(run_dir)) < 2:
            assert driver.poll() is None and time.time() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.05)
    except BaseException:
        os.killpg(driver.pid, signal.SIGKILL)
        raise
    return driver


def test_a_sigkilled_driver_is_resumed_without_recomputing_committed_chunks(undisturbed, inputs, tmp_path):
    job = write_job(tmp_path, inputs)
    run_dir = tmp_path / "run"
    driver = driver_past_its_first_chunk(job, run_dir, tmp_path / "driver.log")
    try:
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait()
    finally:
        try:  # anything left of the killed driver's session (its Ray shares its fate, normally)
            os.killpg(driver.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    before = ledger(run_dir)
    assert json.loads((run_dir / "manifest.json").read_text())["status"] == "running"
    assert len(before) < len(TRAIN_CHUNKS), "the driver was killed too late to test anything"

    assert main(["run", str(job)]) == 1  # a non-empty output folder needs --resume
    assert main(["run", str(job), "--resume"]) == 0
    after = ledger(run_dir)
    assert set(after) == set(TRAIN_CHUNKS)
    assert all(after[key] == before[key] for key in before)  # same record, same mtime: not recomputed
    assert_same_outputs(run_dir, undisturbed)


def test_a_corrupt_committed_chunk_is_detected_and_recomputed_on_resume(undisturbed, inputs, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(undisturbed[0], run_dir)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    victim = "gradients/train/part-00001-00001.parquet"
    sha256 = next(c["sha256"] for c in manifest["chunks"]["train"] if c["file"] == victim)
    data = (run_dir / victim).read_bytes()
    (run_dir / victim).write_bytes(data[: len(data) // 2])  # truncated, as by a crash or a full disk
    with pytest.raises(IntegrityError, match="part-00001-00001.parquet"):
        read_verified_table(run_dir / victim, sha256)  # readers refuse it
    assert RunDir(run_dir).damaged_files(manifest) == [victim]
    before = ledger(run_dir)

    cfg = load_job(write_job(tmp_path, inputs))
    run_job(cfg, run_dir, resume=True)
    after = ledger(run_dir)
    recomputed = {key for key in after if after[key] != before[key]}
    assert recomputed == {(1, 0), (1, 1)}  # chunk 1, on both ranks (ZeRO-3 lockstep); nothing else
    assert_same_outputs(run_dir, undisturbed)


def test_resuming_a_complete_intact_run_does_nothing_and_a_different_job_is_refused(undisturbed, inputs, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(undisturbed[0], run_dir)
    mtimes = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}
    cfg = load_job(write_job(tmp_path, inputs))
    assert run_job(cfg, run_dir, resume=True)["status"] == "complete"
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")} == mtimes
    for override, key in (("compression.k=256", "compression.k"), ("runtime.batch_size=4", "runtime.batch_size")):
        with pytest.raises(JobError, match=f"holds a different job: {key}"):
            run_job(load_job(write_job(tmp_path, inputs), [override]), run_dir, resume=True)
    (tmp_path / "data").mkdir()
    shutil.copy(inputs[1], tmp_path / "data" / "train.parquet")
    table = pq.read_table(inputs[1])
    pq.write_table(table.set_column(1, "text", pa.array(["changed"] + table.column("text").to_pylist()[1:])),
                   tmp_path / "data" / "train.parquet")
    with pytest.raises(JobError, match="data.train has changed"):
        run_job(load_job(write_job(tmp_path, inputs), [f"data.train.path={tmp_path / 'data' / 'train.parquet'}"]),
                run_dir, resume=True)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("not a run")
    with pytest.raises(JobError, match="no readable manifest.json"):
        run_job(cfg, tmp_path / "other", resume=True)


def test_a_second_writer_is_refused_while_the_first_runs_and_sigterm_marks_the_run_failed(
        shared_ray, inputs, tmp_path, capsys):
    """`distinf run --resume` (or an append) started while another driver computes the same folder
    is refused by the lease, naming its holder; SIGTERM to that driver (`ray job stop`, a pod's
    deletion) leaves a "failed" manifest and no lease, and every ledger record names the run."""
    job = write_job(tmp_path, inputs)
    run_dir = tmp_path / "run"
    driver = driver_past_its_first_chunk(job, run_dir, tmp_path / "driver.log")
    try:
        holder = json.loads((run_dir / "lease.json").read_text())
        assert holder["pid"] == driver.pid
        for second in (["--resume"], []):
            assert main(["run", str(job), *second]) == 1
            assert f"is being written by run {holder['run_id']}" in capsys.readouterr().err
        assert main(["run", str(job), "--append-to", str(run_dir)]) == 1
        assert "is being written by run" in capsys.readouterr().err
        assert json.loads((run_dir / "manifest.json").read_text())["status"] == "running"  # untouched

        os.kill(driver.pid, signal.SIGTERM)
        assert driver.wait(timeout=120) == 1, (tmp_path / "driver.log").read_text()[-3000:]
    finally:
        try:
            os.killpg(driver.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "failed" and "SIGTERM" in manifest["error"]
    assert manifest["run_id"] == holder["run_id"]
    assert not (run_dir / "lease.json").exists()
    records = [json.loads(p.read_text()) for p in (run_dir / "ledger" / "train").glob("*.json")]
    assert records and {r["run_id"] for r in records} == {holder["run_id"]}


def test_a_hung_worker_is_caught_by_the_stall_timeout_and_the_run_marked_failed(shared_ray, inputs, tmp_path,
                                                                                monkeypatch):
    """A rank that stops making progress (here: sleeping a minute after its first batch) is a
    failure after runtime.stall_timeout, restarted like one; with no restarts left the job fails
    saying so, and the manifest says "failed", not "running" forever."""
    monkeypatch.setenv("DISTINF_TEST_BATCH_DELAY", "60")
    cfg = load_job(write_job(tmp_path, inputs), ["runtime.stall_timeout=15", "runtime.max_restarts=0"])
    started = time.monotonic()
    with pytest.raises(JobError, match="no progress in .* for 15 s \\(runtime.stall_timeout\\)"):
        run_job(cfg)
    assert time.monotonic() - started < 55  # caught well before the first sleep ends
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["status"] == "failed" and "runtime.stall_timeout" in manifest["error"]
    assert manifest["restarts"][0]["error"].startswith("Stalled")
