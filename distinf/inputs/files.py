"""The files a dataset names: one file, or many (a folder, a glob, a list, a `save_to_disk`
folder), local or on an object store; each one's format, bytes and size."""

from __future__ import annotations

import fnmatch
import glob
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from distinf.inputs.checks import DataError

_COMPRESSED = (".gz", ".bz2", ".zst", ".lz4")
_FORMATS = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "json", ".json": "json",
            ".ndjson": "json", ".csv": "csv"}


@dataclass(frozen=True)
class Source:
    """One file of a dataset: its name as the user would write it, where it lies, its format."""

    name: str
    filesystem: Any
    """A pyarrow FileSystem, or None for a local file."""
    path: str
    """The path inside `filesystem`."""
    fmt: str
    """parquet, json, csv, or arrow (a Hugging Face `save_to_disk` shard: an Arrow IPC stream)."""


_GLOB = re.compile(r"[*?\[]")


def dataset_files(path: str | list[str], key: str) -> list[Source]:
    """The files that `data.<role>.path` names, in the order they are read.

    A file; a folder (every data file below it, in name order, names starting with '.' or '_'
    skipped, other files ignored); a glob; a Hugging Face `save_to_disk` folder (its arrow files
    in state.json's order); or a list of any of these, in list order. A file named twice is an
    error, and so is a name that matches nothing.
    """
    paths = path if isinstance(path, list) else [path]
    found: list[Source] = []
    for item in paths:
        found += _expand(str(item), key, single=not isinstance(path, list))
    seen: set[str] = set()
    for source in found:
        if source.name in seen:
            raise DataError(f"{key}.path: '{source.name}' is named twice; each file is read once")
        seen.add(source.name)
    return found


def _expand(path: str, key: str, single: bool) -> list[Source]:
    from distinf.store import resolve, split_uri

    filesystem, inner = resolve(path)
    uri = split_uri(path)

    def name_of(found: str) -> str:
        return f"{uri[0]}://{found}" if uri else found

    def info(target: str):
        if filesystem is None:
            local = Path(target)
            return "dir" if local.is_dir() else "file" if local.is_file() else None
        kind = filesystem.get_file_info(target).type
        return {pafs.FileType.Directory: "dir", pafs.FileType.File: "file"}.get(kind)

    if _GLOB.search(inner):
        if filesystem is None:
            matches = sorted(m for m in glob.glob(inner, recursive=True) if Path(m).is_file())
        else:
            base = inner[: _GLOB.search(inner).start()].rpartition("/")[0]
            listed = filesystem.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
            matches = sorted(i.path for i in listed
                             if i.type == pafs.FileType.File and fnmatch.fnmatchcase(i.path, inner))
        if not matches:
            raise DataError(f"{key}.path: no file matches '{path}'")
        return [Source(name_of(m), filesystem, m, _format_of(Path(m), key)) for m in matches]
    kind = info(inner)
    if kind == "file":
        return [Source(path if single else name_of(inner), filesystem, inner, _format_of(Path(inner), key))]
    if kind is None:
        raise DataError(f"{key}.path: no such file '{path}'")
    folder = inner.rstrip("/")
    if info(f"{folder}/state.json") == "file":
        return _saved_dataset(folder, filesystem, name_of, key)
    if info(f"{folder}/dataset_dict.json") == "file":
        raise DataError(f"{key}.path: '{path}' holds a DatasetDict saved with save_to_disk; name one split's "
                        f"folder, e.g. '{path.rstrip('/')}/train'")
    if filesystem is None:
        listed = [str(p) for p in Path(folder).rglob("*") if p.is_file()]
    else:
        listed = [i.path for i in filesystem.get_file_info(pafs.FileSelector(folder, recursive=True))
                  if i.type == pafs.FileType.File]
    files = []
    for found in sorted(listed):
        relative = found[len(folder) + 1:]
        if any(part.startswith((".", "_")) for part in relative.split("/")):
            continue  # _SUCCESS, .crc and other writers' bookkeeping, as pyarrow.dataset skips them
        try:
            fmt = _format_of(Path(found), key)
        except DataError:
            continue  # a README or other non-data file beside the data
        files.append(Source(name_of(found), filesystem, found, fmt))
    if not files:
        raise DataError(f"{key}.path: no .parquet, .jsonl or .csv files in the folder '{path}'")
    return files


def _saved_dataset(folder: str, filesystem: Any, name_of, key: str) -> list[Source]:
    """The arrow files of a `datasets.Dataset.save_to_disk` folder, from its state.json."""
    where = f"{key}.path: '{name_of(folder)}'"
    try:
        if filesystem is None:
            state = json.loads(Path(folder, "state.json").read_text(encoding="utf-8"))
        else:
            with filesystem.open_input_stream(f"{folder}/state.json") as stream:
                state = json.loads(stream.read())
        files = [entry["filename"] for entry in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DataError(f"{where}: state.json is not that of a dataset saved with save_to_disk "
                        f"(no _data_files list of filenames: {error})") from None
    if not files:
        raise DataError(f"{where}: state.json lists no data files")
    return [Source(name_of(f"{folder}/{name}"), filesystem, f"{folder}/{name}", "arrow") for name in files]


def _format_of(path: Path, key: str) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in _COMPRESSED:
        suffixes = suffixes[:-1]
        if suffixes and _FORMATS.get(suffixes[-1]) == "parquet":
            raise DataError(f"{key}.path: '{path}': Parquet files are compressed inside; "
                            "do not compress the whole file")
    fmt = _FORMATS.get(suffixes[-1]) if suffixes else None
    if fmt is None:
        raise DataError(f"{key}.path: '{path}': unknown format; use a .parquet, .jsonl or .csv file")
    return fmt


def open_source(source: Source):
    """A stream of the file's bytes, decompressed by its suffix."""
    if source.filesystem is None:
        return pa.input_stream(source.path, compression="detect")
    return source.filesystem.open_input_stream(source.path, compression="detect")


def source_size(source: Source) -> int:
    """The file's size in bytes, as stored (compressed, for a compressed file)."""
    if source.filesystem is None:
        return Path(source.path).stat().st_size
    return source.filesystem.get_file_info(source.path).size
