"""curvature/ of a run directory, for every hessian.method: the names and layout of its files in one
place, written by the reducer and read back by `distinf query` and `distinf report`.

blocks.safetensors holds the arrays of the method's class (distinf.core.curvatures: `to_arrays`, or
what its `solve_chunks` streams, and `from_arrays`): gauss_newton `gram_sum.i` (the additive Gram
sums an append starts from) and `cholesky.i`; kfac, kfac_mix and ekfac `curvature_sum.i`
((1 − mix)·n·K_S + mix·Σ ĝĝᵀ, an append sums every chunk's Gram and factor sums again) and
`cholesky.i`; datainf `inverse.i`; lissa `batch.j` (the sampled rows); identity nothing.
blocks.json holds the method, the example count, each block's columns and damping, and the
indices of the blocks whose gradient is zero.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from distinf.config import HessianConfig
from distinf.core.curvatures import METHODS
from distinf.core.solvers import Solver
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


def read_solver(run_dir: Path, files: dict[str, str], hessian: HessianConfig) -> Solver:
    """The inverse-curvature operator a run stored under curvature/, read back only if its files
    match the sha256 in `files` (the run's manifest): IntegrityError if not, ValueError for a
    method this version cannot read."""
    layout = json.loads(read_verified_bytes(Path(run_dir) / LAYOUT, files[LAYOUT]))
    method = layout.get("method", "gauss_newton")
    if method not in METHODS:
        raise ValueError(f"curvature/ stores hessian.method {method!r}, which this version cannot read back")
    arrays = {name: torch.from_numpy(a) for name, a in read_arrays(Path(run_dir) / ARRAYS, files[ARRAYS]).items()}
    return METHODS[method](hessian).from_arrays(arrays, layout)
