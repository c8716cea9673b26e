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

from distinf.core.adapters.base import _CHUNK_ELEMENTS, Factor, as_tokens, to_device


@dataclass
class EmbeddingPlan:
    tokens: Tensor  # token id of each kept entry
    dims: Tensor    # embedding dimension of each kept entry


class EmbeddingAdapter:
    module_types = (nn.Embedding,)

    def plan(self, module: nn.Embedding, selected: dict[str, np.ndarray]) -> dict[str, Any]:
        unknown = set(selected) - {"weight"}
        if unknown:
            raise ValueError(f"Embedding has no parameters {sorted(unknown)} to track")
        tokens, dims = np.divmod(selected["weight"], module.embedding_dim)
        if module.padding_idx is not None:
            tokens = np.where(tokens == module.padding_idx, -1, tokens)  # -1 never matches an id
        return {"weight": EmbeddingPlan(torch.from_numpy(tokens), torch.from_numpy(dims))}

    def keep(self, module: nn.Embedding, plans: dict[str, Any], inputs: tuple) -> Tensor:
        ids = inputs[0]
        return ids.reshape(ids.shape[0], -1)

    def entries(
        self, module: nn.Embedding, plans: dict[str, Any], ids: Tensor, grad_output: Tensor
    ) -> dict[str, Tensor]:
        plan = to_device(plans["weight"], grad_output.device)
        gy = as_tokens(grad_output)
        n, t = ids.shape
        out = torch.empty(n, len(plan.tokens), dtype=torch.float32, device=gy.device)
        step = max(1, _CHUNK_ELEMENTS // max(1, n * t))
        for start in range(0, len(plan.tokens), step):
            part = slice(start, start + step)
            hits = ids.unsqueeze(-1) == plan.tokens[part]                    # [N, T, chunk]
            g = gy.index_select(2, plan.dims[part]).float()                  # [N, T, chunk]
            out[:, part] = (g * hits).sum(1)
        return {"weight": out}

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
