"""The job's input side: read a dataset file, tokenise it, split it across ranks, collate batches.

Pure functions, no Ray. `read_dataset` and `tokenize` check the data once, at the edge, and raise
`DataError` with a message that names the file, the job-file key and the row, e.g.
``data.train: 'train.csv' row 3 (id 'a7'): text is empty``. Rows are counted from 0, as the
default example ids are. With `data.on_bad_row: skip` a bad row is left out instead and returned
as a `Rejection` (row, id, reason); problems of the whole file still raise.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import torch

from distinf.config import DatasetConfig

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
    """The row in the file, from 0."""
    example_id: str | None
    """None when the id itself is what is wrong."""
    reason: str


class _BadRows:
    """Rows that fail a check: raised at the first (on_bad_row: error) or collected (skip)."""

    def __init__(self, where: str, skip: bool):
        self.where, self.skip = where, skip
        self.ids: pa.Array | None = None
        self.reasons: dict[int, str] = {}

    def add(self, row: int, reason: str, name_id: bool = True) -> None:
        if not self.skip:
            named = f" (id '{self.ids[row].as_py()}')" if name_id and self.ids is not None else ""
            raise DataError(f"{self.where} row {row}{named}: {reason}")
        self.reasons.setdefault(row, reason)  # the first problem found is the one reported

    def rejections(self) -> list[Rejection]:
        def id_of(row: int) -> str | None:
            value = self.ids[row].as_py() if self.ids is not None else None
            return value if value and value.strip() else None

        return [Rejection(row, id_of(row), reason) for row, reason in sorted(self.reasons.items())]


def _all_rejected(where: str, rejected: list[Rejection]) -> DataError:
    first = rejected[0]
    return DataError(f"{where}: every row was rejected ({len(rejected)} in all); the first, row {first.row}: "
                     f"{first.reason}")


# ---------------------------------------------------------------------------------------------
# Reading


def read_table(cfg: DatasetConfig, role: str) -> pa.Table:
    """Read one dataset file into a table of `example_id` (string), `text` (string) and, when
    `cfg.label_column` is set, `label` (int64), in file order.

    Parquet (.parquet, .pq), JSON lines (.jsonl, .ndjson, .json) or CSV (.csv), the text formats
    optionally compressed (.gz, .bz2, .zst, .lz4). Ids are `cfg.id_column` cast to string, or the
    row numbers "0", "1", ... `role` ("train" or "queries") names the job-file key in errors.
    """
    return read_dataset(cfg, role)[0].drop_columns(["row"])


def read_dataset(cfg: DatasetConfig, role: str, on_bad_row: str = "error") -> tuple[pa.Table, list[Rejection]]:
    """`read_table`'s table plus `row` (int64, the row in the file), and the rejected rows.

    With on_bad_row="error" the first bad row raises DataError and the list is empty; with "skip"
    bad rows (missing or non-UTF-8 id or text, empty text, a repeated id, a missing or
    non-integer label) are left out of the table and listed. A problem of the whole file (no
    such file or column, no rows, unreadable) raises in both modes, as does a file whose every
    row is bad.
    """
    key = f"data.{role}"
    path = Path(cfg.path)
    if not path.is_file():
        raise DataError(f"{key}.path: no such file '{cfg.path}'")
    fmt = _format_of(path, key)
    skip = on_bad_row == "skip"
    table = _read_raw(path, fmt, key, [c for c in (cfg.text_column, cfg.id_column) if c], skip)
    where = f"{key}: '{cfg.path}'"

    columns = {"text": cfg.text_column, "label": cfg.label_column, "example_id": cfg.id_column}
    for field, column in columns.items():
        if column is not None and column not in table.column_names:
            option = "id_column" if field == "example_id" else f"{field}_column"
            available = ", ".join(repr(name) for name in table.column_names)
            raise DataError(f"{key}.{option}: no column '{column}' in '{cfg.path}'; "
                            f"the columns are {available}")
    if table.num_rows == 0:
        raise DataError(f"{where} has no rows")

    bad = _BadRows(where, skip)
    if cfg.id_column is None:
        ids = pa.array([str(row) for row in range(table.num_rows)], pa.string())
    else:
        ids = _as_string(table.column(cfg.id_column), bad, f"id column '{cfg.id_column}'")
        _check_ids(ids, bad)
    bad.ids = ids
    text = _as_string(table.column(cfg.text_column), bad, f"text column '{cfg.text_column}'")
    _check_text(text, bad)

    out = {"example_id": ids, "text": text}
    if cfg.label_column is not None:
        out["label"] = _as_labels(table.column(cfg.label_column), bad)
    out["row"] = pa.array(range(table.num_rows), pa.int64())
    table = pa.table(out)
    if not bad.reasons:
        return table, []
    rejected = bad.rejections()
    if len(rejected) == table.num_rows:
        raise _all_rejected(where, rejected)
    return table.filter(pa.array([row not in bad.reasons for row in range(table.num_rows)])), rejected


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


def _read_raw(path: Path, fmt: str, key: str, text_columns: list[str], skip: bool = False) -> pa.Table:
    import pyarrow.csv
    import pyarrow.json
    import pyarrow.parquet

    if fmt != "parquet" and path.stat().st_size == 0:
        raise DataError(f"{key}: '{path}' has no rows (the file is empty)")
    try:
        if fmt == "parquet":
            return pyarrow.parquet.read_table(path)
        if fmt == "csv":
            # Text and ids as strings, so that an id such as "007" keeps its zeros; absent
            # columns are ignored here and reported by the caller. When skipping bad rows, read
            # them as bytes so that a non-UTF-8 row is found by row, not fatal to the file.
            types = {name: pa.binary() if skip else pa.string() for name in text_columns}
            return pyarrow.csv.read_csv(
                path, convert_options=pyarrow.csv.ConvertOptions(column_types=types))
        table = pyarrow.json.read_json(path)
        table.validate(full=True)  # the JSON reader does not check UTF-8 by itself
        return table
    except (pa.ArrowInvalid, OSError) as error:
        raise _read_error(path, fmt, key, error) from None


def _read_error(path: Path, fmt: str, key: str, error: Exception) -> DataError:
    line = _first_non_utf8_line(path) if fmt != "parquet" else None
    if line is not None:
        return DataError(f"{key}: '{path}' is not valid UTF-8 text (line {line}); "
                         "re-encode the file as UTF-8")
    if fmt == "csv" and "Empty CSV file" in str(error):
        return DataError(f"{key}: '{path}' has no rows (the file is empty)")
    if fmt == "json" and _starts_with_bracket(path):
        return DataError(f"{key}: '{path}' holds a JSON array; write one JSON object per line "
                         "(JSON lines)")
    kind = {"parquet": "Parquet", "csv": "CSV", "json": "JSON lines"}[fmt]
    return DataError(f"{key}: '{path}' could not be read as {kind}: {error}")


def _first_non_utf8_line(path: Path) -> int | None:
    """The 1-based line of the first byte sequence that is not UTF-8, or None; streams the file."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    line = 1
    with pa.input_stream(str(path), compression="detect") as stream:
        while chunk := stream.read(1 << 20):
            pending = decoder.getstate()[0]  # an unfinished character from the last chunk, no \n
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as error:
                return line + (pending + chunk)[: error.start].count(b"\n")
            line += chunk.count(b"\n")
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return line
    return None


def _starts_with_bracket(path: Path) -> bool:
    with pa.input_stream(str(path), compression="detect") as stream:
        return stream.read(4096).lstrip().startswith(b"[")


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
    for row in _rows_where(pc.or_(pc.is_null(ids), pc.equal(pc.utf8_trim_whitespace(ids), ""))):
        bad.add(row, "the id is missing", name_id=False)
    counts = pc.value_counts(ids)
    repeated = counts.field("values").filter(pc.greater(counts.field("counts"), 1))
    if not len(repeated):
        return
    if not bad.skip:
        first = ids[_first_true(pc.is_in(ids, value_set=repeated))].as_py()
        rows = pc.indices_nonzero(pc.equal(ids, first)).to_pylist()
        shown = ", ".join(str(r) for r in rows[:10]) + (", ..." if len(rows) > 10 else "")
        raise DataError(f"{bad.where}: duplicate id '{first}' in rows {shown}; ids must be unique")
    seen: dict[str, int] = {}
    for row in _rows_where(pc.is_in(ids, value_set=repeated)):
        value = ids[row].as_py()
        if value in seen:  # the first occurrence stays, the repeats go
            bad.add(row, f"duplicate id '{value}' (first at row {seen[value]})", name_id=False)
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

    examples: list[dict[str, torch.Tensor]]
    """input_ids [T] and attention_mask [T] (int64, T <= max_length, no padding); for
    sequence_classification also labels [] (int64)."""
    ids: list[str]
    truncated: int
    """How many examples were cut to max_length."""
    rows: list[int] = field(default_factory=list)
    """The row in the file of each example."""
    rejected: list[Rejection] = field(default_factory=list)
    """Rows left out under on_bad_row="skip", by `read_dataset` and by `tokenize`."""


_TOKENIZE_CHUNK = 1024


def tokenize(table: pa.Table, tokenizer: Any, max_length: int, task: str, *,
             num_labels: int | None = None, add_special_tokens: bool = True,
             role: str = "train", on_bad_row: str = "error") -> Tokenized:
    """Tokenise `table` (from `read_table` or `read_dataset`) into one dict of 1-D int64 tensors
    per example.

    Sequences longer than `max_length` are truncated the way the tokenizer truncates (its
    `truncation_side`, special tokens kept) and counted in `Tokenized.truncated`. For
    `sequence_classification` each example also gets a 0-d `labels` from the table's `label`
    column, checked against `num_labels`. For `causal_lm` there is no labels key (the loss
    predicts input_ids[1:]), so every example needs at least 2 tokens. Errors name the table's
    `row` column when it has one; with on_bad_row="skip" a failing example is left out and
    listed in `Tokenized.rejected` instead.
    """
    key = f"data.{role}"
    if task not in ("causal_lm", "sequence_classification"):
        raise ValueError(f"task must be 'causal_lm' or 'sequence_classification', not {task!r}")
    if task == "causal_lm" and max_length < 2:
        raise DataError(f"data.max_length: {max_length} leaves causal_lm nothing to predict; "
                        "use at least 2")
    ids = table.column("example_id").to_pylist()
    texts = table.column("text").to_pylist()
    rows = table.column("row").to_pylist() if "row" in table.column_names else list(range(len(ids)))
    labels = None
    if task == "sequence_classification":
        if "label" not in table.column_names:
            raise DataError(f"{key}.label_column: sequence_classification needs a label column")
        if num_labels is None:
            raise ValueError("tokenize: sequence_classification needs num_labels")
        labels = table.column("label").to_pylist()

    out = Tokenized(examples=[], ids=[], truncated=0)
    for start in range(0, len(texts), _TOKENIZE_CHUNK):
        encoded = _encode(tokenizer, texts[start:start + _TOKENIZE_CHUNK], max_length,
                          add_special_tokens)
        for offset, (input_ids, mask, cut) in enumerate(encoded):
            i = start + offset
            example = {"input_ids": torch.tensor(input_ids, dtype=torch.int64),
                       "attention_mask": torch.tensor(mask, dtype=torch.int64)}
            problem = None
            if task == "causal_lm" and len(input_ids) < 2:
                problem = (f"{len(input_ids)} token(s) after tokenisation; causal_lm needs at "
                           "least 2 (one to predict)")
            elif labels is not None:
                label = labels[i]
                if label is None:
                    problem = "the label is missing"
                elif not 0 <= label < num_labels:
                    problem = (f"label {label} is outside 0..{num_labels - 1} (the model has "
                               f"{num_labels} labels)")
                else:
                    example["labels"] = torch.tensor(label, dtype=torch.int64)
            if problem is not None:
                if on_bad_row != "skip":
                    raise DataError(f"{key} row {rows[i]} (id '{ids[i]}'): {problem}")
                out.rejected.append(Rejection(rows[i], ids[i], problem))
                continue
            out.examples.append(example)
            out.ids.append(ids[i])
            out.rows.append(rows[i])
            out.truncated += cut
    if not out.examples:
        raise _all_rejected(key, out.rejected)
    return out


def fingerprint(data: Tokenized) -> str:
    """sha256 over the ids and every example's tensors: equal inputs, equal fingerprints."""
    digest = hashlib.sha256()
    for example_id, example in zip(data.ids, data.examples):
        digest.update(f"{example_id}\0".encode())
        for name in sorted(example):
            digest.update(name.encode())
            digest.update(example[name].numpy().astype("<i8").tobytes())
    return digest.hexdigest()


def _encode(tokenizer: Any, texts: list[str], max_length: int,
            add_special_tokens: bool) -> list[tuple[list[int], list[int], bool]]:
    """(input_ids, attention_mask, truncated) per text, without ever encoding a text in full.

    Encoding to max_length + 1 returns every short text exactly; a result of max_length + 1
    tokens means the text did not fit, and only those are encoded again to max_length.
    """
    def run(batch: list[str], limit: int) -> tuple[list[list[int]], list[list[int]]]:
        out = tokenizer(batch, add_special_tokens=add_special_tokens, truncation=True,
                        max_length=limit, padding=False, return_attention_mask=True,
                        return_token_type_ids=False)
        return out["input_ids"], out["attention_mask"]

    input_ids, masks = run(texts, max_length + 1)
    long = [i for i, seq in enumerate(input_ids) if len(seq) > max_length]
    if long:
        cut_ids, cut_masks = run([texts[i] for i in long], max_length)
        for i, seq, mask in zip(long, cut_ids, cut_masks):
            input_ids[i], masks[i] = seq, mask
    cut = set(long)
    return [(ids, mask, i in cut) for i, (ids, mask) in enumerate(zip(input_ids, masks))]


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
