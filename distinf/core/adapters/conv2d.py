"""nn.Conv2d as a linear map over unfolded patches: W[out, in/groups, kh, kw] on x_unf[N, L, in·kh·kw].

Output channel o of group g sees only input channels g·in/groups ..., so its weight column c maps
to the unfolded column g·(in/groups)·kh·kw + c.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distinf.core.adapters.base import Factor, LinearLayoutAdapter


class Conv2dAdapter(LinearLayoutAdapter):
    module_types = (nn.Conv2d,)

    def weight_rows_cols(self, module: nn.Conv2d, flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # From the module's attributes, not weight.shape, which ZeRO-3 empties on partitioning.
        per_out = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
        rows, cols = np.divmod(flat, per_out)
        group = rows // (module.out_channels // module.groups)
        return rows, group * per_out + cols

    def features(self, module: nn.Conv2d, x: Tensor) -> Tensor:
        if isinstance(module.padding, str):
            raise ValueError(
                f"Conv2d padding={module.padding!r} is not supported for capture; use explicit padding"
            )
        padding = module.padding
        if module.padding_mode != "zeros":
            x = F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
            padding = 0
        patches = F.unfold(x, module.kernel_size, module.dilation, padding, module.stride)
        return patches.transpose(1, 2)  # [N, L, in·kh·kw]

    def output_grads(self, module: nn.Conv2d, gy: Tensor) -> Tensor:
        return gy.flatten(2).transpose(1, 2)  # [N, L, out]

    def weight_gradient(self, module: nn.Conv2d, x: Tensor, gy: Tensor) -> Tensor:
        """[N, out, in/groups·kh·kw]: each group's outputs see only its own unfolded input columns."""
        groups = module.groups
        if groups == 1:
            return super().weight_gradient(module, x, gy)
        per_out = x.shape[2] // groups
        gy_groups = gy.float().chunk(groups, dim=2)
        return torch.cat([torch.einsum("nto,nti->noi", g, x[:, :, i * per_out : (i + 1) * per_out].float())
                          for i, g in enumerate(gy_groups)], dim=1)

    def weight_factors(self, module: nn.Conv2d, x: Tensor, gy: Tensor) -> tuple[Factor, Factor]:
        if module.groups != 1:
            raise ValueError("compression.method: logra does not support grouped Conv2d (groups > 1): "
                             "its gradient is not one outer product per position; use another method")
        return gy, x
