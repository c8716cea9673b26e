"""The run directory, on a local disk or in object storage: every file is written whole, then named.

A reader therefore sees a file whole or not at all, and `manifest.json` with status "complete",
written last, is the only sign that a run is finished. Files that later readers must trust
(gradient chunks, outputs) are committed with their sha256, and read back verified.

Where the run lives. A run directory is a local path or a URI of a pyarrow filesystem
(`s3://bucket/runs/x`, `gs://…`, `hdfs://…`). Inside distinf it is carried as a `pathlib.Path`,
which folds a URI's `//` into `/` (`s3:/bucket/runs/x`); every function here accepts both
spellings, so path arithmetic (`run_dir / "scores"`) is the same for both and only the I/O below
knows where the bytes go. On a local disk a file is written under a temporary name, flushed and
renamed. Object stores have no rename, but a PUT of a whole object is atomic: the file is written
to a local temporary file first and then uploaded in one piece, so the object appears complete
or not at all (a killed upload leaves nothing behind under the name).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from safetensors.numpy import load, save_file

MANIFEST = "manifest.json"

SCHEMES = ("s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss")
"""URI schemes of object stores and remote filesystems that pyarrow opens (`FileSystem.from_uri`)."""

_URI = re.compile(r"^([a-z][a-z0-9+.-]*):/+(.*)$")


class IntegrityError(ValueError):
    """A run-directory file that is not what was committed: missing, truncated or changed."""


# ---------------------------------------------------------------------------------------------
# Where a path lives


def _split_uri(path: str | Path) -> tuple[str, str] | None:
    """(scheme, rest) of a URI in either spelling (`s3://b/k` or the folded `s3:/b/k`), else None."""
    match = _URI.match(str(path))
    return (match.group(1), match.group(2)) if match and match.group(1) in SCHEMES else None


def is_remote(path: str | Path) -> bool:
    return _split_uri(path) is not None


def run_path(path: str | Path) -> Path:
    """A run directory as distinf carries it: local paths made absolute, URIs kept as they are."""
    return Path(path) if is_remote(path) else Path(path).resolve()


def display(path: str | Path) -> str:
    """A path as the user wrote it: `s3://bucket/run`, not the folded `s3:/bucket/run`."""
    uri = _split_uri(path)
    return f"{uri[0]}://{uri[1]}" if uri else str(path)


@functools.lru_cache(maxsize=None)
def _filesystem(scheme: str, netloc: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem of one bucket (or namenode) and the path of its root inside it, once per process."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if scheme == "s3" and endpoint:
        # The AWS SDKs honour AWS_ENDPOINT_URL (MinIO, Ceph, a test server); pyarrow alone does not.
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        return pafs.S3FileSystem(endpoint_override=endpoint, region=region), netloc
    filesystem, root = pafs.FileSystem.from_uri(f"{scheme}://{netloc}/")
    return filesystem, root


def _resolve(path: str | Path) -> tuple[pafs.FileSystem | None, str]:
    """(filesystem, path inside it) of a remote path, or (None, the local path)."""
    uri = _split_uri(path)
    if uri is None:
        return None, str(path)
    netloc, _, inner = uri[1].partition("/")
    filesystem, root = _filesystem(uri[0], netloc)
    inner = inner.rstrip("/")
    return filesystem, f"{root.rstrip('/')}/{inner}" if inner else root


# ---------------------------------------------------------------------------------------------
# Reading and listing


def read_bytes(path: str | Path) -> bytes:
    """The whole file; FileNotFoundError when there is none."""
    filesystem, key = _resolve(path)
    if filesystem is None:
        return Path(key).read_bytes()
    if filesystem.get_file_info(key).type != pafs.FileType.File:
        raise FileNotFoundError(f"no such file: '{display(path)}'")
    with filesystem.open_input_stream(key) as stream:
        return stream.readall()


def is_file(path: str | Path) -> bool:
    filesystem, key = _resolve(path)
    if filesystem is None:
        return Path(key).is_file()
    return filesystem.get_file_info(key).type == pafs.FileType.File


def file_size(path: str | Path) -> int | None:
    """Size in bytes, or None when there is no such file."""
    filesystem, key = _resolve(path)
    if filesystem is None:
        try:
            return Path(key).stat().st_size
        except OSError:
            return None
    info = filesystem.get_file_info(key)
    return info.size if info.type == pafs.FileType.File else None


def list_files(folder: str | Path, recursive: bool = False) -> dict[Path, int]:
    """{path: size} of the files in `folder` (and below it, if `recursive`), in name order.

    A folder that does not exist has no files. Paths are `folder / name`, in folder's spelling.
    """
    folder = Path(folder)
    filesystem, key = _resolve(folder)
    if filesystem is None:
        if not folder.is_dir():
            return {}
        found = folder.rglob("*") if recursive else folder.iterdir()
        return {p: p.stat().st_size for p in sorted(found) if p.is_file()}
    infos = filesystem.get_file_info(pafs.FileSelector(key, recursive=recursive, allow_not_found=True))
    prefix = key.rstrip("/") + "/"
    return {folder / info.path[len(prefix):]: info.size
            for info in sorted(infos, key=lambda i: i.path) if info.type == pafs.FileType.File}


def is_empty(folder: str | Path) -> bool:
    """True when nothing is stored at or under `folder` (or it does not exist)."""
    filesystem, key = _resolve(folder)
    if filesystem is None:
        path = Path(key)
        return not path.exists() or (path.is_dir() and not any(path.iterdir()))
    return filesystem.get_file_info(key).type != pafs.FileType.File and not list_files(folder, recursive=True)


def remove(path: str | Path) -> None:
    """Delete one file, if it is there."""
    filesystem, key = _resolve(path)
    if filesystem is None:
        Path(key).unlink(missing_ok=True)
    elif filesystem.get_file_info(key).type == pafs.FileType.File:
        filesystem.delete_file(key)


def free_bytes(folder: str | Path) -> int | None:
    """Free space on the disk holding `folder`; None for object storage, which has no such limit."""
    return None if is_remote(folder) else shutil.disk_usage(folder).free


def make_folder(folder: str | Path) -> None:
    """Create a local folder and its parents; object stores have no folders, only keys."""
    if not is_remote(folder):
        Path(folder).mkdir(parents=True, exist_ok=True)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    filesystem, key = _resolve(path)
    with open(key, "rb") if filesystem is None else filesystem.open_input_stream(key) as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Writing: whole or not at all


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")


def _commit(path: str | Path, write: Callable[[str], None], digest: bool = False) -> dict:
    """Have `write(tmp)` fill a local temporary file, then publish it under `path` in one step.

    Returns {"bytes", "sha256"} (sha256 only with `digest`) of what was published.
    """
    filesystem, key = _resolve(path)
    if filesystem is None:
        path = Path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _temporary(path)
    else:
        handle, name = tempfile.mkstemp(prefix=".distinf-", suffix=".tmp")
        os.close(handle)
        tmp = Path(name)
    try:
        write(str(tmp))
        record = {"bytes": tmp.stat().st_size, "sha256": file_sha256(tmp) if digest else None}
        if filesystem is None:
            # Data on disk before the name: after a crash the name never points at a half-written file.
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        else:
            # One object, visible only once the upload completes (a multipart upload too).
            with open(tmp, "rb") as source, filesystem.open_output_stream(key) as target:
                shutil.copyfileobj(source, target, 8 << 20)
    finally:
        tmp.unlink(missing_ok=True)
    return record


def write_parquet(table: pa.Table, path: str | Path) -> None:
    """Dictionary encoding for string columns only: on float gradient lists it never repeats a
    value and made gradient files 1.5x their raw size."""
    strings = [field.name for field in table.schema if pa.types.is_string(field.type)]
    pq.write_table(table, path, use_dictionary=strings)


def atomic_write_table(table: pa.Table, path: str | Path) -> Path:
    _commit(path, lambda tmp: write_parquet(table, tmp))
    return Path(path)


def commit_table(table: pa.Table, path: str | Path) -> dict:
    """Write `table` atomically; returns its {"rows", "bytes", "sha256"} for a ledger or manifest."""
    return {"rows": table.num_rows, **_commit(path, lambda tmp: write_parquet(table, tmp), digest=True)}


def atomic_write_json(data: Any, path: str | Path) -> Path:
    text = json.dumps(data, indent=2, default=str)
    _commit(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return Path(path)


def atomic_write_arrays(arrays: dict[str, np.ndarray], path: str | Path) -> Path:
    """safetensors (no pickle) of named numpy arrays."""
    _commit(path, lambda tmp: save_file({name: np.ascontiguousarray(a) for name, a in arrays.items()}, tmp))
    return Path(path)


def read_verified_bytes(path: str | Path, sha256: str) -> bytes:
    """A file's bytes, only if they still have the sha256 recorded when it was committed."""
    try:
        data = read_bytes(path)
    except FileNotFoundError:
        raise IntegrityError(f"'{display(path)}' is missing; run the job again with --resume to recompute it") from None
    if hashlib.sha256(data).hexdigest() != sha256:
        raise IntegrityError(f"'{display(path)}' does not match the checksum recorded when it was committed "
                             "(truncated or changed since); run the job again with --resume to recompute it")
    return data


def read_verified_table(path: str | Path, sha256: str, columns: list[str] | None = None) -> pa.Table:
    """A Parquet file read only if its bytes still have the sha256 recorded when it was committed."""
    return pq.read_table(pa.BufferReader(read_verified_bytes(path, sha256)), columns=columns)


def read_arrays(path: str | Path, sha256: str | None = None) -> dict[str, np.ndarray]:
    """The arrays of a safetensors file, checked against `sha256` when one is given."""
    return load(read_bytes(path) if sha256 is None else read_verified_bytes(path, sha256))


# ---------------------------------------------------------------------------------------------
# Names inside a run directory


def gradient_dir(run_dir: str | Path, split: str) -> Path:
    return Path(run_dir) / "gradients" / split


def chunk_path(run_dir: str | Path, split: str, rank: int, seq: int) -> Path:
    """Chunk `seq` of `rank`: names come from numbers only, never from example ids."""
    return gradient_dir(run_dir, split) / f"part-{rank:05d}-{seq:05d}.parquet"


def list_chunks(run_dir: str | Path, split: str) -> list[Path]:
    """Committed gradient chunks of a split, in (rank, sequence) order."""
    return [p for p in list_files(gradient_dir(run_dir, split))
            if p.name.startswith("part-") and p.name.endswith(".parquet")]


def read_manifest(run_dir: str | Path) -> dict | None:
    path = Path(run_dir) / MANIFEST
    try:
        return json.loads(read_bytes(path).decode("utf-8"))
    except (FileNotFoundError, IsADirectoryError):
        return None
