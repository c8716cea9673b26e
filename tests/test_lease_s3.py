"""The lease on S3 (a local moto server, no Ray): released only If-Match the ETag it read, and a
store that ignores If-None-Match refused up front, since no lease could exclude a second writer
there (issue 27)."""

from __future__ import annotations

import json
import time

import pyarrow.fs as pafs
import pytest

import job_fixtures
from distinf.runtime import lease as leases
from distinf.runtime.errors import JobError
from distinf.store import read_bytes, run_path

BUCKET = "distinf-lease"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with job_fixtures.moto_s3(tmp_path_factory.mktemp("moto"), BUCKET) as filesystem:
        yield filesystem


def test_a_release_never_deletes_a_lease_taken_over_after_it_was_read(s3, monkeypatch):
    run_dir = run_path(f"s3://{BUCKET}/runs/release")
    first = leases.acquire(run_dir, "distinf run", ttl=30)
    first._stop.set()
    real_read, successor = leases._read, []

    def read_then_taken_over(path):
        found = real_read(path)
        if not successor:  # the holder read its own lease; a taker whose clock says it expired goes first
            successor.append(None)
            later = time.time() + 120
            successor[0] = leases.acquire(run_dir, "distinf run", ttl=30, now=lambda: later)
        return found

    monkeypatch.setattr(leases, "_read", read_then_taken_over)
    first.release()
    monkeypatch.setattr(leases, "_read", real_read)
    try:
        assert json.loads(read_bytes(run_dir / "lease.json"))["run_id"] == successor[0].run_id
    finally:
        successor[0].release()


def test_a_store_that_ignores_if_none_match_is_refused(s3, monkeypatch):
    real_client = leases._s3_client

    def ignoring_conditions():
        client = real_client()
        put = client.put_object

        def put_object(**kwargs):
            kwargs.pop("IfNoneMatch", None)  # as older MinIO and Ceph do, without a word
            return put(**kwargs)

        client.put_object = put_object
        return client

    monkeypatch.setattr(leases, "_s3_client", ignoring_conditions)
    with pytest.raises(JobError, match="ignores conditional writes"):
        leases.acquire(run_path(f"s3://{BUCKET}/runs/ignored"), "distinf run", ttl=30)
    monkeypatch.setattr(leases, "_s3_client", real_client)
    leases.acquire(run_path(f"s3://{BUCKET}/runs/honoured"), "distinf run", ttl=30).release()
    left = s3.get_file_info(pafs.FileSelector(f"{BUCKET}/runs", recursive=True, allow_not_found=True))
    assert not [i.path for i in left if ".probe-" in i.path]  # the probe leaves nothing behind
