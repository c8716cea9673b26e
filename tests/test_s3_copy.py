"""Root copies on S3 over CopyObject's 5 GiB (issue 27): a committed version's large outputs
(curvature/blocks.safetensors with hessian.blocks: full at a large k) are copied to the run
directory's root in parts (CreateMultipartUpload, UploadPartCopy of byte ranges, Complete), and a
failed part aborts the upload. A local moto server, no Ray.

The copy limit and the part size are lowered here so that a 12 MiB object takes the multipart
path (moto, like S3, takes parts of 5 MiB or more). moto does not refuse a CopyObject over 5 GiB,
so the path taken is read from the copy's ETag: S3 gives an object assembled from N parts an
ETag ending in "-N", and one made by CopyObject the MD5 of its bytes.
"""

from __future__ import annotations

import hashlib
import os

import boto3
import pytest

import job_fixtures
from distinf import store
from distinf.runtime import versions
from distinf.runtime.lease import acquire
from distinf.store import file_sha256, read_bytes, run_path

BUCKET = "distinf-copy"
MiB = 1 << 20


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with job_fixtures.moto_s3(tmp_path_factory.mktemp("moto"), BUCKET) as filesystem:
        yield filesystem


@pytest.fixture
def small_limits(monkeypatch):
    monkeypatch.setattr(store, "_SERVER_COPY_LIMIT", 1 * MiB)
    monkeypatch.setattr(store, "_COPY_PART_BYTES", 5 * MiB, raising=False)


def staged_version(s3, run_dir, version: str, blocks: bytes) -> dict:
    """A version folder in the bucket with a large and two small outputs, and its manifest."""
    contents = {"curvature/blocks.safetensors": blocks, "curvature/blocks.json": b"{}",
                "scores/top_k.parquet": f"top-k of {version}".encode()}
    prefix = f"{BUCKET}/{str(run_dir).split(BUCKET + '/', 1)[1]}/versions/{version}"
    for name, data in contents.items():
        with s3.open_output_stream(f"{prefix}/{name}") as stream:
            stream.write(data)
    files = {name: hashlib.sha256(data).hexdigest() for name, data in contents.items()}
    return {"status": "complete", "version": version, "run_id": version, "history": [version], "files": files}


def etag(run_dir, name: str) -> str:
    key = f"{str(run_dir).split(BUCKET + '/', 1)[1]}/{name}"
    return boto3.client("s3", region_name="us-east-1").head_object(Bucket=BUCKET, Key=key)["ETag"].strip('"')


def test_a_root_copy_over_the_copy_limit_is_copied_in_parts_and_small_ones_in_one_request(s3, small_limits):
    run_dir = run_path(f"s3://{BUCKET}/runs/large")
    blocks = os.urandom(12 * MiB + 12345)  # parts of 5, 5 and 2 MiB and a bit
    manifest = staged_version(s3, run_dir, "v1", blocks)
    with acquire(run_dir, "distinf run", ttl=60):
        versions.finish(run_dir, manifest)
        assert not versions.root_copies_lag(run_dir, manifest)
    assert read_bytes(run_dir / "curvature" / "blocks.safetensors") == blocks
    assert file_sha256(run_dir / "curvature" / "blocks.safetensors") == manifest["files"]["curvature/blocks.safetensors"]
    assert etag(run_dir, "curvature/blocks.safetensors").endswith("-3")  # assembled from 3 copied parts
    assert read_bytes(run_dir / "scores" / "top_k.parquet") == b"top-k of v1"
    assert etag(run_dir, "scores/top_k.parquet") == hashlib.md5(b"top-k of v1").hexdigest()  # one CopyObject


def test_a_multipart_copy_that_fails_midway_is_aborted_and_publishes_nothing(s3, small_limits, monkeypatch):
    run_dir = run_path(f"s3://{BUCKET}/runs/aborted")
    source, target = run_dir / "versions" / "v1" / "curvature" / "blocks.safetensors", run_dir / "blocks.safetensors"
    staged_version(s3, run_dir, "v1", os.urandom(11 * MiB))
    real_client = store._s3_client

    def failing_second_part():
        client = real_client()
        copy_part = client.upload_part_copy

        def upload_part_copy(**kwargs):
            if kwargs["PartNumber"] == 2:
                from botocore.exceptions import EndpointConnectionError

                raise EndpointConnectionError(endpoint_url="http://s3")
            return copy_part(**kwargs)

        client.upload_part_copy = upload_part_copy
        return client

    monkeypatch.setattr(store, "_s3_client", failing_second_part)
    with pytest.raises(OSError, match="multipart copy failed"):
        store.server_copy(source, target)
    assert not store.is_file(target)
    uploads = boto3.client("s3", region_name="us-east-1").list_multipart_uploads(Bucket=BUCKET)
    assert not uploads.get("Uploads")  # aborted: no parts left behind to be billed
