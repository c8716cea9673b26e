"""Scoring: score(i, q) = ĝ_qᵀ Ĥ⁻¹ ĝ_i from preconditioned queries Q = Ĥ⁻¹ Ĝ_qᵀ [k, m].

Everything here works one chunk of training gradients at a time, so the same code scores a
notebook's matrix and a cluster's Parquet chunks; the top-K merge is exact and order-independent.

`scoring.normalize` divides each score by a per-query and a per-example factor, so examples with
large gradients stop winning every query:
  none     1 and 1: the paper's influence
  relatif  1 and √(ĝ_iᵀ Ĥ⁻¹ ĝ_i): RelatIF's θ-relative influence (per query, the order of cosine)
  cosine   √(ĝ_qᵀ Ĥ⁻¹ ĝ_q) and √(ĝ_iᵀ Ĥ⁻¹ ĝ_i): the cosine in the Ĥ⁻¹ metric, in [-1, 1]
  unit     ‖ĝ_q‖ and ‖ĝ_i‖: unit-norm gradients before the solve's product (as bergson and LESS)

The undivided score is the influence, kept next to the normalised one in every output: removing
training example i from n changes q's loss by about +influence(i, q)/n to first order (removing
a proponent raises it), and removing a set by the sum over the set. A normalised score ranks; it
adds up to nothing.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def score_chunk(preconditioned_queries: Tensor, train_grads: Tensor) -> Tensor:
    """Q [k, m], Ĝ_chunk [n, k] -> scores [m, n], float64."""
    return (train_grads.to("cpu", torch.float64) @ preconditioned_queries.to(torch.float64)).T


NORMALIZATIONS = ("none", "relatif", "cosine", "unit")


def needs_self_influence(normalize: str) -> bool:
    return normalize in ("relatif", "cosine")


def query_divisors(normalize: str, query_grads: Tensor, preconditioned_queries: Tensor) -> np.ndarray:
    """[m] factor each query's scores are divided by; Q [k, m] as score_chunk takes it."""
    g = query_grads.to("cpu", torch.float64)
    if normalize == "cosine":
        return np.sqrt((g * preconditioned_queries.to("cpu", torch.float64).T).sum(1).clamp(min=0).numpy())
    if normalize == "unit":
        return g.norm(dim=1).numpy()
    return np.ones(g.shape[0])


def train_divisors(normalize: str, train_grads: Tensor, self_influence: np.ndarray | None) -> np.ndarray:
    """[n] factor each training example's scores are divided by (self_influence [n] for relatif, cosine)."""
    if needs_self_influence(normalize):
        return np.sqrt(np.clip(np.asarray(self_influence, dtype=np.float64), 0, None))
    if normalize == "unit":
        return train_grads.to("cpu", torch.float64).norm(dim=1).numpy()
    return np.ones(train_grads.shape[0])


def normalized(scores: np.ndarray, query_div: np.ndarray, train_div: np.ndarray) -> np.ndarray:
    """scores [m, n] / (query_div [m] ⊗ train_div [n]); a zero divisor (a zero gradient, whose
    scores are 0 too) gives 0, not NaN."""
    divisor = np.outer(query_div, train_div)
    return np.divide(scores, divisor, out=np.zeros_like(scores, dtype=np.float64), where=divisor > 0)


class TopK:
    """The K highest scores per query, merged chunk by chunk, each with a value carried along
    (the raw influence of the same pair, when the scores rank by a normalised one).

    Ties are broken by the smaller training position, so any chunking gives the same answer.
    """

    def __init__(self, num_queries: int, k: int):
        self.k = k
        self.scores = np.full((num_queries, 0), -np.inf)
        self.positions = np.zeros((num_queries, 0), dtype=np.int64)
        self.values = np.zeros((num_queries, 0))

    def update(self, scores: Tensor | np.ndarray, positions: np.ndarray,
               values: Tensor | np.ndarray | None = None) -> None:
        """scores [m, n] for training examples at global positions [n] (or [m, n]); values [m, n]
        ride along with them (the scores themselves when not given)."""
        scores = np.asarray(scores, dtype=np.float64)
        values = scores if values is None else np.asarray(values, dtype=np.float64)
        all_scores = np.concatenate([self.scores, scores], axis=1)
        all_positions = np.concatenate([self.positions, np.broadcast_to(positions, scores.shape)], axis=1)
        all_values = np.concatenate([self.values, values], axis=1)
        keep = min(self.k, all_scores.shape[1])
        order = np.lexsort((all_positions, -all_scores), axis=1)[:, :keep]
        self.scores = np.take_along_axis(all_scores, order, axis=1)
        self.positions = np.take_along_axis(all_positions, order, axis=1)
        self.values = np.take_along_axis(all_values, order, axis=1)
