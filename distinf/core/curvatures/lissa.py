"""lissa (Agarwal et al.; Koh & Liang): the stochastic recursion of distinf.core.solvers.LiSSA on
batches sampled by example-id hash (`lissa_samples`), so a run's chunking does not change them."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from distinf.core.curvatures.base import (ChunkedSolve, CurvatureMethod, TrainChunks, in_order, layout_damping,
                                          layout_slices, numbered)
from distinf.core.kfac import FactorSums
from distinf.core.solvers import LiSSA, block_traces, dampings_and_zero_blocks, lissa_samples


class LiSSAMethod(CurvatureMethod):
    name = "lissa"
    keys = ("lissa_iterations", "lissa_scale", "lissa_batch_size", "lissa_seed")

    def samples(self, ids: Sequence[str]) -> list[np.ndarray]:
        h = self.hessian
        return lissa_samples(ids, h.lissa_iterations, h.lissa_batch_size, h.lissa_seed)

    def fit(self, slices: list[slice], train_grads: Tensor, train_ids: Sequence[str],
            factors: FactorSums | None = None) -> LiSSA:
        n = train_grads.shape[0]
        damping, zero = dampings_and_zero_blocks(block_traces(train_grads, slices), n, slices, self.hessian.damping)
        ids = [str(i) for i in (train_ids if train_ids is not None else range(n))]
        batches = [train_grads[torch.from_numpy(rows)] for rows in self.samples(ids)]
        return LiSSA.build(slices, damping, batches, self.hessian.lissa_scale, zero)

    def solve_chunks(self, slices: list[slice], train: TrainChunks) -> ChunkedSolve:
        """Each sampled row is fetched once, from the chunk that holds it."""
        traces, count = train.traces()
        damping, zero = dampings_and_zero_blocks(traces, count, slices, self.hessian.damping)
        samples = self.samples(train.ids())
        wanted = sorted({int(p) for rows in samples for p in rows})
        fetched = train.rows(wanted)
        where = {p: i for i, p in enumerate(wanted)}
        batches = [fetched[[where[int(p)] for p in rows]] for rows in samples]
        solver = LiSSA.build(slices, damping, batches, self.hessian.lissa_scale, zero)
        return ChunkedSolve.of(solver, count, self.to_arrays(solver))

    def to_arrays(self, solver: LiSSA) -> dict[str, np.ndarray]:
        return numbered("batch", solver.batches)

    def from_arrays(self, arrays: dict[str, Tensor], layout: dict) -> LiSSA:
        return LiSSA.build(layout_slices(layout), layout_damping(layout), in_order(arrays, "batch"),
                           self.hessian.lissa_scale, layout.get("zero_blocks", []))
