"""Versions of a run's outputs, and the one commit point readers go through.

Each run or append stages its curvature, scores and rejected rows in `versions/<run_id>/`. The
run directory's `manifest.json` is the commit point: a version is committed in the one atomic
write that makes the manifest say "complete" with `version: <run_id>` and the sha256 of each of
its files. In order:

1. the version is staged whole in `versions/<run_id>/` (no reader trusts it yet);
2. the switch: `manifest.json` says "complete" for it (`Run.publish`, under the lease);
3. the version's completion marker: `versions/<run_id>/manifest.json`, a copy of that manifest;
4. versions beyond `output.keep_versions` are deleted, then the root copies (`scores/`,
   `curvature/`, `rejected.parquet`) are refreshed from the version, one atomic replace each.

The root copies are a convenience for a person with DuckDB: they may lag the manifest (the
driver was killed in step 4, or during it, when `scores/` can hold files of two versions).
distinf itself reads the committed version's folder (`committed_root`), which is whole from step
2 on; a later run or `--resume` under the lease finishes steps 3 and 4 (`finish`).

History, committed versions only: the completion markers name them, and every output row carries
`run_id` and `as_of`, so `read_parquet('RUN/versions/*/scores/top_k.parquet')` filtered on
`run_id IN (SELECT run_id FROM read_json('RUN/versions/*/manifest.json', ...))` (docs/operations.md, "Append").
"""

from __future__ import annotations

import logging
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa

from distinf.runtime.curvature_files import LAYOUT
from distinf.runtime.layout import DENSE, INDEX_SET, MANIFEST, VERSIONS, version_dir
from distinf.runtime.lease import check_held
from distinf.store import (atomic_write_json, file_sha256, is_file, is_remote, list_files, remove,
                           server_copy, temporary_path)


def stamp(table: pa.Table, run_id: str, as_of: datetime) -> pa.Table:
    """`table` with the version's run_id and as_of (UTC) as its last two columns."""
    n = table.num_rows
    return (table.append_column("run_id", pa.array([run_id] * n, pa.string()))
                 .append_column("as_of", pa.array([as_of] * n, pa.timestamp("us", tz="UTC"))))


def now() -> datetime:
    return datetime.now(timezone.utc)


def committed_root(run_dir: Path, manifest: dict) -> Path:
    """Where the outputs of the complete `manifest` are read whole: its version's folder, or the
    run directory itself for a run written before versions had a commit point (or whose folder is gone)."""
    version = manifest.get("version")
    if version and is_file(version_dir(run_dir, version) / LAYOUT):
        return version_dir(run_dir, version)
    return Path(run_dir)


def complete_versions(run_dir: Path, committed: str | None) -> list[str]:
    """The versions with a completion marker, and the `committed` one (its marker may not be
    written yet), oldest first (names sort by time)."""
    folders = {path.relative_to(Path(run_dir) / VERSIONS).parts[0]: path
               for path in list_files(Path(run_dir) / VERSIONS, recursive=True)
               if path.name == MANIFEST and path.parent.parent == Path(run_dir) / VERSIONS}
    return sorted(set(folders) | ({committed} if committed else set()))


def history(run_dir: Path, committed: str | None, keep: int, new: str) -> list[str]:
    """The versions kept once `new` is committed: the newest `keep` of them, `new` last."""
    return ([v for v in complete_versions(run_dir, committed) if v != new] + [new])[-keep:]


def finish(run_dir: Path, manifest: dict) -> None:
    """Steps 3 and 4 for the committed `manifest` (idempotent, under the lease): its version's
    completion marker, the pruning of every version not in its history, then the root copies."""
    version = manifest.get("version")
    if not version:
        return
    folder = version_dir(run_dir, version)
    check_held(run_dir)
    if not is_file(folder / MANIFEST):
        atomic_write_json(manifest, folder / MANIFEST)
    prune(run_dir, manifest.get("history") or [version])
    names = [name for name in manifest.get("files", {}) if name != INDEX_SET]
    try:
        refresh_root_copies(run_dir, folder, names)
    except OSError as error:  # committed already: readers go to the version's folder
        logging.getLogger("distinf.driver").warning(
            f"version {version} is committed, but its root copies could not be refreshed ({error}); distinf "
            f"reads versions/{version}/, and the next run refreshes them", extra={"event": "root_copies_lag"})


def repair(run_dir: Path, manifest: dict) -> None:
    """Finish a committed version whose driver was killed after the switch (no completion marker,
    root copies that lag); nothing to do for one finished whole."""
    version = manifest.get("version")
    if version and (not is_file(version_dir(run_dir, version) / MANIFEST) or root_copies_lag(run_dir, manifest)):
        finish(run_dir, manifest)


def refresh_root_copies(run_dir: Path, version: Path, names: list[str]) -> None:
    """Put each `version/name` at `run_dir/name` (one atomic replace each), and delete dense score
    parts of the run directory that the version does not have. Fenced before each file."""
    for name in names:
        check_held(run_dir)
        _replace_with_copy(version / name, Path(run_dir) / name)
    staged = {p.name for p in list_files(version / DENSE)}
    for path in list_files(Path(run_dir) / DENSE):
        if path.name.startswith("part-") and path.name not in staged:
            check_held(run_dir)
            remove(path)


def root_copies_lag(run_dir: Path, manifest: dict) -> bool:
    """True when a root copy of the committed version's outputs is missing or not its bytes, or
    the root holds a dense part the version does not."""
    source = committed_root(run_dir, manifest)
    if source == Path(run_dir):
        return False
    present = list_files(Path(run_dir), recursive=True)
    files = manifest.get("files", {})
    extra = [p for p in list_files(Path(run_dir) / DENSE) if str(p.relative_to(run_dir)) not in files]
    return bool(extra) or any(Path(run_dir) / name not in present or file_sha256(Path(run_dir) / name) != sha256
                              for name, sha256 in files.items() if name != INDEX_SET)


def _replace_with_copy(source: Path, target: Path) -> None:
    if is_remote(source):  # a server-side copy: the object appears whole under its name
        server_copy(source, target)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(target)
    try:
        os.link(source, tmp)  # no second copy of the bytes on one filesystem
    except OSError:
        shutil.copyfile(source, tmp)
    os.replace(tmp, target)


def prune(run_dir: Path, keep: list[str]) -> None:
    """Delete every version folder but those in `keep` (under the lease: a run whose lease was
    taken over deletes nothing)."""
    check_held(run_dir)
    folders: dict[str, list[Path]] = {}
    for path in list_files(Path(run_dir) / VERSIONS, recursive=True):
        relative = path.relative_to(Path(run_dir) / VERSIONS)
        folders.setdefault(relative.parts[0], []).append(path)
    for name, files in folders.items():
        if name in keep:
            continue
        if is_remote(run_dir):
            for path in files:
                remove(path)
        else:
            shutil.rmtree(Path(run_dir) / VERSIONS / name, ignore_errors=True)
