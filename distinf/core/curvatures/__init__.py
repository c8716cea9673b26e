"""The registry of `hessian.method`s: every `CurvatureMethod` subclass with a name, defined in any
module of this package (each is imported here, in name order).

Adding a method is adding one module here with its class (distinf.core.curvatures.base says what
it provides); the config's `hessian.method` choices, its key checks, distinf.attribute, the
distributed job and the stored curvature/ all ask the registry.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Sequence

from torch import Tensor

from distinf.core.curvatures.base import CurvatureMethod
from distinf.core.kfac import FactorSums
from distinf.core.registry import discover
from distinf.core.solvers import Solver

METHODS: dict[str, type[CurvatureMethod]] = discover(__name__, __path__, CurvatureMethod, "hessian.method")
"""Every hessian.method by name."""


def method_class(name: str) -> type[CurvatureMethod]:
    if name not in METHODS:
        raise ValueError(f"hessian.method: unknown {name!r}; expected one of {list(METHODS)}")
    return METHODS[name]


def curvature_method(hessian: Any) -> CurvatureMethod:
    """The method of a `hessian` section (distinf.config.HessianConfig), holding it."""
    return method_class(hessian.method)(hessian)


def fit_solver(method: str, slices: list[slice], train_grads: Tensor, damping: str | float = "auto",
               train_ids: Sequence[str] | None = None, lissa_iterations: int = 10,
               lissa_scale: str | float = "auto", lissa_batch_size: int = 16, lissa_seed: int = 0,
               factors: FactorSums | None = None, gram_share: float = 0.0) -> Solver:
    """The solver of `method` from all training gradients [n, k] held in memory (and, for the
    methods that need them, the Kronecker factors the capture summed over the same examples);
    the hessian keys as arguments, for callers without a config."""
    hessian = SimpleNamespace(method=method, damping=damping, lissa_iterations=lissa_iterations,
                              lissa_scale=lissa_scale, lissa_batch_size=lissa_batch_size, lissa_seed=lissa_seed,
                              mix=gram_share)
    return fit(curvature_method(hessian), slices, train_grads, train_ids, factors)


def fit(method: CurvatureMethod, slices: list[slice], train_grads: Tensor, train_ids: Sequence[str] | None,
        factors: FactorSums | None = None) -> Solver:
    """`method.fit`, refusing an empty training set first (the curvature is undefined)."""
    if train_grads.shape[0] == 0:
        raise ValueError("no training examples: the curvature is undefined")
    return method.fit(slices, train_grads, train_ids, factors)


__all__ = ["CurvatureMethod", "METHODS", "curvature_method", "fit", "fit_solver", "method_class"]
