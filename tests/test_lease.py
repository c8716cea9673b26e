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

import pytest

from distinf.runtime import lease as leases
from distinf.runtime.lease import LeaseHeld, LeaseLost, acquire, write_manifest
from distinf.runtime.run_dir import RunDir


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
    assert leases._take_over(tmp_path / "lease.json", stale, None, {"run_id": "first-taker"})
    assert not leases._take_over(tmp_path / "lease.json", stale, None, {"run_id": "second-taker"})
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
    stale_lease(tmp_path, host=socket.gethostname(), pid=gone.pid, expires=time.time() + 600)
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
    RunDir(tmp_path).remove_leftovers()
    assert not (tmp_path / "gradients" / ".part.abc.tmp").exists()
    assert (query / ".top_k.parquet.def.tmp").exists()
