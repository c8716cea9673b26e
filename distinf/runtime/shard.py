"""One rank's part of the gradient pass, without Ray: process group, ZeRO-3 model, capture hooks.

The gradient worker actor (distinf.runtime.worker) runs it; so does the one-GPU benchmark, on a
machine without Ray. Every rank must run the same number of steps (their sizes may differ), since
each ZeRO-3 forward and backward gathers every layer collectively.
"""

from __future__ import annotations

import os
import socket
import time

import torch

from distinf.config import ConfigError, JobConfig
from distinf.core.capture import GradientCapture
from distinf.core.checkpointing import CheckpointedBlocks
from distinf.core.compressors import build_compressor
from distinf.core.curvatures import curvature_method
from distinf.core.kfac import FactorSums
from distinf.optimizer_state import entry_scale
from distinf.core.tasks import loss_function
from distinf.core.tracking import track_modules
from distinf.models import load_model
from distinf.runtime.chunk_factors import plans_only
from distinf.runtime.process_memory import peak_rss, release_free_memory, reset_peak_rss
from distinf.runtime.weight_check import verify_loaded_weights
from distinf.runtime.zero3 import deepspeed_config, largest_gather, partitioned_model


def shard_device(device: str) -> torch.device:
    """Ray gives a GPU actor one visible device, so its GPU is always index 0 (as for a lone process)."""
    return torch.device("cuda", 0) if device == "cuda" else torch.device("cpu")


def process_group_backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def distributed_env(rank: int, world_size: int, master_addr: str, master_port: int) -> dict[str, str]:
    """What torch.distributed and DeepSpeed read; without LOCAL_RANK DeepSpeed tries MPI."""
    return {"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": "0",
            "MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port)}


def local_parameter_elements(model: torch.nn.Module) -> int:
    """Parameter elements this rank holds: its ZeRO-3 partitions, or everything when replicated."""
    return sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in model.parameters())


class GradientShard:
    def __init__(self, cfg: JobConfig, rank: int, world_size: int):
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.device = shard_device(cfg.runtime.device)
        self.capture: GradientCapture | None = None
        self.factor_template: FactorSums | None = None

    def setup(self, master_addr: str, master_port: int) -> dict:
        """Join the process group, build the (sharded) model, derive the index set, hook it.

        Returns what the manifest records of this rank, the setup's peak memory among it; the
        peak is then reset, so `memory()` reports the gradient pass alone.
        """
        cfg, started = self.cfg, time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if cfg.runtime.zero_stage == 3:
            model = self._sharded_model(master_addr, master_port)
        else:  # stages 0-2 shard only optimiser state and gradients, which inference never has
            model = load_model(cfg.model).to(self.device)
        weight_check = verify_loaded_weights(model, cfg.model)
        comp = cfg.compression
        try:
            tracked = track_modules(model, comp.modules.include, comp.modules.exclude)
            compressor = build_compressor(tracked, comp.method, comp.k, comp.seed, comp.allocation)
            scale = None if comp.optimizer_state is None else entry_scale(comp.optimizer_state, compressor.layout)
        except (ValueError, FileNotFoundError) as error:  # the same on every rank and every restart: not worth a retry
            raise ConfigError(f"compression: {error}") from None
        self.index_set = compressor.layout  # an IndexSet (dropout) or a Layout: the same face
        # kfac and its kin: the factor plans of the index set; the worker sums a chunk's rows into a copy.
        self.factor_template = (plans_only(FactorSums(tracked, compressor.layout))
                                if curvature_method(cfg.hessian).needs_factors else None)
        self.capture = GradientCapture(model, tracked, compressor, column_scale=scale).__enter__()
        self.checkpointed = CheckpointedBlocks(model).__enter__() if cfg.runtime.activation_checkpointing else None
        self.loss_fn = loss_function(cfg.model.task)
        release_free_memory()
        info = {
            "rank": self.rank, "host": socket.gethostname(), "pid": os.getpid(),
            "local_params": local_parameter_elements(model), "total_params": tracked.total_numel,
            "tracked_params": tracked.tracked_numel, "index_set_hash": self.index_set.fingerprint(),
            "setup_seconds": round(time.perf_counter() - started, 3),
            "dtype": weight_check.pop("dtype"), "weight_check": weight_check,
            "memory": {"setup_peak_rss": peak_rss(), **self._device_peak()},
        }
        reset_peak_rss()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        return info

    def _sharded_model(self, master_addr: str, master_port: int) -> torch.nn.Module:
        os.environ.update(distributed_env(self.rank, self.world_size, master_addr, master_port))
        import deepspeed
        from transformers.integrations import HfDeepSpeedConfig

        # On CPU the shared-memory comm op would JIT-compile for a minute and leak /dev/shm files.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        deepspeed.init_distributed(dist_backend=process_group_backend(self.device))
        model = partitioned_model(self.cfg.model, deepspeed_config(self.cfg, self.world_size))
        config = deepspeed_config(self.cfg, self.world_size, largest_gather(model))
        self._hf_ds_config = HfDeepSpeedConfig(config)  # transformers' own code asks whether ZeRO-3 is on
        engine, *_ = deepspeed.initialize(model=model, config=config)
        return engine.module

    def memory(self) -> dict:
        """Peak memory since setup ended: resident bytes, and on a GPU the allocator's peak."""
        return {"gradients_peak_rss": peak_rss(), **self._device_peak("gradients_")}

    def _device_peak(self, prefix: str = "setup_") -> dict:
        if self.device.type != "cuda":
            return {}
        return {f"{prefix}peak_gpu_allocated": torch.cuda.max_memory_allocated(self.device)}

    def close(self) -> None:
        if getattr(self, "checkpointed", None) is not None:
            self.checkpointed.__exit__(None, None, None)
            self.checkpointed = None
        if self.capture is not None:
            self.capture.__exit__(None, None, None)
            self.capture = None
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
