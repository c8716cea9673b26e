"""The row checks of a dataset, made once, at the edge: ids (present, unique, not floats), text
(present, not empty, UTF-8, not enormous), labels (integers), completions and chat messages.

A bad row raises `DataError` with a message that names the file, the job-file key and the row,
e.g. ``data.train: 'train.csv' row 3 (id 'a7'): text is empty``. Rows are counted from 0 in their
file, as the default example ids are (across the files, for several). With `data.on_bad_row:
skip` a bad row is left out instead and returned as a `Rejection` (row, id, reason, file);
problems of a whole file still raise.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from distinf.config import DatasetConfig


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


def all_rejected(where: str, rejected: list[Rejection]) -> DataError:
    """The error for a dataset whose every row was rejected: how many, and the first one's reason."""
    first = rejected[0]
    return DataError(f"{where}: every row was rejected ({len(rejected)} in all); the first, row {first.row}: "
                     f"{first.reason}")


MAX_TEXT_BYTES = 16 << 20
"""A row whose text (prompt and completion, or rendered messages) is longer is a bad row: a text
is cut to data.max_length tokens anyway, and one enormous row (a broken export) must not take the
memory of the process that reads it."""


def check_batch(cfg: DatasetConfig, table: pa.Table, file: str, where: str, skip: bool, many: bool,
                offset: int, first_row: int) -> tuple[pa.Table, list[Rejection]]:
    """One batch of the rows of the file named `file` (its first is `first_row` of the file),
    checked and renamed to distinf's columns."""
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
        out["file"] = pa.array([file] * table.num_rows, pa.string())
    table = pa.table(out)
    if not bad.reasons:
        return table, []
    rejected = bad.rejections()
    if many:
        rejected = [Rejection(r.row, r.example_id, f"in '{file}': {r.reason}", file) for r in rejected]
    return table.filter(pa.array([row not in bad.reasons for row in range(table.num_rows)])), rejected


def check_ids_across(table: pa.Table, file: str, first_seen: dict, bad: list[Rejection], key: str,
                     where: str, skip: bool, many: bool) -> pa.Table:
    """Ids already read from an earlier file, or an earlier batch of this one: an error naming
    both places, or (skip) rejected here."""
    keep = []
    for example_id, row in zip(table.column("example_id").to_pylist(), table.column("row").to_pylist()):
        if example_id in first_seen:
            other, other_row = first_seen[example_id]
            same = other == file
            if not skip:
                raise DataError(f"{where}: duplicate id '{example_id}' in rows {other_row}, {row}; ids must be unique"
                                if same else
                                f"{key}: duplicate id '{example_id}' in '{other}' row {other_row} and "
                                f"'{file}' row {row}; ids must be unique across the files")
            reason = (f"duplicate id '{example_id}' (first at row {other_row})" if same else
                      f"duplicate id '{example_id}' (first in '{other}' row {other_row})")
            bad.append(Rejection(row, example_id, f"in '{file}': {reason}", file) if many
                       else Rejection(row, example_id, reason))
            keep.append(False)
        else:
            first_seen[example_id] = (file, row)
            keep.append(True)
    return table if all(keep) else table.filter(pa.array(keep, pa.bool_()))


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
