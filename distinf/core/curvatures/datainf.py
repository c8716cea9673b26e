"""datainf (Kwon et al.): Sherman–Morrison per example, Ĥ_l⁻¹ ≈ (1/λ)(I − (1/n) Σ_i g_i g_iᵀ/(λ + ‖g_i‖²))
(distinf.core.solvers.DataInfSums). The weighted sums are additive, so chunks sum them like the Gram."""

from __future__ import annotations

from functools import partial
from typing import Sequence

import numpy as np
from torch import Tensor

from distinf.core.curvatures.base import (ChunkedSolve, CurvatureMethod, TrainChunks, in_order, layout_damping,
                                          layout_slices, numbered)
from distinf.core.kfac import FactorSums
from distinf.core.solvers import DataInf, DataInfSums, block_traces, dampings_and_zero_blocks


class DataInfMethod(CurvatureMethod):
    name = "datainf"
    holds_blocks = True

    def fit(self, slices: list[slice], train_grads: Tensor, train_ids: Sequence[str],
            factors: FactorSums | None = None) -> DataInf:
        damping, zero = dampings_and_zero_blocks(block_traces(train_grads, slices), train_grads.shape[0], slices,
                                                 self.hessian.damping)
        return DataInfSums(slices, damping).add(train_grads).solve(zero)

    def solve_chunks(self, slices: list[slice], train: TrainChunks) -> ChunkedSolve:
        traces, count = train.traces()
        damping, zero = dampings_and_zero_blocks(traces, count, slices, self.hessian.damping)
        total = train.sum(partial(DataInfSums, slices, damping))
        solver = total.solve_(zero)  # the sums become the inverses: one set of blocks
        return ChunkedSolve.of(solver, count, self.to_arrays(solver))

    def to_arrays(self, solver: DataInf) -> dict[str, np.ndarray]:
        return numbered("inverse", solver.inverses)

    def from_arrays(self, arrays: dict[str, Tensor], layout: dict) -> DataInf:
        return DataInf(layout_slices(layout), layout_damping(layout), in_order(arrays, "inverse"), layout["count"],
                       layout.get("zero_blocks", []))
