"""A Hugging Face model as DeepSpeed ZeRO-3 partitions from its first byte.

`from_pretrained` under ZeRO-3 reads every checkpoint file whole on rank 0 and gathers each module
on every rank to copy it in, so rank 0 holds the whole model during setup. Here the model is
built under `deepspeed.zero.Init` without initialising any weight (each tensor is partitioned as
its module is constructed), then every rank reads its own flat range of each weight straight from
the safetensors files: a rank's setup peak is its partition plus the largest single tensor (the
construction of one module), whatever the model's size.

A checkpoint whose names or shapes do not map one-to-one onto the model's parameters (weights
renamed by a model-specific conversion, a head the checkpoint lacks, pickle weights) falls back to
`from_pretrained` under `HfDeepSpeedConfig`, and the log says why.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch
from torch import nn

from distinf.checkpoint import Checkpoint, CheckpointError
from distinf.config import JobConfig, ModelConfig
from distinf.models import DTYPES, auto_class, check_model_dir, load_model, model_config, with_lora


def deepspeed_config(cfg: JobConfig, world_size: int, largest_module: int | None = None) -> dict:
    """The ZeRO-3 inference config; with `largest_module` (elements of the largest set of
    parameters one module gathers at a time) also the limits on what stays gathered.

    DeepSpeed's defaults keep every gathered parameter that is used again within 1e9 elements,
    which for a frozen model means most of it between forward and backward. Reuse distance 0
    releases each module's weights after every use; on a GPU one module is prefetched ahead to hide
    the gather, on the CPU nothing is (there the gather and the compute share the same cores).
    """
    batch = cfg.runtime.batch_size
    zero: dict = {
        "stage": 3,
        # Partition every tensor, small ones too, so each rank holds ~p/W elements.
        "stage3_param_persistence_threshold": 0,
        "stage3_model_persistence_threshold": 0,
    }
    if largest_module is not None and cfg.runtime.release_after_use:
        prefetch = largest_module if cfg.runtime.device == "cuda" else 0
        zero.update(stage3_max_reuse_distance=0, stage3_prefetch_bucket_size=prefetch,
                    stage3_max_live_parameters=largest_module + prefetch)
    return {
        "train_micro_batch_size_per_gpu": batch,
        "train_batch_size": batch * world_size,
        "gradient_accumulation_steps": 1,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.model.dtype == "bfloat16"},
        "fp16": {"enabled": cfg.model.dtype == "float16"},
    }


def largest_gather(model: nn.Module) -> int:
    """Elements of the largest set of parameters that one module owns directly (what ZeRO-3
    gathers for it), counted on the full shapes of partitioned parameters."""
    return max((sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters(recurse=False))
                for module in model.modules()), default=0)


@dataclass(frozen=True)
class WeightMap:
    params: dict[str, str]
    """model parameter name (named_parameters, tied ones once) -> checkpoint tensor name"""
    buffers: dict[str, str]
    """model buffer name -> checkpoint tensor name, for the persistent buffers the checkpoint holds"""


def map_weights(model: nn.Module, checkpoint: Checkpoint) -> WeightMap:
    """Which checkpoint tensor holds each parameter; raises CheckpointError naming what does not map.

    A name matches as it is, without the model's base prefix ("model.", "bert.": a checkpoint of the
    bare backbone) or with it; a tied parameter matches under any of its names.
    """
    params, missing, mismatched = _match_parameters(model, checkpoint)
    if missing or mismatched:
        raise CheckpointError("; ".join(
            ([f"no checkpoint tensor for {len(missing)} parameter(s): {', '.join(missing[:5])}"] if missing else [])
            + ([f"shape differs for {', '.join(mismatched[:5])}"] if mismatched else [])))
    stored_name = _stored_name_finder(model, checkpoint)
    buffers = {name: found for name, _ in model.named_buffers() if (found := stored_name(name)) is not None}
    return WeightMap(params, buffers)


def matching_weights(model: nn.Module, checkpoint: Checkpoint) -> dict[str, str]:
    """model parameter name -> checkpoint tensor name, for the parameters that map one-to-one (the
    rest, a LoRA adapter's or a renamed head's, are left out). A PEFT-wrapped model's base weights
    map under their names in the base model."""
    return _match_parameters(model, checkpoint, _base_model_name)[0]


def _base_model_name(name: str) -> str:
    return name.removeprefix("base_model.model.").replace(".base_layer.", ".")


def _stored_name_finder(model: nn.Module, checkpoint: Checkpoint):
    prefix = getattr(model, "base_model_prefix", "") or ""

    def stored_name(name: str) -> str | None:
        candidates = [name, name.removeprefix(prefix + ".") if prefix else name, f"{prefix}.{name}" if prefix else name]
        return next((c for c in candidates if c in checkpoint.tensors), None)

    return stored_name


def _match_parameters(model: nn.Module, checkpoint: Checkpoint, rename=lambda name: name
                      ) -> tuple[dict[str, str], list[str], list[str]]:
    """(mapped, missing, mismatched): a name matches as it is, without the model's base prefix or
    with it; a tied parameter matches under any of its names."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    stored_name = _stored_name_finder(base, checkpoint)
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(rename(name))
    params, missing, mismatched = {}, [], []
    for name, param in model.named_parameters():
        found = next(filter(None, map(stored_name, names[id(param)])), None)
        shape = tuple(getattr(param, "ds_shape", None) or param.shape)
        if found is None:
            missing.append(name)
        elif checkpoint.tensors[found].shape != shape:
            mismatched.append(f"{name} {shape} vs {found} {checkpoint.tensors[found].shape}")
        else:
            params[name] = found
    return params, missing, mismatched


@torch.no_grad()
def load_partitions(model: nn.Module, checkpoint: Checkpoint, weights: WeightMap) -> None:
    """Fill every rank's ZeRO-3 partitions from the checkpoint, reading only its own range.

    DeepSpeed's layout: a tensor's flattening, padded to a multiple of the group size, cut into
    equal consecutive parts; rank r holds part r (the padding is zeroed here).
    """
    for name, param in model.named_parameters():
        part = param.ds_tensor
        start = part.ds_numel * param.ds_zero_partition_rank
        stop = min(start + part.ds_numel, param.ds_numel)
        if start < stop:
            part[: stop - start].copy_(checkpoint.read(weights.params[name], start, stop))
        part[max(stop - start, 0):].zero_()
    for name, buffer in model.named_buffers():
        if name in weights.buffers:  # buffers are not partitioned: every rank reads them whole
            buffer.copy_(checkpoint.read(weights.buffers[name]).view(buffer.shape))


def partitioned_model(cfg: ModelConfig, ds_config: dict) -> nn.Module:
    """The job's model, eval mode, partitioned over the process group from the first byte
    (the group must be initialised). LoRA adapters are added after the base weights are loaded."""
    checkpoint = _streaming_plan(cfg)
    if checkpoint is not None:
        return _streamed(cfg, ds_config, checkpoint)
    from transformers.integrations import HfDeepSpeedConfig

    live = HfDeepSpeedConfig(ds_config)  # while it is alive, from_pretrained partitions on construction
    model = load_model(cfg)
    del live
    return model


def _streaming_plan(cfg: ModelConfig) -> Checkpoint | None:
    """The checkpoint to stream from, or None (with the reason printed) when it cannot be."""
    path = check_model_dir(cfg)
    try:
        checkpoint = Checkpoint(path)
        with torch.device("meta"):  # names and shapes only, no memory
            skeleton = auto_class(cfg).from_config(model_config(cfg), trust_remote_code=cfg.trust_remote_code)
        map_weights(skeleton, checkpoint)
        return checkpoint
    except CheckpointError as error:
        logging.getLogger("distinf.worker").warning(
            f"loading '{path}' through transformers' ZeRO-3 path (rank 0 reads the whole checkpoint) because "
            f"its weights cannot be streamed per partition: {error}", extra={"event": "not_streamed"})
        return None


def arange_dtype_guard():
    """transformers' guard that keeps `zero.Init` from casting the explicitly typed `torch.arange`
    of RoPE buffers to the model's dtype (entered before `zero.Init`), where transformers has one;
    before it did (5.17, say) its own ZeRO-3 loading ran without one, and so does this."""
    try:
        from transformers.integrations.deepspeed import prevent_arange_dtype_change
    except ImportError:
        return contextlib.nullcontext()
    return prevent_arange_dtype_change()


def _streamed(cfg: ModelConfig, ds_config: dict, checkpoint: Checkpoint) -> nn.Module:
    import deepspeed

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4
        from transformers.modeling_utils import no_init_weights

    # No `dtype=` for zero.Init: DeepSpeed 0.19 reads `dtype or float16 if fp16_ok() else bfloat16 …`
    # as `(dtype or float16) if fp16_ok() else bfloat16`, so on a CPU without float16 support every
    # partition became bfloat16 whatever it was given. The config's bf16/fp16 flags, which
    # `deepspeed_config` sets from model.dtype, decide the dtype on every accelerator;
    # distinf.runtime.weight_check verifies the result on every rank.
    dtype = DTYPES[cfg.dtype]
    with no_init_weights(), arange_dtype_guard(), deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = auto_class(cfg).from_config(model_config(cfg), dtype=dtype, trust_remote_code=cfg.trust_remote_code)
    model.tie_weights()  # as from_pretrained does once the weights are in
    load_partitions(model, checkpoint, map_weights(model, checkpoint))
    if cfg.lora is not None:
        model = with_lora(model, cfg)
    return model.eval()
