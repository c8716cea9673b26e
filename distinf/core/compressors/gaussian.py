"""gaussian (TRAK-style): ĝ_l = P_l g_l with P_l [k_l, p_l] of N(0, 1/k_l) entries, per tensor.

P_l is never stored whole: it is cut into column blocks of about BLOCK_ELEMENTS entries, each
drawn from its own generator (seed, tensor name, block number) when applied and dropped after,
so any block can be regenerated anywhere (another worker, a later query run). Cost per example
O(k_l·p_l) multiply-adds plus drawing k_l·p_l normals per batch: the overhead dropout avoids.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from distinf.core.compressors.base import CompressionMethod, GradientProjection, Layout, allocated_sizes, seeded_generator
from distinf.core.index_set import ParamShapes

BLOCK_ELEMENTS = 1 << 22  # 16 MiB of float32 per generated block


class GaussianCompressor(GradientProjection, CompressionMethod):
    name = "gaussian"

    def __init__(self, param_shapes: ParamShapes, k: int, seed: int = 0, allocation: str = "stratified"):
        names, shapes, sizes = allocated_sizes(param_shapes, k, seed, allocation)
        self.layout = Layout("gaussian", names, shapes, sizes, seed)
        self._k = dict(zip(names, sizes))
        self._p = {name: math.prod(shape) for name, shape in zip(names, shapes)}

    def column_blocks(self, name: str) -> list[slice]:
        """The column ranges of P_l that are generated together."""
        p, width = self._p[name], max(1, BLOCK_ELEMENTS // self._k[name])
        return [slice(start, min(p, start + width)) for start in range(0, p, width)]

    def block(self, name: str, index: int) -> Tensor:
        """Columns column_blocks(name)[index] of P_l: [k_l, width] float32, N(0, 1/k_l)."""
        cols = self.column_blocks(name)[index]
        generator = seeded_generator(self.layout.seed, "gaussian", name, index)
        return torch.randn(self._k[name], cols.stop - cols.start, generator=generator).mul_(1.0 / math.sqrt(self._k[name]))

    def matrix(self, name: str) -> Tensor:
        """P_l whole, [k_l, p_l]: for tests and small models only."""
        return torch.cat([self.block(name, i) for i in range(len(self.column_blocks(name)))], dim=1)

    def project(self, name: str, grad: Tensor) -> Tensor:
        out = torch.zeros(grad.shape[0], self._k[name], dtype=torch.float32, device=grad.device)
        for index, cols in enumerate(self.column_blocks(name)):
            out.addmm_(grad[:, cols].float(), self.block(name, index).to(grad.device).T)
        return out
