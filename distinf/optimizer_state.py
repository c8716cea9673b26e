"""Optimizer-aware scores (TrackStar): the 1/(√v + ε) of every kept entry, read from a saved Adam state.

v is Adam's exp_avg_sq at the attributed checkpoint. Only the k kept entries are needed, so a
parameter's tensor is read, indexed and dropped one at a time. Accepted forms:
- a torch optimizer state_dict (torch.save) of an optimizer built from `model.named_parameters()`,
  whose param_groups carry `param_names`;
- safetensors holding exp_avg_sq under each parameter's name: one file, or a folder of shards
  (each name in exactly one shard), as a sharded save writes them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from distinf.config import OptimizerStateConfig
from distinf.core.index_set import IndexSet

KEY = "compression.optimizer_state.path"


def _torch_state(path: Path) -> dict[str, Callable[[], Tensor]]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or "state" not in state or "param_groups" not in state:
        raise ValueError(f"{KEY}: '{path}' is not a torch optimizer state_dict (no 'state' and 'param_groups')")
    out = {}
    for group in state["param_groups"]:
        names = group.get("param_names")
        if names is None:
            raise ValueError(f"{KEY}: '{path}' has no param_names: build the optimizer from "
                             f"model.named_parameters(), or save exp_avg_sq by name as safetensors")
        for name, number in zip(names, group["params"]):
            moments = state["state"].get(number, {})
            if "exp_avg_sq" in moments:
                out[name] = lambda m=moments: m["exp_avg_sq"]
    return out


def _safetensors_state(files: list[Path]) -> dict[str, Callable[[], Tensor]]:
    from safetensors import safe_open

    out, where = {}, {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                if name in where:
                    raise ValueError(f"{KEY}: '{name}' is in two shards, '{where[name]}' and '{file}'")
                where[name] = file

                def read(file=file, name=name) -> Tensor:
                    with safe_open(str(file), framework="pt") as shard:
                        return shard.get_tensor(name)
                out[name] = read
    return out


def second_moments(path: str | Path) -> dict[str, Callable[[], Tensor]]:
    """{parameter name: a function that reads its exp_avg_sq} of a saved state, in any accepted form."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{KEY}: folder '{path}' holds no .safetensors shards")
        return _safetensors_state(files)
    if not path.is_file():
        raise FileNotFoundError(f"{KEY}: no such file or folder '{path}'")
    return _safetensors_state([path]) if path.suffix == ".safetensors" else _torch_state(path)


def entry_scale(config: OptimizerStateConfig, index_set: IndexSet) -> Tensor:
    """[k] float64: 1 / (√v_j + eps) for each kept entry j, in the index set's column order."""
    readers = second_moments(config.path)
    parts = []
    for name, shape, flat in zip(index_set.names, index_set.shapes, index_set.flat_indices):
        if name not in readers:
            raise ValueError(f"{KEY}: '{config.path}' has no exp_avg_sq for '{name}', a parameter the index set keeps")
        v = readers[name]()
        if tuple(v.shape) != tuple(shape):
            raise ValueError(f"{KEY}: exp_avg_sq of '{name}' has shape {tuple(v.shape)}, the parameter {tuple(shape)}")
        kept = v.reshape(-1)[torch.from_numpy(np.asarray(flat))].to(torch.float64)
        if not torch.isfinite(kept).all() or (kept < 0).any():
            raise ValueError(f"{KEY}: exp_avg_sq of '{name}' holds negative or non-finite values")
        parts.append(1.0 / (kept.sqrt() + config.eps))
        del v
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)
