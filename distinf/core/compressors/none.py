"""none (the paper's "Orig"): the whole tracked gradient, k = p. Exact, and small models only.

`required_bytes` estimates what a run holds (the gradients, and for curvature methods that form
blocks, the p_l x p_l blocks), so a run that cannot fit is refused before it starts.
"""

from __future__ import annotations

import math
from typing import Sequence

from torch import Tensor

from distinf.core.compressors.base import CompressionMethod, GradientProjection, Layout
from distinf.core.index_set import ParamShapes


class NoneCompressor(GradientProjection, CompressionMethod):
    name = "none"

    def __init__(self, param_shapes: ParamShapes):
        # Component j of a tensor is its flat entry j: the layout's table is the real index set.
        names = tuple(name for name, _ in param_shapes)
        shapes = tuple(tuple(shape) for _, shape in param_shapes)
        self.layout = Layout("none", names, shapes, tuple(math.prod(shape) for shape in shapes))

    @classmethod
    def build(cls, param_shapes: ParamShapes, k: int, seed: int = 0, allocation: str = "stratified") -> "NoneCompressor":
        return cls(param_shapes)  # k = p: no allocation, nothing drawn

    def project(self, name: str, grad: Tensor) -> Tensor:
        return grad


def required_bytes(block_sizes: Sequence[int], rows: int, block_bytes: int) -> int:
    """float32 gradients [rows, p] plus the curvature's blocks (its method's `block_bytes`)."""
    return 4 * rows * sum(block_sizes) + block_bytes


def available_bytes() -> int:
    """MemAvailable from /proc/meminfo (or a large number where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024:
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"


def check_fits(block_sizes: Sequence[int], rows: int, hessian: str, block_bytes: int, fraction: float = 0.8) -> None:
    """Refuse a run whose gradients and `block_bytes` of hessian.method `hessian`'s blocks cannot fit."""
    need, have = required_bytes(block_sizes, rows, block_bytes), available_bytes()
    if need > fraction * have:
        p = sum(block_sizes)
        raise MemoryError(
            f"compression.method: none keeps all p = {p:,} tracked entries: {rows} gradients need "
            f"{human_bytes(4 * rows * p)} (n·p·4 bytes) and hessian.method: {hessian} with these blocks "
            f"{human_bytes(need - 4 * rows * p)}, {human_bytes(need)} in all, but only {human_bytes(have)} "
            "is available; use a compression method with k << p, or narrow compression.modules "
            f"(the largest block has {max(block_sizes):,} entries)"
        )
