"""Gradient compressions, one file each, all driven by the same GradientCapture hooks.

`build_compressor(tracked, method, k, seed, allocation)` gives the compressor of a
`compression.method`; pca needs its fit pass first (`pca.PCAFit`, see distinf.api). Adding a
method is adding one file with a class that follows `base.Compressor` and one line here.
"""

from __future__ import annotations

from distinf.core.compressors.base import Compressor, GradientProjection, Layout
from distinf.core.compressors.dropout import DropoutCompressor
from distinf.core.compressors.fjlt import FJLTCompressor
from distinf.core.compressors.gaussian import GaussianCompressor
from distinf.core.compressors.logra import LoGraCompressor
from distinf.core.compressors.none import NoneCompressor
from distinf.core.tracking import Tracked

METHODS = ("dropout", "none", "gaussian", "fjlt", "pca", "logra")


def build_compressor(tracked: Tracked, method: str = "dropout", k: int = 8192, seed: int = 0,
                     allocation: str = "stratified") -> Compressor:
    shapes = tracked.param_shapes
    if method == "dropout":
        return DropoutCompressor.draw(shapes, k, seed, allocation)
    if method == "none":
        return NoneCompressor(shapes)
    if method == "gaussian":
        return GaussianCompressor(shapes, k, seed, allocation)
    if method == "fjlt":
        return FJLTCompressor(shapes, k, seed, allocation)
    if method == "logra":
        return LoGraCompressor(shapes, k, seed, allocation)
    if method == "pca":
        raise ValueError("compression.method: pca is fitted on the training gradients first; "
                         "use distinf.attribute (pca.PCAFit), not build_compressor")
    raise ValueError(f"compression.method: unknown {method!r}; expected one of {list(METHODS)}")


__all__ = ["Compressor", "GradientProjection", "Layout", "METHODS", "build_compressor", "DropoutCompressor",
           "NoneCompressor", "GaussianCompressor", "FJLTCompressor", "LoGraCompressor"]
