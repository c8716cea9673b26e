"""Activation checkpointing of a model's repeated blocks, for the gradient capture of long documents.

Autograd keeps every block's activations from the forward to the backward pass: about 21·h floats
per token per layer, more than a 7B model's partition at 4,096 tokens. Checkpointed, a block
keeps only its input and runs its forward again when the backward pass reaches it.

Hugging Face's own `gradient_checkpointing_enable` acts in train mode only, and the capture runs
the model in eval mode, so here each block's `forward` is wrapped in torch's non-reentrant
`checkpoint` for the duration of a `with` block (and restored after: the model is left as it
was). The capture's hooks tolerate the second forward: the output-gradient hooks that fire are
those of the first forward, whose graph the backward pass walks, with the kept inputs of that
forward; the recomputation's hooks attach to tensors no backward pass reaches, and its kept
inputs are dropped with them. So each kept entry is summed exactly once.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from torch import nn
from torch.utils.checkpoint import checkpoint


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks: modules of the classes it names in `_no_split_modules` (the
    decoder or encoder layers of a Hugging Face model), outermost only."""
    names = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    blocks: list[nn.Module] = []
    for module in model.modules():
        if type(module).__name__ in names and not any(_contains(b, module) for b in blocks):
            blocks.append(module)
    return blocks


def _contains(outer: nn.Module, inner: nn.Module) -> bool:
    return any(m is inner for m in outer.modules())


class CheckpointedBlocks:
    """`with CheckpointedBlocks(model):` each repeated block's forward runs under checkpoint."""

    def __init__(self, model: nn.Module, blocks: list[nn.Module] | None = None):
        self.blocks = repeated_blocks(model) if blocks is None else blocks
        if not self.blocks:
            raise ValueError(f"{type(model).__name__} names no repeated blocks (_no_split_modules) to checkpoint")
        self._saved: list[tuple[nn.Module, Any]] = []
        # A key/value cache would grow again in the recomputed forward (and the capture never needs one).
        self._configs = [m.config for m in model.modules() if getattr(getattr(m, "config", None), "use_cache", None)]

    def __enter__(self) -> "CheckpointedBlocks":
        for config in self._configs:
            config.use_cache = False
        for block in self.blocks:
            self._saved.append((block, block.__dict__.get("forward")))
            block.forward = partial(checkpoint, type(block).forward.__get__(block), use_reentrant=False)
        return self

    def __exit__(self, *exc: Any) -> None:
        for block, own in self._saved:
            if own is None:
                del block.forward
            else:
                block.forward = own
        self._saved.clear()
        for config in self._configs:
            config.use_cache = True
