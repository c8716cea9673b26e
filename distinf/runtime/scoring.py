"""Scoring tasks: one per training-gradient chunk, no model loaded, all reading the same Q."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import numpy as np
import ray
import torch

from distinf.core.curvature import Curvature, self_influence
from distinf.core.numerics import require_finite
from distinf.core.scoring import TopK, needs_self_influence, normalized, score_chunk, train_divisors
from distinf.runtime.faults import injected_step_delay
from distinf.runtime.versions import stamp
from distinf.store import atomic_write_table, read_verified_table
from distinf.tables import dense_table, gradients_of


@dataclass
class ChunkScores:
    ids: list[str]
    losses: np.ndarray
    score_mean: np.ndarray          # [n] mean over queries of the ranking score
    influence_mean: np.ndarray      # [n] mean over queries of the influence (undivided)
    self_influence: np.ndarray | None
    top_scores: np.ndarray          # [m, K'] the chunk's own top-K
    top_ids: np.ndarray             # [m, K'] their example ids
    top_influence: np.ndarray       # [m, K'] their influence
    bottom_scores: np.ndarray       # [m, K'] the chunk's K lowest scores, lowest first
    bottom_ids: np.ndarray          # [m, K'] their example ids
    bottom_influence: np.ndarray    # [m, K'] their influence


@ray.remote(num_cpus=1)
def score_train_chunk(path: str, sha256: str, preconditioned: np.ndarray, curvature: Curvature, top_k: int,
                      with_self_influence: bool, query_ids: list[str], dense_path: str | None,
                      version: tuple[str, datetime] | None = None, normalize: str = "none",
                      query_divisors: np.ndarray | None = None) -> ChunkScores:
    """One chunk's top-K, score_mean, influence_mean, self-influence and dense part; scores divided as
    scoring.normalize says (`query_divisors` [m] from the queries, the chunk's own from its rows)."""
    injected_step_delay("scoring")  # tests only: a scoring stage long enough to lose a node in
    table = read_verified_table(path, sha256)
    ids = table.column("example_id").to_pylist()
    grads = torch.from_numpy(gradients_of(table))
    require_finite(grads, f"gradient chunk {path}")
    self_inf = (self_influence(curvature, grads).numpy()
                if with_self_influence or needs_self_influence(normalize) else None)
    if self_inf is not None:
        require_finite(self_inf, f"the self-influence of gradient chunk {path}")
    influence = score_chunk(torch.from_numpy(preconditioned), grads).numpy()  # [m, n]
    scores = influence
    if normalize != "none":
        scores = normalized(influence, query_divisors, train_divisors(normalize, grads, self_inf))
    require_finite(scores, f"the scores of gradient chunk {path}")
    top = TopK(scores.shape[0], top_k)
    top.update(scores, np.arange(len(ids)), influence)  # local order is global order within a chunk
    bottom = TopK(scores.shape[0], top_k)
    bottom.update(-scores, np.arange(len(ids)), influence)
    if dense_path is not None:
        dense = dense_table(query_ids, ids, scores, influence)
        atomic_write_table(dense if version is None else stamp(dense, *version), dense_path)
    return ChunkScores(
        ids=ids,
        losses=table.column("loss").to_numpy(),
        score_mean=scores.mean(0),
        influence_mean=influence.mean(0),
        self_influence=self_inf if with_self_influence else None,
        top_scores=top.scores,
        top_ids=np.asarray(ids, dtype=object)[top.positions],
        top_influence=top.values,
        bottom_scores=-bottom.scores,
        bottom_ids=np.asarray(ids, dtype=object)[bottom.positions],
        bottom_influence=bottom.values,
    )
