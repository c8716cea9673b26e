"""curvature/ of a run directory, for every hessian.method: the names and layout of its files in one
place, written by the reducer and read back by `distinf query` and `distinf report`.

blocks.safetensors holds, per method: gauss_newton `gram_sum.i` (the additive Gram sums an append
starts from) and `cholesky.i`; kfac and kfac_mix `curvature_sum.i` ((1 − mix)·n·K_S + mix·Σ ĝĝᵀ, an
append sums every chunk's Gram and factor sums again) and `cholesky.i`; datainf `inverse.i`; lissa `batch.j` (the sampled rows); identity
nothing. blocks.json holds the method, the example count, each block's columns and damping, and
the indices of the blocks whose gradient is zero.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from distinf.config import HessianConfig
from distinf.core.curvature import Curvature
from distinf.core.solvers import DataInf, Identity, LiSSA, Solver
from distinf.store import atomic_write_json, read_arrays, read_verified_bytes

LAYOUT = "curvature/blocks.json"
ARRAYS = "curvature/blocks.safetensors"
FILES = (LAYOUT, ARRAYS)


def write_layout(folder: Path, method: str, count: int, slices: list[slice], damping: list[float],
                 zero: list[int] = ()) -> None:
    atomic_write_json({
        "method": method,
        "count": count,
        "blocks": [{"start": s.start, "stop": s.stop, "damping": lam} for s, lam in zip(slices, damping)],
        "zero_blocks": list(zero),  # indices into blocks: they contribute nothing to any score
    }, Path(folder) / Path(LAYOUT).name)


def _numbered(prefix: str, tensors: list[Tensor]) -> dict[str, np.ndarray]:
    return {f"{prefix}.{i}": t.numpy() for i, t in enumerate(tensors)}


def _in_order(arrays: dict[str, Tensor], prefix: str) -> list[Tensor]:
    return [arrays[f"{prefix}.{i}"] for i in range(sum(name.startswith(f"{prefix}.") for name in arrays))]


SUM_ARRAYS = {"gauss_newton": "gram_sum", "kfac": "curvature_sum", "kfac_mix": "curvature_sum",
              "ekfac": "curvature_sum"}
"""The name of the summed blocks of the methods the reducer factorises, beside their cholesky.i."""


def _cholesky(a: dict[str, Tensor], layout: dict, hessian: HessianConfig) -> Curvature:
    return Curvature(_slices(layout), _in_order(a, "cholesky"), _damping(layout), layout["count"],
                     layout.get("zero_blocks", []))


ARRAYS_OF: dict[str, Callable[[Solver], dict[str, np.ndarray]]] = {
    # gauss_newton streams its own (gram_sum.i, then cholesky.i) in the reducer, never held twice.
    "identity": lambda solver: {},
    "datainf": lambda solver: _numbered("inverse", solver.inverses),
    "lissa": lambda solver: _numbered("batch", solver.batches),
}
"""The arrays of blocks.safetensors of each method solved over chunks, from its solver."""

SOLVER_OF: dict[str, Callable[[dict[str, Tensor], dict, HessianConfig], Solver]] = {
    "gauss_newton": _cholesky,
    "kfac": _cholesky,
    "kfac_mix": _cholesky,
    "ekfac": _cholesky,
    "identity": lambda a, layout, hessian: Identity(_slices(layout)),
    "datainf": lambda a, layout, hessian: DataInf(_slices(layout), _damping(layout), _in_order(a, "inverse"),
                                                  layout["count"]),
    "lissa": lambda a, layout, hessian: LiSSA.build(_slices(layout), _damping(layout), _in_order(a, "batch"),
                                                    hessian.lissa_scale),
}
"""Each hessian.method's solver, from its stored arrays and layout."""


def _slices(layout: dict) -> list[slice]:
    return [slice(b["start"], b["stop"]) for b in layout["blocks"]]


def _damping(layout: dict) -> list[float]:
    return [b["damping"] for b in layout["blocks"]]


def read_solver(run_dir: Path, files: dict[str, str], hessian: HessianConfig) -> Solver:
    """The inverse-curvature operator a run stored under curvature/, read back only if its files
    match the sha256 in `files` (the run's manifest): IntegrityError if not, ValueError for a
    method this version cannot read."""
    layout = json.loads(read_verified_bytes(Path(run_dir) / LAYOUT, files[LAYOUT]))
    method = layout.get("method", "gauss_newton")
    if method not in SOLVER_OF:
        raise ValueError(f"curvature/ stores hessian.method {method!r}, which this version cannot read back")
    arrays = {name: torch.from_numpy(a) for name, a in read_arrays(Path(run_dir) / ARRAYS, files[ARRAYS]).items()}
    return SOLVER_OF[method](arrays, layout, hessian)
