"""The commit point's tail (issue 27), on a local folder: once the manifest has switched to a
version, refreshing the root copies is a convenience. A copy the store refuses (CopyObject stops at
5 GiB) leaves them lagging, logged, and never fails the committed run; readers go to the version."""

from __future__ import annotations

import json
import logging

from distinf.runtime import versions
from distinf.runtime.lease import acquire
from distinf.store import file_sha256


def staged_version(run_dir, version: str) -> dict:
    folder = run_dir / "versions" / version
    for name, text in {"curvature/blocks.safetensors": "6 GiB of blocks", "curvature/blocks.json": "{}",
                       "scores/top_k.parquet": f"top-k of {version}"}.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    files = {name: file_sha256(folder / name) for name in ("curvature/blocks.safetensors", "curvature/blocks.json",
                                                           "scores/top_k.parquet")}
    return {"status": "complete", "version": version, "run_id": version, "history": [version], "files": files}


def test_a_root_copy_the_store_refuses_leaves_the_committed_version_readable(tmp_path, monkeypatch, caplog):
    run_dir = tmp_path / "run"
    manifest = staged_version(run_dir, "v2")
    real_copy = versions._replace_with_copy

    def copy_object(source, target):
        if source.name == "blocks.safetensors":
            raise OSError("EntityTooLarge: Your proposed upload exceeds the maximum allowed size")
        real_copy(source, target)

    monkeypatch.setattr(versions, "_replace_with_copy", copy_object)
    with acquire(run_dir, "distinf run", ttl=60), caplog.at_level(logging.WARNING):
        versions.finish(run_dir, manifest)
        assert "could not be refreshed" in caplog.text
        assert json.loads((run_dir / "versions" / "v2" / "manifest.json").read_text())["version"] == "v2"  # marker
        assert versions.committed_root(run_dir, manifest) == run_dir / "versions" / "v2"
        assert versions.root_copies_lag(run_dir, manifest)
        monkeypatch.setattr(versions, "_replace_with_copy", real_copy)
        versions.repair(run_dir, manifest)  # the next run, under the lease, catches up
        assert not versions.root_copies_lag(run_dir, manifest)
    assert (run_dir / "scores" / "top_k.parquet").read_text() == "top-k of v2"
