"""What every compression shares: the column layout, k_l per tensor, seeded generators, the hook contract.

A compression maps each tracked parameter tensor's per-example gradient to its own k_l columns
of the [N, k] output, so the curvature blocks (`hessian.blocks: layer`) mean the same for every
method. k_l is the share the dropout's allocation gives the tensor (`compression.allocation`),
so "the same k" is the same k_l per tensor across methods. Every projection is linear in the
gradient, so a tied parameter's columns are the sum of its uses' projections, as for dropout.
"""

from __future__ import annotations

import hashlib
import math
import zlib
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from distinf.core.index_set import Columns, ParamShapes, draw_index_set
from distinf.core.tracking import ModuleUse


@dataclass(frozen=True)
class Layout(Columns):
    """The columns of a projected gradient: k_l consecutive columns per parameter, in order.

    Its table's flat_index is the column's component number inside its parameter's block.
    """

    method: str
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    sizes: tuple[int, ...]
    seed: int = 0

    def to_table(self) -> pa.Table:
        """param (string), flat_index (int64: the component number within the parameter)."""
        params = [name for name, size in zip(self.names, self.sizes) for _ in range(size)]
        component = np.concatenate([np.arange(size, dtype=np.int64) for size in self.sizes])
        return pa.table({"param": pa.array(params, pa.string()), "flat_index": pa.array(component, pa.int64())})

    def fingerprint(self) -> str:
        digest = hashlib.sha256(f"{self.method}:{self.seed}:".encode())
        for name, shape, size in zip(self.names, self.shapes, self.sizes):
            digest.update(f"{name}:{list(shape)}:{size};".encode())
        return digest.hexdigest()


def allocated_sizes(param_shapes: ParamShapes, k: int, seed: int = 0,
                    allocation: str = "stratified") -> tuple[tuple[str, ...], tuple[tuple[int, ...], ...], tuple[int, ...]]:
    """(names, shapes, k_l): the dropout allocation's share of k per tensor (tensors with none left out)."""
    index_set = draw_index_set(param_shapes, k, seed, allocation)
    return index_set.names, index_set.shapes, tuple(index_set.sizes)


def seeded_generator(seed: int, *labels: Any) -> torch.Generator:
    """A CPU torch generator per (seed, labels): one tensor's (or block's) draw never shifts another's."""
    entropy = [seed, *(zlib.crc32(str(label).encode()) for label in labels)]
    state = np.random.SeedSequence(entropy).generate_state(2, np.uint32)
    return torch.Generator().manual_seed((int(state[0]) << 32) | int(state[1]))


def gaussian_matrix(rows: int, cols: int, generator: torch.Generator) -> Tensor:
    """[rows, cols] with N(0, 1/rows) entries, so E‖P g‖² = ‖g‖² (Johnson–Lindenstrauss scaling)."""
    return torch.randn(rows, cols, generator=generator).mul_(1.0 / math.sqrt(rows))


class Compressor(Protocol):
    """The hook contract GradientCapture drives; one object per run, shared by all batches.

    plan(use) -> per-module state, or None if none of the module's parameters is in the layout;
    keep(use, plan, inputs) on forward; entries(use, plan, kept, grad_output) on backward returns
    {local parameter name: [N, k_l]} for the module's parameters in the layout.
    """

    layout: Columns

    def plan(self, use: ModuleUse) -> Any: ...

    def keep(self, use: ModuleUse, plan: Any, inputs: tuple) -> Any: ...

    def entries(self, use: ModuleUse, plan: Any, kept: Any, grad_output: Tensor) -> dict[str, Tensor]: ...


class CompressionMethod:
    """What the registry (distinf.core.compressors.METHODS) knows of a `compression.method`'s class:
    its name, whether the distributed job runs it, and how it is built for a run."""

    name: ClassVar[str]
    runs_in_job: ClassVar[bool] = True
    """False: distinf.attribute only; the job config refuses it by name."""
    keeps_entries: ClassVar[bool] = False
    """Its columns are gradient entries themselves (not mixtures): what optimizer_state scales and
    what Kronecker factors describe."""

    @classmethod
    def build(cls, param_shapes: ParamShapes, k: int, seed: int = 0, allocation: str = "stratified") -> Compressor:
        return cls(param_shapes, k, seed, allocation)


class GradientProjection:
    """Base of compressions that act on each tensor's whole per-example gradient [N, p_l] -> [N, k_l]."""

    layout: Columns

    def plan(self, use: ModuleUse) -> dict[str, str] | None:
        columns = self.layout.slices()
        wanted = {local: name for local, name in use.params.items() if name in columns}
        return wanted or None

    def keep(self, use: ModuleUse, plan: dict[str, str], inputs: tuple) -> Any:
        return use.adapter.keep_inputs(use.module, inputs)

    def entries(self, use: ModuleUse, plan: dict[str, str], kept: Any, grad_output: Tensor) -> dict[str, Tensor]:
        grads = use.adapter.per_example_gradient(use.module, kept, grad_output)
        return {local: self.project(name, grads[local]) for local, name in plan.items()}

    def project(self, name: str, grad: Tensor) -> Tensor:
        """[N, p_l] (row-major in the parameter's storage order) -> [N, k_l]."""
        raise NotImplementedError
