"""Which parameters are tracked, and every module that uses each of them.

A parameter is tracked when it requires grad, a module of a supported kind owns it, and one of
its modules matches the include patterns and none of the exclude ones. Every module that uses a
tracked parameter is hooked, so a tied weight (input embedding = output layer) receives the sum
of all its uses, as autograd would give it. Parameters of other kinds (norms) are left out; the
tracked fraction of p says how much.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Sequence

from torch import nn

from distinf.core.adapters import Adapter, adapter_for


def param_shape(param: nn.Parameter) -> tuple[int, ...]:
    """The full shape, also for a ZeRO-3 partitioned parameter (whose .shape is empty)."""
    return tuple(getattr(param, "ds_shape", None) or param.shape)


@dataclass
class ModuleUse:
    """One hooked module and which canonical parameter each of its own parameters is."""

    name: str
    module: nn.Module
    adapter: Adapter
    params: dict[str, str]  # local attribute name -> canonical parameter name


@dataclass
class Tracked:
    param_shapes: list[tuple[str, tuple[int, ...]]]  # canonical names, named_parameters order
    uses: list[ModuleUse]
    total_numel: int
    untracked: list[str] = field(default_factory=list)

    @property
    def tracked_numel(self) -> int:
        return sum(math.prod(shape) for _, shape in self.param_shapes)

    @property
    def tracked_fraction(self) -> float:
        return self.tracked_numel / max(1, self.total_numel)


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(re.fullmatch(pattern, name) for pattern in patterns)


def track_modules(
    model: nn.Module, include: Sequence[str] = (".*",), exclude: Sequence[str] = ()
) -> Tracked:
    """Decide the tracked parameters of `model` (call before freezing it for capture)."""
    canonical = {}
    for name, param in model.named_parameters():  # first name of a shared parameter wins
        canonical.setdefault(id(param), name)
    total = sum(math.prod(param_shape(p)) for p in model.parameters())

    candidates: list[tuple[str, nn.Module, Adapter, dict[str, str]]] = []
    chosen: set[str] = set()
    for module_name, module in model.named_modules():
        own = {local: p for local, p in module.named_parameters(recurse=False) if p.requires_grad}
        adapter = adapter_for(module) if own else None
        if adapter is None:
            continue
        params = {local: canonical[id(p)] for local, p in own.items()}
        candidates.append((module_name, module, adapter, params))
        if _matches(module_name, include) and not _matches(module_name, exclude):
            chosen.update(params.values())

    uses = []
    for module_name, module, adapter, params in candidates:
        kept = {local: name for local, name in params.items() if name in chosen}
        if kept:
            uses.append(ModuleUse(module_name, module, adapter, kept))
    shapes = {name: param_shape(p) for name, p in model.named_parameters()}
    ordered = [(name, shapes[name]) for name in shapes if name in chosen]
    untracked = [name for name in shapes if name not in chosen]
    return Tracked(ordered, uses, total, untracked)
