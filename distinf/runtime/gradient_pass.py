"""The gradient pass: every chunk the ledger lacks, computed by the worker group, resumable.

The pass is cut into chunks that every attempt plans the same way (`partition.chunk_plan`), and a chunk
committed intact in the ledger is never computed again: a restarted group, a resumed run, an
append or a query run again each compute only what is missing.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import ray
from tqdm.auto import tqdm

from distinf.batching import chunk_steps
from distinf.config import JobConfig
from distinf.core.curvatures import curvature_method
from distinf.inputs import Tokenized
from distinf.partition import PAD, chunk_plan
from distinf.runtime import metrics
from distinf.runtime.failures import await_group
from distinf.runtime.ledger import Planned, input_order, pending_chunks, rows_digest
from distinf.runtime.restarts import with_restarts
from distinf.runtime.run import Run
from distinf.runtime.workers import WorkerGroup
from distinf.token_rows import TokenRows

log = logging.getLogger("distinf.driver")
PROBE_TIMEOUT = 120
QUICK_CALL = 300
"""Seconds the memory report and the shutdown of the workers may take (both are quick) before the
attempt counts as hung."""
"""Seconds the driver waits for an answer of a progress actor (it answers at once when alive)."""


@ray.remote(num_cpus=0)
class Progress:
    """Every rank's examples done and chunks committed, for the driver's bar, logs and metrics."""

    def __init__(self) -> None:
        self.done = 0
        self.chunks = 0

    def add(self, n: int) -> None:
        self.done += n

    def chunk(self) -> None:
        self.chunks += 1

    def value(self) -> tuple[int, int]:
        return self.done, self.chunks


@dataclass
class Gradients:
    index_table: pa.Table
    records: dict[str, list[dict]]
    """split -> the ledger record of every (chunk, rank) part, in input order: (segment, rank, chunk)."""


@dataclass
class SplitWork:
    """One split's gradient pass: the examples to compute, cut into chunks, and stored chunks reused."""

    data: Tokenized
    positions: dict[int, list[list[int]]]
    """chunk number -> rank -> positions into data (PAD a padding slot), as `chunk_plan` cuts them."""
    carried: list[dict] = field(default_factory=list)
    """Manifest records of chunks a stored run holds already (an append), used as they are."""
    segment: int = 0
    """Which append computes these chunks (0: the first run)."""

    def planned(self) -> Planned:
        return {c: [[self.data.ids[p] for p in part if p != PAD] for part in parts]
                for c, parts in self.positions.items()}

    def planned_rows(self) -> dict[int, list[str]]:
        """chunk -> rank -> the `rows_digest` of the tokenised rows the part holds."""
        return {c: [rows_digest([self.data.examples[p] for p in part if p != PAD]) for part in parts]
                for c, parts in self.positions.items()}


def split_work(cfg: JobConfig, data: Tokenized, first_chunk: int = 0, carried: list[dict] = (),
               segment: int = 0) -> SplitWork:
    """All of `data` in chunks numbered from `first_chunk`."""
    runtime = cfg.runtime
    plan = (chunk_plan(len(data.ids), runtime.num_workers, runtime.batch_size, runtime.chunk_examples)
            if data.ids else [])
    return SplitWork(data, {first_chunk + c: parts for c, parts in enumerate(plan)}, list(carried), segment)


def gradient_pass(cfg: JobConfig, run: Run, work: dict[str, SplitWork], pad_token_id: int) -> Gradients:
    """Compute every chunk the ledger lacks, rebuilding the worker group after a failure. The run
    adopts the workers' index set and notes their layout, memory and timings."""
    splits = list(work)
    planned = {s: work[s].planned() for s in splits}
    rows = {s: work[s].planned_rows() for s in splits}
    # kfac and its kin: a train part counts as done only with its Kronecker factor sums.
    with_factors = {s: s == "train" and curvature_method(cfg.hessian).needs_factors for s in splits}
    records = {s: run.folder.verified_records(s, planned[s], with_factors=with_factors[s], rows=rows[s])
               for s in splits}
    group = WorkerGroup(cfg, run.view(), run.manifest.model_fingerprint)
    state = {"index_table": run.stored_index_set(), "todo": {}}

    def attempt(number: int) -> None:
        todo = state["todo"] = {s: pending_chunks(planned[s], records[s]) for s in splits}
        if state["index_table"] is not None and not any(todo.values()):
            return  # every chunk is committed and intact: no model needed
        group.start()
        state["index_table"] = run.adopt_index_set(group.infos)
        for split in splits:
            if todo[split]:
                for record in _compress(cfg, group, split, work[split], pad_token_id, todo[split], number):
                    records[split][(record["chunk"], record["rank"])] = record
        run.record_workers(group.call(lambda w: w.memory.remote(), "memory", stall=QUICK_CALL),
                           group.call(lambda w: w.timings.remote(), "timings", stall=QUICK_CALL))
        group.call(lambda w: w.shutdown.remote(), "shutdown", stall=QUICK_CALL)

    def take_stock() -> None:
        run.folder.remove_leftovers()
        for split in splits:  # what the failed attempt committed before it stopped
            records[split].update(run.folder.verified_records(split, planned[split], state["todo"][split],
                                                              with_factors[split], rows[split]))

    with_restarts(run, cfg.runtime.max_restarts, "gradients", "gradient pass", attempt, "Committed chunks are kept",
                  stop=group.stop, name_of=group.worker_name, after_failure=take_stock)
    ordered = {}
    for s in splits:
        computed = [{**records[s][key], "segment": work[s].segment} for key in records[s]]
        ordered[s] = sorted(work[s].carried + computed, key=input_order)
    return Gradients(state["index_table"], ordered)


def rank_share(data: Tokenized, parts: list[list[int]], steps: list[list[list[int]]]
               ) -> tuple[TokenRows, list[str], list[list[int]], list[list[list[int]]]]:
    """What one rank is sent for its chunks: only its own examples and ids, and its chunks'
    positions and steps renumbered into them (PAD kept), so no worker receives the whole dataset.

    A rank whose every slot is padding gets the first example to run them on.
    """
    used = sorted({p for part in parts for p in part if p != PAD}) or [0]
    local = {p: i for i, p in enumerate(used)}

    def renumber(positions: list[int]) -> list[int]:
        return [PAD if p == PAD else local[p] for p in positions]

    return (data.examples.take(used), [data.ids[p] for p in used], [renumber(part) for part in parts],
            [[renumber(step) for step in chunk] for chunk in steps])


def example_lengths(data: Tokenized) -> np.ndarray:
    """Tokens of each example [n]."""
    return np.diff(data.examples.offsets)


def planned_steps(cfg: JobConfig, data: Tokenized, parts: list[list[int]]) -> list[list[list[int]]]:
    """Each rank's steps for one chunk (`parts[r]`: rank r's positions), grouped by length, the
    same count on every rank (distinf.batching)."""
    runtime = cfg.runtime
    return chunk_steps(parts, example_lengths(data), runtime.batch_size, runtime.tokens_per_step)


def _compress(cfg: JobConfig, group: WorkerGroup, split: str, work: SplitWork, pad_token_id: int,
              todo: list[int], attempt: int) -> list[dict]:
    """Run the chunks `todo` of one split on every rank; returns their ledger records."""
    data, positions = work.data, work.positions
    progress = Progress.remote()
    futures = []
    steps = {c: planned_steps(cfg, data, positions[c]) for c in todo}
    for rank, worker in enumerate(group.workers):
        examples, ids, parts, rank_steps = rank_share(data, [positions[c][rank] for c in todo],
                                                      [steps[c][rank] for c in todo])
        futures.append(worker.compress.remote(split, ray.put(examples), ray.put(ids),
                                              list(zip(todo, parts, rank_steps)), pad_token_id, progress,
                                              attempt, group.run.fence.run_id, group.run.fence))
    committed = len(data.ids) - sum(p != PAD for c in todo for part in positions[c] for p in part)
    fields = {"split": split, "attempt": attempt, "total": len(data.ids)}
    log.info(f"gradients/{split}: {len(todo)} chunk(s) to compute, {committed} of {len(data.ids)} examples stored",
             extra={"event": "stage_start", "stage": "gradients", "chunks": len(todo), **fields})
    seen = [0, 0]  # examples, chunks: what the metrics and the log have been told
    logged = time.monotonic()
    # A bar only for a person at a terminal; a log (`ray job logs`, a pod's) gets a line a minute.
    with tqdm(total=len(data.ids), initial=committed, desc=f"gradients/{split}", unit="ex", mininterval=1.0,
              disable=not sys.stderr.isatty()) as bar:
        def poll() -> int:
            nonlocal logged
            examples, chunks = ray.get(progress.value.remote(), timeout=PROBE_TIMEOUT)
            metrics.examples_done(cfg.name, split, examples - seen[0])
            metrics.chunks_committed(cfg.name, split, chunks - seen[1])
            seen[:] = examples, chunks
            done = committed + examples
            metrics.examples_progress(cfg.name, split, done, len(data.ids))
            if done > bar.n:
                bar.update(done - bar.n)
            if time.monotonic() - logged >= 60:
                logged = time.monotonic()
                log.info(f"gradients/{split}: {done} of {len(data.ids)} examples",
                         extra={"event": "progress", "done": done, **fields})
            return done

        try:
            records = [record for records in await_group(futures, group.run.root, poll,
                                                         cfg.runtime.stall_timeout, f"gradients/{split}")
                       for record in records]
            poll()  # the last batches and commits, which may land after the last poll
        finally:
            ray.kill(progress)
    log.info(f"gradients/{split}: {len(records)} chunk part(s) committed",
             extra={"event": "stage_done", "stage": "gradients", "parts": len(records), **fields})
    return records
