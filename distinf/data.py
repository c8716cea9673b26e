"""The job's input side: read a dataset (one file, or many: a folder, a glob, a list, a
`save_to_disk` folder; local or on an object store), tokenise it (masking the loss to the
completion or assistant tokens of instruction data), split it across ranks, collate batches.

Pure functions, no Ray. `read_dataset` and `tokenize` check the data once, at the edge, and raise
`DataError` with a message that names the file, the job-file key and the row, e.g.
``data.train: 'train.csv' row 3 (id 'a7'): text is empty``. Rows are counted from 0 in their
file, as the default example ids are (across the files, for several). With `data.on_bad_row:
skip` a bad row is left out instead and returned as a `Rejection` (row, id, reason, file);
problems of a whole file still raise.
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import json
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import torch

from distinf.config import DatasetConfig, JobConfig
from distinf.models import load_tokenizer
from distinf.token_rows import TokenRows, TokenRowsBuilder

PAD = -1
"""Partition entry of a padding slot: the rank runs some real example there and drops its outputs."""

_COMPRESSED = (".gz", ".bz2", ".zst", ".lz4")
_FORMATS = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "json", ".json": "json",
            ".ndjson": "json", ".csv": "csv"}


class DataError(ValueError):
    """A dataset that cannot be used as given; the message names the file, key and row."""


@dataclass(frozen=True)
class Rejection:
    """A row left out under `data.on_bad_row: skip`, and why."""

    row: int
    """The row in its file, from 0."""
    example_id: str | None
    """None when the id itself is what is wrong."""
    reason: str
    """With several files, it begins with the file: "in 'data/part-1.jsonl': ..."."""
    file: str | None = None
    """The file, when the dataset has several."""


class _BadRows:
    """Rows that fail a check: raised at the first (on_bad_row: error) or collected (skip)."""

    def __init__(self, where: str, skip: bool, first_row: int = 0):
        self.where, self.skip, self.first_row = where, skip, first_row
        """Rows are numbered within the batch; `first_row` is the batch's first row in its file."""
        self.ids: pa.Array | None = None
        self.reasons: dict[int, str] = {}

    def add(self, row: int, reason: str, name_id: bool = True) -> None:
        if not self.skip:
            named = f" (id '{self.ids[row].as_py()}')" if name_id and self.ids is not None else ""
            raise DataError(f"{self.where} row {self.first_row + row}{named}: {reason}")
        self.reasons.setdefault(row, reason)  # the first problem found is the one reported

    def rejections(self) -> list[Rejection]:
        def id_of(row: int) -> str | None:
            value = self.ids[row].as_py() if self.ids is not None else None
            return value if value and value.strip() else None

        return [Rejection(self.first_row + row, id_of(row), reason) for row, reason in sorted(self.reasons.items())]


def _all_rejected(where: str, rejected: list[Rejection]) -> DataError:
    first = rejected[0]
    return DataError(f"{where}: every row was rejected ({len(rejected)} in all); the first, row {first.row}: "
                     f"{first.reason}")


# ---------------------------------------------------------------------------------------------
# Reading


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


def read_table(cfg: DatasetConfig, role: str) -> pa.Table:
    """Read a dataset into a table of `example_id` (string), `text` (string) and, when
    `cfg.label_column` is set, `label` (int64), in file order; with prompt/completion columns
    also `prompt` and `completion` (text is their concatenation), with a messages column also
    `messages` (list of {role, content}; text shows the turns as "role: content" lines).

    Parquet (.parquet, .pq), JSON lines (.jsonl, .ndjson, .json) or CSV (.csv), the text formats
    optionally compressed (.gz, .bz2, .zst, .lz4), one file or several (`dataset_files`). Ids are
    `cfg.id_column` cast to string, or the row numbers "0", "1", ... (counted across the files).
    `role` ("train" or "queries") names the job-file key in errors.
    """
    table = read_dataset(cfg, role)[0]
    return table.drop_columns([c for c in ("row", "file") if c in table.column_names])


def read_dataset(cfg: DatasetConfig, role: str, on_bad_row: str = "error") -> tuple[pa.Table, list[Rejection]]:
    """`read_table`'s table plus `row` (int64, the row in its file) and, when the dataset has
    several files, `file` (the file's name); and the rejected rows.

    With on_bad_row="error" the first bad row raises DataError and the list is empty; with "skip"
    bad rows (missing or non-UTF-8 id or text, empty text, a repeated id, a missing or
    non-integer label, a missing or empty completion, messages without an assistant turn) are
    left out of the table and listed. A problem of a whole file (no such file or column,
    unreadable) raises in both modes, as do a dataset without rows and one whose every row is
    bad. Ids must be unique across the files: a repeat names both files.
    """
    tables, rejected = [], []
    for table, bad in read_files(cfg, role, on_bad_row):
        tables.append(table)
        rejected += bad
    return pa.concat_tables(tables), rejected


def read_files(cfg: DatasetConfig, role: str, on_bad_row: str = "error") -> Iterator[tuple[pa.Table, list[Rejection]]]:
    """`read_dataset` a batch of rows at a time: each batch's checked table and rejected rows as
    soon as it is read (at most `READ_BATCH_ROWS` rows of one file), so that a caller that
    tokenises as it goes never holds a split's text whole, not even one file's. The checks across
    batches and files (unique ids, not every row rejected) are the same; the last ones raise
    once every file has been read."""
    key = f"data.{role}"
    sources = dataset_files(cfg.path, key)
    skip = on_bad_row == "skip"
    many = len(sources) > 1
    first_seen: dict[str, tuple[str, int]] = {}
    offset = total = 0
    rejected: list[Rejection] = []
    for source in sources:
        for table, bad in _read_source(cfg, key, source, skip, many, offset, first_seen):
            offset += table.num_rows + len(bad)
            total += table.num_rows
            rejected += bad
            yield table, bad
    where = f"{key}: '{sources[0].name}'" if not many else f"{key} ({len(sources)} files)"
    if total == 0 and not rejected:
        raise DataError(f"{where} has no rows")
    if total == 0:
        raise _all_rejected(where, rejected)


def _check_ids_across(table: pa.Table, source: Source, first_seen: dict, bad: list[Rejection], key: str,
                      where: str, skip: bool, many: bool) -> pa.Table:
    """Ids already read from an earlier file, or an earlier batch of this one: an error naming
    both places, or (skip) rejected here."""
    keep = []
    for example_id, row in zip(table.column("example_id").to_pylist(), table.column("row").to_pylist()):
        if example_id in first_seen:
            other, other_row = first_seen[example_id]
            same = other == source.name
            if not skip:
                raise DataError(f"{where}: duplicate id '{example_id}' in rows {other_row}, {row}; ids must be unique"
                                if same else
                                f"{key}: duplicate id '{example_id}' in '{other}' row {other_row} and "
                                f"'{source.name}' row {row}; ids must be unique across the files")
            reason = (f"duplicate id '{example_id}' (first at row {other_row})" if same else
                      f"duplicate id '{example_id}' (first in '{other}' row {other_row})")
            bad.append(Rejection(row, example_id, f"in '{source.name}': {reason}", source.name) if many
                       else Rejection(row, example_id, reason))
            keep.append(False)
        else:
            first_seen[example_id] = (source.name, row)
            keep.append(True)
    return table if all(keep) else table.filter(pa.array(keep, pa.bool_()))


def _read_source(cfg: DatasetConfig, key: str, source: Source, skip: bool, many: bool, offset: int,
                 first_seen: dict[str, tuple[str, int]]) -> Iterator[tuple[pa.Table, list[Rejection]]]:
    """One file's rows, checked, a batch at a time: each batch's table (with `row`, and `file`
    when `many`) and its rejections. `first_seen` holds every id read so far (file, row), to
    refuse a repeat in a later batch or file.

    Default ids are `offset` + the row, so that they stay unique across files. An empty file
    among several has no rows and no error.
    """
    string_columns = [c for c in (cfg.text_column, cfg.id_column, cfg.prompt_column,
                                  cfg.completion_column) if c]
    wanted = string_columns + [c for c in (cfg.label_column, cfg.messages_column) if c]
    where = f"{key}: '{source.name}'"
    if cfg.messages_column is not None:
        text_fields = {"messages": cfg.messages_column}
    elif cfg.prompt_column is not None:
        text_fields = {"prompt": cfg.prompt_column, "completion": cfg.completion_column}
    else:
        text_fields = {"text": cfg.text_column}
    columns = {**text_fields, "label": cfg.label_column, "example_id": cfg.id_column}
    first_row = 0
    for table in _read_raw(source, key, string_columns, skip, allow_empty=many, columns=wanted):
        if table.num_rows == 0 and many:
            continue
        for name, column in columns.items():
            if column is not None and column not in table.column_names:
                option = "id_column" if name == "example_id" else f"{name}_column"
                available = ", ".join(repr(c) for c in table.column_names)
                raise DataError(f"{key}.{option}: no column '{column}' in '{source.name}'; "
                                f"the columns are {available}")
        if table.num_rows == 0:
            continue
        checked, rejected = _check_batch(cfg, table, source, where, skip, many, offset, first_row)
        if checked.num_rows:
            checked = _check_ids_across(checked, source, first_seen, rejected, key, where, skip, many)
            rejected.sort(key=lambda r: r.row)
        first_row += table.num_rows
        yield checked, rejected
    if first_row == 0 and not many:
        raise DataError(f"{where} has no rows")


def _check_batch(cfg: DatasetConfig, table: pa.Table, source: Source, where: str, skip: bool, many: bool,
                 offset: int, first_row: int) -> tuple[pa.Table, list[Rejection]]:
    """One batch of a file's rows (its first is `first_row` of the file), checked and renamed to
    distinf's columns."""
    bad = _BadRows(where, skip, first_row)
    if cfg.id_column is None:
        ids = pa.array([str(offset + first_row + row) for row in range(table.num_rows)], pa.string())
    else:
        _refuse_float_ids(table.column(cfg.id_column), where, cfg.id_column)
        ids = _as_string(table.column(cfg.id_column), bad, f"id column '{cfg.id_column}'")
        _check_ids(ids, bad)
    bad.ids = ids
    out = {"example_id": ids}
    if cfg.messages_column is not None:
        out["text"], out["messages"] = _as_messages(table.column(cfg.messages_column), bad,
                                                    f"messages column '{cfg.messages_column}'")
    elif cfg.prompt_column is not None:
        prompt = _as_string(table.column(cfg.prompt_column), bad, f"prompt column '{cfg.prompt_column}'")
        completion = _as_string(table.column(cfg.completion_column), bad,
                                f"completion column '{cfg.completion_column}'")
        for row in _rows_where(pc.is_null(prompt)):
            bad.add(row, "the prompt is missing")
        for row in _rows_where(pc.is_null(completion)):
            bad.add(row, "the completion is missing")
        for row in _rows_where(pc.equal(pc.utf8_trim_whitespace(completion), "")):
            bad.add(row, "the completion is empty")
        out["text"] = pc.binary_join_element_wise(pc.fill_null(prompt, ""), pc.fill_null(completion, ""), "")
        out["prompt"], out["completion"] = prompt, completion
    else:
        text = _as_string(table.column(cfg.text_column), bad, f"text column '{cfg.text_column}'")
        _check_text(text, bad)
        out["text"] = text
    sizes = pc.binary_length(out["text"])
    for row in _rows_where(pc.greater(sizes, MAX_TEXT_BYTES)):
        size = sizes[row].as_py()
        bad.add(row, f"text is {size:,} bytes, over the {MAX_TEXT_BYTES:,} a row may hold (a broken export?); "
                     "only its first data.max_length tokens would be used")
    if cfg.label_column is not None:
        out["label"] = _as_labels(table.column(cfg.label_column), bad)
    out["row"] = pa.array(range(first_row, first_row + table.num_rows), pa.int64())
    if many:
        out["file"] = pa.array([source.name] * table.num_rows, pa.string())
    table = pa.table(out)
    if not bad.reasons:
        return table, []
    rejected = bad.rejections()
    if many:
        rejected = [Rejection(r.row, r.example_id, f"in '{source.name}': {r.reason}", source.name)
                    for r in rejected]
    return table.filter(pa.array([row not in bad.reasons for row in range(table.num_rows)])), rejected


_MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))


def _as_messages(column: pa.ChunkedArray, bad: _BadRows, what: str) -> tuple[pa.Array, pa.Array]:
    """A chat column as (display text, list<struct<role, content>>); a value may also be a JSON
    string of that list (CSV). A row without a well-formed list or without an assistant turn
    with content is bad; when skipping, it becomes null."""
    column = column.combine_chunks()
    if pa.types.is_dictionary(column.type):
        column = column.cast(column.type.value_type)
    textual = pa.types.is_string(column.type) or pa.types.is_large_string(column.type)
    if not (textual or pa.types.is_list(column.type) or pa.types.is_large_list(column.type)):
        raise DataError(f"{bad.where}: {what} has type {column.type}; expected a list of "
                        "{role, content} objects")
    values, texts = [], []
    for row, value in enumerate(column.to_pylist()):
        problem, turns = None, None
        if value is None:
            problem = "the messages are missing"
        else:
            if textual:
                try:
                    value = json.loads(value)
                except ValueError as error:
                    value, problem = None, f"{what} is not a JSON list of {{role, content}} objects ({error})"
            if problem is None:
                turns = value if isinstance(value, list) else None
                if not turns or not all(isinstance(t, dict) and isinstance(t.get("role"), str)
                                        and isinstance(t.get("content"), str) for t in turns):
                    problem = f"{what} is not a non-empty list of {{role, content}} objects with string values"
                elif not any(t["role"] == "assistant" and t["content"].strip() for t in turns):
                    problem = "the messages have no assistant turn with content (nothing carries the loss)"
        if problem is not None:
            bad.add(row, problem)
            values.append(None)
            texts.append(None)
            continue
        turns = [{"role": t["role"], "content": t["content"]} for t in turns]
        values.append(turns)
        texts.append("\n".join(f"{t['role']}: {t['content']}" for t in turns))
    return pa.array(texts, pa.string()), pa.array(values, _MESSAGES)


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


def _open(source: Source):
    """A stream of the file's bytes, decompressed by its suffix."""
    if source.filesystem is None:
        return pa.input_stream(source.path, compression="detect")
    return source.filesystem.open_input_stream(source.path, compression="detect")


def _size(source: Source) -> int:
    if source.filesystem is None:
        return Path(source.path).stat().st_size
    return source.filesystem.get_file_info(source.path).size


MAX_TEXT_BYTES = 16 << 20
"""A row whose text (prompt and completion, or rendered messages) is longer is a bad row: a text
is cut to data.max_length tokens anyway, and one enormous row (a broken export) must not take the
memory of the process that reads it."""

READ_BATCH_ROWS = 65_536
"""Rows read and checked at a time: a file larger than this never lies in memory whole."""


def _read_raw(source: Source, key: str, text_columns: list[str], skip: bool = False,
              allow_empty: bool = False, columns: list[str] | None = None) -> Iterator[pa.Table]:
    """One file as tables of up to about READ_BATCH_ROWS rows, in file order, through
    pyarrow.dataset (a `save_to_disk` shard: an Arrow stream).

    With `columns`, only those are read when the file has them all (other columns of a wide file
    never reach memory); else every column, for the caller to name what is missing."""
    import pyarrow.csv
    import pyarrow.dataset as ds

    fmt = source.fmt
    if fmt not in ("parquet", "arrow") and _size(source) == 0:
        if allow_empty:
            return
        raise DataError(f"{key}: '{source.name}' has no rows (the file is empty)")
    try:
        if fmt == "arrow":
            with _open(source) as stream:
                reader = pa.ipc.open_stream(stream)
                wanted = columns if columns and set(columns) <= set(reader.schema.names) else None
                for table in _rebatched(reader, reader.schema):
                    yield table.select(wanted) if wanted else table
            return
        if fmt == "csv":
            # Text and ids as strings, so that an id such as "007" keeps its zeros; absent
            # columns are ignored here and reported by the caller. When skipping bad rows, read
            # them as bytes so that a non-UTF-8 row is found by row, not fatal to the file.
            types = {name: pa.binary() if skip else pa.string() for name in text_columns}
            file_format = ds.CsvFileFormat(convert_options=pyarrow.csv.ConvertOptions(column_types=types))
        else:
            file_format = fmt
        dataset = ds.dataset(source.path, format=file_format, filesystem=source.filesystem)
        wanted = columns if columns and set(columns) <= set(dataset.schema.names) else None
        scanner = dataset.scanner(columns=wanted, batch_size=READ_BATCH_ROWS, batch_readahead=1,
                                  fragment_readahead=1)
        for table in _rebatched(scanner.to_batches(), scanner.projected_schema):
            if fmt == "json":
                table.validate(full=True)  # the JSON reader does not check UTF-8 by itself
            yield table
    except (pa.ArrowInvalid, OSError) as error:
        if allow_empty and fmt == "csv" and "Empty CSV file" in str(error):
            return
        raise _read_error(source, key, error) from None


def _rebatched(batches: Iterable[pa.RecordBatch], schema: pa.Schema) -> Iterator[pa.Table]:
    """Record batches joined into tables of at least READ_BATCH_ROWS rows (the last one fewer):
    Parquet row groups and Arrow streams may come in much smaller batches."""
    pending, rows, tables = [], 0, 0
    for batch in batches:
        pending.append(batch)
        rows += batch.num_rows
        if rows >= READ_BATCH_ROWS:
            yield pa.Table.from_batches(pending, schema)
            pending, rows, tables = [], 0, tables + 1
    if pending or not tables:  # an empty file is one empty table: its columns are still checked
        yield pa.Table.from_batches(pending, schema)


def _read_error(source: Source, key: str, error: Exception) -> DataError:
    fmt, name = source.fmt, source.name
    line = _first_non_utf8_line(source) if fmt in ("csv", "json") else None
    if line is not None:
        return DataError(f"{key}: '{name}' is not valid UTF-8 text (line {line}); "
                         "re-encode the file as UTF-8")
    if fmt == "csv" and "Empty CSV file" in str(error):
        return DataError(f"{key}: '{name}' has no rows (the file is empty)")
    if fmt == "json" and _starts_with_bracket(source):
        return DataError(f"{key}: '{name}' holds a JSON array; write one JSON object per line "
                         "(JSON lines)")
    kind = {"parquet": "Parquet", "csv": "CSV", "json": "JSON lines", "arrow": "an Arrow stream"}[fmt]
    return DataError(f"{key}: '{name}' could not be read as {kind}: {error}")


def _first_non_utf8_line(source: Source) -> int | None:
    """The 1-based line of the first byte sequence that is not UTF-8, or None; streams the file."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    line = 1
    try:
        with _open(source) as stream:
            while chunk := stream.read(1 << 20):
                pending = decoder.getstate()[0]  # an unfinished character from the last chunk, no \n
                try:
                    decoder.decode(chunk)
                except UnicodeDecodeError as error:
                    return line + (pending + chunk)[: error.start].count(b"\n")
                line += chunk.count(b"\n")
    except OSError:
        return None
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return line
    return None


def _starts_with_bracket(source: Source) -> bool:
    try:
        with _open(source) as stream:
            return stream.read(4096).lstrip().startswith(b"[")
    except OSError:
        return False


def _refuse_float_ids(column: pa.ChunkedArray, where: str, name: str) -> None:
    """Float ids are refused: 123456789012 would read back as the id '123456789012.0' or
    '1.23456789012e+11', so a night whose id column became float (pandas makes an integer column
    with one missing value float) would take every stored row for a new one."""
    kind = column.type.value_type if pa.types.is_dictionary(column.type) else column.type
    if pa.types.is_floating(kind) or pa.types.is_decimal(kind):
        raise DataError(f"{where}: id column '{name}' has type {kind}; ids must be integers or strings, since a "
                        "float id's text changes with its type (pandas makes an integer column with a missing value "
                        "float: write it as Int64 or as strings)")


def _as_string(column: pa.ChunkedArray, bad: _BadRows, what: str) -> pa.Array:
    """A column as a valid UTF-8 string array; numbers and booleans are written out as text.

    A non-UTF-8 value is a bad row; when skipping, it becomes null.
    """
    column = column.combine_chunks()
    if pa.types.is_dictionary(column.type):
        column = column.cast(column.type.value_type)
    if pa.types.is_nested(column.type):
        raise DataError(f"{bad.where}: {what} has type {column.type}; expected text")
    try:
        strings = column.cast(pa.string())
        strings.validate(full=True)  # Parquet strings written by other tools may be unchecked
        return strings
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        if not (pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type)
                or pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
            raise DataError(f"{bad.where}: {what} has type {column.type}; expected text") from None
    raw = column.cast(pa.large_binary()) if not pa.types.is_binary(column.type) else column
    values = raw.to_pylist()
    for row, value in enumerate(values):
        if value is not None and not _is_utf8(value):
            bad.add(row, f"{what} is not valid UTF-8 text; re-encode it as UTF-8", name_id=False)
            values[row] = None
    return pa.array([None if value is None else value.decode("utf-8") for value in values], pa.string())


def _is_utf8(value: bytes) -> bool:
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _first_true(mask: pa.Array) -> int | None:
    hits = pc.indices_nonzero(pc.fill_null(mask, False))
    return hits[0].as_py() if len(hits) else None


def _rows_where(mask: pa.Array) -> list[int]:
    return pc.indices_nonzero(pc.fill_null(mask, False)).to_pylist()


def _check_ids(ids: pa.Array, bad: _BadRows) -> None:
    # Kleene or: a null id is missing (plain `or_` gives null for null rows, which _rows_where drops).
    for row in _rows_where(pc.or_kleene(pc.is_null(ids), pc.equal(pc.utf8_trim_whitespace(ids), ""))):
        bad.add(row, "the id is missing", name_id=False)
    counts = pc.value_counts(ids)
    repeated = counts.field("values").filter(pc.greater(counts.field("counts"), 1))
    if not len(repeated):
        return
    if not bad.skip:
        first = ids[_first_true(pc.is_in(ids, value_set=repeated))].as_py()
        rows = pc.indices_nonzero(pc.equal(ids, first)).to_pylist()
        shown = ", ".join(str(bad.first_row + r) for r in rows[:10]) + (", ..." if len(rows) > 10 else "")
        raise DataError(f"{bad.where}: duplicate id '{first}' in rows {shown}; ids must be unique")
    seen: dict[str, int] = {}
    for row in _rows_where(pc.is_in(ids, value_set=repeated)):
        value = ids[row].as_py()
        if value in seen:  # the first occurrence stays, the repeats go
            bad.add(row, f"duplicate id '{value}' (first at row {bad.first_row + seen[value]})", name_id=False)
        else:
            seen[value] = row


def _check_text(text: pa.Array, bad: _BadRows) -> None:
    for row in _rows_where(pc.is_null(text)):
        bad.add(row, "text is missing")
    for row in _rows_where(pc.equal(pc.utf8_trim_whitespace(text), "")):
        bad.add(row, "text is empty")


def _as_labels(column: pa.ChunkedArray, bad: _BadRows) -> pa.Array:
    """Integer labels as int64; integral floats (1.0) and integer strings ("1") are accepted.

    A missing or non-integer label is a bad row; when skipping, it becomes null.
    """
    values = column.combine_chunks()
    if pa.types.is_dictionary(values.type):
        values = values.cast(values.type.value_type)
    try:
        labels = values.cast(pa.int64())  # safe cast: fails on 1.5 or "cat" rather than rounding
        if labels.null_count == 0:
            return labels
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    labels = []
    for row, value in enumerate(values.to_pylist()):
        if value is None or (isinstance(value, str) and not value.strip()):
            bad.add(row, "the label is missing")
        elif _integer(value) is None:
            bad.add(row, f"label {value!r} is not an integer; labels must be class indices "
                         "0..num_labels-1")
        labels.append(_integer(value) if value is not None else None)
    return pa.array(labels, pa.int64())


def _integer(value: Any) -> int | None:
    if isinstance(value, float):
        return int(value) if value.is_integer() else None
    if isinstance(value, str):
        text = value.strip()
        if text == "":
            return None
        try:
            return int(text)
        except ValueError:
            try:
                number = float(text)
            except ValueError:
                return None
            return int(number) if number.is_integer() else None
    if isinstance(value, int):
        return value
    return None


# ---------------------------------------------------------------------------------------------
# Tokenising


@dataclass
class Tokenized:
    """One tokenised dataset: `examples[i]` belongs to `ids[i]`."""

    examples: TokenRows
    """Example i is a dict of input_ids [T] and attention_mask [T] (int64, T <= max_length, no
    padding); for sequence_classification also labels [] (int64); for a masked causal_lm
    (prompt/completion or messages columns) also labels [T]: input_ids with -100 at every token
    that carries no loss. Held flat (`TokenRows`), about 4 bytes a token."""
    ids: list[str]
    truncated: int
    """How many examples were cut to max_length."""
    rows: list[int] = field(default_factory=list)
    """The row in its file of each example."""
    rejected: list[Rejection] = field(default_factory=list)
    """Rows left out under on_bad_row="skip", by `read_dataset` and by `tokenize`."""
    files: list[str | None] = field(default_factory=list)
    """The file of each example, when the dataset has several (else empty)."""


_TOKENIZE_CHUNK = 1024


def tokenize(table: pa.Table | Iterable[pa.Table], tokenizer: Any, max_length: int, task: str, *,
             num_labels: int | None = None, add_special_tokens: bool = True,
             role: str = "train", on_bad_row: str = "error") -> Tokenized:
    """Tokenise `table` (from `read_table` or `read_dataset`), or the tables of `read_files` one
    after another as they are read, into one dict of 1-D int64 tensors per example.

    Sequences longer than `max_length` are truncated the way the tokenizer truncates (its
    `truncation_side`, special tokens kept) and counted in `Tokenized.truncated`. For
    `sequence_classification` each example also gets a 0-d `labels` from the table's `label`
    column, checked against `num_labels`. For `causal_lm` there is no labels key (the loss
    predicts input_ids[1:]), so every example needs at least 2 tokens.

    Loss masking (causal_lm): a table with `prompt` and `completion` columns is tokenised as the
    text prompt + completion, and `labels` keeps only the tokens that cover completion
    characters (a token straddling the boundary counts as completion; special tokens the
    tokenizer adds count as completion after the first completion token, as prompt before). A
    table with `messages` is rendered with the tokenizer's chat template (no special tokens
    added: the template writes them) and `labels` keeps the tokens of each assistant turn, as
    the template writes it after the generation prompt (content and end-of-turn). The loss is
    the mean over the kept tokens that have a token before them. An example truncated so far
    that no such token is left is a bad row.

    Errors name the table's `row` column (and `file`) when it has one; with on_bad_row="skip"
    a failing example is left out and listed in `Tokenized.rejected` instead. No table, or only
    empty ones, give an empty Tokenized; rows that are all rejected raise.
    """
    key = f"data.{role}"
    if task not in ("causal_lm", "sequence_classification"):
        raise ValueError(f"task must be 'causal_lm' or 'sequence_classification', not {task!r}")
    if task == "causal_lm" and max_length < 2:
        raise DataError(f"data.max_length: {max_length} leaves causal_lm nothing to predict; "
                        "use at least 2")
    out, rows_out = Tokenized(examples=TokenRows.empty(), ids=[], truncated=0), TokenRowsBuilder()
    for piece in [table] if isinstance(table, pa.Table) else table:
        _tokenize_table(piece, tokenizer, max_length, task, num_labels, add_special_tokens, key, on_bad_row,
                        out, rows_out)
    out.examples = rows_out.build()
    if not out.ids and out.rejected:
        raise _all_rejected(key, out.rejected)
    return out


def _tokenize_table(table: pa.Table, tokenizer: Any, max_length: int, task: str, num_labels: int | None,
                    add_special_tokens: bool, key: str, on_bad_row: str, out: Tokenized,
                    rows_out: TokenRowsBuilder) -> None:
    """`tokenize` of one table, its examples added to `rows_out` and its ids, rows, files,
    rejections and truncations to `out`."""
    mode = "messages" if "messages" in table.column_names else \
        "completion" if "completion" in table.column_names else "text"
    if mode != "text":
        option = f"{key}.{'messages' if mode == 'messages' else 'prompt'}_column"
        if task != "causal_lm":
            raise DataError(f"{option}: loss masking is for causal_lm, not {task}")
        if not getattr(tokenizer, "is_fast", False):
            raise DataError(f"{option}: needs a fast tokenizer (tokenizer.json) to tell the masked tokens "
                            "apart by character offsets; the tokenizer of model.path is a slow one")
        if mode == "messages" and not getattr(tokenizer, "chat_template", None):
            raise DataError(f"{option}: the tokenizer of model.path has no chat template to render the "
                            "messages with")
    ids = table.column("example_id").to_pylist()
    texts = table.column("text").to_pylist()
    rows = table.column("row").to_pylist() if "row" in table.column_names else list(range(len(ids)))
    files = table.column("file").to_pylist() if "file" in table.column_names else None
    labels = None
    if task == "sequence_classification":
        if "label" not in table.column_names:
            raise DataError(f"{key}.label_column: sequence_classification needs a label column")
        if num_labels is None:
            raise ValueError("tokenize: sequence_classification needs num_labels")
        labels = table.column("label").to_pylist()

    def where(i: int) -> str:
        return f"{key}: '{files[i]}' row {rows[i]}" if files else f"{key} row {rows[i]}"

    for start in range(0, len(texts), _TOKENIZE_CHUNK):
        stop = start + _TOKENIZE_CHUNK
        spans: list[list[tuple[int, int]] | str] | None = None
        if mode == "completion":
            prompts = table.column("prompt").slice(start, _TOKENIZE_CHUNK).to_pylist()
            spans = [[(len(p), len(t))] for p, t in zip(prompts, texts[start:stop])]
        elif mode == "messages":
            rendered = [_render_chat(tokenizer, m) for m in table.column("messages").slice(
                start, _TOKENIZE_CHUNK).to_pylist()]
            texts[start:stop] = [r[0] if isinstance(r, tuple) else "" for r in rendered]
            spans = [r[1] if isinstance(r, tuple) else r for r in rendered]
        encoded = _encode(tokenizer, texts[start:stop], max_length,
                          add_special_tokens and mode != "messages", offsets=mode != "text")
        for offset, (input_ids, _, cut, token_spans) in enumerate(encoded):
            i = start + offset
            loss_mask = label = problem = None
            if spans is not None and isinstance(spans[offset], str):
                problem = spans[offset]  # the chat template could not render the row
            elif task == "causal_lm" and len(input_ids) < 2:
                problem = (f"{len(input_ids)} token(s) after tokenisation; causal_lm needs at "
                           "least 2 (one to predict)")
            elif spans is not None:
                keep = _loss_tokens(token_spans, spans[offset], mode)
                predicted = sum(keep[1:])
                if predicted == 0:
                    what = "completion" if mode == "completion" else "assistant turns"
                    problem = (f"no token of the {what} is left to carry the loss: cut away by "
                               f"data.max_length ({max_length} tokens)" if cut else
                               f"the {what} has no token with a token before it to predict it from")
                else:
                    loss_mask = keep
            elif labels is not None:
                label = labels[i]
                if label is None:
                    problem = "the label is missing"
                elif not 0 <= label < num_labels:
                    problem = (f"label {label} is outside 0..{num_labels - 1} (the model has "
                               f"{num_labels} labels)")
            if problem is not None:
                if on_bad_row != "skip":
                    raise DataError(f"{where(i)} (id '{ids[i]}'): {problem}")
                file = files[i] if files else None
                out.rejected.append(Rejection(rows[i], ids[i], f"in '{file}': {problem}" if file else problem,
                                              file))
                continue
            rows_out.add(input_ids, loss_mask, label)
            out.ids.append(ids[i])
            out.rows.append(rows[i])
            if files:
                out.files.append(files[i])
            out.truncated += cut


def _render_chat(tokenizer: Any, messages: list[dict]) -> tuple[str, list[tuple[int, int]]] | str:
    """(the conversation as the chat template renders it, the character spans of its assistant
    turns), or the reason it cannot be rendered turn by turn.

    An assistant turn j spans from the end of messages[:j] rendered with the generation prompt
    to the end of messages[:j+1]; each rendering must be a prefix of the whole, or the turns
    cannot be told apart.
    """
    def render(turns: list[dict], generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation_prompt)

    try:
        whole = render(messages, False)
        spans = []
        for j, turn in enumerate(messages):
            if turn["role"] != "assistant":
                continue
            before = render(messages[:j], True) if j else ""
            through = render(messages[: j + 1], False)
            if not (whole.startswith(through) and through.startswith(before)):
                return (f"the chat template does not render the conversation turn by turn (turn {j} renders "
                        "differently within the whole), so its assistant tokens cannot be told apart")
            if turn["content"].strip():
                spans.append((len(before), len(through)))
    except Exception as error:  # noqa: BLE001 - a template raises what it likes (jinja2, ValueError)
        return f"the chat template could not render the messages: {error}"
    return whole, spans


def _loss_tokens(token_spans: list[tuple[int, int]], spans: list[tuple[int, int]], mode: str) -> list[bool]:
    """Which tokens carry the loss: those overlapping a span of characters (a completion, an
    assistant turn). A zero-width token (a special token the tokenizer added) carries it after a
    completion began (an EOS), not before (a BOS)."""
    keep, begun = [], False
    for start, end in token_spans:
        if start == end:
            keep.append(begun if mode == "completion" else False)
            continue
        hit = any(start < stop and end > first for first, stop in spans)
        begun = begun or hit
        keep.append(hit)
    return keep


def fingerprint(data: Tokenized) -> str:
    """sha256 over the ids and every example's tensors: equal inputs, equal fingerprints."""
    digest = hashlib.sha256()
    for example_id, example in zip(data.ids, data.examples):
        digest.update(f"{example_id}\0".encode())
        for name in sorted(example):
            digest.update(name.encode())
            digest.update(example[name].numpy().astype("<i8").tobytes())
    return digest.hexdigest()


CHARS_PER_TOKEN = 32
"""A text is tokenised from at most this many characters per token of max_length (from its kept
side), doubled while that part gives too few tokens: a token of ordinary text spans a few
characters, and a fast tokenizer encodes the whole string before it truncates."""


def _kept_part(text: str, budget: int, side: str) -> tuple[str, int]:
    """(the part of `text` to tokenise, where it starts in `text`): the whole of a short text, else
    about `budget` characters from the kept side, cut at whitespace when there is some near the
    cut, so that no word is split (the tokens before the cut are then those of the whole text)."""
    if len(text) <= budget:
        return text, 0
    if side == "left":
        start = len(text) - budget
        for i in range(start, start + budget // 2):  # keep the whitespace: it belongs to the next word
            if text[i].isspace():
                return text[i:], i
        return text[start:], start
    for i in range(budget, budget // 2, -1):
        if text[i].isspace():
            return text[:i], 0
    return text[:budget], 0


def _encode(tokenizer: Any, texts: list[str], max_length: int, add_special_tokens: bool,
            offsets: bool = False) -> list[tuple[list[int], list[int], bool, list | None]]:
    """(input_ids, attention_mask, truncated, character offsets in the whole text or None) per
    text, without ever encoding a text in full.

    A fast tokenizer encodes the whole string before it truncates, so a long text is first cut to
    `CHARS_PER_TOKEN` characters a token from its kept side (`tokenizer.truncation_side`), and
    the cut doubled while the part gives at most max_length tokens. Encoding to max_length + 1
    then returns every short text exactly; a result of max_length + 1 tokens means the text did
    not fit, and only those are encoded again to max_length.
    """
    side = getattr(tokenizer, "truncation_side", "right")

    def run(batch: list[str], limit: int) -> tuple[list[list[int]], list[list[int]], list | None]:
        out = tokenizer(batch, add_special_tokens=add_special_tokens, truncation=True,
                        max_length=limit, padding=False, return_attention_mask=True,
                        return_token_type_ids=False, return_offsets_mapping=offsets)
        spans = [[tuple(span) for span in seq] for seq in out["offset_mapping"]] if offsets else None
        return out["input_ids"], out["attention_mask"], spans

    budget = CHARS_PER_TOKEN * (max_length + 2)
    parts = [_kept_part(text, budget, side) for text in texts]
    input_ids, masks, spans = run([part for part, _ in parts], max_length + 1)
    short_cut = [i for i, seq in enumerate(input_ids) if len(seq) <= max_length and len(parts[i][0]) < len(texts[i])]
    while short_cut:  # cut too short to fill max_length (long runs of whitespace, long tokens): cut longer
        budget *= 2
        for i in short_cut:
            parts[i] = _kept_part(texts[i], budget, side)
        again_ids, again_masks, again_spans = run([parts[i][0] for i in short_cut], max_length + 1)
        for j, i in enumerate(short_cut):
            input_ids[i], masks[i] = again_ids[j], again_masks[j]
            if offsets:
                spans[i] = again_spans[j]
        short_cut = [i for i in short_cut if len(input_ids[i]) <= max_length and len(parts[i][0]) < len(texts[i])]
    long = [i for i, seq in enumerate(input_ids) if len(seq) > max_length]
    if long:
        cut_ids, cut_masks, cut_spans = run([parts[i][0] for i in long], max_length)
        for j, (i, seq, mask) in enumerate(zip(long, cut_ids, cut_masks)):
            input_ids[i], masks[i] = seq, mask
            if offsets:
                spans[i] = cut_spans[j]
    if offsets:  # offsets into the whole text, where the part began later in it
        spans = [[(a + parts[i][1], b + parts[i][1]) if parts[i][1] and b > a else (a, b) for a, b in seq]
                 for i, seq in enumerate(spans)]
    cut = set(long)
    return [(ids, mask, i in cut, spans[i] if offsets else None)
            for i, (ids, mask) in enumerate(zip(input_ids, masks))]


# ---------------------------------------------------------------------------------------------
# Partitioning across ranks


def partition(n_examples: int, world_size: int, batch_size: int) -> list[list[int]]:
    """Split positions 0..n-1 into `world_size` contiguous, balanced, equal-length lists.

    Rank r gets a contiguous run of real positions (the first n % world_size ranks one more
    than the others), followed by `PAD` (-1) entries up to L = ceil(n / world_size), so every
    list has length L. Cutting each list into consecutive batches of `batch_size` then gives
    every rank the same number of steps, `steps_per_rank(...)`, with the same batch sizes —
    the lockstep ZeRO-3 needs, since each forward/backward gathers parameters collectively.

    A padding slot is at most the last entry of a rank's list (a rank with no real example,
    when n < world_size, has one). The worker runs some real example in its place (position 0
    serves on every rank) and drops that row's outputs, so a padding step does all the
    collectives of a real one and writes nothing. At most world_size - 1 slots are padding.

    `batch_size` is only validated: the lists do not depend on it, so a partition is valid for
    any batch size.
    """
    if n_examples <= 0:
        raise ValueError(f"partition: n_examples must be > 0, got {n_examples}")
    if world_size <= 0:
        raise ValueError(f"partition: world_size must be > 0, got {world_size}")
    if batch_size <= 0:
        raise ValueError(f"partition: batch_size must be > 0, got {batch_size}")
    length = math.ceil(n_examples / world_size)
    base, extra = divmod(n_examples, world_size)
    parts, start = [], 0
    for rank in range(world_size):
        size = base + (rank < extra)
        parts.append(list(range(start, start + size)) + [PAD] * (length - size))
        start += size
    return parts


def chunk_plan(n_examples: int, world_size: int, batch_size: int,
               chunk_examples: int) -> list[list[list[int]]]:
    """The gradient pass as fixed units of work: `plan[c][r]` is the positions (PAD for a
    padding slot) that rank r computes and commits as chunk c.

    Each rank's `partition` list is cut into runs of ceil(chunk_examples / batch_size) whole
    batches. Every rank has the same number of chunks and, chunk for chunk, the same batches,
    so any subset of chunks can be (re)computed with all ranks in lockstep, and chunk c always
    covers the same examples, whichever attempt computes it.
    """
    if chunk_examples <= 0:
        raise ValueError(f"chunk_plan: chunk_examples must be > 0, got {chunk_examples}")
    parts = partition(n_examples, world_size, batch_size)
    span = math.ceil(chunk_examples / batch_size) * batch_size
    return [[part[start:start + span] for part in parts] for start in range(0, len(parts[0]), span)]


def steps_per_rank(n_examples: int, world_size: int, batch_size: int) -> int:
    """Forward/backward steps every rank runs over its `partition(...)` list: ceil(L / batch)."""
    if n_examples <= 0 or world_size <= 0 or batch_size <= 0:
        raise ValueError("steps_per_rank: n_examples, world_size and batch_size must be > 0")
    return math.ceil(math.ceil(n_examples / world_size) / batch_size)


# ---------------------------------------------------------------------------------------------
# Collating


def collate(examples: list[dict[str, torch.Tensor]], pad_token_id: int = 0) -> dict[str, torch.Tensor]:
    """Stack per-example tensors into a batch: [N, T] for 1-D fields, [N] for 0-d ones.

    1-D tensors of different lengths are right-padded to the longest: input_ids with
    `pad_token_id`, attention_mask with 0, labels with -100 (ignored by cross-entropy), any
    other field with 0. Tensors of equal shape are stacked as they are.
    """
    if not examples:
        raise ValueError("collate: no examples")
    keys = list(examples[0])
    for i, example in enumerate(examples):
        if set(example) != set(keys):
            raise ValueError(f"collate: example {i} has keys {sorted(example)}, "
                             f"example 0 has {sorted(keys)}")
    pad_values = {"input_ids": pad_token_id, "attention_mask": 0, "labels": -100}
    batch = {}
    for key in keys:
        tensors = [example[key] for example in examples]
        shapes = {tuple(t.shape) for t in tensors}
        if len(shapes) == 1:
            batch[key] = torch.stack(tensors)
        elif all(t.dim() == 1 for t in tensors):
            length = max(t.shape[0] for t in tensors)
            out = torch.full((len(tensors), length), pad_values.get(key, 0),
                             dtype=tensors[0].dtype)
            for row, t in enumerate(tensors):
                out[row, : t.shape[0]] = t
            batch[key] = out
        else:
            raise ValueError(f"collate: '{key}' has shapes {sorted(shapes)}; only 1-D tensors "
                             "of different lengths can be padded")
    return batch


# ---------------------------------------------------------------------------------------------
# A job's data


@dataclass
class Plan:
    """A job's train and query sets, read and tokenised (None where the job does not read one)."""

    train: Tokenized | None
    queries: Tokenized | None
    pad_token_id: int
    stored_train: int = 0
    """Rows of the training file left out because the run already holds their ids (an append)."""

    def split(self, name: str) -> Tokenized:
        return self.train if name == "train" else self.queries


def plan_job(cfg: JobConfig, splits: tuple[str, ...] = ("train", "queries"),
             stored_train_ids: set[str] | frozenset = frozenset()) -> Plan:
    """Read and tokenise the train and query sets (those in `splits`), a batch of rows at a time
    (`read_files`); ids are checked unique per set.

    With data.on_bad_row: skip, bad rows are left out and listed in each set's `rejected`. Training
    rows whose ids are in `stored_train_ids` (an append: the run holds them already) are left out
    before tokenising, and so are their rejections.
    """
    tokenizer = load_tokenizer(cfg.model)
    num_labels = None
    if cfg.model.task == "sequence_classification":
        from transformers import AutoConfig

        num_labels = AutoConfig.from_pretrained(cfg.model.path, local_files_only=True,
                                                trust_remote_code=cfg.model.trust_remote_code).num_labels
    sets: dict[str, Tokenized | None] = {"train": None, "queries": None}
    stored = [0]
    for role, dataset in (("train", cfg.data.train), ("queries", cfg.data.queries)):
        if role not in splits:
            continue
        read: list[Rejection] = []

        def tables(role=role, dataset=dataset, read=read) -> Iterator[pa.Table]:
            """Each batch's rows as they are read, less those an append's run holds already."""
            for table, rejected in read_files(dataset, role, cfg.data.on_bad_row):
                if role == "train" and stored_train_ids:
                    known = pa.array([i in stored_train_ids for i in table.column("example_id").to_pylist()],
                                     pa.bool_())
                    stored[0] += sum(known.to_pylist())
                    table = table.filter(pc.invert(known))
                    rejected = [r for r in rejected if r.example_id not in stored_train_ids]
                read.extend(rejected)
                yield table

        sets[role] = tokenize(tables(), tokenizer, cfg.data.max_length, cfg.model.task, num_labels=num_labels,
                              role=role, on_bad_row=cfg.data.on_bad_row)
        sets[role].rejected = sorted(read + sets[role].rejected, key=lambda r: (r.file or "", r.row))
    return Plan(sets["train"], sets["queries"], tokenizer.pad_token_id, stored[0])
