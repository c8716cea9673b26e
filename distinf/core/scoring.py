"""Scoring: score(i, q) = ĝ_qᵀ Ĥ⁻¹ ĝ_i from preconditioned queries Q = Ĥ⁻¹ Ĝ_qᵀ [k, m].

Everything here works one chunk of training gradients at a time, so the same code scores a
notebook's matrix and a cluster's Parquet chunks; the top-K merge is exact and order-independent.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def score_chunk(preconditioned_queries: Tensor, train_grads: Tensor) -> Tensor:
    """Q [k, m], Ĝ_chunk [n, k] -> scores [m, n], float64."""
    return (train_grads.to("cpu", torch.float64) @ preconditioned_queries.to(torch.float64)).T


class TopK:
    """The K highest scores per query, merged chunk by chunk.

    Ties are broken by the smaller training position, so any chunking gives the same answer.
    """

    def __init__(self, num_queries: int, k: int):
        self.k = k
        self.scores = np.full((num_queries, 0), -np.inf)
        self.positions = np.zeros((num_queries, 0), dtype=np.int64)

    def update(self, scores: Tensor | np.ndarray, positions: np.ndarray) -> None:
        """scores [m, n] for training examples at global positions [n] (or [m, n])."""
        scores = np.asarray(scores, dtype=np.float64)
        all_scores = np.concatenate([self.scores, scores], axis=1)
        all_positions = np.concatenate([self.positions, np.broadcast_to(positions, scores.shape)], axis=1)
        keep = min(self.k, all_scores.shape[1])
        order = np.lexsort((all_positions, -all_scores), axis=1)[:, :keep]
        self.scores = np.take_along_axis(all_scores, order, axis=1)
        self.positions = np.take_along_axis(all_positions, order, axis=1)
