"""logra (Choe et al.): a Kronecker projection (P_a ⊗ P_b) built from the layer's own factors.

A tensor's per-example gradient in its 2-D storage view [a, b] is Σ_t a_t b_tᵀ (input features
and output gradients, in the order the storage puts them). LoGra projects each side first,
P_a a_t ∈ R^{r_a} and P_b b_t ∈ R^{r_b}, and forms Σ_t (P_a a_t)(P_b b_t)ᵀ ∈ R^{r_a x r_b}:
exactly (P_a ⊗ P_b) vec(G), for O(N·T·(a·r_a + b·r_b + r_a·r_b)) work and never the [N, p_l]
gradient. P are Gaussian N(0, 1/r) per side; a side with r equal to its width is not projected.
r_a·r_b ≤ k_l with the two sides compressed in the same ratio, so the total is a little under
k (reported as the run's k). An embedding's one-hot side is a column gather of P_a.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from distinf.core.adapters.base import Factor, storage_matrix_shape
from distinf.core.compressors.base import CompressionMethod, Layout, allocated_sizes, gaussian_matrix, seeded_generator
from distinf.core.index_set import ParamShapes
from distinf.core.tracking import ModuleUse


def factor_ranks(k_l: int, rows: int, cols: int) -> tuple[int, int]:
    """(r_a, r_b) with r_a·r_b ≤ k_l, r_a ≤ rows, r_b ≤ cols, and r_a/r_b ≈ rows/cols (both sides
    compressed in the same ratio); of the two nearest such shapes, the larger product."""
    target = math.sqrt(k_l * rows / cols)
    best = (0, 0.0, 1, 1)
    for r_a in {max(1, min(rows, k_l, math.floor(target))), max(1, min(rows, k_l, math.ceil(target)))}:
        r_b = max(1, min(cols, k_l // r_a))
        r_a = max(1, min(rows, k_l // r_b))  # the leftover of rounding r_b goes back to r_a
        score = (r_a * r_b, -abs(math.log(r_a / r_b) - math.log(rows / cols)))
        if score > best[:2]:
            best = (*score, r_a, r_b)
    return best[2], best[3]


class LoGraCompressor(CompressionMethod):
    name = "logra"

    def __init__(self, param_shapes: ParamShapes, k: int, seed: int = 0, allocation: str = "stratified"):
        names, shapes, shares = allocated_sizes(param_shapes, k, seed, allocation)
        self.ranks = {name: factor_ranks(k_l, *storage_matrix_shape(shape))
                      for name, shape, k_l in zip(names, shapes, shares)}
        self.layout = Layout("logra", names, shapes, tuple(a * b for a, b in self.ranks.values()), seed)
        self._dims = {name: storage_matrix_shape(shape) for name, shape in zip(names, shapes)}
        self._cache: dict[tuple[str, str, str], Tensor | None] = {}

    def projections(self, name: str) -> tuple[Tensor | None, Tensor | None]:
        """(P_a [r_a, a], P_b [r_b, b]); None where that side is kept whole (r = its width)."""
        (r_a, r_b), (a, b) = self.ranks[name], self._dims[name]
        p_a = None if r_a == a else gaussian_matrix(r_a, a, seeded_generator(self.layout.seed, "logra-a", name))
        p_b = None if r_b == b else gaussian_matrix(r_b, b, seeded_generator(self.layout.seed, "logra-b", name))
        return p_a, p_b

    def _projection(self, name: str, side: int, device: torch.device) -> Tensor | None:
        key = (name, "ab"[side], str(device))
        if key not in self._cache:
            matrix = self.projections(name)[side]
            self._cache[key] = None if matrix is None else matrix.to(device)
        return self._cache[key]

    def plan(self, use: ModuleUse) -> dict[str, str] | None:
        wanted = {local: name for local, name in use.params.items() if name in self.ranks}
        return wanted or None

    def keep(self, use: ModuleUse, plan: dict[str, str], inputs: tuple):
        return use.adapter.keep_inputs(use.module, inputs)

    def entries(self, use: ModuleUse, plan: dict[str, str], kept, grad_output: Tensor) -> dict[str, Tensor]:
        factors = use.adapter.outer_factors(use.module, kept, grad_output)
        result = {}
        for local, name in plan.items():
            a, b = factors[local]
            dims = self._dims[name]
            pa = _project(a, self._projection(name, 0, grad_output.device), dims[0])
            pb = _project(b, self._projection(name, 1, grad_output.device), dims[1])
            result[local] = torch.einsum("nti,ntj->nij", pa, pb).flatten(1)
        return result


def _project(factor: Factor, matrix: Tensor | None, width: int) -> Tensor:
    """[N, T, width] features (or [N, T] ids of one-hot rows) -> [N, T, r]."""
    if not factor.is_floating_point():  # ids: P e_id is column id of P
        if matrix is None:
            return F.one_hot(factor, width).float()
        return matrix.T[factor]
    return factor.float() if matrix is None else factor.float() @ matrix.T
