"""Refusing numbers that would make an answer silently wrong: non-finite values, and the float16
range of stored gradients.

Pure functions over tensors and arrays; the runtime turns NumericalError into a fatal job error
(the same numbers come back on every restart, so no restart is tried).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor

# The largest finite float16: a float32 gradient entry beyond it is stored as inf.
FLOAT16_MAX = float(torch.finfo(torch.float16).max)


class NumericalError(ValueError):
    """A curvature block, damping, preconditioned query or score that is not a finite number, or a
    curvature block that cannot be factorised. The message names the block (columns a:b) or the
    chunk file, and what to change."""


def _all_finite(values: Tensor | np.ndarray) -> bool:
    if isinstance(values, Tensor):
        return bool(torch.isfinite(values).all())
    return bool(np.isfinite(values).all())


def require_finite(values: Tensor | np.ndarray, what: str) -> None:
    """Raise NumericalError naming `what` unless every entry of values is finite."""
    if not _all_finite(values):
        raise NumericalError(f"{what} holds non-finite values (NaN or inf); refusing to score with it")


def require_finite_columns(values: Tensor | np.ndarray, slices: Sequence[slice], what: str) -> None:
    """require_finite for rows x k columns, naming the first curvature block (columns a:b) at fault."""
    if _all_finite(values):
        return
    for part in slices:
        if not _all_finite(values[:, part]):
            raise NumericalError(f"{what} holds non-finite values (NaN or inf) in the curvature block at "
                                 f"columns {part.start}:{part.stop}; refusing to score with it")
    require_finite(values, what)


def float16_overflow_rows(grads: Tensor) -> dict[int, str]:
    """Rows of finite float32 gradients [N, k] that float16 would store with an inf entry, with the
    reason (checked on the cast itself, so exactly the rows that would overflow)."""
    overflow = (torch.isinf(grads.to(torch.float16)) & torch.isfinite(grads)).any(dim=1)
    peak = grads.abs().amax(dim=1) if grads.shape[1] else torch.zeros(grads.shape[0])
    return {i: (f"gradient entry {peak[i].item():.3g} is beyond float16's range (±{FLOAT16_MAX:.0f}); "
                "use output.gradient_dtype: float32")
            for i in torch.nonzero(overflow).flatten().tolist()}
