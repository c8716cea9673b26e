"""What a `hessian.method` is: one class holding everything about it that is not shared math.

A method class (a subclass of `CurvatureMethod` with a `name`) says which `hessian` keys it uses,
whether the distributed job runs it, whether the capture must sum Kronecker factors for it, and how
much memory its blocks take; and it builds its solver three ways: `fit` from all training gradients
in memory (distinf.attribute), `solve_chunks` over a distributed run's committed chunks (the
reducer, through the `TrainChunks` the runtime offers), and `from_arrays` from what a run stored
under curvature/ (`to_arrays` is what it stores). Defining the class in a module of this package
registers it (distinf.core.curvatures); nothing else names it.

The shared math lives beside: distinf.core.curvature (Gram sums, damping, Cholesky),
distinf.core.solvers (the solvers without a Cholesky) and distinf.core.kfac (Kronecker factors).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, ClassVar, Iterable, Protocol, Sequence

import numpy as np
import torch
from torch import Tensor

from distinf.core.curvature import Curvature, GramSums, factorize_, factorize_or_zero_, zero_blocks
from distinf.core.kfac import FactorSums
from distinf.core.solvers import Solver


class TrainChunks(Protocol):
    """A distributed run's committed training gradients, as the reducer offers them to `solve_chunks`
    (distinf.runtime.solve.CommittedChunks): every read is spread over tasks and verified."""

    def sum(self, empty: Callable[[], Any], start: Any = None) -> Any:
        """Every chunk's rows added into additive sums (anything with `add(grads)`, `blocks` and
        `count`, as GramSums) that `empty()` makes; the total, on top of `start` if given."""

    def traces(self) -> tuple[list[float], int]:
        """(Σ_i ‖ĝ_i^l‖² per block, the example count) over every chunk; ValueError if no example."""

    def ids(self) -> list[str]:
        """Every example id, in chunk order."""

    def rows(self, positions: Sequence[int]) -> Tensor:
        """[len(positions), k]: the gradients at these positions of `ids()`."""

    def stored_gram_sums(self) -> GramSums | None:
        """An append's starting point: the Gram sums the extended run stored (over every chunk not
        in this pass), when a method `extends_stored_sums` and they are intact; else None."""

    def factor_sums(self) -> FactorSums:
        """The sum of every chunk's Kronecker factor sums (methods that `need_factors`)."""

    def step(self, name: str) -> None:
        """Count one step of progress (e.g. `blocks_factorised`): the reducer's stall watch."""


@dataclass
class ChunkedSolve:
    """What `solve_chunks` gives the reducer: blocks.safetensors' arrays, made as they are written
    (`shapes` {name: (dtype, shape)} first, for the file's header), then the solver and the count."""

    shapes: dict[str, tuple[Any, tuple[int, ...]]]
    arrays: Iterable[tuple[str, np.ndarray]]
    solver: Callable[[], Solver]  # call it once `arrays` is spent
    count: int

    @classmethod
    def of(cls, solver: Solver, count: int, arrays: dict[str, np.ndarray]) -> "ChunkedSolve":
        """A solve that holds its solver before any array is written."""
        arrays = {name: np.asarray(a) for name, a in arrays.items()}
        return cls({name: (a.dtype, a.shape) for name, a in arrays.items()}, arrays.items(), lambda: solver, count)


def numbered(prefix: str, tensors: Sequence[Tensor]) -> dict[str, np.ndarray]:
    """{prefix.i: array}: a list of tensors as blocks.safetensors names them."""
    return {f"{prefix}.{i}": t.numpy() for i, t in enumerate(tensors)}


def in_order(arrays: dict[str, Tensor], prefix: str) -> list[Tensor]:
    """The tensors `numbered` named, back in their order."""
    return [arrays[f"{prefix}.{i}"] for i in range(sum(name.startswith(f"{prefix}.") for name in arrays))]


def layout_slices(layout: dict) -> list[slice]:
    """The blocks' columns of a stored curvature/blocks.json."""
    return [slice(b["start"], b["stop"]) for b in layout["blocks"]]


def layout_damping(layout: dict) -> list[float]:
    return [b["damping"] for b in layout["blocks"]]


class CurvatureMethod:
    """One `hessian.method`. An instance holds the run's `hessian` section (distinf.config.HessianConfig:
    method, blocks, damping and the method keys), read here by attribute only."""

    name: ClassVar[str]
    keys: ClassVar[tuple[str, ...]] = ()
    """The `hessian` keys this method uses beyond method, blocks and damping; the others refuse them."""
    runs_in_job: ClassVar[bool] = True
    """False: distinf.attribute only; the job config refuses it by name."""
    needs_factors: ClassVar[bool] = False
    """The capture sums the Kronecker factors of the training batches (distinf.core.kfac), which are
    of kept gradient entries: compression.method dropout only, and no optimizer_state scaling."""
    holds_blocks: ClassVar[bool] = False
    """Its solve holds k_l x k_l float64 blocks (and their factor or a copy): `block_bytes`."""
    extends_stored_sums: ClassVar[bool] = False
    """An append sums only the new chunks onto the `gram_sum.i` the extended run stored."""

    def __init__(self, hessian: Any):
        self.hessian = hessian

    def block_bytes(self, block_sizes: Sequence[int]) -> int:
        """Memory estimate of the blocks the solve holds: a float64 block and its factor (or its
        copy in the object store) each; 0 for a method without blocks."""
        return 2 * 8 * sum(size * size for size in block_sizes) if self.holds_blocks else 0

    def fit(self, slices: list[slice], train_grads: Tensor, train_ids: Sequence[str],
            factors: FactorSums | None = None) -> Solver:
        """The solver from all training gradients [n, k] (n > 0) held in memory; `factors`: the
        Kronecker factors the capture summed over the same examples (`needs_factors`)."""
        raise NotImplementedError

    def solve_chunks(self, slices: list[slice], train: TrainChunks) -> ChunkedSolve:
        """The solver over a distributed run's chunks, with the same numbers as `fit`."""
        raise NotImplementedError(f"hessian.method: {self.name} is not solved over chunks")

    def to_arrays(self, solver: Solver) -> dict[str, np.ndarray]:
        """blocks.safetensors' arrays of a solver."""
        raise NotImplementedError

    def from_arrays(self, arrays: dict[str, Tensor], layout: dict) -> Solver:
        """The solver back from blocks.safetensors' arrays and blocks.json's `layout` (method, count,
        blocks with their columns and damping, zero_blocks)."""
        raise NotImplementedError


class CholeskyMethod(CurvatureMethod):
    """A method whose Ĥ is additive sums over the training examples, damped and Cholesky-factorised
    per block (distinf.core.curvature.factorize_): it only says which sums (`sums`, `chunk_sums`)."""

    holds_blocks = True
    sum_name: ClassVar[str] = "gram_sum"
    """blocks.safetensors stores the sums as `{sum_name}.i` beside `cholesky.i`."""

    def sums(self, gram: GramSums, factors: FactorSums | None) -> GramSums:
        """The blocks to factorise, from the Gram sums (and factors) of the training examples."""
        return gram

    def chunk_sums(self, slices: list[slice], train: TrainChunks) -> GramSums:
        gram = train.sum(partial(GramSums, slices), train.stored_gram_sums() if self.extends_stored_sums else None)
        if gram.count == 0:
            raise ValueError("no training examples: the curvature is undefined")
        return self.sums(gram, None)

    def fit(self, slices: list[slice], train_grads: Tensor, train_ids: Sequence[str],
            factors: FactorSums | None = None) -> Solver:
        return factorize_(self.sums(GramSums(slices).add(train_grads), factors), self.hessian.damping)

    def solve_chunks(self, slices: list[slice], train: TrainChunks) -> ChunkedSolve:
        """The summed blocks are written as they are, then each becomes its factor in its own
        storage and is written too: one set of k_l x k_l blocks is ever held."""
        total = self.chunk_sums(slices, train)
        count, lambdas = total.count, []
        zero = zero_blocks([float(torch.trace(b)) for b in total.blocks], count, slices)

        def arrays():
            for i, block in enumerate(total.blocks):
                yield f"{self.sum_name}.{i}", block.numpy()
            for i, (block, part) in enumerate(zip(total.blocks, slices)):
                lam, factor = factorize_or_zero_(block, count, self.hessian.damping, part, i in zero)
                total.blocks[i] = factor
                lambdas.append(lam)
                train.step("blocks_factorised")
                yield f"cholesky.{i}", factor.numpy()

        shapes = {f"{kind}.{i}": (np.float64, (s.stop - s.start,) * 2)
                  for kind in (self.sum_name, "cholesky") for i, s in enumerate(slices)}
        return ChunkedSolve(shapes, arrays(), lambda: Curvature(slices, total.blocks, lambdas, count, zero), count)

    def to_arrays(self, solver: Curvature) -> dict[str, np.ndarray]:
        return numbered("cholesky", solver.cholesky)

    def from_arrays(self, arrays: dict[str, Tensor], layout: dict) -> Curvature:
        return Curvature(layout_slices(layout), in_order(arrays, "cholesky"), layout_damping(layout), layout["count"],
                         layout.get("zero_blocks", []))
