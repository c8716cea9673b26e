"""Versions of a run's outputs: each run or append stages its curvature and scores in
`versions/<run_id>/`, and only a complete version is switched into the run directory's own paths.

While a run or an append computes, the outputs at `scores/`, `curvature/` and `rejected.parquet`
stay those of the last complete version, and so does what `manifest.json` vouches for (an append's
manifest carries that version whole under `append.base`). At the end the staged files are
published over them, one atomic replace each (locally a hard link renamed over the name, on an
object store a server-side copy), and then the manifest says "complete" for the new version. A
failed or killed run therefore never leaves half-rewritten outputs behind, only an unfinished
version folder, which the next run of the same command replaces.

The last `output.keep_versions` complete versions stay under `versions/`, each with its own
manifest.json, and every output row carries `run_id` and `as_of`, so the nightly history reads
in DuckDB as `read_parquet('RUN/versions/*/scores/top_k.parquet')`.
"""

from __future__ import annotations

import os
import shutil
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa

from distinf.runtime.layout import DENSE, VERSIONS
from distinf.store import resolve, temporary_path, is_remote, list_files, remove


def stamp(table: pa.Table, run_id: str, as_of: datetime) -> pa.Table:
    """`table` with the version's run_id and as_of (UTC) as its last two columns."""
    n = table.num_rows
    return (table.append_column("run_id", pa.array([run_id] * n, pa.string()))
                 .append_column("as_of", pa.array([as_of] * n, pa.timestamp("us", tz="UTC"))))


def now() -> datetime:
    return datetime.now(timezone.utc)


def publish(run_dir: Path, version: Path, names: list[str]) -> None:
    """Put each staged `version/name` at `run_dir/name`, replacing the file there in one step, and
    delete dense score parts of the run directory that the version does not have."""
    for name in names:
        _replace_with_copy(version / name, run_dir / name)
    staged = {p.name for p in list_files(version / DENSE)}
    for path in list_files(run_dir / DENSE):
        if path.name.startswith("part-") and path.name not in staged:
            remove(path)


def _replace_with_copy(source: Path, target: Path) -> None:
    filesystem, source_key = resolve(source)
    if filesystem is not None:  # a server-side copy: the object appears whole under its name
        filesystem.copy_file(source_key, resolve(target)[1])
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(target)
    try:
        os.link(source, tmp)  # no second copy of the bytes on one filesystem
    except OSError:
        shutil.copyfile(source, tmp)
    os.replace(tmp, target)


def prune(run_dir: Path, keep: int, current: str) -> list[str]:
    """Delete all but the newest `keep` complete versions (names sort by time), and every
    unfinished one but `current`; returns the versions kept, oldest first."""
    folders: dict[str, list[Path]] = {}
    for path in list_files(Path(run_dir) / VERSIONS, recursive=True):
        relative = path.relative_to(Path(run_dir) / VERSIONS)
        folders.setdefault(relative.parts[0], []).append(path)
    complete = sorted(name for name, files in folders.items() if any(p.name == "manifest.json" and
                                                                      p.parent.name == name for p in files))
    kept = complete[-keep:]
    for name, files in folders.items():
        if name in kept or name == current:
            continue
        if is_remote(run_dir):
            for path in files:
                remove(path)
        else:
            shutil.rmtree(Path(run_dir) / VERSIONS / name, ignore_errors=True)
    return kept
