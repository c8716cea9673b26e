"""Reading a dataset into checked tables: every file of it (`files.dataset_files`) in its format,
a batch of rows at a time, each batch's rows checked (`checks`) and renamed to distinf's columns.
Pure functions, no Ray."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import pyarrow as pa

from distinf.config import DatasetConfig
from distinf.inputs.checks import DataError, Rejection, all_rejected, check_batch, check_ids_across
from distinf.inputs.files import Source, dataset_files, open_source, source_size

READ_BATCH_ROWS = 65_536
"""Rows read and checked at a time: a file larger than this never lies in memory whole."""


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
        raise all_rejected(where, rejected)


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
    for table in read_raw(source, key, string_columns, skip, allow_empty=many, columns=wanted):
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
        checked, rejected = check_batch(cfg, table, source.name, where, skip, many, offset, first_row)
        if checked.num_rows:
            checked = check_ids_across(checked, source.name, first_seen, rejected, key, where, skip, many)
            rejected.sort(key=lambda r: r.row)
        first_row += table.num_rows
        yield checked, rejected
    if first_row == 0 and not many:
        raise DataError(f"{where} has no rows")


def read_raw(source: Source, key: str, text_columns: list[str], skip: bool = False,
             allow_empty: bool = False, columns: list[str] | None = None) -> Iterator[pa.Table]:
    """One file as tables of up to about READ_BATCH_ROWS rows, in file order, through
    pyarrow.dataset (a `save_to_disk` shard: an Arrow stream).

    With `columns`, only those are read when the file has them all (other columns of a wide file
    never reach memory); else every column, for the caller to name what is missing."""
    import pyarrow.csv
    import pyarrow.dataset as ds

    fmt = source.fmt
    if fmt not in ("parquet", "arrow") and source_size(source) == 0:
        if allow_empty:
            return
        raise DataError(f"{key}: '{source.name}' has no rows (the file is empty)")
    try:
        if fmt == "arrow":
            with open_source(source) as stream:
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
        with open_source(source) as stream:
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
        with open_source(source) as stream:
            return stream.read(4096).lstrip().startswith(b"[")
    except OSError:
        return False
