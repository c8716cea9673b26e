"""dropout (the default): keep a shared random set of k_l entries of each tensor (docs/methods.md, "How it works").

The fast path: the adapters form only the kept entries, O(N·T·k), never the [N, p_l] gradient.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from distinf.core.compressors.base import CompressionMethod
from distinf.core.index_set import IndexSet, ParamShapes, draw_index_set
from distinf.core.tracking import ModuleUse


class DropoutCompressor(CompressionMethod):
    name = "dropout"
    keeps_entries = True

    def __init__(self, index_set: IndexSet):
        self.layout = index_set
        self._flat = dict(zip(index_set.names, index_set.flat_indices))

    @classmethod
    def draw(cls, param_shapes: ParamShapes, k: int, seed: int = 0, allocation: str = "stratified") -> "DropoutCompressor":
        return cls(draw_index_set(param_shapes, k, seed, allocation))

    build = draw

    def plan(self, use: ModuleUse) -> dict[str, Any] | None:
        selected = {local: self._flat[name] for local, name in use.params.items() if name in self._flat}
        return use.adapter.plan(use.module, selected) if selected else None

    def keep(self, use: ModuleUse, plan: dict[str, Any], inputs: tuple) -> Any:
        return use.adapter.keep(use.module, plan, inputs)

    def entries(self, use: ModuleUse, plan: dict[str, Any], kept: Any, grad_output: Tensor) -> dict[str, Tensor]:
        return use.adapter.entries(use.module, plan, kept, grad_output)
