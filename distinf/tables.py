"""The output tables (README.md, "Read the outputs"), built in one place so the API and the job agree on columns."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pyarrow as pa

from distinf.core.numerics import require_finite

# Every score table carries two numbers per pair (distinf/core/scoring.py): `score`, the ranking
# score divided as scoring.normalize says (cosine by default), and `influence`, the undivided
# ĝ_qᵀĤ⁻¹ĝ_i, which adds up: removing a set of training rows changes a query's loss by about the
# sum of their influence over n. With normalize: none the two are equal.
TOP_K_SCHEMA = pa.schema(
    [("query_id", pa.string()), ("rank", pa.int32()), ("train_id", pa.string()), ("score", pa.float32()),
     ("influence", pa.float32()), ("kind", pa.string())]
)
"""`kind` is "proponent" (the K highest scores, rank 1 = strongest proponent) or "opponent" (the K
lowest, rank 1 = strongest opponent, the most negative score)."""
TRAIN_VALUES_SCHEMA = pa.schema(
    [("train_id", pa.string()), ("loss", pa.float32()), ("score_mean", pa.float32()),
     ("self_influence", pa.float32()), ("influence_mean", pa.float32())]
)
DENSE_SCHEMA = pa.schema([("query_id", pa.string()), ("train_id", pa.string()), ("score", pa.float32()),
                          ("influence", pa.float32())])
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


def as_stored(values) -> np.ndarray:
    """Values as the float32 they are stored as; an overflow becomes inf, for the caller to refuse."""
    with np.errstate(over="ignore"):
        return np.asarray(values).astype(np.float32)


def top_k_table(query_ids: Sequence[str], train_ids: Sequence[str], scores: np.ndarray,
                positions: np.ndarray, influence: np.ndarray, opponent_scores: np.ndarray | None = None,
                opponent_positions: np.ndarray | None = None, opponent_influence: np.ndarray | None = None
                ) -> pa.Table:
    """scores/positions/influence [m, K] of a TopK (its scores, positions, values; positions index
    train_ids); rank 1 = strongest proponent by score. With the opponents' [m, K] (the K lowest
    scores, lowest first), each query's proponents are followed by its opponents, told apart by `kind`.

    A non-finite score is refused, never dropped: a NaN would hide a proponent without a trace.
    Checked as stored: 1e39 is finite in float64 only."""
    parts = [(scores, positions, influence, "proponent")]
    if opponent_scores is not None:
        parts.append((opponent_scores, opponent_positions, opponent_influence, "opponent"))
    m = scores.shape[0]
    train = np.asarray(train_ids, dtype=object)
    queries = np.asarray(query_ids, dtype=object)
    columns: list[list[np.ndarray]] = [[], [], [], [], [], []]
    for q in range(m):
        for part_scores, part_positions, part_influence, kind in parts:
            kk = part_scores.shape[1]
            stored_scores, stored_influence = as_stored(part_scores[q]), as_stored(part_influence[q])
            require_finite(stored_scores, f"the top-{kk} {kind} scores of query '{query_ids[q]}' (as float32)")
            require_finite(stored_influence, f"the top-{kk} {kind} influence of query '{query_ids[q]}' (as float32)")
            columns[0].append(np.repeat(queries[q:q + 1], kk))
            columns[1].append(np.arange(1, kk + 1, dtype=np.int32))
            columns[2].append(train[part_positions[q]])
            columns[3].append(stored_scores)
            columns[4].append(stored_influence)
            columns[5].append(np.full(kk, kind, dtype=object))
    joined = [np.concatenate(c) if c else np.array([], dtype=object) for c in columns]
    return pa.table([pa.array(values, field.type) for values, field in zip(joined, TOP_K_SCHEMA)],
                    schema=TOP_K_SCHEMA)


def train_values_table(train_ids: Sequence[str], losses: np.ndarray, score_mean: np.ndarray,
                       self_influence: np.ndarray | None, influence_mean: np.ndarray) -> pa.Table:
    """One row per training example; self_influence is NaN when it was not computed. score_mean and
    influence_mean [n]: the mean over queries of each row's score and influence. Every other value
    must be finite once stored as float32."""
    n = len(train_ids)
    columns = {"loss": as_stored(losses), "score_mean": as_stored(score_mean),
               "influence_mean": as_stored(influence_mean)}
    if self_influence is not None:
        columns["self_influence"] = as_stored(self_influence)
    for name, values in columns.items():
        if not np.isfinite(values).all():
            bad = int(np.flatnonzero(~np.isfinite(values))[0])
            require_finite(values, f"train_values' {name} of train id '{train_ids[bad]}' (as float32)")
    self_inf = columns.get("self_influence", np.full(n, np.nan, np.float32))
    return pa.table(
        [pa.array(list(train_ids), pa.string()), pa.array(columns["loss"]),
         pa.array(columns["score_mean"]), pa.array(self_inf), pa.array(columns["influence_mean"])],
        schema=TRAIN_VALUES_SCHEMA,
    )


def dense_table(query_ids: Sequence[str], train_ids: Sequence[str], scores: np.ndarray,
                influence: np.ndarray) -> pa.Table:
    """Long form of scores and influence [m, n]: one row per (query, train) pair."""
    m, n = scores.shape
    stored, stored_influence = as_stored(scores), as_stored(influence)
    require_finite(stored, "the dense scores (as float32)")
    require_finite(stored_influence, "the dense influence (as float32)")
    return pa.table(
        [pa.array(np.repeat(np.asarray(query_ids, dtype=object), n), pa.string()),
         pa.array(np.tile(np.asarray(train_ids, dtype=object), m), pa.string()),
         pa.array(stored.ravel()),
         pa.array(stored_influence.ravel())],
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
