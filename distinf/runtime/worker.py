"""The gradient worker: one Ray actor per GPU (or CPU slot) hosting a ZeRO-3 shard of the model.

All workers run the same number of steps, because every ZeRO-3 forward and backward gathers each
layer collectively (the steps' sizes may differ). A padding slot (-1) runs a real example whose
outputs are dropped (and whose Kronecker factors, with hessian.method kfac or kfac_mix, are not
summed: runtime.chunk_factors). Work comes as chunks of the driver's `chunk_plan`, the same chunk
indices for every rank, with the steps the driver grouped by length (distinf.batching); each
chunk's rows go back to input order and are committed to the ledger by a writer thread
(runtime.chunk_writer) while the next chunk computes.
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

from distinf.batching import collate
from distinf.config import JobConfig
from distinf.core.numerics import float16_overflow_rows
from distinf.inputs import DataError
from distinf.log import configure as configure_logging
from distinf.models import verify_model
from distinf.partition import PAD
from distinf.runtime.chunk_factors import ChunkFactors, factor_arrays
from distinf.runtime.chunk_writer import ChunkWriter
from distinf.runtime.faults import injected_delay, injected_fault
from distinf.runtime.ledger import commit_chunk, rows_digest
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
        self.step_seconds = self.io_wait_seconds = 0.0

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
                 chunks: Sequence[tuple[int, Sequence[int], Sequence[Sequence[int]]]], pad_token_id: int,
                 progress: Any = None, attempt: int = 0, run_id: str | None = None, fence: Any = None) -> list[dict]:
        """Compute and commit chunks of this rank's partition: (chunk index, positions in input
        order, steps: the positions grouped as the driver planned them, distinf.batching), PAD a
        stand-in slot. Every rank is given the same chunk indices and step counts.

        `fence` (runtime.lease.Fence) is checked before each commit: a run whose lease was taken
        over commits nothing more. Returns the chunks' ledger records, rows in input order. A
        non-finite loss or gradient stops the job naming the examples or, with data.on_bad_row:
        skip, leaves them out and lists them in the record.
        """
        writer = ChunkWriter(self.cfg.runtime.commit_queue)
        try:
            for chunk, positions, steps in chunks:
                began = time.perf_counter()
                rows, rejected, factors = self._chunk_rows(split, examples, ids, positions, steps, pad_token_id,
                                                           progress, attempt, writer)
                digest = rows_digest([examples[p] for p in positions if p != PAD])
                writer.submit(self._commit, split, chunk, [ids[p] for p in positions if p != PAD], rows, rejected,
                              attempt, run_id, factors, progress, began, fence, digest)
            records = writer.close()
        except BaseException:
            writer.abandon()
            raise
        self.io_wait_seconds += writer.wait_seconds
        if progress is not None:  # calls from one caller run in order: this returns once ours have landed
            ray.get(progress.value.remote(), timeout=PROGRESS_TIMEOUT)
        return records

    def _commit(self, split: str, chunk: int, planned: list[str], rows: tuple | None, rejected: list[dict],
                attempt: int, run_id: str | None, factors: ChunkFactors | None, progress: Any, began: float,
                fence: Any, digest: str) -> dict:
        """One chunk's ledger commit (on the writer thread): its rows (ids, losses [n], grads [n, k],
        or None) cast and encoded, written with its factor sums and record (with `digest`, the
        planned rows' ledger.rows_digest), each write after `fence` allows it; returns the record."""
        table = gradient_table(*rows, self.cfg.output.gradient_dtype) if rows is not None else None
        record = commit_chunk(self.run_dir, split, self.rank, chunk, planned, table, rejected, attempt, run_id,
                              factor_arrays(factors.chunk) if factors is not None else None,
                              fence.check if fence is not None else None, digest)
        if progress is not None:
            progress.chunk.remote()
        log.info(f"{split} chunk {chunk} committed by rank {self.rank}: {record['rows']} rows",
                 extra={"event": "chunk_committed", "split": split, "chunk": chunk, "rank": self.rank,
                        "rows": record["rows"], "rejected": len(rejected), "attempt": attempt,
                        "seconds": round(time.perf_counter() - began, 3)})
        return record

    def timings(self) -> dict:
        """Seconds this worker's gradient pass spent: in steps, and waiting on chunk commits."""
        return {"step_seconds": round(self.step_seconds, 3), "io_wait_seconds": round(self.io_wait_seconds, 3)}

    def _chunk_rows(self, split: str, examples: Sequence[dict[str, Tensor]], ids: Sequence[str],
                    positions: Sequence[int], steps: Sequence[Sequence[int]], pad_token_id: int, progress: Any,
                    attempt: int, writer: ChunkWriter) -> tuple[tuple | None, list[dict], ChunkFactors | None]:
        """One chunk's steps computed: (its rows in input order: ids, losses [n] and grads [n, k] as
        numpy, or None; rejected rows; its Kronecker factor sums or None)."""
        dtype, skip = self.cfg.output.gradient_dtype, self.cfg.data.on_bad_row == "skip"
        template = self.shard.factor_template if split == "train" else None
        # kfac: the capture sums the factors of this chunk's rows only (the queries' never).
        factors = self.shard.capture.factors = ChunkFactors(template, skip) if template is not None else None
        rows: dict[int, tuple[Tensor, Tensor]] = {}  # position -> (loss [], grad [k])
        bad_rows: dict[int, str] = {}

        def batches():
            for step in steps:
                if factors is not None:
                    factors.start_step([p != PAD for p in step])
                yield collate([examples[p if p != PAD else 0] for p in step], pad_token_id)

        computed = self.shard.capture.run(batches(), self.shard.loss_fn, self.shard.device)
        began = time.perf_counter()
        for step, (g, loss) in zip(steps, computed):
            self.step_seconds += time.perf_counter() - began
            release_free_memory()  # what the step freed inside the heap, before the next step's peak
            real = [i for i, p in enumerate(step) if p != PAD]
            bad = nonfinite_rows(loss[real], g[real], dtype)
            if bad and not skip:
                raise nonfinite_error(split, [ids[step[i]] for i in real], bad, self.cfg.model.dtype)
            for j, i in enumerate(real):
                if j in bad:
                    bad_rows[step[i]] = bad[j]
                else:
                    rows[step[i]] = loss[i], g[i]
            if factors is not None:
                factors.commit_step([i for j, i in enumerate(real) if j not in bad])
            if progress is not None and real:
                progress.add.remote(len(real))
            self.batches += 1
            # tests only; a kill lands after the queued commits, so a test knows which chunks are stored
            injected_fault(f"rank{self.rank}:batch{self.batches}", attempt, before=writer.flush)
            injected_delay()
            began = time.perf_counter()
        self.shard.capture.factors = None
        order = [p for p in positions if p in rows]
        rejected = [{"example_id": ids[p], "reason": bad_rows[p]} for p in positions if p in bad_rows]
        kept = (([ids[p] for p in order], torch.stack([rows[p][0] for p in order]).numpy(),
                 torch.stack([rows[p][1] for p in order]).numpy()) if order else None)
        return kept, rejected, factors

    def shutdown(self) -> None:
        self.shard.close()
