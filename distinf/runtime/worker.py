"""The gradient worker: one Ray actor per GPU (or CPU slot) hosting a ZeRO-3 shard of the model.

All workers run the same number of steps with the same batch sizes, because every ZeRO-3
forward and backward gathers each layer collectively. A padding slot (-1) runs a real example
whose outputs are dropped.
"""

from __future__ import annotations

import os
import socket
from typing import Any, Sequence

import ray
import torch
from torch import Tensor

from distinf.api import compress_examples
from distinf.config import JobConfig
from distinf.core.capture import GradientCapture
from distinf.core.index_set import draw_index_set
from distinf.core.tasks import loss_function
from distinf.core.tracking import track_modules
from distinf.data import PAD
from distinf.models import load_model
from distinf.store import atomic_write_table, chunk_path
from distinf.tables import gradient_table


def deepspeed_config(cfg: JobConfig, world_size: int) -> dict:
    batch = cfg.runtime.batch_size
    return {
        "train_micro_batch_size_per_gpu": batch,
        "train_batch_size": batch * world_size,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {
            "stage": 3,
            # Partition every tensor, small ones too, so each rank holds ~p/W elements.
            "stage3_param_persistence_threshold": 0,
            "stage3_model_persistence_threshold": 0,
        },
        "bf16": {"enabled": cfg.model.dtype == "bfloat16"},
        "fp16": {"enabled": cfg.model.dtype == "float16"},
    }


def local_parameter_elements(model: torch.nn.Module) -> int:
    """Parameter elements this rank holds: its ZeRO-3 partitions, or everything when replicated."""
    return sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in model.parameters())


@ray.remote
class GradientWorker:
    def __init__(self, rank: int, world_size: int, job: dict, run_dir: str):
        self.rank, self.world_size = rank, world_size
        self.cfg = JobConfig.model_validate(job)
        self.run_dir = run_dir
        self.capture: GradientCapture | None = None

    def address(self) -> dict:
        return {"node_id": ray.get_runtime_context().get_node_id(), "ip": ray.util.get_node_ip_address()}

    def free_port(self, host: str) -> int:
        with socket.socket() as s:
            s.bind((host, 0))
            return s.getsockname()[1]

    def setup(self, master_addr: str, master_port: int) -> dict:
        """Join the process group, build the (sharded) model, derive the index set, hook it."""
        cfg, runtime = self.cfg, self.cfg.runtime
        self.device = torch.device("cuda", 0) if runtime.device == "cuda" else torch.device("cpu")
        if runtime.zero_stage == 3:
            model = self._sharded_model(master_addr, master_port)
        else:  # stages 0-2 shard only optimiser state and gradients, which inference never has
            model = load_model(cfg.model).to(self.device)
        comp = cfg.compression
        tracked = track_modules(model, comp.modules.include, comp.modules.exclude)
        self.index_set = draw_index_set(tracked.param_shapes, comp.k, comp.seed, comp.allocation)
        self.capture = GradientCapture(model, tracked, self.index_set).__enter__()
        self.loss_fn = loss_function(cfg.model.task)
        return {
            "rank": self.rank, "host": socket.gethostname(), "node_ip": ray.util.get_node_ip_address(),
            "local_params": local_parameter_elements(model), "total_params": tracked.total_numel,
            "tracked_params": tracked.tracked_numel, "index_set_hash": self.index_set.fingerprint(),
            "index_set": self.index_set.to_table() if self.rank == 0 else None,
        }

    def _sharded_model(self, master_addr: str, master_port: int) -> torch.nn.Module:
        os.environ.update(RANK=str(self.rank), WORLD_SIZE=str(self.world_size), LOCAL_RANK="0",
                          MASTER_ADDR=master_addr, MASTER_PORT=str(master_port))
        import deepspeed
        from transformers.integrations import HfDeepSpeedConfig

        # On CPU the shared-memory comm op would JIT-compile for a minute and leak /dev/shm files.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        deepspeed.init_distributed(dist_backend="nccl" if self.device.type == "cuda" else "gloo")
        config = deepspeed_config(self.cfg, self.world_size)
        self._hf_ds_config = HfDeepSpeedConfig(config)  # alive while loading: partition on construction
        engine, *_ = deepspeed.initialize(model=load_model(self.cfg.model), config=config)
        return engine.module

    def compress(self, split: str, examples: Sequence[dict[str, Tensor]], ids: Sequence[str],
                 positions: Sequence[int], pad_token_id: int, progress: Any = None) -> list[str]:
        """Compressed gradients of the examples at `positions` (PAD = padding slot), in chunks.

        Returns the committed chunk paths. Each chunk holds whole batches, about
        runtime.chunk_examples rows.
        """
        batch_size, chunk_rows = self.cfg.runtime.batch_size, self.cfg.runtime.chunk_examples
        dtype = self.cfg.output.gradient_dtype
        written, pending, seq = [], [], 0
        for start in range(0, len(positions), batch_size):
            step = list(positions[start : start + batch_size])
            batch = [examples[p if p != PAD else 0] for p in step]
            grads, losses = compress_examples(self.capture, batch, self.loss_fn, len(batch), self.device, pad_token_id)
            real = [i for i, p in enumerate(step) if p != PAD]
            pending.append(([ids[step[i]] for i in real], losses[real], grads[real]))
            if progress is not None and real:
                progress.add.remote(len(real))
            last = start + batch_size >= len(positions)
            if sum(len(p[0]) for p in pending) >= chunk_rows or (last and pending):
                rows = [i for p in pending for i in p[0]]
                if rows:
                    table = gradient_table(rows, torch.cat([p[1] for p in pending]).numpy(),
                                           torch.cat([p[2] for p in pending]).numpy(), dtype)
                    written.append(str(atomic_write_table(table, chunk_path(self.run_dir, split, self.rank, seq))))
                    seq += 1
                pending = []
        return written

    def shutdown(self) -> None:
        if self.capture is not None:
            self.capture.__exit__(None, None, None)
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

