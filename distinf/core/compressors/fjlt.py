"""fjlt: the subsampled randomised Hadamard transform (Ailon & Chazelle), per tensor.

ĝ_l = (1/√k_l) · S_l H (D_l g_l), with g_l zero-padded to n_l = 2^⌈log2 p_l⌉, D_l random ±1
signs, H the unnormalised Sylvester–Hadamard matrix (entries ±1) applied as a fast transform in
O(n_l log n_l), and S_l a seeded choice of k_l of its n_l rows. E‖ĝ_l‖² = ‖g_l‖². The signs
(one byte per entry) are the compression map it has to keep: p bytes.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

from distinf.core.compressors.base import CompressionMethod, GradientProjection, Layout, allocated_sizes, seeded_generator
from distinf.core.index_set import ParamShapes, sample_without_replacement, seeded_rng

FACTOR_LOG2 = 5  # the transform runs as matmuls with 32 x 32 Hadamard factors: fast on BLAS


@lru_cache(maxsize=None)
def _hadamard(size: int, device: str) -> Tensor:
    h = torch.ones(1, 1)
    while h.shape[0] < size:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h.to(device)


def hadamard_transform(x: Tensor) -> Tensor:
    """x [N, n] (n a power of two) -> x Hᵀ = x H with H the unnormalised Sylvester matrix.

    H_n = H_f1 ⊗ H_f2 ⊗ ...: apply one small factor per axis of x viewed as [N, f1, f2, ...].
    """
    n_rows, n = x.shape
    levels = int(math.log2(n))
    if 2**levels != n:
        raise ValueError(f"hadamard_transform needs a power-of-two width, got {n}")
    step = min(FACTOR_LOG2, levels)
    x = x.reshape(-1, 2**step) @ _hadamard(2**step, str(x.device))  # the last axis
    inner, done = 2**step, step
    while done < levels:
        step = min(FACTOR_LOG2, levels - done)
        x = torch.matmul(_hadamard(2**step, str(x.device)), x.reshape(-1, 2**step, inner))
        inner, done = inner * 2**step, done + step
    return x.reshape(n_rows, n)


class FJLTCompressor(GradientProjection, CompressionMethod):
    name = "fjlt"

    def __init__(self, param_shapes: ParamShapes, k: int, seed: int = 0, allocation: str = "stratified"):
        names, shapes, sizes = allocated_sizes(param_shapes, k, seed, allocation)
        self.layout = Layout("fjlt", names, shapes, sizes, seed)
        self._k = dict(zip(names, sizes))
        self._p = {name: math.prod(shape) for name, shape in zip(names, shapes)}
        self._signs: dict[tuple[str, str], Tensor] = {}
        self._rows: dict[tuple[str, str], Tensor] = {}

    def padded(self, name: str) -> int:
        return 1 << max(0, math.ceil(math.log2(self._p[name])))

    def signs(self, name: str) -> Tensor:
        """D_l: [p_l] float32 of ±1."""
        bits = torch.randint(0, 2, (self._p[name],), generator=seeded_generator(self.layout.seed, "fjlt", name),
                             dtype=torch.int8)
        return bits.float().mul_(2).sub_(1)

    def rows(self, name: str) -> Tensor:
        """S_l: the k_l kept rows of the transform, sorted, int64."""
        rng = seeded_rng(self.layout.seed, "fjlt-rows:" + name)
        return torch.from_numpy(np.ascontiguousarray(sample_without_replacement(rng, self.padded(name), self._k[name])))

    def _cached(self, cache: dict, name: str, device: torch.device, make) -> Tensor:
        key = (name, str(device))
        if key not in cache:
            value = make(name)
            cache[key] = (value.to(torch.int8) if value.is_floating_point() else value).to(device)
        return cache[key]

    def project(self, name: str, grad: Tensor) -> Tensor:
        signs = self._cached(self._signs, name, grad.device, self.signs)
        rows = self._cached(self._rows, name, grad.device, self.rows)
        x = torch.zeros(grad.shape[0], self.padded(name), dtype=torch.float32, device=grad.device)
        torch.mul(grad.float(), signs, out=x[:, : self._p[name]])
        return hadamard_transform(x).index_select(1, rows).mul_(1.0 / math.sqrt(self._k[name]))
