"""Gauss-Newton curvature in the compressed space: Ĥ = (1/n) Σ_i ĝ_i ĝ_iᵀ + Λ, block-diagonal.

Gram sums are additive, so workers sum their chunks and a reducer sums the workers, all in
float64; the damping and the Cholesky factors come from the total (`factorize`, or `factorize_`
turning each Gram block into its factor in its own storage).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor

from distinf.core.index_set import Columns
from distinf.core.numerics import NumericalError

# λ_l = AUTO_DAMPING_SCALE · mean eigenvalue of the block's Gram: the paper's and DataInf's rule.
AUTO_DAMPING_SCALE = 0.1

# A block whose gradient is zero in exact arithmetic (a frozen or unused tensor; GPT-2's attention
# key bias, whose shift every softmax ignores) holds at most float32 rounding: entries whose root
# mean square is below float32's machine epsilon times the largest block's. `damping: auto` would
# scale that rounding up to O(1) of every score, so such a block is set to contribute nothing.
ZERO_BLOCK_TOLERANCE = 2.0 ** -23


def block_slices(columns: Columns, blocks: str) -> list[slice]:
    """`layer`: one block per parameter tensor; `full`: one k x k block."""
    if blocks == "full":
        return [slice(0, columns.k)]
    if blocks == "layer":
        return list(columns.slices().values())
    raise ValueError(f"hessian.blocks: unknown {blocks!r}; expected 'layer' or 'full'")


@dataclass
class GramSums:
    """Σ ĝ ĝᵀ per block and the example count: the additive state of the curvature."""

    slices: list[slice]
    blocks: list[Tensor] = field(default_factory=list)
    count: int = 0

    def __post_init__(self) -> None:
        if not self.blocks:
            self.blocks = [torch.zeros(s.stop - s.start, s.stop - s.start, dtype=torch.float64) for s in self.slices]

    def add(self, grads: Tensor) -> "GramSums":
        """Add the rows of grads [N, k]."""
        g = grads.detach().to("cpu", torch.float64)
        for block, part in zip(self.blocks, self.slices):
            block.addmm_(g[:, part].T, g[:, part])
        self.count += g.shape[0]
        return self

    def merge(self, other: "GramSums") -> "GramSums":
        for mine, theirs in zip(self.blocks, other.blocks):
            mine += theirs
        self.count += other.count
        return self


def _rebuild(cls: type, plain: dict, tensors: dict, tensor_lists: dict):
    # Arrays from Ray's object store are read-only views of shared memory; the tensors over them
    # are only read (factors, inverses, batches), so torch's warning about it is moot here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return cls(**plain, **{name: torch.from_numpy(a) for name, a in tensors.items()},
                   **{name: [torch.from_numpy(a) for a in arrays] for name, arrays in tensor_lists.items()})


class ArrayPickled:
    """A dataclass mixin: pickled with its tensor fields (and lists of tensors) as numpy arrays.

    Under pickle protocol 5, which Ray's object store uses, numpy arrays travel out of band: a
    task that receives the object gets tensors viewing the store's shared memory, with no copy of
    its own (torch tensors would be pickled in band, and every task would deserialise a copy).
    Unpickled, it is the same dataclass with the same CPU tensors.
    """

    def __reduce__(self):
        plain, tensors, tensor_lists = {}, {}, {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor):
                tensors[f.name] = value.detach().cpu().numpy()
            elif isinstance(value, list) and value and all(isinstance(v, Tensor) for v in value):
                tensor_lists[f.name] = [v.detach().cpu().numpy() for v in value]
            else:
                plain[f.name] = value
        return _rebuild, (type(self), plain, tensors, tensor_lists)


@dataclass
class Curvature(ArrayPickled):
    """Ĥ's factorisation: lower Cholesky factor and damping of each block.

    Like every solver of distinf.core.solvers it offers precondition and self_influence.
    Pickled with its factors as numpy arrays (ArrayPickled): zero-copy from Ray's object store.
    """

    slices: list[slice]
    cholesky: list[Tensor]
    damping: list[float]
    count: int
    zero_blocks: list[int] = field(default_factory=list)  # blocks that contribute exactly nothing

    def precondition(self, grads: Tensor) -> Tensor:
        return precondition(self, grads)

    def self_influence(self, grads: Tensor) -> Tensor:
        return self_influence(self, grads)


def zero_blocks(traces: list[float], count: int, slices: list[slice]) -> list[int]:
    """The blocks whose gradient is zero or float32 rounding of zero, from each block's Σ_i ‖ĝ_i^l‖²:
    an entry root mean square of 0, or at most ZERO_BLOCK_TOLERANCE times the largest block's."""
    rms = [math.sqrt(max(t, 0.0) / (count * max(1, s.stop - s.start))) for t, s in zip(traces, slices)]
    top = max(rms, default=0.0)
    return [i for i, r in enumerate(rms) if r == 0.0 or r <= ZERO_BLOCK_TOLERANCE * top]


def block_damping(gram_sum: Tensor, count: int, damping: str | float) -> float:
    """`auto`: a tenth of the block's mean eigenvalue, trace(Σ ĝĝᵀ)/(n·k_l); else the float."""
    return damping_from_trace(float(torch.trace(gram_sum)), count, gram_sum.shape[0], damping)


def damping_from_trace(trace: float, count: int, size: int, damping: str | float) -> float:
    """block_damping from Σ_i ‖ĝ_i^l‖² alone (what the solvers without a Gram keep)."""
    if damping != "auto":
        return float(damping)
    mean_eigenvalue = trace / (count * size)
    # A block no example touches has a zero Gram; any positive λ gives it zero influence.
    return AUTO_DAMPING_SCALE * mean_eigenvalue if mean_eigenvalue > 0 else 1.0


def factorize_block_(block: Tensor, count: int, lam: float, part: slice | None = None) -> Tensor:
    """The lower Cholesky factor L of block/count + λI, computed in block's own storage (float64).

    `block`, a contiguous Gram sum Σ ĝĝᵀ, is overwritten: scaled, damped on its diagonal and
    factorised in place, with no k_l x k_l temporary. Returns L as the column-major view
    `block.mT` of that storage, the very tensor (numbers and strides) torch.linalg.cholesky_ex
    returns for block/count + λI: LAPACK works on column-major matrices, and the transposed view
    of a symmetric matrix is that matrix in column-major order, so torch factorises it where it
    lies. `part`, the block's columns, only names it in the error of a block that is not positive
    definite.
    """
    if count == 0:
        raise ValueError("no training examples: the curvature is undefined")
    if not block.is_contiguous():
        raise ValueError("factorize_block_: the Gram block must be contiguous")
    where = f" at columns {part.start}:{part.stop}" if part is not None else ""
    if not math.isfinite(lam):
        raise NumericalError(f"curvature block{where}: damping is {lam}; set hessian.damping to a finite float")
    block.div_(count)
    block.diagonal().add_(lam)  # in place: no k x k identity or sum temporaries
    if not bool(torch.isfinite(block).all()):  # LAPACK may "factorise" NaN without complaint
        raise NumericalError(f"curvature block{where} holds non-finite values (NaN or inf) (damping {lam:g}): "
                             "a stored gradient is not finite; recompute the run's gradients")
    factor = block.mT  # column-major: torch.linalg.cholesky_ex's own layout, so no copy
    info = torch.empty((), dtype=torch.int32)
    torch.linalg.cholesky_ex(factor, out=(factor, info))
    if int(info) != 0:
        raise NumericalError(
            f"curvature block{where} is not positive definite with damping {lam:g}; "
            "raise hessian.damping (or use auto); no restart can change this"
        )
    return factor


def factorize(sums: GramSums, damping: str | float = "auto") -> Curvature:
    """Damping and Cholesky factor of every block; `sums` is left as it was."""
    return factorize_(GramSums(sums.slices, [block.clone() for block in sums.blocks], sums.count), damping)


def factorize_(sums: GramSums, damping: str | float = "auto") -> Curvature:
    """factorize in place: each Gram block of `sums` becomes its factor (the Curvature's tensors
    view sums.blocks' storage), so only one k_l x k_l set is ever held; the same numbers as
    factorize. `sums` is spent afterwards."""
    if sums.count == 0:
        raise ValueError("no training examples: the curvature is undefined")
    zero = zero_blocks([float(torch.trace(b)) for b in sums.blocks], sums.count, sums.slices)
    factors, lambdas = [], []
    for i, (block, part) in enumerate(zip(sums.blocks, sums.slices)):
        lam, factor = factorize_or_zero_(block, sums.count, damping, part, i in zero)
        factors.append(factor)
        lambdas.append(lam)
    return Curvature(sums.slices, factors, lambdas, sums.count, zero)


def factorize_or_zero_(block: Tensor, count: int, damping: str | float, part: slice,
                       is_zero: bool) -> tuple[float, Tensor]:
    """(λ, factor) of one Gram block, in place. A zero block is not factorised: its damping is an
    untouched block's (1 under auto), its stored factor √λ·I, and precondition never reads it."""
    if not is_zero:
        lam = block_damping(block, count, damping)
        return lam, factorize_block_(block, count, lam, part)
    block.zero_()
    lam = block_damping(block, count, damping)
    block.diagonal().fill_(math.sqrt(lam))
    return lam, block.mT


def precondition(curvature: Curvature, grads: Tensor) -> Tensor:
    """[m, k] -> Ĥ⁻¹ ĝ for each row, float64 (any solver of distinf.core.solvers)."""
    if not isinstance(curvature, Curvature):
        return curvature.precondition(grads)
    g = grads.detach().to("cpu", torch.float64)
    out = torch.zeros_like(g)  # a zero block's columns stay exactly 0
    for i, (factor, part) in enumerate(zip(curvature.cholesky, curvature.slices)):
        if i not in curvature.zero_blocks:
            out[:, part] = torch.cholesky_solve(g[:, part].T, factor).T
    return out


def self_influence(curvature: Curvature, grads: Tensor) -> Tensor:
    """[n, k] -> ĝ_iᵀ Ĥ⁻¹ ĝ_i = Σ_l ‖L_l⁻¹ ĝ_i^l‖², float64, ≥ 0 (any solver of distinf.core.solvers)."""
    if not isinstance(curvature, Curvature):
        return curvature.self_influence(grads)
    g = grads.detach().to("cpu", torch.float64)
    total = torch.zeros(g.shape[0], dtype=torch.float64)
    for i, (factor, part) in enumerate(zip(curvature.cholesky, curvature.slices)):
        if i in curvature.zero_blocks:
            continue
        whitened = torch.linalg.solve_triangular(factor, g[:, part].T, upper=False)
        total += whitened.square().sum(0)
    return total

