"""The run directory's lease on a local disk: one holder, refused while its heartbeat is live, taken
over once it has expired (by one taker only) or at once when its process on this host is gone,
and a holder whose lease was taken over writes no manifest. (Object storage: test_object_store.)"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distinf.runtime import lease as leases
from distinf.runtime.lease import LeaseHeld, LeaseLost, acquire, write_manifest
from distinf.runtime.run_dir import RunDir


def this_namespace() -> dict:
    """The PID namespace and boot of this process, as a lease records them."""
    return {"pid_ns": str(os.stat("/proc/self/ns/pid").st_ino),
            "boot_id": Path("/proc/sys/kernel/random/boot_id").read_text().strip()}


def stale_lease(run_dir, **fields) -> dict:
    body = {"run_id": "old-run", "purpose": "distinf run", "host": "another-host", "pid": 1,
            "heartbeat": time.time() - 600, "expires": time.time() - 480, "ttl": 120, **fields}
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "lease.json").write_text(json.dumps(body))
    return body


def test_a_live_lease_is_refused_naming_its_holder_and_released_on_exit(tmp_path):
    with acquire(tmp_path / "run", "distinf run", ttl=60) as first:
        assert RunDir(tmp_path / "run").is_unused()  # a folder holding only its lease holds no run
        with pytest.raises(LeaseHeld, match=f"being written by run {first.run_id} .*pid {os.getpid()}"):
            acquire(tmp_path / "run", "distinf run", ttl=60)
    assert not (tmp_path / "run" / "lease.json").exists()
    acquire(tmp_path / "run", "distinf run", ttl=60).release()


def test_an_expired_lease_is_taken_over_by_one_taker_only(tmp_path):
    stale = stale_lease(tmp_path)
    assert leases._swap(tmp_path / "lease.json", lambda found: found == stale, {"run_id": "first-taker"}, None) is None
    assert leases._swap(tmp_path / "lease.json", lambda found: found == stale, {"run_id": "second-taker"}, None)
    assert json.loads((tmp_path / "lease.json").read_text())["run_id"] == "first-taker"

    stale_lease(tmp_path / "run")
    with acquire(tmp_path / "run", "distinf run", ttl=60) as taken:
        assert json.loads((tmp_path / "run" / "lease.json").read_text())["run_id"] == taken.run_id


def test_a_lease_whose_heartbeat_is_live_is_not_taken_over(tmp_path):
    stale_lease(tmp_path, expires=time.time() + 60, heartbeat=time.time())
    with pytest.raises(LeaseHeld, match="old-run .*expires \\(in [0-9]+ s\\)"):
        acquire(tmp_path, "distinf run", ttl=60)


def test_a_lease_of_a_dead_process_on_this_host_is_taken_over_at_once(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    stale_lease(tmp_path, host=socket.gethostname(), pid=gone.pid, expires=time.time() + 600, **this_namespace())
    acquire(tmp_path, "distinf run", ttl=60).release()


def test_the_heartbeat_renews_and_a_taken_over_holder_writes_no_manifest(tmp_path):
    lease = acquire(tmp_path, "distinf run", ttl=40)  # renewed every 10 s by its thread
    try:
        before = json.loads((tmp_path / "lease.json").read_text())["heartbeat"]
        lease.renew()
        assert json.loads((tmp_path / "lease.json").read_text())["heartbeat"] > before
        write_manifest(tmp_path, {"status": "running"})
        assert json.loads((tmp_path / "manifest.json").read_text())["run_id"] == lease.run_id

        stale_lease(tmp_path, run_id="successor", host="another-host", expires=time.time() + 600)
        with pytest.raises(LeaseLost, match="successor"):
            write_manifest(tmp_path, {"status": "complete"})
        with pytest.raises(LeaseLost):
            lease.renew()
        assert json.loads((tmp_path / "manifest.json").read_text())["status"] == "running"
    finally:
        lease.release()
    assert json.loads((tmp_path / "lease.json").read_text())["run_id"] == "successor"  # not ours: kept


def test_leftovers_of_a_nested_query_folder_are_left_to_its_own_writer(tmp_path):
    (tmp_path / "gradients").mkdir()
    (tmp_path / "gradients" / ".part.abc.tmp").write_text("killed mid-write")
    query = tmp_path / "queries" / "night"
    query.mkdir(parents=True)
    (query / "lease.json").write_text("{}")
    (query / ".top_k.parquet.def.tmp").write_text("being written")
    with acquire(tmp_path, "distinf run", ttl=60):
        RunDir(tmp_path).remove_leftovers()
    assert not (tmp_path / "gradients" / ".part.abc.tmp").exists()
    assert (query / ".top_k.parquet.def.tmp").exists()


# ---------------------------------------------------------------------------------------------
# Fencing: a holder whose lease was taken over writes nothing more, anywhere (issue 27)


def taken_over(run_dir):
    """A lease held by this process, then taken over by a live successor (our heartbeat had lapsed)."""
    lease = acquire(run_dir, "distinf run", ttl=60)
    stale_lease(run_dir, run_id="successor", generation=getattr(lease, "generation", 0) + 1, heartbeat=time.time(),
                expires=time.time() + 600)
    return lease


def test_a_taken_over_worker_commits_no_chunk_and_no_ledger_record(tmp_path):
    import pickle

    import pyarrow as pa

    from distinf.runtime.layout import chunk_path, record_path
    from distinf.runtime.ledger import commit_chunk

    lease = acquire(tmp_path, "distinf run", ttl=60)
    try:
        fence = pickle.loads(pickle.dumps(lease.fence()))  # as a Ray worker receives it
        table = pa.table({"example_id": ["a"]})
        commit_chunk(tmp_path, "train", 0, 0, ["a"], table, [], fence=fence.check)  # still ours: committed
        assert record_path(tmp_path, "train", 0, 0).exists()
        stale_lease(tmp_path, run_id="successor", generation=lease.generation + 1, heartbeat=time.time(),
                    expires=time.time() + 600)
        with pytest.raises(LeaseLost, match="successor"):
            commit_chunk(tmp_path, "train", 0, 1, ["b"], pa.table({"example_id": ["b"]}), [], fence=fence.check)
        assert not record_path(tmp_path, "train", 0, 1).exists() and not chunk_path(tmp_path, "train", 0, 1).exists()
    finally:
        lease.release()


def test_a_fence_of_an_expired_lease_refuses_even_when_nobody_took_it_yet(tmp_path):
    lease = acquire(tmp_path, "distinf run", ttl=60)
    lease._stop.set()
    try:
        body = json.loads((tmp_path / "lease.json").read_text())
        (tmp_path / "lease.json").write_text(json.dumps({**body, "expires": time.time() - 1}))
        with pytest.raises(LeaseLost, match="expired"):
            lease.fence().check()
    finally:
        lease.release()


def test_a_taken_over_driver_prunes_publishes_removes_and_discards_nothing(tmp_path):
    from distinf.runtime import versions
    from distinf.runtime.incremental import refuse_or_discard

    run = tmp_path / "run"
    staged = run / "versions" / "successor" / "scores"
    staged.mkdir(parents=True)
    (staged / "top_k.parquet").write_text("the successor's staged version")
    mine = run / "versions" / "mine"
    (mine / "scores").mkdir(parents=True)
    (mine / "scores" / "top_k.parquet").write_text("the stale holder's version")
    (run / "scores").mkdir()
    (run / "scores" / "top_k.parquet").write_text("the committed root copy")
    (run / "gradients").mkdir()
    (run / "gradients" / ".part.abc.tmp").write_text("the successor's upload in progress")
    pending = run / "gradients" / "part-00000-00009.parquet"
    pending.write_text("a failed append's chunk")
    lease = taken_over(run)
    try:
        with pytest.raises(LeaseLost):
            versions.prune(run, ["mine"])
        with pytest.raises(LeaseLost):
            versions.refresh_root_copies(run, mine, ["scores/top_k.parquet"])
        with pytest.raises(LeaseLost):
            versions.finish(run, {"version": "mine", "history": ["mine"], "files": {"scores/top_k.parquet": "x"}})
        with pytest.raises(LeaseLost):
            RunDir(run).remove_leftovers()
        with pytest.raises(LeaseLost):
            refuse_or_discard(RunDir(run), [pending], discard=True)
        with pytest.raises(LeaseLost):
            write_manifest(run, {"status": "complete"})
    finally:
        lease.release()
    assert (staged / "top_k.parquet").read_text() == "the successor's staged version"
    assert (run / "scores" / "top_k.parquet").read_text() == "the committed root copy"
    assert not (mine / "manifest.json").exists() and not (run / "manifest.json").exists()
    assert (run / "gradients" / ".part.abc.tmp").exists() and pending.exists()


def test_every_take_has_a_larger_generation_than_the_one_it_took_over_even_with_a_clock_behind(tmp_path):
    first = acquire(tmp_path, "distinf run", ttl=60)
    first._stop.set()
    body = json.loads((tmp_path / "lease.json").read_text())
    (tmp_path / "lease.json").write_text(json.dumps({**body, "expires": time.time() - 7200}))
    second = acquire(tmp_path, "distinf run", ttl=60, now=lambda: time.time() - 3600)  # the taker's clock is behind
    try:
        assert second.generation == first.generation + 1
        with pytest.raises(LeaseLost):
            first.fence().check()
        second.fence().check()
    finally:
        second.release()
        first.release()


# ---------------------------------------------------------------------------------------------
# The local lease is a compare-and-swap; unreadable and foreign-namespace leases are held


TAKER = """
import sys, time
from pathlib import Path
from distinf.runtime.lease import LeaseHeld, acquire
try:
    lease = acquire(Path(sys.argv[1]), "the taker", ttl=60, now=lambda: time.time() + 3600)
    print("TOOK", lease.run_id, flush=True)
    lease._stop.set()
except LeaseHeld as error:
    print("HELD", error, flush=True)
"""


def test_a_renewal_interleaved_with_a_takeover_never_overwrites_the_new_holder(tmp_path, monkeypatch):
    """The holder renews just as a taker (whose clock says the lease expired) takes over: the renewal
    reads the lease, the taker runs, then the renewal writes. Both may not end up believing they hold it."""
    lease = acquire(tmp_path, "distinf run", ttl=60)
    lease._stop.set()
    real_read, taker = leases._read, []

    def read_then_let_the_taker_in(path):
        found = real_read(path)
        if not taker and Path(path).name == "lease.json":
            taker.append(subprocess.Popen([sys.executable, "-c", TAKER, str(tmp_path)], stdout=subprocess.PIPE,
                                          text=True, env={**os.environ, "PYTHONPATH": os.getcwd()}))
            try:
                taker[0].wait(timeout=30)  # it finishes in a few seconds, unless the renewal's lock holds it
            except subprocess.TimeoutExpired:
                pass
        return found

    monkeypatch.setattr(leases, "_read", read_then_let_the_taker_in)
    try:
        try:
            lease.renew()
            renewed = True
        except LeaseLost:
            renewed = False
        monkeypatch.setattr(leases, "_read", real_read)
        said = taker[0].communicate(timeout=60)[0]
        holder = json.loads((tmp_path / "lease.json").read_text())["run_id"]
        if said.startswith("TOOK"):  # before the renewal's write, or (on a slow start) after it
            assert holder == said.split()[1], "the renewal overwrote the new holder's lease"
            with pytest.raises(LeaseLost):  # either way the old holder knows it holds the lease no more
                lease.check()
        else:
            assert said.startswith("HELD") and renewed and holder == lease.run_id, said
    finally:
        lease.release()


def test_an_empty_or_unreadable_lease_counts_as_held_until_its_mtime_plus_the_ttl(tmp_path):
    (tmp_path / "lease.json").write_bytes(b"")  # created with O_EXCL, not written yet
    with pytest.raises(LeaseHeld, match="unreadable"):
        acquire(tmp_path, "distinf run", ttl=60)
    (tmp_path / "lease.json").write_text('{"run_id": "half-writ')
    with pytest.raises(LeaseHeld):
        acquire(tmp_path, "distinf run", ttl=60)
    past = time.time() - 120
    os.utime(tmp_path / "lease.json", (past, past))  # nobody wrote it for longer than the ttl: taken over
    acquire(tmp_path, "distinf run", ttl=60).release()


@pytest.mark.parametrize("other", [{"pid_ns": "4026531999"}, {"boot_id": "another-boot"}])
def test_a_dead_pid_in_another_pid_namespace_or_boot_is_no_shortcut(tmp_path, other):
    """Two containers with host networking share a hostname, not their pids: a live lease is kept."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    stale_lease(tmp_path, host=socket.gethostname(), pid=gone.pid, heartbeat=time.time(), expires=time.time() + 117,
                **{**this_namespace(), **other})
    with pytest.raises(LeaseHeld, match="old-run"):
        acquire(tmp_path, "distinf run", ttl=60)


# ---------------------------------------------------------------------------------------------
# The heartbeat: survives any error, gives up after ttl/2, renews only while the main loop advances


def slow_down():
    from botocore.exceptions import ClientError

    return ClientError({"Error": {"Code": "SlowDown", "Message": "Please reduce your request rate."}}, "PutObject")


def heartbeat(run_dir) -> float:
    return json.loads((run_dir / "lease.json").read_text())["heartbeat"]


def test_the_heartbeat_survives_an_error_that_is_not_an_oserror_and_renews_after_it(tmp_path, monkeypatch):
    real_swap, failures = leases._swap, []

    def throttled(path, expected, body, etag, create=False):
        if body is not None and len(failures) < 2:
            failures.append(1)
            raise slow_down()
        return real_swap(path, expected, body, etag, create)

    lease = acquire(tmp_path, "distinf run", ttl=4.0)  # renewed every 1 s, retried after 0.25 s, then 0.5 s
    monkeypatch.setattr(leases, "_swap", throttled)
    try:
        first = heartbeat(tmp_path)
        deadline = time.time() + 10
        while heartbeat(tmp_path) == first and time.time() < deadline:
            leases.tick()
            time.sleep(0.1)
        assert len(failures) == 2 and heartbeat(tmp_path) > first
        leases.tick()  # still held
    finally:
        lease.release()


def test_a_lease_not_renewed_within_half_its_ttl_stops_the_driver(tmp_path, monkeypatch):
    def always_throttled(path, expected, body, etag, create=False):
        raise slow_down()

    lease = acquire(tmp_path, "distinf run", ttl=1.0)
    monkeypatch.setattr(leases, "_swap", always_throttled)
    try:
        time.sleep(0.8)
        with pytest.raises(LeaseLost, match="not renewed|could not be renewed"):
            leases.tick()  # what the driver's polling loops call: the run stops, its workers are killed
        with pytest.raises(LeaseLost):
            write_manifest(tmp_path, {"status": "running"})
    finally:
        monkeypatch.undo()
        lease.release()


def test_the_heartbeat_stops_renewing_when_the_main_loop_does_not_advance(tmp_path):
    lease = acquire(tmp_path, "distinf run", ttl=1.0, tick_window=0.4)  # renewed every 0.25 s while ticked
    try:
        for _ in range(8):
            leases.tick()
            time.sleep(0.1)
        ticking = heartbeat(tmp_path)
        time.sleep(1.5)  # the main loop hangs
        assert heartbeat(tmp_path) - ticking < 0.5  # at most the renewal already due, then none
        with pytest.raises(LeaseLost, match="main loop made no progress"):
            leases.tick()
    finally:
        lease.release()
