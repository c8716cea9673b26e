"""The output tables (README.md, "Read the outputs"), built in one place so the API and the job agree on columns."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pyarrow as pa

from distinf.core.numerics import require_finite

TOP_K_SCHEMA = pa.schema(
    [("query_id", pa.string()), ("rank", pa.int32()), ("train_id", pa.string()), ("score", pa.float32()),
     ("kind", pa.string())]
)
"""`kind` is "proponent" (the K highest scores, rank 1 = strongest proponent) or "opponent" (the K
lowest, rank 1 = strongest opponent, the most negative score)."""
TRAIN_VALUES_SCHEMA = pa.schema(
    [("train_id", pa.string()), ("loss", pa.float32()), ("score_mean", pa.float32()),
     ("self_influence", pa.float32())]
)
DENSE_SCHEMA = pa.schema([("query_id", pa.string()), ("train_id", pa.string()), ("score", pa.float32())])
REJECTED_SCHEMA = pa.schema([("example_id", pa.string()), ("split", pa.string()), ("row", pa.int64()),
                             ("reason", pa.string()), ("file", pa.string())])
"""`file` names the row's input file when its dataset has several (null for a single file)."""


def gradient_schema(k: int, dtype: str = "float32") -> pa.Schema:
    value = pa.float16() if dtype == "float16" else pa.float32()
    return pa.schema(
        [("example_id", pa.string()), ("loss", pa.float32()), ("grad", pa.list_(value, k))]
    )


def gradient_table(ids: Sequence[str], losses: np.ndarray, grads: np.ndarray, dtype: str = "float32") -> pa.Table:
    """example_id, loss, grad (fixed_size_list[k]) for rows of grads [n, k]."""
    schema = gradient_schema(grads.shape[1], dtype)
    stored = np.ascontiguousarray(grads, dtype=np.float16 if dtype == "float16" else np.float32)
    # Checked after the cast: float16 turns entries beyond ±65504 into inf, which a checksum would
    # then vouch for. The workers leave such rows out first; this is the last line.
    require_finite(stored, f"a gradient chunk stored as {dtype}")
    flat = pa.array(stored.ravel())
    return pa.table(
        [pa.array(list(ids), pa.string()), pa.array(np.asarray(losses, np.float32)),
         pa.FixedSizeListArray.from_arrays(flat, grads.shape[1])],
        schema=schema,
    )


def gradients_of(table: pa.Table) -> np.ndarray:
    """The grad column of a gradient table as float32 [n, k]."""
    column = table.column("grad").combine_chunks()
    k = column.type.list_size
    return column.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, k)


def top_k_table(query_ids: Sequence[str], train_ids: Sequence[str], scores: np.ndarray,
                positions: np.ndarray, opponent_scores: np.ndarray | None = None,
                opponent_positions: np.ndarray | None = None) -> pa.Table:
    """scores/positions [m, K] of a TopK (positions index train_ids); rank 1 = strongest proponent.
    With opponent_scores/positions [m, K] (the K lowest scores, lowest first), each query's
    proponents are followed by its opponents, told apart by `kind`.

    A non-finite score is refused, never dropped: a NaN would hide a proponent without a trace."""
    parts = [(scores, positions, "proponent")]
    if opponent_scores is not None:
        parts.append((opponent_scores, opponent_positions, "opponent"))
    m = scores.shape[0]
    train = np.asarray(train_ids, dtype=object)
    queries = np.asarray(query_ids, dtype=object)
    columns: list[list[np.ndarray]] = [[], [], [], [], []]
    for q in range(m):
        for part_scores, part_positions, kind in parts:
            kk = part_scores.shape[1]
            require_finite(part_scores[q], f"the top-{kk} {kind} scores of query '{query_ids[q]}'")
            columns[0].append(np.repeat(queries[q:q + 1], kk))
            columns[1].append(np.arange(1, kk + 1, dtype=np.int32))
            columns[2].append(train[part_positions[q]])
            columns[3].append(np.asarray(part_scores[q], np.float32))
            columns[4].append(np.full(kk, kind, dtype=object))
    joined = [np.concatenate(c) if c else np.array([], dtype=object) for c in columns]
    return pa.table([pa.array(values, field.type) for values, field in zip(joined, TOP_K_SCHEMA)],
                    schema=TOP_K_SCHEMA)


def train_values_table(train_ids: Sequence[str], losses: np.ndarray, score_mean: np.ndarray,
                       self_influence: np.ndarray | None) -> pa.Table:
    n = len(train_ids)
    self_inf = np.full(n, np.nan) if self_influence is None else self_influence
    return pa.table(
        [pa.array(list(train_ids), pa.string()), pa.array(np.asarray(losses, np.float32)),
         pa.array(np.asarray(score_mean, np.float32)), pa.array(np.asarray(self_inf, np.float32))],
        schema=TRAIN_VALUES_SCHEMA,
    )


def dense_table(query_ids: Sequence[str], train_ids: Sequence[str], scores: np.ndarray) -> pa.Table:
    """Long form of scores [m, n]: one row per (query, train) pair."""
    m, n = scores.shape
    return pa.table(
        [pa.array(np.repeat(np.asarray(query_ids, dtype=object), n), pa.string()),
         pa.array(np.tile(np.asarray(train_ids, dtype=object), m), pa.string()),
         pa.array(np.asarray(scores, np.float32).ravel())],
        schema=DENSE_SCHEMA,
    )


def rejected_table(rows: Sequence[tuple[str | None, str, int, str, str | None]]) -> pa.Table:
    """Rows left out under data.on_bad_row: skip, as (example_id, split, row in its file, reason,
    file), sorted by split (train first), file and row."""
    order = {"train": 0, "queries": 1}
    rows = sorted(rows, key=lambda r: (order.get(r[1], 2), r[1], r[4] or "", r[2]))
    columns = list(zip(*rows)) if rows else [[]] * len(REJECTED_SCHEMA)
    return pa.table([pa.array(list(values), field.type) for values, field in zip(columns, REJECTED_SCHEMA)],
                    schema=REJECTED_SCHEMA)
