"""nn.Embedding: row v of W[V, D] receives Σ_t [ids[n, t] = v] · gy[n, t, :].

The padding row gets no gradient in torch, so kept entries in it stay zero here too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from distinf.core.adapters.base import _CHUNK_ELEMENTS, as_tokens, to_device


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
