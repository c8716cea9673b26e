"""nn.Linear: y = x Wᵀ + b, W[out, in]; flat index f is (row f // in, column f % in)."""

from __future__ import annotations

import numpy as np
from torch import Tensor, nn

from distinf.core.adapters.base import LinearLayoutAdapter, as_tokens


class LinearAdapter(LinearLayoutAdapter):
    module_types = (nn.Linear,)

    def weight_rows_cols(self, module: nn.Linear, flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.divmod(flat, module.in_features)

    def features(self, module: nn.Linear, x: Tensor) -> Tensor:
        return as_tokens(x)

    def output_grads(self, module: nn.Linear, gy: Tensor) -> Tensor:
        return as_tokens(gy)
