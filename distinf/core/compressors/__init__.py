"""Gradient compressions, one file each, all driven by the same GradientCapture hooks.

The registry `METHODS` holds every class of this package's modules that subclasses
`base.CompressionMethod` with a `name` (modules in name order): adding a method is adding one file
with such a class that also follows `base.Compressor`. `build_compressor(tracked, method, k, seed,
allocation)` gives the compressor of a `compression.method`; pca needs its fit pass first
(`pca.PCAFit`, see distinf.api).
"""

from __future__ import annotations

from distinf.core.compressors.base import CompressionMethod, Compressor, GradientProjection, Layout
from distinf.core.compressors.dropout import DropoutCompressor
from distinf.core.compressors.fjlt import FJLTCompressor
from distinf.core.compressors.gaussian import GaussianCompressor
from distinf.core.compressors.logra import LoGraCompressor
from distinf.core.compressors.none import NoneCompressor
from distinf.core.registry import discover
from distinf.core.tracking import Tracked

METHODS: dict[str, type[CompressionMethod]] = discover(__name__, __path__, CompressionMethod, "compression.method")
"""Every compression.method by name."""


def build_compressor(tracked: Tracked, method: str = "dropout", k: int = 8192, seed: int = 0,
                     allocation: str = "stratified") -> Compressor:
    if method not in METHODS:
        raise ValueError(f"compression.method: unknown {method!r}; expected one of {list(METHODS)}")
    return METHODS[method].build(tracked.param_shapes, k, seed, allocation)


__all__ = ["CompressionMethod", "Compressor", "GradientProjection", "Layout", "METHODS", "build_compressor",
           "DropoutCompressor", "NoneCompressor", "GaussianCompressor", "FJLTCompressor", "LoGraCompressor"]
