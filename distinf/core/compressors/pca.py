"""pca: ĝ_l = V_l g_l with V_l [k_l, p_l] the top principal directions of the training gradients.

Two passes. The fit streams every training example's whole gradient once and keeps, per tensor,
whichever is smaller: the rows G_l [n, p_l] (then the n x n Gram gives V_l) or the second-moment
matrix Σ g gᵀ [p_l, p_l] (then its eigenvectors do). The directions are uncentred (eigenvectors
of (1/n) Gᵀ G, the Gauss-Newton curvature itself), and at most min(k_l, n, rank) per tensor are
kept: the training gradients span no more. The second pass projects train and queries alike.
Memory: the fit's Σ min(n, p_l)·p_l plus the map Σ k_l·p_l, checked before it starts.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from distinf.core.compressors.base import CompressionMethod, GradientProjection, Layout
from distinf.core.compressors.none import available_bytes, human_bytes
from distinf.core.index_set import ParamShapes

RANK_TOLERANCE = 1e-10  # directions with variance below this fraction of the largest are dropped


class PCACompressor(GradientProjection, CompressionMethod):
    name = "pca"
    runs_in_job = False  # its fit pass reads every training gradient whole before the capture

    @classmethod
    def build(cls, param_shapes: ParamShapes, k: int, seed: int = 0, allocation: str = "stratified") -> "PCACompressor":
        raise ValueError("compression.method: pca is fitted on the training gradients first; "
                         "use distinf.attribute (pca.PCAFit), not build_compressor")

    def __init__(self, layout: Layout, components: dict[str, Tensor]):
        self.layout = layout
        self.components = components  # name -> V_l [k_l, p_l], orthonormal rows, float32
        self._on_device: dict[tuple[str, str], Tensor] = {}

    def project(self, name: str, grad: Tensor) -> Tensor:
        key = (name, str(grad.device))
        if key not in self._on_device:
            self._on_device[key] = self.components[name].to(grad.device)
        return grad.float() @ self._on_device[key].T


def fit_bytes(shapes: Sequence[tuple[int, ...]], sizes: Sequence[int], n_train: int) -> int:
    total = 0
    for shape, k_l in zip(shapes, sizes):
        p_l = math.prod(shape)
        total += (4 * n_train * p_l if n_train < p_l else 8 * p_l * p_l) + 4 * min(k_l, n_train, p_l) * p_l
    return total


class PCAFit:
    """Streaming statistics of the training gradients; `finish()` turns them into a PCACompressor."""

    def __init__(self, names: Sequence[str], shapes: Sequence[tuple[int, ...]], sizes: Sequence[int],
                 n_train: int, seed: int = 0):
        need, have = fit_bytes(shapes, sizes, n_train), available_bytes()
        if need > 0.8 * have:
            raise MemoryError(
                f"compression.method: pca needs about {human_bytes(need)} (per tensor min(n, p_l)·p_l "
                f"for the fit plus the k_l·p_l map) but only {human_bytes(have)} is available; "
                "lower k, narrow compression.modules, or use gaussian, fjlt, logra or dropout"
            )
        self.names, self.shapes, self.sizes, self.n_train, self.seed = list(names), list(shapes), list(sizes), n_train, seed
        self.rows: dict[str, list[Tensor]] = {}
        self.moments: dict[str, Tensor] = {}
        for name, shape in zip(self.names, self.shapes):
            p_l = math.prod(shape)
            if n_train < p_l:
                self.rows[name] = []
            else:
                self.moments[name] = torch.zeros(p_l, p_l, dtype=torch.float64)
        self.count = 0

    def add(self, grads: dict[str, Tensor]) -> "PCAFit":
        """grads: {name: [N, p_l]} whole per-example gradients of one batch."""
        for name, g in grads.items():
            g = g.detach().to("cpu")
            if name in self.rows:
                self.rows[name].append(g.float())
            else:
                g64 = g.double()
                self.moments[name].addmm_(g64.T, g64)
        self.count += len(next(iter(grads.values())))
        return self

    def finish(self) -> PCACompressor:
        if self.count == 0:
            raise ValueError("compression.method: pca has no training gradients to fit")
        components, kept = {}, []
        for name, k_l in zip(self.names, self.sizes):
            if name in self.rows:
                g = torch.cat(self.rows.pop(name)).double()             # [n, p_l]
                values, vectors = torch.linalg.eigh(g @ g.T)             # of the n x n Gram
                directions = (g.T @ vectors) / values.clamp(min=1e-300).sqrt()  # [p_l, n], unit columns
            else:
                values, directions = torch.linalg.eigh(self.moments.pop(name))
            order = torch.argsort(values, descending=True)
            values, directions = values[order], directions[:, order]
            rank = int((values > RANK_TOLERANCE * values[0].clamp(min=1e-300)).sum()) if values[0] > 0 else 0
            v = directions[:, : max(1, min(k_l, rank))].T               # [k_l', p_l]
            v = v * torch.sign(v.gather(1, v.abs().argmax(1, keepdim=True)))  # deterministic signs
            components[name] = v.float().contiguous()
            kept.append(v.shape[0])
        layout = Layout("pca", tuple(self.names), tuple(self.shapes), tuple(kept), self.seed)
        return PCACompressor(layout, components)
