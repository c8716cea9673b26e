"""nn.Embedding: row v of W[V, D] receives Σ_t [ids[n, t] = v] · gy[n, t, :].

The padding row gets no gradient in torch, so kept entries in it stay zero here too. As an outer
product the gradient is Σ_t onehot(ids_t) gy_tᵀ; the one-hot side stays as ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from distinf.core.adapters.base import Factor, as_tokens, to_device


@dataclass
class EmbeddingPlan:
    """The kept entries sorted by token, so the entries of one token are a contiguous run."""

    tokens: Tensor  # token id of each kept entry, ascending (-1: the padding row's, never matched)
    dims: Tensor    # embedding dimension of each kept entry, in the same order
    entry: Tensor   # the entry's position in the module's k_l columns


class EmbeddingAdapter:
    module_types = (nn.Embedding,)

    def plan(self, module: nn.Embedding, selected: dict[str, np.ndarray]) -> dict[str, Any]:
        unknown = set(selected) - {"weight"}
        if unknown:
            raise ValueError(f"Embedding has no parameters {sorted(unknown)} to track")
        tokens, dims = np.divmod(selected["weight"], module.embedding_dim)
        if module.padding_idx is not None:
            tokens = np.where(tokens == module.padding_idx, -1, tokens)  # -1 never matches an id
        order = np.argsort(tokens, kind="stable")
        as_long = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))  # noqa: E731
        return {"weight": EmbeddingPlan(as_long(tokens[order]), as_long(dims[order]), as_long(order))}

    def keep(self, module: nn.Embedding, plans: dict[str, Any], inputs: tuple) -> Tensor:
        ids = inputs[0]
        return ids.reshape(ids.shape[0], -1)

    def entries(
        self, module: nn.Embedding, plans: dict[str, Any], ids: Tensor, grad_output: Tensor
    ) -> dict[str, Tensor]:
        """Only the (position, kept entry) pairs whose token matches are visited: O(N·T·log k + matches)."""
        plan = to_device(plans["weight"], grad_output.device)
        gy = as_tokens(grad_output).reshape(-1, grad_output.shape[-1])  # [N·T, D]
        n, t = ids.shape
        k = len(plan.tokens)
        flat_ids = ids.reshape(-1).to(plan.tokens.dtype)
        first = torch.searchsorted(plan.tokens, flat_ids)                   # each position's run of entries
        count = torch.searchsorted(plan.tokens, flat_ids, right=True) - first
        position = torch.repeat_interleave(torch.arange(n * t, device=gy.device), count)
        run_start = torch.cumsum(count, 0) - count                          # where each position's pairs begin
        sorted_entry = first[position] + torch.arange(len(position), device=gy.device) - run_start[position]
        values = gy[position, plan.dims[sorted_entry]].float()
        out = torch.zeros(n * k, dtype=torch.float32, device=gy.device)
        out.index_add_(0, (position // t) * k + plan.entry[sorted_entry], values)
        return {"weight": out.view(n, k)}

    def keep_inputs(self, module: nn.Embedding, inputs: tuple) -> Tensor:
        return self.keep(module, {}, inputs)

    def _unpadded_grads(self, module: nn.Embedding, ids: Tensor, grad_output: Tensor) -> Tensor:
        gy = as_tokens(grad_output).float()
        if module.padding_idx is not None:
            gy = gy.masked_fill((ids == module.padding_idx).unsqueeze(-1), 0.0)
        return gy

    def per_example_gradient(self, module: nn.Embedding, ids: Tensor, grad_output: Tensor) -> dict[str, Tensor]:
        gy = self._unpadded_grads(module, ids, grad_output)
        n, _, dim = gy.shape
        out = torch.zeros(n, module.num_embeddings, dim, dtype=torch.float32, device=gy.device)
        out.scatter_add_(1, ids.unsqueeze(-1).expand(-1, -1, dim), gy)
        return {"weight": out.flatten(1)}

    def outer_factors(self, module: nn.Embedding, ids: Tensor, grad_output: Tensor) -> dict[str, tuple[Factor, Factor]]:
        return {"weight": (ids, self._unpadded_grads(module, ids, grad_output))}
