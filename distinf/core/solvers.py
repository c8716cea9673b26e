"""The inverse-Hessian solvers of `hessian.method`, each per curvature block, each with the same face.

Each method's class (distinf.core.curvatures) builds its solver from these; this is the math only.

A solver offers `precondition(grads [m, k]) -> Ĥ⁻¹ ĝ` and `self_influence(grads [n, k])`, and
carries `slices` and `damping` (per block), so scoring and the run directory treat them alike.

- gauss_newton (distinf.core.curvature): Ĥ = (1/n) Σ ĝĝᵀ + λI, Cholesky. Exact in the compressed space.
- identity: Ĥ = I, plain gradient dot products (Pruthi et al., TracIn-style). No damping.
- datainf (Kwon et al.): swap inversion and averaging, then Sherman–Morrison per example,
      Ĥ⁻¹ ≈ (1/n) Σ_i (λI + g_i g_iᵀ)⁻¹ = (1/λ) (I − (1/n) Σ_i g_i g_iᵀ / (λ + ‖g_i‖²)).
  The weighted sum is additive like the Gram, so it is kept as one k_l x k_l matrix per block
  (no factorisation) and chunks of a distributed run sum it like the Gram sums.
- lissa (Agarwal et al.; Koh & Liang): the recursion h_0 = v,
      h_j = v + h_{j−1} − (H̃_j + λI) h_{j−1} / s,    Ĥ⁻¹ v ≈ h_J / s,
  with H̃_j = (1/|B_j|) Σ_{i∈B_j} g_i g_iᵀ on a seeded sample B_j of training examples. Its fixed
  point is (H + λI)⁻¹ v: with every example in each batch it is the Neumann series of the
  gauss_newton solve. B_j is chosen by hashing (seed, j, example id), so it does not depend on
  the order or the chunking of the training set. `scale: auto` is λ + the largest eigenvalue of
  any H̃_j, the smallest s for which every step contracts.
- kfac (distinf.core.kfac): Ĥ = K_S + λI, K_S the Kronecker factors A ⊗ G of each tensor
  restricted to its kept entries; kfac_mix: Ĥ = (1 − β)·K_S + β·(1/n) Σ ĝĝᵀ + λI; ekfac: K_S's
  eigenbasis with the Gram's variances along it as eigenvalues, + λI. All three are
  gauss_newton's Cholesky path on another matrix (a Curvature), with its damping and zero-block rules.
The damping λ_l is the same rule for every solver (`damping: auto`, a tenth of the mean eigenvalue),
and so is the zero-block rule: a block whose gradient is float32 rounding of zero contributes
exactly nothing (`dampings_and_zero_blocks`, `leave_out`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Protocol, Sequence

import numpy as np
import torch
from torch import Tensor

from distinf.core.curvature import ArrayPickled, damping_from_trace, zero_blocks


class Solver(Protocol):
    slices: list[slice]
    damping: list[float]

    def precondition(self, grads: Tensor) -> Tensor: ...

    def self_influence(self, grads: Tensor) -> Tensor: ...


def _float64(grads: Tensor) -> Tensor:
    return grads.detach().to("cpu", torch.float64)


@dataclass
class Identity:
    slices: list[slice]
    damping: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.damping = self.damping or [0.0] * len(self.slices)

    def precondition(self, grads: Tensor) -> Tensor:
        return _float64(grads).clone()

    def self_influence(self, grads: Tensor) -> Tensor:
        return _float64(grads).square().sum(1)


def block_traces(grads: Tensor, slices: Sequence[slice]) -> list[float]:
    """Σ_i ‖ĝ_i^l‖² per block: all the auto damping needs."""
    g = _float64(grads)
    return [float(g[:, part].square().sum()) for part in slices]


def block_dampings(traces: Sequence[float], count: int, slices: Sequence[slice], damping: str | float) -> list[float]:
    return [damping_from_trace(t, count, s.stop - s.start, damping) for t, s in zip(traces, slices)]


def dampings_and_zero_blocks(traces: Sequence[float], count: int, slices: Sequence[slice],
                             damping: str | float) -> tuple[list[float], list[int]]:
    """Each block's damping, and the zero blocks (distinf.core.curvature.zero_blocks): a block whose
    gradient is zero or float32 rounding of zero is damped as an untouched one and left out of
    every score, as gauss_newton leaves it out; `damping: auto` would otherwise scale its rounding
    up to the size of every other block's contribution."""
    zero = zero_blocks(list(traces), count, list(slices))
    traces = [0.0 if i in zero else t for i, t in enumerate(traces)]
    return block_dampings(traces, count, slices, damping), zero


def leave_out(out: Tensor, slices: Sequence[slice], zero: Sequence[int]) -> Tensor:
    """`out` (a preconditioned [m, k]) with the zero blocks' columns exactly 0."""
    for i in zero:
        out[:, slices[i]] = 0
    return out


# --- DataInf


@dataclass
class DataInfSums:
    """Σ_i g_i g_iᵀ / (λ_l + ‖g_i^l‖²) per block and the example count; additive like GramSums."""

    slices: list[slice]
    damping: list[float]
    blocks: list[Tensor] = field(default_factory=list)
    count: int = 0

    def __post_init__(self) -> None:
        if not self.blocks:
            self.blocks = [torch.zeros(s.stop - s.start, s.stop - s.start, dtype=torch.float64) for s in self.slices]

    def add(self, grads: Tensor) -> "DataInfSums":
        g = _float64(grads)
        for block, part, lam in zip(self.blocks, self.slices, self.damping):
            gb = g[:, part]
            weights = 1.0 / (lam + gb.square().sum(1))
            block.addmm_(gb.T * weights, gb)
        self.count += g.shape[0]
        return self

    def merge(self, other: "DataInfSums") -> "DataInfSums":
        for mine, theirs in zip(self.blocks, other.blocks):
            mine += theirs
        self.count += other.count
        return self

    def solve(self, zero: Sequence[int] = ()) -> "DataInf":
        """The approximate inverse of every block; `zero`: the zero blocks it leaves out."""
        if self.count == 0:
            raise ValueError("no training examples: the curvature is undefined")
        inverses = [(torch.eye(b.shape[0], dtype=torch.float64) - b / self.count) / lam
                    for b, lam in zip(self.blocks, self.damping)]
        return DataInf(self.slices, self.damping, inverses, self.count, list(zero))

    def solve_(self, zero: Sequence[int] = ()) -> "DataInf":
        """solve in place: each block becomes its inverse (I − B/n)/λ in its own storage, with
        solve's numbers (zeros may differ in sign); the sums are spent afterwards."""
        if self.count == 0:
            raise ValueError("no training examples: the curvature is undefined")
        for b, lam in zip(self.blocks, self.damping):
            b.div_(-self.count)
            b.diagonal().add_(1.0)
            b.div_(lam)
        return DataInf(self.slices, self.damping, self.blocks, self.count, list(zero))


@dataclass
class DataInf(ArrayPickled):
    slices: list[slice]
    damping: list[float]
    inverses: list[Tensor]  # the approximate Ĥ_l⁻¹, symmetric k_l x k_l
    count: int
    zero_blocks: list[int] = field(default_factory=list)  # left out of every score (dampings_and_zero_blocks)

    def precondition(self, grads: Tensor) -> Tensor:
        g = _float64(grads)
        out = torch.zeros_like(g)
        for i, (inverse, part) in enumerate(zip(self.inverses, self.slices)):
            if i not in self.zero_blocks:
                out[:, part] = g[:, part] @ inverse
        return out

    def self_influence(self, grads: Tensor) -> Tensor:
        g = _float64(grads)
        return (g * self.precondition(g)).sum(1)


# --- LiSSA


def lissa_samples(ids: Sequence[str], iterations: int, batch_size: int, seed: int) -> list[np.ndarray]:
    """Positions (into ids) of B_j for j < iterations: the batch_size ids with the smallest
    hash(seed, j, id). Depends on the ids alone, not on their order or chunking."""
    batches = []
    for j in range(iterations):
        keys = np.array([int.from_bytes(hashlib.blake2b(f"{seed}:{j}:{i}".encode(), digest_size=8).digest(), "little")
                         for i in ids], dtype=np.uint64)
        batches.append(np.argsort(keys, kind="stable")[: min(batch_size, len(ids))])
    return batches


_CHUNK = 1 << 22  # elements of the [rows, |B|, columns] temporaries of the recursion


def _block_ids(slices: Sequence[slice]) -> Tensor:
    """[k]: the block of each column."""
    return torch.cat([torch.full((s.stop - s.start,), i, dtype=torch.long) for i, s in enumerate(slices)])


def _blockwise_gram(batch: Tensor, blocks: Tensor, count: int) -> Tensor:
    """[count, |B|, |B|]: G_l G_lᵀ of each block l of batch [|B|, k], column chunk by column chunk."""
    b = batch.shape[0]
    out = torch.zeros(b, b, count, dtype=torch.float64)
    step = max(1, _CHUNK // max(1, b * b))
    for start in range(0, batch.shape[1], step):
        g = batch[:, start : start + step]
        out.index_add_(2, blocks[start : start + step], g[:, None, :] * g[None, :, :])
    return out.permute(2, 0, 1)


@dataclass
class LiSSA(ArrayPickled):
    """The recursion for every block at once: per-column damping and scale, block-wise H̃ products."""

    slices: list[slice]
    damping: list[float]
    scales: list[float]
    batches: list[Tensor]  # the sampled rows of each iteration, [|B_j|, k] float64
    zero_blocks: list[int] = field(default_factory=list)  # left out of every score (dampings_and_zero_blocks)

    @classmethod
    def build(cls, slices: list[slice], damping: list[float], batches: list[Tensor],
              scale: str | float = "auto", zero: Sequence[int] = ()) -> "LiSSA":
        batches = [_float64(b) for b in batches]
        if scale != "auto":
            return cls(slices, damping, [float(scale)] * len(slices), batches, list(zero))
        # λ_max(H̃_j) per block, from the small |B| x |B| Gram of each block of each batch.
        top = torch.zeros(len(slices), dtype=torch.float64)
        blocks = _block_ids(slices)
        for b in batches:
            grams = _blockwise_gram(b, blocks, len(slices))
            top = torch.maximum(top, torch.linalg.eigvalsh(grams)[:, -1].clamp(min=0) / len(b))
        return cls(slices, damping, [lam + float(t) for lam, t in zip(damping, top)], batches, list(zero))

    def precondition(self, grads: Tensor) -> Tensor:
        v = _float64(grads)
        blocks = _block_ids(self.slices)
        lam = torch.tensor(self.damping, dtype=torch.float64)[blocks]
        scale = torch.tensor(self.scales, dtype=torch.float64)[blocks]
        h = v.clone()
        for batch in self.batches:
            h = v + h - (self._hessian_product(h, batch, blocks) + lam * h) / scale
        return leave_out(h / scale, self.slices, self.zero_blocks)

    def _hessian_product(self, h: Tensor, batch: Tensor, blocks: Tensor) -> Tensor:
        """H̃ h for each row of h [m, k]: (1/|B|) Σ_b g_b (g_b^l · h^l) within each block l."""
        m, b = h.shape[0], batch.shape[0]
        step = max(1, _CHUNK // max(1, m * b))
        dots = torch.zeros(m, b, len(self.slices), dtype=torch.float64)
        for start in range(0, h.shape[1], step):
            part = slice(start, start + step)
            dots.index_add_(2, blocks[part], h[:, None, part] * batch[None, :, part])
        out = torch.empty_like(h)
        for start in range(0, h.shape[1], step):
            part = slice(start, start + step)
            out[:, part] = (dots[:, :, blocks[part]] * batch[None, :, part]).sum(1)
        return out / b

    def self_influence(self, grads: Tensor) -> Tensor:
        """ĝ_iᵀ (LiSSA's Ĥ⁻¹) ĝ_i; with few iterations the operator is only near-symmetric."""
        g = _float64(grads)
        return (g * self.precondition(g)).sum(1)
