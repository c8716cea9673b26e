"""The gradient worker: one Ray actor per GPU (or CPU slot) hosting a ZeRO-3 shard of the model.

All workers run the same number of steps with the same batch sizes, because every ZeRO-3
forward and backward gathers each layer collectively. A padding slot (-1) runs a real example
whose outputs are dropped (and whose Kronecker factors, with hessian.method kfac or kfac_mix, are
not summed: runtime.chunk_factors). Work comes as chunks of the driver's `chunk_plan`, the same chunk
indices for every rank, and each chunk is committed to the ledger as it completes.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Any, Sequence

import ray
import torch
from torch import Tensor

from distinf.config import JobConfig
from distinf.core.numerics import float16_overflow_rows
from distinf.data import PAD, DataError, collate
from distinf.ledger import commit_chunk, rows_digest
from distinf.log import configure as configure_logging
from distinf.models import verify_model
from distinf.runtime.chunk_factors import ChunkFactors, factor_arrays
from distinf.runtime.faults import injected_delay, injected_fault
from distinf.runtime.process_memory import release_free_memory
from distinf.runtime.shard import GradientShard
from distinf.tables import gradient_table

log = logging.getLogger("distinf.worker")
PROGRESS_TIMEOUT = 300
"""Seconds a rank waits for the progress actor to acknowledge its updates (it answers at once)."""


def nonfinite_rows(losses: Tensor, grads: Tensor, gradient_dtype: str = "float32") -> dict[int, str]:
    """Rows of losses [N] / compressed gradients [N, k] that are not finite, or (gradient_dtype
    float16) would not be once stored, with the reason.

    fp16 overflow or a degenerate example shows up here; one such row would turn the curvature,
    and with it every score, into NaN.
    """
    bad = {i: f"loss is {losses[i].item()}" for i in torch.nonzero(~torch.isfinite(losses)).flatten().tolist()}
    for i in torch.nonzero(~torch.isfinite(grads).all(dim=1)).flatten().tolist():
        bad.setdefault(i, "gradient has non-finite entries")
    if gradient_dtype == "float16":
        for i, reason in float16_overflow_rows(grads).items():
            bad.setdefault(i, reason)
    return bad


def nonfinite_error(split: str, ids: Sequence[str], bad: dict[int, str], dtype: str) -> DataError:
    named = ", ".join(f"'{ids[i]}' ({reason})" for i, reason in list(bad.items())[:10])
    more = f" and {len(bad) - 10} more" if len(bad) > 10 else ""
    hint = "model.dtype float16 overflows easily: try bfloat16 or float32. " if dtype == "float16" else ""
    return DataError(f"data.{split}: non-finite loss or gradient for example id(s) {named}{more}. {hint}"
                     "Set data.on_bad_row: skip to leave such examples out (listed in rejected.parquet).")


@ray.remote
class GradientWorker:
    """A Ray actor around one GradientShard: placement, rendezvous, chunks and their ledger commits."""

    def __init__(self, rank: int, world_size: int, job: dict, run_dir: str):
        configure_logging()
        self.rank, self.world_size = rank, world_size
        self.cfg = JobConfig.model_validate(job)
        self.run_dir = run_dir
        self.shard = GradientShard(self.cfg, rank, world_size)
        self.batches = 0

    def address(self) -> dict:
        return {"node_id": ray.get_runtime_context().get_node_id(), "ip": ray.util.get_node_ip_address()}

    def free_port(self, host: str) -> int:
        with socket.socket() as s:
            s.bind((host, 0))
            return s.getsockname()[1]

    def setup(self, master_addr: str, master_port: int, model_fingerprint: str | None = None) -> dict:
        """The shard's setup, with where it runs and (rank 0) the index set's table. The model files
        are checked against the driver's `model_fingerprint` first."""
        verify_model(self.cfg.model, model_fingerprint)
        info = self.shard.setup(master_addr, master_port)
        log.info(f"rank {self.rank} of {self.world_size} ready: {info['local_params']:,} local parameters",
                 extra={"event": "worker_ready", "rank": self.rank, "pid": os.getpid(),
                        "seconds": info.get("setup_seconds")})
        return {**info, "node_ip": ray.util.get_node_ip_address(), "node_id": ray.get_runtime_context().get_node_id(),
                "index_set": self.shard.index_set.to_table() if self.rank == 0 else None}

    def memory(self) -> dict:
        return self.shard.memory()

    def compress(self, split: str, examples: Sequence[dict[str, Tensor]], ids: Sequence[str],
                 chunks: Sequence[tuple[int, Sequence[int]]], pad_token_id: int, progress: Any = None,
                 attempt: int = 0, run_id: str | None = None, fence: Any = None) -> list[dict]:
        """Compute and commit chunks of this rank's partition: (chunk index, positions), PAD a
        padding slot. Every rank is given the same chunk indices, hence the same steps.

        `fence` (runtime.lease.Fence) is checked before each commit: a run whose lease was taken
        over commits nothing more. Returns the chunks' ledger records. A non-finite loss or gradient stops the job naming the
        examples or, with data.on_bad_row: skip, leaves them out and lists them in the record.
        """
        batch_size, dtype = self.cfg.runtime.batch_size, self.cfg.output.gradient_dtype
        skip = self.cfg.data.on_bad_row == "skip"
        records = []
        template = self.shard.factor_template if split == "train" else None
        for chunk, positions in chunks:
            began = time.perf_counter()
            kept, losses, grads, rejected = [], [], [], []
            steps = [list(positions[start : start + batch_size]) for start in range(0, len(positions), batch_size)]
            # kfac: the capture sums the factors of this chunk's rows only (the queries' never).
            factors = self.shard.capture.factors = ChunkFactors(template, skip) if template is not None else None

            def batches():
                for step in steps:
                    if factors is not None:
                        factors.start_step([p != PAD for p in step])
                    yield collate([examples[p if p != PAD else 0] for p in step], pad_token_id)

            computed = self.shard.capture.run(batches(), self.shard.loss_fn, self.shard.device)
            for step, (g, loss) in zip(steps, computed):
                release_free_memory()  # what the step freed inside the heap, before the next step's peak
                real = [i for i, p in enumerate(step) if p != PAD]
                step_ids, g, loss = [ids[step[i]] for i in real], g[real], loss[real]
                bad = nonfinite_rows(loss, g, dtype)
                if bad and not skip:
                    raise nonfinite_error(split, step_ids, bad, self.cfg.model.dtype)
                good = [i for i in range(len(step_ids)) if i not in bad]
                if bad:
                    rejected += [{"example_id": step_ids[i], "reason": reason} for i, reason in bad.items()]
                    step_ids, g, loss = [step_ids[i] for i in good], g[good], loss[good]
                if factors is not None:
                    factors.commit_step([real[i] for i in good])
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
            rows = rows_digest([examples[p] for p in positions if p != PAD])
            self.shard.capture.factors = None
            records.append(commit_chunk(self.run_dir, split, self.rank, chunk, planned, table, rejected, attempt,
                                        run_id, factor_arrays(factors.chunk) if factors is not None else None,
                                        fence.check if fence is not None else None, rows))
            if progress is not None:
                progress.chunk.remote()
            log.info(f"{split} chunk {chunk} committed by rank {self.rank}: {len(kept)} rows",
                     extra={"event": "chunk_committed", "split": split, "chunk": chunk, "rank": self.rank,
                            "rows": len(kept), "rejected": len(rejected), "attempt": attempt,
                            "seconds": round(time.perf_counter() - began, 3)})
        if progress is not None:  # calls from one caller run in order: this returns once ours have landed
            ray.get(progress.value.remote(), timeout=PROGRESS_TIMEOUT)
        return records

    def shutdown(self) -> None:
        self.shard.close()
