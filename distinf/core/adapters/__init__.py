"""Layer adapters: one per layer kind, each turning (layer input, output gradient, kept indices)
into per-example entries. Adding a layer kind is adding one file and one line here.

PEFT LoRA layers need no adapter of their own: their trainable factors lora_A and lora_B are
nn.Linear modules called with the (dropout-ed) input and the A output, so the Linear adapter
captures them exactly; the frozen base layer is not tracked.
"""

from __future__ import annotations

from torch import nn

from distinf.core.adapters.base import Adapter
from distinf.core.adapters.conv1d import Conv1DAdapter
from distinf.core.adapters.conv2d import Conv2dAdapter
from distinf.core.adapters.embedding import EmbeddingAdapter
from distinf.core.adapters.linear import LinearAdapter

ADAPTERS: tuple = (LinearAdapter(), Conv1DAdapter(), EmbeddingAdapter(), Conv2dAdapter())


def adapter_for(module: nn.Module) -> Adapter | None:
    """The adapter for this module's kind, or None if its parameters cannot be captured."""
    for adapter in ADAPTERS:
        if type(module) in adapter.module_types:
            return adapter
    for adapter in ADAPTERS:
        if isinstance(module, adapter.module_types):
            return adapter
    return None


__all__ = ["Adapter", "adapter_for", "ADAPTERS"]
