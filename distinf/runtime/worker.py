"""The gradient worker: one Ray actor per GPU (or CPU slot) hosting a ZeRO-3 shard of the model.

All workers run the same number of steps with the same batch sizes, because every ZeRO-3
forward and backward gathers each layer collectively. A padding slot (-1) runs a real example
whose outputs are dropped. Work comes as chunks of the driver's `chunk_plan`, the same chunk
indices for every rank, and each chunk is committed to the ledger as it completes.
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
from distinf.core.compressors import build_compressor
from distinf.core.tasks import loss_function
from distinf.core.tracking import track_modules
from distinf.data import PAD, DataError
from distinf.ledger import commit_chunk
from distinf.models import load_model
from distinf.runtime.faults import injected_delay, injected_fault
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


def nonfinite_rows(losses: Tensor, grads: Tensor) -> dict[int, str]:
    """Rows of losses [N] / compressed gradients [N, k] that are not finite, with the reason.

    fp16 overflow or a degenerate example shows up here; one such row would turn the curvature,
    and with it every score, into NaN.
    """
    bad = {i: f"loss is {losses[i].item()}" for i in torch.nonzero(~torch.isfinite(losses)).flatten().tolist()}
    for i in torch.nonzero(~torch.isfinite(grads).all(dim=1)).flatten().tolist():
        bad.setdefault(i, "gradient has non-finite entries")
    return bad


def nonfinite_error(split: str, ids: Sequence[str], bad: dict[int, str], dtype: str) -> DataError:
    named = ", ".join(f"'{ids[i]}' ({reason})" for i, reason in list(bad.items())[:10])
    more = f" and {len(bad) - 10} more" if len(bad) > 10 else ""
    hint = "model.dtype float16 overflows easily: try bfloat16 or float32. " if dtype == "float16" else ""
    return DataError(f"data.{split}: non-finite loss or gradient for example id(s) {named}{more}. {hint}"
                     "Set data.on_bad_row: skip to leave such examples out (listed in rejected.parquet).")


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
        self.batches = 0

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
        compressor = build_compressor(tracked, comp.method, comp.k, comp.seed, comp.allocation)
        self.index_set = compressor.layout  # an IndexSet (dropout) or a Layout: the same face
        self.capture = GradientCapture(model, tracked, compressor).__enter__()
        self.loss_fn = loss_function(cfg.model.task)
        return {
            "rank": self.rank, "host": socket.gethostname(), "pid": os.getpid(),
            "node_ip": ray.util.get_node_ip_address(),
            "node_id": ray.get_runtime_context().get_node_id(),
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
                 chunks: Sequence[tuple[int, Sequence[int]]], pad_token_id: int, progress: Any = None,
                 attempt: int = 0) -> list[dict]:
        """Compute and commit chunks of this rank's partition: (chunk index, positions), PAD a
        padding slot. Every rank is given the same chunk indices, hence the same steps.

        Returns the chunks' ledger records. A non-finite loss or gradient stops the job naming the
        examples or, with data.on_bad_row: skip, leaves them out and lists them in the record.
        """
        batch_size, dtype = self.cfg.runtime.batch_size, self.cfg.output.gradient_dtype
        skip = self.cfg.data.on_bad_row == "skip"
        records = []
        for chunk, positions in chunks:
            kept, losses, grads, rejected = [], [], [], []
            for start in range(0, len(positions), batch_size):
                step = list(positions[start : start + batch_size])
                batch = [examples[p if p != PAD else 0] for p in step]
                g, loss = compress_examples(self.capture, batch, self.loss_fn, len(batch), self.device, pad_token_id)
                real = [i for i, p in enumerate(step) if p != PAD]
                step_ids, g, loss = [ids[step[i]] for i in real], g[real], loss[real]
                bad = nonfinite_rows(loss, g)
                if bad and not skip:
                    raise nonfinite_error(split, step_ids, bad, self.cfg.model.dtype)
                if bad:
                    rejected += [{"example_id": step_ids[i], "reason": reason} for i, reason in bad.items()]
                    good = [i for i in range(len(step_ids)) if i not in bad]
                    step_ids, g, loss = [step_ids[i] for i in good], g[good], loss[good]
                kept += step_ids
                losses.append(loss)
                grads.append(g)
                if progress is not None and real:
                    progress.add.remote(len(real))
                self.batches += 1
                injected_fault(f"rank{self.rank}:batch{self.batches}", attempt)  # tests only
                injected_delay()
            table = (gradient_table(kept, torch.cat(losses).numpy(), torch.cat(grads).numpy(), dtype)
                     if kept else None)
            planned = [ids[p] for p in positions if p != PAD]
            records.append(commit_chunk(self.run_dir, split, self.rank, chunk, planned, table, rejected, attempt))
        return records

    def shutdown(self) -> None:
        if self.capture is not None:
            self.capture.__exit__(None, None, None)
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

