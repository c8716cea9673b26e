"""What every layer adapter shares: the selected-entry product, computed a slice of k at a time.

Most layers are a linear map in "linear layout": an input of features x[N, T, in] and an output
gradient gy[N, T, out] give ∂l_n/∂W[r, c] = Σ_t gy[n, t, r] · x[n, t, c]. Only the kept (r, c)
pairs are formed, in O(N·T·k) work and memory, never the per-example gradient's O(N·p).

The compressions that need more than kept entries use two further methods: the whole per-example
gradient (`per_example_gradient`, [N, p_l]) and its outer-product factors (`outer_factors`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn

# Bound on N·T·chunk elements of the temporary product, so memory stays flat as k grows.
_CHUNK_ELEMENTS = 1 << 24
# Form the [N, rows, cols] block that the kept entries touch with one matmul, then pick the
# entries, when that block is at most this many times k: a matmul does 10-50x more multiply-adds
# per second than the gather-multiply-sum path, so the block wins on small conv layers and LoRA
# factors with a large share kept (25-35x at half kept), and loses on LLM-sized layers, where a few
# thousand kept entries touch a block 100x k or more (benchmarks/RESULTS.md, "Dense block").
_DENSE_BLOCK_FACTOR = 16


@dataclass
class WeightPlan:
    """Precomputed gather indices for one weight: kept entry j is (rows[j], cols[j])."""

    rows: Tensor
    unique_cols: Tensor
    col_of_entry: Tensor  # position of cols[j] inside unique_cols
    unique_rows: Tensor
    row_of_entry: Tensor  # position of rows[j] inside unique_rows

    @property
    def block_size(self) -> int:
        return len(self.unique_rows) * len(self.unique_cols)


@dataclass
class BiasPlan:
    rows: Tensor


# One side of a per-example outer product: dense features [N, T, d], or token ids [N, T] that
# stand for one-hot rows of width d (an embedding's input), never materialised.
Factor = Tensor


def storage_matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """The 2-D view of a parameter that `outer_factors` refer to: [shape[0], rest] ([out, 1] for a bias)."""
    rows = shape[0] if shape else 1
    cols = 1
    for d in shape[1:]:
        cols *= d
    return rows, cols


def plan_weight(rows: np.ndarray, cols: np.ndarray) -> WeightPlan:
    unique_cols, col_of_entry = np.unique(cols, return_inverse=True)
    unique_rows, row_of_entry = np.unique(rows, return_inverse=True)
    as_long = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))  # noqa: E731
    return WeightPlan(as_long(rows), as_long(unique_cols), as_long(col_of_entry), as_long(unique_rows),
                      as_long(row_of_entry))


def gather_last(values: Tensor, index: Tensor) -> Tensor:
    """values[..., index] for values [N, T, d]: [N, T, len(index)].

    torch.gather walks the output row by row, so each (n, t) row of `values` is read while it
    sits in cache; index_select on the last dimension walks index by index, striding across all
    N·T rows per index (2-5x slower on CPU, 4.7x for SmolLM2's 49k-wide logit rows).
    """
    return torch.gather(values, 2, index.expand(values.shape[0], values.shape[1], -1))


def selected_products(x_cols: Tensor, col_of_entry: Tensor, gy: Tensor, rows: Tensor) -> Tensor:
    """[N, k] = Σ_t gy[:, t, rows[j]] · x_cols[:, t, col_of_entry[j]], chunked over j."""
    n, t = gy.shape[0], gy.shape[1]
    out = torch.empty(n, len(rows), dtype=torch.float32, device=gy.device)
    step = max(1, _CHUNK_ELEMENTS // max(1, n * t))
    for start in range(0, len(rows), step):
        part = slice(start, start + step)
        g = gather_last(gy, rows[part]).float()  # a fresh tensor either way: safe to multiply in place
        x = gather_last(x_cols, col_of_entry[part])
        # Not einsum("ntk,ntk->nk"): torch lowers it to a bmm of [N·k, 1, T] after copying both
        # operands to a [N, k, T] layout.
        out[:, part] = g.mul_(x).sum(1)
    return out


def use_dense_block(plan: WeightPlan, gy: Tensor) -> bool:
    """The block path for gy [N, T, out]: when the block is small next to k (_DENSE_BLOCK_FACTOR);
    not for one position (T = 1), where gathering is one multiply per entry and the block only
    adds work; not past the temporary-memory bound."""
    n, t = gy.shape[0], gy.shape[1]
    small = plan.block_size <= _DENSE_BLOCK_FACTOR * len(plan.rows)
    return small and t > 1 and n * plan.block_size <= _CHUNK_ELEMENTS


def dense_block_products(x_cols: Tensor, gy: Tensor, plan: WeightPlan) -> Tensor:
    """selected_products through the dense [N, rows, cols] block (see _DENSE_BLOCK_FACTOR)."""
    block = torch.einsum("nto,nti->noi", gather_last(gy, plan.unique_rows).float(), x_cols.float())
    return block[:, plan.row_of_entry, plan.col_of_entry]


def to_device(plan: Any, device: torch.device) -> Any:
    """Move a plan's index tensors once, on first use on a device."""
    for name, value in vars(plan).items():
        if isinstance(value, Tensor) and value.device != device:
            setattr(plan, name, value.to(device))
    return plan


class LinearLayoutAdapter:
    """Base for layers that reduce to linear layout; subclasses say how to get there.

    Subclasses implement `weight_rows_cols` (flat weight index -> output row, input column),
    `features` (layer input -> x[N, T, in]) and `output_grads` (gy as the layer emits it ->
    [N, T, out]).
    """

    def weight_rows_cols(self, module: nn.Module, flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def features(self, module: nn.Module, x: Tensor) -> Tensor:
        raise NotImplementedError

    def output_grads(self, module: nn.Module, gy: Tensor) -> Tensor:
        raise NotImplementedError

    def plan(self, module: nn.Module, selected: dict[str, np.ndarray]) -> dict[str, Any]:
        plans: dict[str, Any] = {}
        for name, flat in selected.items():
            if name == "weight":
                plans[name] = plan_weight(*self.weight_rows_cols(module, flat))
            elif name == "bias":
                plans[name] = BiasPlan(torch.from_numpy(flat.astype(np.int64)))
            else:
                raise ValueError(f"{type(module).__name__} has no parameter {name!r} to track")
        return plans

    def keep(self, module: nn.Module, plans: dict[str, Any], inputs: tuple) -> Tensor | None:
        """Forward: keep only the input columns the kept weight entries need."""
        weight = plans.get("weight")
        if weight is None:
            return None
        x = self.features(module, inputs[0].detach())
        return gather_last(x, to_device(weight, x.device).unique_cols)

    def entries(
        self, module: nn.Module, plans: dict[str, Any], kept: Tensor | None, grad_output: Tensor
    ) -> dict[str, Tensor]:
        gy = self.output_grads(module, grad_output)
        result = {}
        for name, plan in plans.items():
            plan = to_device(plan, gy.device)
            if name == "weight" and use_dense_block(plan, gy):
                result[name] = dense_block_products(kept, gy, plan)
            elif name == "weight":
                result[name] = selected_products(kept, plan.col_of_entry, gy, plan.rows)
            else:
                result[name] = gather_last(gy, plan.rows).float().sum(1)
        return result

    # --- the whole per-example gradient and its factors, for compressions other than dropout

    def keep_inputs(self, module: nn.Module, inputs: tuple) -> Tensor:
        """Forward: the layer's features x[N, T, in], all of them."""
        return self.features(module, inputs[0].detach())

    def weight_gradient(self, module: nn.Module, x: Tensor, gy: Tensor) -> Tensor:
        """[N, *weight storage shape flattened to 2-D] from x[N, T, in], gy[N, T, out]."""
        return torch.einsum("nto,nti->noi", gy.float(), x.float())

    def per_example_gradient(self, module: nn.Module, kept: Tensor, grad_output: Tensor) -> dict[str, Tensor]:
        """{local name: [N, p_l]} flattened row-major in the parameter's storage order."""
        gy = self.output_grads(module, grad_output)
        result = {}
        for name, _ in module.named_parameters(recurse=False):
            if name == "weight":
                result[name] = self.weight_gradient(module, kept, gy).flatten(1)
            elif name == "bias":
                result[name] = gy.float().sum(1)
        return result

    def outer_factors(self, module: nn.Module, kept: Tensor, grad_output: Tensor) -> dict[str, tuple[Factor, Factor]]:
        """{local name: (a, b)} with the per-example gradient in its storage_matrix_shape = Σ_t a_t b_tᵀ."""
        gy = self.output_grads(module, grad_output).float()
        result = {}
        for name, _ in module.named_parameters(recurse=False):
            if name == "weight":
                result[name] = self.weight_factors(module, kept.float(), gy)
            elif name == "bias":
                result[name] = (gy, torch.ones(*gy.shape[:2], 1, dtype=gy.dtype, device=gy.device))
        return result

    def weight_factors(self, module: nn.Module, x: Tensor, gy: Tensor) -> tuple[Factor, Factor]:
        """W stored [out, in]: ∂l/∂W = Σ_t gy_t x_tᵀ."""
        return gy, x


def as_tokens(x: Tensor) -> Tensor:
    """[N, ..., F] -> [N, T, F]: every position between batch and features is a 'token'."""
    return x.reshape(x.shape[0], -1, x.shape[-1])


class Adapter(Protocol):
    """The contract of a layer adapter (see LinearLayoutAdapter for the common case).

    plan/keep/entries serve dropout (kept entries only); keep_inputs with per_example_gradient or
    outer_factors serve the other compressions. Names are the module's own parameter names.
    """

    def plan(self, module: nn.Module, selected: dict[str, np.ndarray]) -> dict[str, Any]: ...

    def keep(self, module: nn.Module, plans: dict[str, Any], inputs: tuple) -> Any: ...

    def entries(
        self, module: nn.Module, plans: dict[str, Any], kept: Any, grad_output: Tensor
    ) -> dict[str, Tensor]: ...

    def keep_inputs(self, module: nn.Module, inputs: tuple) -> Any: ...

    def per_example_gradient(self, module: nn.Module, kept: Any, grad_output: Tensor) -> dict[str, Tensor]: ...

    def outer_factors(self, module: nn.Module, kept: Any, grad_output: Tensor) -> dict[str, tuple[Factor, Factor]]: ...
