"""What a rank loaded, checked against what the job asked for, before it computes any gradient.

Loading goes through DeepSpeed's and transformers' own code, whose choices change with a release
or with what the accelerator reports: DeepSpeed 0.19's `zero.Init(dtype=float32)` builds bfloat16
on CPUs without float16 support. Such a run computes, finishes and writes "complete" over other
numbers than the checkpoint's. So every rank checks, once it has set up:

- every parameter, and every ZeRO-3 partition of one, has the job's dtype;
- a window of each parameter's elements that this rank holds equals the same elements read back
  from the checkpoint and cast to that dtype, bit for bit (loading casts the same way).

A failure is a `ModelError`: it would be the same on every retry, so the run stops and says which
parameter is wrong. The cost is one small read per parameter (measured at 1B in benchmarks/RESULTS.md).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

import torch
from torch import nn

from distinf.checkpoint import Checkpoint, CheckpointError
from distinf.config import ModelConfig
from distinf.models import DTYPES, ModelError, check_model_dir
from distinf.runtime.zero3 import matching_weights

WINDOW = 64
"""Elements compared per parameter: a contiguous run, one seek and one read."""


@dataclass(frozen=True)
class HeldRange:
    """The elements [start, stop) of a parameter's row-major flattening that this rank holds,
    and a flat view of them."""

    start: int
    stop: int
    values: torch.Tensor


def held_range(param: torch.Tensor) -> HeldRange:
    """A ZeRO-3 partition is one consecutive slice of the padded flattening; a replicated
    parameter is held whole."""
    part = getattr(param, "ds_tensor", None)
    if part is None:
        return HeldRange(0, param.numel(), param.detach().reshape(-1))
    start = part.ds_numel * param.ds_zero_partition_rank
    stop = max(min(start + part.ds_numel, param.ds_numel), start)
    return HeldRange(start, stop, part.detach()[: stop - start])


def is_adapter_parameter(name: str) -> bool:
    """A LoRA adapter's own weights, which PEFT keeps in float32 under a half-precision model."""
    return any(part.startswith("lora_") for part in name.split("."))


def check_dtypes(model: nn.Module, dtype: torch.dtype) -> None:
    """Every parameter and partition (adapters' aside) in `dtype`; raises ModelError naming those
    that are not."""
    wrong = []
    for name, param in model.named_parameters():
        if is_adapter_parameter(name):
            continue
        part = getattr(param, "ds_tensor", None)
        found = {param.dtype} | ({part.dtype} if part is not None else set())
        if found != {dtype}:
            wrong.append(f"{name} ({', '.join(sorted(str(d).removeprefix('torch.') for d in found))})")
    if wrong:
        raise ModelError(f"model.dtype is {str(dtype).removeprefix('torch.')} but {len(wrong)} parameter(s) were "
                         f"built in another dtype by the loading library: {', '.join(wrong[:5])}; refusing to "
                         "compute with other weights than the job asked for")


def window_start(name: str, held: HeldRange, size: int) -> int:
    """Where the compared window starts: spread over the tensor by the name, the same on every
    restart, so a misplaced slice anywhere in the partitions is as likely to be hit as the front."""
    room = held.stop - held.start - size
    spread = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
    return held.start + (spread % (room + 1) if room > 0 else 0)


def check_against_checkpoint(model: nn.Module, checkpoint: Checkpoint, names: dict[str, str],
                             window: int = WINDOW) -> tuple[int, int]:
    """Compare a window of each mapped parameter's held elements with the checkpoint's; returns the
    numbers of parameters and elements compared, raises ModelError naming the first that differs."""
    params = compared = 0
    for name, param in model.named_parameters():
        if name not in names:
            continue
        held = held_range(param)
        size = min(window, held.stop - held.start)
        if size <= 0:
            continue
        start = window_start(name, held, size)
        held_values = held.values[start - held.start: start - held.start + size].cpu()
        stored = checkpoint.read(names[name], start, start + size).to(held_values.dtype)
        if not torch.equal(held_values.contiguous().view(torch.uint8), stored.view(torch.uint8)):
            at = int((held_values != stored).nonzero()[0]) if (held_values != stored).any() else 0
            raise ModelError(
                f"parameter '{name}' differs from checkpoint tensor '{names[name]}' after loading: element "
                f"{start + at} is {held_values[at].item()!r} here and {stored[at].item()!r} in "
                f"'{checkpoint.tensors[names[name]].file}'; refusing to compute with other weights than the "
                "checkpoint's")
        params, compared = params + 1, compared + size
    return params, compared


def verify_loaded_weights(model: nn.Module, cfg: ModelConfig) -> dict:
    """Both checks on the job's model as this rank holds it; what the manifest records of them.

    Parameters the checkpoint does not hold one-to-one (an adapter's, a head the checkpoint lacks,
    weights renamed by a model-specific conversion) get the dtype check only; without safetensors
    (model.allow_pickle) every parameter does.
    """
    started = time.perf_counter()
    dtype = DTYPES[cfg.dtype]
    check_dtypes(model, dtype)
    try:
        checkpoint = Checkpoint(check_model_dir(cfg))
    except CheckpointError:
        checkpoint = None
    params, elements = (check_against_checkpoint(model, checkpoint, matching_weights(model, checkpoint))
                        if checkpoint is not None else (0, 0))
    return {"dtype": cfg.dtype, "params_compared": params, "elements_compared": elements,
            "seconds": round(time.perf_counter() - started, 4)}
