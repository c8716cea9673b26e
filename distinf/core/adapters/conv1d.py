"""Hugging Face Conv1D (GPT-2): y = x W + b with W[in, out] stored transposed to nn.Linear."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from transformers.pytorch_utils import Conv1D

from distinf.core.adapters.base import Factor, LinearLayoutAdapter, as_tokens


class Conv1DAdapter(LinearLayoutAdapter):
    module_types = (Conv1D,)

    def weight_rows_cols(self, module: Conv1D, flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        cols, rows = np.divmod(flat, module.nf)  # W[i, o]: the input index is the major one
        return rows, cols

    def features(self, module: Conv1D, x: Tensor) -> Tensor:
        return as_tokens(x)

    def output_grads(self, module: Conv1D, gy: Tensor) -> Tensor:
        return as_tokens(gy)

    def weight_gradient(self, module: Conv1D, x: Tensor, gy: Tensor) -> Tensor:
        return torch.einsum("nti,nto->nio", x.float(), gy.float())

    def weight_factors(self, module: Conv1D, x: Tensor, gy: Tensor) -> tuple[Factor, Factor]:
        return x, gy  # W stored [in, out]: ∂l/∂W = Σ_t x_t gy_tᵀ
