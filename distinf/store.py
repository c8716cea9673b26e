"""The run directory, on a local disk or in object storage: every file is written whole, then named.

A reader therefore sees a file whole or not at all, and `manifest.json` with status "complete",
written last, is the only sign that a run is finished. Files that later readers must trust
(gradient chunks, outputs) are committed with their sha256, and read back verified.

Where the run lives. A run directory is a local path or a URI of a pyarrow filesystem
(`s3://bucket/runs/x`, `gs://…`, `hdfs://…`). Inside distinf it is carried as a `pathlib.Path`,
which folds a URI's `//` into `/` (`s3:/bucket/runs/x`); every function here accepts both
spellings, so path arithmetic (`run_dir / "scores"`) is the same for both and only the I/O below
knows where the bytes go. On a local disk a file is written under a temporary name, flushed and
renamed. Object stores have no rename: the file is written to a local temporary file, uploaded
under a temporary key beside its name, then copied to its name on the server (`_publish`), so the
object appears complete or not at all.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
import shutil
import struct
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from safetensors.numpy import load

from distinf.config import KEY_SCHEMES, SECRET_PARAMETERS, ConfigError, refuse_credentials


SCHEMES = ("s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss")
"""URI schemes of object stores and remote filesystems that pyarrow opens (`FileSystem.from_uri`)."""

_URI = re.compile(r"^([a-z][a-z0-9+.-]*):/+(.*)$")


class IntegrityError(ValueError):
    """A run-directory file that is not what was committed: missing, truncated or changed."""


# ---------------------------------------------------------------------------------------------
# Where a path lives


def split_uri(path: str | Path) -> tuple[str, str] | None:
    """(scheme, rest) of a URI in either spelling (`s3://b/k` or the folded `s3:/b/k`), else None."""
    match = _URI.match(str(path))
    return (match.group(1), match.group(2)) if match and match.group(1) in SCHEMES else None


def is_remote(path: str | Path) -> bool:
    return split_uri(path) is not None


def run_path(path: str | Path) -> Path:
    """A run directory as distinf carries it: local paths made absolute, URIs kept as they are.

    A URI with credentials in it is refused here too, for callers of the Python API: the path
    travels in Ray task arguments and manifests."""
    try:
        refuse_credentials(str(path))
    except ValueError as error:
        raise ConfigError(f"run directory: {error}") from None
    return Path(path) if is_remote(path) else Path(path).resolve()


SECRET_VALUE = re.compile(r"(" + SECRET_PARAMETERS.pattern + r")[^&;#]*", re.IGNORECASE)
"""A secret query parameter with its value, for `display` to keep the name and hide the value."""


def display(path: str | Path) -> str:
    """A path as the user wrote it: `s3://bucket/run`, not the folded `s3:/bucket/run`.

    Credentials in a URI (`s3://KEY:SECRET@bucket`, refused by the job's validation) are shown as
    `***`, so that no message, manifest or task argument built from a path can echo a secret.
    """
    text = SECRET_VALUE.sub(r"\1***", str(path))
    uri = split_uri(text)
    if uri is None:
        return text
    netloc, slash, rest = uri[1].partition("/")
    userinfo, at, host = netloc.rpartition("@")
    if at and uri[0] in KEY_SCHEMES:
        netloc = f"***@{host}"
    elif ":" in userinfo:  # user:password@ (a bare user, as in hdfs://alice@namenode, is no secret)
        netloc = f"{userinfo.partition(':')[0]}:***@{host}"
    return f"{uri[0]}://{netloc}{slash}{rest}"


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


def resolve(path: str | Path) -> tuple[pafs.FileSystem | None, str]:
    """(filesystem, path inside it) of a remote path, or (None, the local path)."""
    uri = split_uri(path)
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
    filesystem, key = resolve(path)
    if filesystem is None:
        return Path(key).read_bytes()
    if filesystem.get_file_info(key).type != pafs.FileType.File:
        raise FileNotFoundError(f"no such file: '{display(path)}'")
    with filesystem.open_input_stream(key) as stream:
        return stream.readall()


def is_file(path: str | Path) -> bool:
    filesystem, key = resolve(path)
    if filesystem is None:
        return Path(key).is_file()
    return filesystem.get_file_info(key).type == pafs.FileType.File


def file_size(path: str | Path) -> int | None:
    """Size in bytes, or None when there is no such file."""
    filesystem, key = resolve(path)
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
    filesystem, key = resolve(folder)
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
    filesystem, key = resolve(folder)
    if filesystem is None:
        path = Path(key)
        return not path.exists() or (path.is_dir() and not any(path.iterdir()))
    return filesystem.get_file_info(key).type != pafs.FileType.File and not list_files(folder, recursive=True)


def remove(path: str | Path) -> None:
    """Delete one file, if it is there."""
    filesystem, key = resolve(path)
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
    filesystem, key = resolve(path)
    with open(key, "rb") if filesystem is None else filesystem.open_input_stream(key) as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Writing: whole or not at all


def temporary_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")


def _commit(path: str | Path, write: Callable[[str], None], digest: bool = False) -> dict:
    """Have `write(tmp)` fill a local temporary file, then publish it under `path` in one step.

    Returns {"bytes", "sha256"} (sha256 only with `digest`) of what was published.
    """
    filesystem, key = resolve(path)
    if filesystem is None:
        path = Path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temporary_path(path)
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
            _publish(filesystem, tmp, key)
    finally:
        tmp.unlink(missing_ok=True)
    return record


_SERVER_COPY_LIMIT = 5 << 30
"""S3's CopyObject (what pyarrow's `move` and `copy_file` send) copies objects of at most 5 GiB in
one request."""
_COPY_PART_BYTES = 512 << 20
"""Bytes per part of a multipart copy (S3 takes parts of 5 MiB to 5 GiB, at most 10,000 of them)."""


def server_copy(source: str | Path, target: str | Path) -> None:
    """Copy the object `source` to `target` of the same store on the server; `target` appears
    whole or not at all. On S3 an object over CopyObject's limit is copied in parts
    (`_multipart_copy`)."""
    filesystem, source_key = resolve(source)
    _, target_key = resolve(target)
    if isinstance(filesystem, pafs.S3FileSystem) and \
            filesystem.get_file_info(source_key).size > _SERVER_COPY_LIMIT:
        _multipart_copy(source_key, target_key)
    else:
        filesystem.copy_file(source_key, target_key)


def _s3_client():
    try:
        import boto3
    except ImportError:
        raise OSError("copying an object of over 5 GiB on S3 needs boto3: pip install 'distinf[s3]'") from None
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    return boto3.client("s3", region_name=region)  # honours AWS_ENDPOINT_URL(_S3), profiles, roles


def _multipart_copy(source_key: str, target_key: str) -> None:
    """S3: CreateMultipartUpload, UploadPartCopy of each byte range of `source_key` (each only if
    the source still has the ETag read first), CompleteMultipartUpload; aborted on any failure, so
    that no half-copied object and no billed leftover parts remain. Keys are "bucket/key"."""
    client = _s3_client()  # first: it names the missing boto3 (and botocore with it)
    from botocore.exceptions import BotoCoreError, ClientError

    source_bucket, source_name = source_key.split("/", 1)
    bucket, name = target_key.split("/", 1)
    upload = None
    try:
        head = client.head_object(Bucket=source_bucket, Key=source_name)
        size, etag = head["ContentLength"], head["ETag"]
        part = max(_COPY_PART_BYTES, -(-size // 10_000))
        upload = client.create_multipart_upload(Bucket=bucket, Key=name)["UploadId"]
        parts = []
        for number, start in enumerate(range(0, size, part), start=1):
            copied = client.upload_part_copy(
                Bucket=bucket, Key=name, UploadId=upload, PartNumber=number, CopySourceIfMatch=etag,
                CopySource={"Bucket": source_bucket, "Key": source_name},
                CopySourceRange=f"bytes={start}-{min(start + part, size) - 1}")
            parts.append({"PartNumber": number, "ETag": copied["CopyPartResult"]["ETag"]})
        client.complete_multipart_upload(Bucket=bucket, Key=name, UploadId=upload, MultipartUpload={"Parts": parts})
    except (BotoCoreError, ClientError) as error:  # an OSError, as pyarrow's own copy raises
        _abort_quietly(client, bucket, name, upload)
        raise OSError(f"s3://{source_key} -> s3://{target_key}: multipart copy failed: {error}") from error
    except BaseException:
        _abort_quietly(client, bucket, name, upload)
        raise


def _abort_quietly(client, bucket: str, name: str, upload: str | None) -> None:
    if upload is None:
        return
    try:
        client.abort_multipart_upload(Bucket=bucket, Key=name, UploadId=upload)
    except Exception:  # the store is unreachable: the copy's own error is the one to report
        pass


def _upload(filesystem: pafs.FileSystem, source: Path, key: str) -> None:
    with open(source, "rb") as handle, filesystem.open_output_stream(key) as target:
        shutil.copyfileobj(handle, target, 8 << 20)


def _publish(filesystem: pafs.FileSystem, source: Path, key: str) -> None:
    """Upload the local file `source` to `key` whole, or leave `key` as it was.

    pyarrow cannot abort an output stream: closing it, which `with` does on an error too (and so
    does its destructor), completes the upload with the bytes written so far. So the upload goes
    to a temporary key beside the name, deleted if anything fails, and only a finished upload is
    moved to the name on the server (on S3 one CopyObject, which creates the object whole, then a
    delete of the temporary key; on GCS a rewrite; on HDFS a rename).
    """
    if source.stat().st_size > _SERVER_COPY_LIMIT:
        # Over CopyObject's limit only a direct upload is possible (a gradient chunk or JSON record
        # never is); an error midway may publish a partial object, which the sha256 recorded for
        # every committed output catches when it is read.
        _upload(filesystem, source, key)
        return
    staged = str(temporary_path(Path(key)))
    try:
        _upload(filesystem, source, staged)
        filesystem.move(staged, key)
    except NotImplementedError:  # a store without move (Azure blobs without a hierarchical namespace)
        _delete_quietly(filesystem, staged)
        _upload(filesystem, source, key)
    except BaseException:
        _delete_quietly(filesystem, staged)
        raise


def _delete_quietly(filesystem: pafs.FileSystem, key: str) -> None:
    try:
        if filesystem.get_file_info(key).type == pafs.FileType.File:
            filesystem.delete_file(key)
    except OSError:
        pass  # the store is unreachable: the upload's own error is the one to report


def _split_columns(schema: pa.Schema) -> list[str]:
    """Parquet paths of the float32/float64 elements of list columns (grad.list.element): the
    gradients, where BYTE_STREAM_SPLIT pays. Scalar float columns (losses, the score tables) are
    written plainly, as every Parquet reader decodes them (Spark's vectorized reader gained a
    BYTE_STREAM_SPLIT decoder only in 2026).

    float16 is left out: DuckDB (2.0) refuses BYTE_STREAM_SPLIT on its FIXED_LEN_BYTE_ARRAY pages."""
    paths = []
    for field in schema:
        kind = field.type
        if pa.types.is_list(kind) or pa.types.is_fixed_size_list(kind) or pa.types.is_large_list(kind):
            if pa.types.is_float32(kind.value_type) or pa.types.is_float64(kind.value_type):
                paths.append(f"{field.name}.list.element")
    return paths


def write_parquet(table: pa.Table, path: str | Path) -> None:
    """zstd; dictionary encoding for string columns only (on float gradient lists it never repeats
    a value and made gradient files 1.5x their raw size); BYTE_STREAM_SPLIT for float list columns
    (the gradients), which groups the exponent bytes so that zstd finds them
    (benchmarks/parquet_encoding.py)."""
    strings = [field.name for field in table.schema if pa.types.is_string(field.type)]
    pq.write_table(table, path, use_dictionary=strings, compression="zstd",
                   use_byte_stream_split=_split_columns(table.schema))


def atomic_write_table(table: pa.Table, path: str | Path) -> Path:
    _commit(path, lambda tmp: write_parquet(table, tmp))
    return Path(path)


def commit_table(table: pa.Table, path: str | Path) -> dict:
    """Write `table` atomically; returns its {"rows", "bytes", "sha256"} for a ledger or manifest."""
    return {"rows": table.num_rows, **_commit(path, lambda tmp: write_parquet(table, tmp), digest=True)}


def atomic_write_text(text: str, path: str | Path) -> Path:
    _commit(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return Path(path)


def atomic_write_json(data: Any, path: str | Path) -> Path:
    return atomic_write_text(json.dumps(data, indent=2, default=str), path)


Layout = Sequence[tuple[str, Any, tuple[int, ...]]]
"""(name, numpy dtype, shape) of each array of a safetensors file, in the order of their bytes."""

_SAFETENSORS_DTYPES = {np.dtype(t): code for t, code in (
    (np.float64, "F64"), (np.float32, "F32"), (np.float16, "F16"), (np.int64, "I64"), (np.int32, "I32"),
    (np.int16, "I16"), (np.int8, "I8"), (np.uint64, "U64"), (np.uint32, "U32"), (np.uint16, "U16"),
    (np.uint8, "U8"), (np.bool_, "BOOL"))}
_BAND_BYTES = 8 << 20  # a non-contiguous array is written in row bands of about this size


def safetensors_layout(specs: dict[str, tuple[Any, tuple[int, ...]]]) -> list[tuple[str, np.dtype, tuple[int, ...]]]:
    """{name: (dtype, shape)} in the order safetensors' own writer puts the bytes (larger dtypes first,
    then by name), so that a file streamed in this layout is byte for byte `safetensors.numpy.save_file`'s."""
    names = sorted(specs, key=lambda name: (-np.dtype(specs[name][0]).itemsize, name))
    return [(name, np.dtype(specs[name][0]), tuple(int(d) for d in specs[name][1])) for name in names]


def _little_endian(layout: Layout) -> list[tuple[str, np.dtype, tuple[int, ...]]]:
    return [(name, np.dtype(dtype).newbyteorder("<"), tuple(int(d) for d in shape)) for name, dtype, shape in layout]


def safetensors_header(layout: Layout) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """The 8-byte little-endian length and the JSON header {name: {dtype, shape, data_offsets}} of a
    safetensors file whose arrays follow in `layout`'s order, padded with spaces to 8 bytes as
    safetensors pads it (the data starts aligned); and {name: (start, stop)} of each array's bytes
    from the file's start."""
    entries, offset = {}, 0
    for name, dtype, shape in _little_endian(layout):
        if dtype not in _SAFETENSORS_DTYPES:
            raise ValueError(f"safetensors: no dtype code for {dtype} ({name})")
        if name in entries:
            raise ValueError(f"safetensors: {name} twice in one file")
        size = dtype.itemsize * math.prod(shape)
        entries[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header = json.dumps(entries, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    header += b" " * (-len(header) % 8)
    start = 8 + len(header)
    spans = {name: (start + e["data_offsets"][0], start + e["data_offsets"][1]) for name, e in entries.items()}
    return struct.pack("<Q", len(header)) + header, spans


def _write_array(handle, array: np.ndarray) -> None:
    if array.flags.c_contiguous:
        handle.write(array.reshape(-1).view(np.uint8))  # straight from the array's memory
        return
    row_bytes = math.prod(array.shape[1:]) * array.itemsize  # a C-order row along the first axis
    band = max(1, _BAND_BYTES // max(1, row_bytes))
    for start in range(0, array.shape[0], band):  # a transposed factor, say: one band copied at a time
        handle.write(np.ascontiguousarray(array[start:start + band]).reshape(-1).view(np.uint8))


def write_safetensors(path: str | Path, layout: Layout, arrays: Iterable[tuple[str, np.ndarray]]) -> None:
    """A safetensors file streamed to a local `path`: the header of `layout` (the file's order), then
    each (name, array) of `arrays` written at its place as it comes, in any order. The next array is
    asked for only once the one before is written, so the file is never held in memory and a
    producer may build, or overwrite, one array at a time. Every name of `layout` must come once."""
    layout = _little_endian(layout)
    header, spans = safetensors_header(layout)
    expected = {name: (dtype, shape) for name, dtype, shape in layout}
    written: set[str] = set()
    with open(path, "wb") as handle:
        handle.write(header)
        for name, array in arrays:
            array = np.asarray(array)
            if name not in expected or name in written:
                raise ValueError(f"safetensors: {name} is {'written twice' if name in written else 'not in the header'}")
            dtype, shape = expected[name]
            if array.dtype.newbyteorder("<") != dtype or array.shape != shape:
                raise ValueError(f"safetensors: {name} is {array.dtype} {array.shape}, the header says {dtype} {shape}")
            if array.dtype != dtype:  # big-endian: the file is little-endian
                array = array.astype(dtype)
            handle.seek(spans[name][0])
            _write_array(handle, array)
            written.add(name)
        missing = [name for name in expected if name not in written]
        if missing:
            raise ValueError(f"safetensors: no array for {missing[:3]} of the header")
        handle.truncate(spans[layout[-1][0]][1] if layout else len(header))


def atomic_write_array_stream(layout: Layout, arrays: Iterable[tuple[str, np.ndarray]], path: str | Path) -> Path:
    """safetensors (no pickle) of arrays produced one at a time (write_safetensors), committed whole."""
    _commit(path, lambda tmp: write_safetensors(tmp, layout, arrays))
    return Path(path)


def atomic_write_arrays(arrays: dict[str, np.ndarray], path: str | Path) -> Path:
    """safetensors (no pickle) of named numpy arrays: the bytes `safetensors.numpy.save_file` writes,
    streamed array by array, never built in memory."""
    arrays = {name: np.asarray(a) for name, a in arrays.items()}
    layout = safetensors_layout({name: (a.dtype, a.shape) for name, a in arrays.items()})
    return atomic_write_array_stream(layout, arrays.items(), path)


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
