"""identity: Ĥ = I, plain gradient dot products (Pruthi et al., TracIn-style). No damping, nothing stored."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from torch import Tensor

from distinf.core.curvatures.base import ChunkedSolve, CurvatureMethod, TrainChunks, layout_slices
from distinf.core.kfac import FactorSums
from distinf.core.solvers import Identity


class IdentityMethod(CurvatureMethod):
    name = "identity"

    def fit(self, slices: list[slice], train_grads: Tensor, train_ids: Sequence[str],
            factors: FactorSums | None = None) -> Identity:
        return Identity(slices)

    def solve_chunks(self, slices: list[slice], train: TrainChunks) -> ChunkedSolve:
        return ChunkedSolve.of(Identity(slices), len(train.ids()), {})

    def to_arrays(self, solver: Identity) -> dict[str, np.ndarray]:
        return {}

    def from_arrays(self, arrays: dict[str, Tensor], layout: dict) -> Identity:
        return Identity(layout_slices(layout))
