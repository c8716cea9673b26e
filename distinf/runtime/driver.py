"""The driver of `distinf run`: plan, gradient workers, reducer, scoring tasks, manifest last.

Scheduling only: the math lives in distinf.core and is reached through the worker, reducer and
scoring modules.

Nothing committed is lost to a failure. The gradient pass is cut into chunks that every attempt
plans the same way (`data.chunk_plan`), and a chunk committed intact in the ledger is never
computed again. A failed worker brings its whole group down (ZeRO-3 needs every rank); the group
is rebuilt on a new rendezvous port and resumes from the ledger, at most runtime.max_restarts
times; the reducer and scoring stage likewise. A killed driver is resumed with
`run_job(..., resume=True)` (`distinf run --resume`), which first checks that the folder holds
the same job.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayError, RayTaskError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from tqdm.auto import tqdm

from distinf.config import ConfigError, JobConfig
from distinf.core.curvature import block_slices
from distinf.core.index_set import IndexSet
from distinf.core.numerics import NumericalError
from distinf.core.scoring import TopK
from distinf.data import PAD, DataError, Tokenized, chunk_plan, fingerprint, read_dataset, tokenize
from distinf.ledger import Planned, input_order, pending_chunks, verified_records
from distinf.log import configure as configure_logging
from distinf.models import ModelError, load_tokenizer, model_fingerprint
from distinf.runtime.process_memory import HOST_ALLOCATOR_ENV
from distinf.runtime.reducer import Reducer, zero_block_entries
from distinf.runtime.incremental import (APPEND_PENDING, Base, chain_fingerprint, check_appendable,
                                         open_for_append, refuse_or_discard, stale_chunks)
from distinf.runtime.lease import LeaseLost, acquire, write_manifest
from distinf.runtime.rundir import (Interrupted, JobError, arm_sigterm, check_free_space, check_same_job,
                                    damaged_files, estimated_bytes, interruption, is_unused, open_run_dir,
                                    remove_leftovers, terminated_as_error, unwritable, write_error)
from distinf.runtime import curvature_files, metrics, versions
from distinf.runtime.scoring import score_train_chunk
from distinf.runtime.versions import stamp
from distinf.runtime.worker import GradientWorker
from distinf.store import (MANIFEST, IntegrityError, atomic_write_json, atomic_write_table, display, file_sha256, gradient_dir, is_file, list_files,
                           read_verified_bytes, read_verified_table, run_path)
from distinf.tables import rejected_table, top_k_table, train_values_table

__all__ = ["JobError", "Plan", "capacity_shortfall", "cluster_resources", "plan_job", "run_job", "summary"]

WORKER_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
              **HOST_ALLOCATOR_ENV}
SPLITS = ("train", "queries")
log = logging.getLogger("distinf.driver")
# What a resumed run carries over from the stored manifest; the rest is recomputed.
_CARRIED = ("name", "model_fingerprint", "data_fingerprint", "index_set_hash", "index_set_sha256", "params",
            "workers", "restarts", "resumed")


@dataclass
class Plan:
    train: Tokenized | None
    queries: Tokenized | None
    pad_token_id: int
    stored_train: int = 0
    """Rows of the training file left out because the run already holds their ids (an append)."""

    def split(self, name: str) -> Tokenized:
        return self.train if name == "train" else self.queries


def plan_job(cfg: JobConfig, splits: tuple[str, ...] = ("train", "queries"),
             stored_train_ids: set[str] | frozenset = frozenset()) -> Plan:
    """Read and tokenise the train and query sets (those in `splits`); ids are checked unique per set.

    With data.on_bad_row: skip, bad rows are left out and listed in each set's `rejected`. Training
    rows whose ids are in `stored_train_ids` (an append: the run holds them already) are left out
    before tokenising, and so are their rejections.
    """
    tokenizer = load_tokenizer(cfg.model)
    num_labels = None
    if cfg.model.task == "sequence_classification":
        from transformers import AutoConfig

        num_labels = AutoConfig.from_pretrained(cfg.model.path, local_files_only=True,
                                                trust_remote_code=cfg.model.trust_remote_code).num_labels
    sets: dict[str, Tokenized | None] = {"train": None, "queries": None}
    stored = 0
    for role, dataset in (("train", cfg.data.train), ("queries", cfg.data.queries)):
        if role not in splits:
            continue
        table, rejected = read_dataset(dataset, role, cfg.data.on_bad_row)
        if role == "train" and stored_train_ids:
            known = pa.array([i in stored_train_ids for i in table.column("example_id").to_pylist()], pa.bool_())
            stored = sum(known.to_pylist())
            table = table.filter(pc.invert(known))
            rejected = [r for r in rejected if r.example_id not in stored_train_ids]
        if table.num_rows == 0:  # an append whose every row is stored already
            sets[role] = Tokenized(examples=[], ids=[], truncated=0, rows=[], rejected=list(rejected))
            continue
        sets[role] = tokenize(table, tokenizer, cfg.data.max_length, cfg.model.task, num_labels=num_labels,
                              role=role, on_bad_row=cfg.data.on_bad_row)
        sets[role].rejected = sorted(rejected + sets[role].rejected, key=lambda r: r.row)
    return Plan(sets["train"], sets["queries"], tokenizer.pad_token_id, stored)


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


def worker_env(device: str = "cpu") -> dict:
    """The environment of the job's actors and tasks.

    DeepSpeed's accelerator is named for the job's device both ways: left to itself it picks CUDA
    wherever CUDA is visible, and a DS_ACCELERATOR=cpu inherited from the node would shard a GPU
    job onto the CPU. DISTINF_TEST_* reach the workers so that tests can inject faults into real
    worker processes.
    """
    return {**WORKER_ENV, "DS_ACCELERATOR": device,
            **{k: v for k, v in os.environ.items() if k.startswith("DISTINF_TEST_")}}


def _connect(cfg: JobConfig) -> bool:
    """Join runtime.address, or start a local Ray; True if this job started it (and stops it).

    A local Ray on a loaded node can miss its own start-up window; one retry, then a JobError
    (recorded in the manifest) instead of a raw traceback. log_to_driver: the actors' log lines
    reach the driver's stderr, and so `ray job logs`.
    """
    if ray.is_initialized():
        return False
    if cfg.runtime.address:
        start, where = (lambda: ray.init(address=cfg.runtime.address, log_to_driver=True)), cfg.runtime.address
    else:
        start, where = (lambda: ray.init(include_dashboard=False, dashboard_host="127.0.0.1", log_to_driver=True,
                                         runtime_env={"env_vars": worker_env(cfg.runtime.device)})), "a local Ray"
    for _ in range(2):
        try:
            start()
            return not cfg.runtime.address
        except Exception as error:  # ray.init raises a bare Exception when its raylet misses the window
            ray.shutdown()
            failure = error
    raise JobError(f"could not start or join {where}: {failure}; committed chunks are kept, "
                   "run again with --resume") from failure


# ---------------------------------------------------------------------------------------------
# Failures


class _GroupFailed(Exception):
    """A call on the worker group failed; `rank` is the worker to blame (the dead one, if one died)."""

    def __init__(self, rank: int, error: BaseException):
        super().__init__(f"rank {rank}: {error}")
        self.rank, self.error = rank, error


def _cause(error: BaseException) -> BaseException:
    """The exception raised inside a task or actor call, or the error itself."""
    return error.cause if isinstance(error, RayTaskError) and error.cause is not None else error


def _fatal(error: BaseException, run_dir: Path) -> Exception | None:
    """What to raise at once for a failure no restart can fix: bad data, a corrupt chunk, a full
    disk, an actor whose constructor raises."""
    if isinstance(error, RayActorError) and error.actor_init_failed:
        return JobError(f"an actor of the job could not start: {error}")
    cause = _cause(error)
    if isinstance(cause, (ConfigError, DataError, JobError, ModelError)):  # the same on every restart
        return cause
    if isinstance(cause, (IntegrityError, NumericalError)):
        return JobError(str(cause))
    if isinstance(cause, OSError):
        return write_error(cause, run_dir)
    return None


def _headline(error: BaseException) -> str:
    cause = _cause(error)
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
    return f"{type(cause).__name__}: {lines[0][:300] if lines else ''}"


class Stalled(RuntimeError):
    """A stage made no progress for runtime.stall_timeout seconds: hung, and restarted like a failure."""


def _await_group(futures: list, run_dir: Path, poll: Callable[[], int] | None = None,
                 stall: float | None = None, what: str = "the call") -> list:
    """Results of one call on every worker, in rank order; a failure raises _GroupFailed.

    `poll` returns a progress count; `stall` seconds without a new result or more progress
    raise _GroupFailed(Stalled) (a hung rank, a collective that never completes).
    """
    pending = list(futures)
    seen, since = None, time.monotonic()
    while pending:
        ready, pending = ray.wait(pending, num_returns=len(pending), timeout=1.0)
        for ref in ready:
            try:
                ray.get(ref)
            except RayError as error:
                raise _blame(futures, ref, error, run_dir) from None
        progress = (len(futures) - len(pending), poll() if poll is not None else 0)
        if progress != seen:
            seen, since = progress, time.monotonic()
        elif pending and stall is not None and time.monotonic() - since > stall:
            waiting = [futures.index(ref) for ref in pending]
            raise _GroupFailed(waiting[0], Stalled(f"no progress in {what} for {stall:g} s (runtime.stall_timeout); "
                                                   f"still waiting on rank(s) {waiting}"))
    return ray.get(futures)


def _blame(futures: list, failed: Any, error: RayError, run_dir: Path) -> _GroupFailed:
    # When a rank dies its peers soon fail too, inside their collectives: name the one that died.
    if not isinstance(error, RayActorError) and _fatal(error, run_dir) is None:
        others = [ref for ref in futures if ref != failed]
        ready, _ = ray.wait(others, num_returns=len(others), timeout=5.0)
        for ref in ready:
            try:
                ray.get(ref)
            except RayActorError as died:
                return _GroupFailed(futures.index(ref), died)
            except RayError:
                pass
    return _GroupFailed(futures.index(failed), error)


# ---------------------------------------------------------------------------------------------
# The gradient pass


@dataclass
class WorkerGroup:
    """One attempt's gradient workers, in rank order, and their placement group."""

    placement: Any = None
    workers: list = field(default_factory=list)
    infos: list[dict] = field(default_factory=list)

    def stop(self) -> None:
        # Kill rather than ask: after a failure a survivor may be blocked in a collective.
        for worker in self.workers:
            ray.kill(worker)
        if self.placement is not None:
            remove_placement_group(self.placement)


def worker_bundle(device: str) -> dict[str, int]:
    """One rank's placement-group bundle: a CPU, and on a GPU job the GPU Ray then makes its only visible one."""
    return {"CPU": 1, "GPU": 1} if device == "cuda" else {"CPU": 1}


def capacity_shortfall(resources: dict[str, float], num_workers: int, device: str) -> str | None:
    """What a cluster with `resources` (ray.cluster_resources(): totals) lacks for the job's worker
    bundles, in words; None when it has enough."""
    bundle = worker_bundle(device)
    short = [f"{need * num_workers:g} {name} (the cluster has {resources.get(name, 0):g})"
             for name, need in bundle.items() if resources.get(name, 0) < need * num_workers]
    if not short:
        return None
    return f"runtime.num_workers: {num_workers} workers of {bundle} need " + ", ".join(short)


def cluster_resources(address: str) -> dict[str, float]:
    """The total resources of the Ray cluster at `address`: connect, read, disconnect (a Ray this
    process has joined already is read and left as it is)."""
    if ray.is_initialized():
        return dict(ray.cluster_resources())
    try:
        ray.init(address=address, log_to_driver=False)
    except Exception as error:  # ray.init raises bare Exceptions for an address it cannot reach
        ray.shutdown()
        raise ConfigError(f"runtime.address: cannot connect to the Ray cluster at {address!r}: "
                          f"{str(error).splitlines()[0] if str(error) else type(error).__name__}") from None
    try:
        return dict(ray.cluster_resources())
    finally:
        ray.shutdown()


def _start_workers(cfg: JobConfig, run_dir: Path, group: WorkerGroup) -> None:
    world = cfg.runtime.num_workers
    bundle = worker_bundle(cfg.runtime.device)
    # The keys the job set, so that the worker's validation sees the same job as the driver's.
    job = cfg.model_dump(exclude_unset=True)
    group.placement = placement_group([bundle] * world, strategy="PACK")
    timeout = cfg.runtime.placement_timeout
    try:
        ray.get(group.placement.ready(), timeout=timeout)
    except GetTimeoutError:
        raise JobError(f"runtime.num_workers: could not place {world} workers ({bundle} each) within {timeout:g} s "
                       "(runtime.placement_timeout); does the cluster have that many free slots?") from None
    group.workers = [
        GradientWorker.options(
            num_cpus=bundle["CPU"], num_gpus=bundle.get("GPU", 0),
            scheduling_strategy=PlacementGroupSchedulingStrategy(group.placement, placement_group_bundle_index=rank),
            runtime_env={"env_vars": worker_env(cfg.runtime.device)},
        ).remote(rank, world, job, str(run_dir))
        for rank in range(world)
    ]
    stall = cfg.runtime.stall_timeout
    addresses = _await_group([w.address.remote() for w in group.workers], run_dir, stall=stall, what="start-up")
    # One machine (one node, or several nodes sharing an IP): rendezvous on loopback, since Ray
    # may report an address that is not bindable here; across machines, on rank 0's node.
    # A new port on every attempt: the last group's may still be held.
    host = "127.0.0.1" if len({a["ip"] for a in addresses}) == 1 else addresses[0]["ip"]
    [port] = _await_group([group.workers[0].free_port.remote(host)], run_dir, stall=stall, what="start-up")
    group.infos = _await_group([w.setup.remote(host, port) for w in group.workers], run_dir, stall=stall,
                               what="model setup")
    if len({info["index_set_hash"] for info in group.infos}) != 1:
        raise JobError("workers derived different index sets; the job cannot continue")


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


def split_work(cfg: JobConfig, data: Tokenized, first_chunk: int = 0, carried: list[dict] = (),
               segment: int = 0) -> SplitWork:
    """All of `data` in chunks numbered from `first_chunk`."""
    runtime = cfg.runtime
    plan = (chunk_plan(len(data.ids), runtime.num_workers, runtime.batch_size, runtime.chunk_examples)
            if data.ids else [])
    return SplitWork(data, {first_chunk + c: parts for c, parts in enumerate(plan)}, list(carried), segment)


def _gradient_pass(cfg: JobConfig, run_dir: Path, work: dict[str, SplitWork], pad_token_id: int,
                   state: dict) -> Gradients:
    """Compute every chunk the ledger lacks, rebuilding the worker group after a failure."""
    splits = list(work)
    planned = {s: work[s].planned() for s in splits}
    records = {s: verified_records(run_dir, s, planned[s]) for s in splits}
    index_table = _stored_index_set(run_dir, state)
    max_restarts = cfg.runtime.max_restarts
    for attempt in range(max_restarts + 1):
        todo = {s: pending_chunks(planned[s], records[s]) for s in splits}
        if index_table is not None and not any(todo.values()):
            break  # every chunk is committed and intact: no model needed
        group = WorkerGroup()
        try:
            _start_workers(cfg, run_dir, group)
            index_table = _adopt_index_set(run_dir, state, group.infos)
            for split in splits:
                if todo[split]:
                    for record in _compress(cfg, group, run_dir, split, work[split], pad_token_id, todo[split],
                                            attempt, state["run_id"]):
                        records[split][(record["chunk"], record["rank"])] = record
            _record_memory(run_dir, state, _await_group([w.memory.remote() for w in group.workers], run_dir))
            _await_group([w.shutdown.remote() for w in group.workers], run_dir)
            break
        except _GroupFailed as failure:
            fatal = _fatal(failure.error, run_dir)
            if fatal is not None:
                raise fatal from None
            who = _worker_name(failure.rank, group.infos)
            state["restarts"].append({"stage": "gradients", "attempt": attempt, "worker": who,
                                      "error": _headline(failure.error)})
            metrics.restarted(cfg.name, "gradients")
            write_manifest(run_dir, state)
            if attempt == max_restarts:
                raise JobError(f"gradient pass: {who} failed on attempt {attempt + 1} ({_headline(failure.error)}); "
                               f"gave up after runtime.max_restarts = {max_restarts} restart(s). Committed "
                               "chunks are kept: run again with --resume to continue") from None
            log.warning(f"{who} failed ({_headline(failure.error)}); restarting the worker group "
                        f"({attempt + 1} of {max_restarts} restarts)",
                        extra={"event": "restart", "stage": "gradients", "attempt": attempt + 1})
        finally:
            group.stop()
        remove_leftovers(run_dir)
        for split in splits:  # what the failed attempt committed before it stopped
            records[split].update(verified_records(run_dir, split, planned[split], todo[split]))
    ordered = {}
    for s in splits:
        computed = [{**records[s][key], "segment": work[s].segment} for key in records[s]]
        ordered[s] = sorted(work[s].carried + computed, key=input_order)
    return Gradients(index_table, ordered)


def _worker_name(rank: int, infos: list[dict]) -> str:
    info = next((i for i in infos if i["rank"] == rank), None)
    return f"worker rank {rank}" + (f" (pid {info['pid']} on {info['host']})" if info else "")


def _stored_index_set(run_dir: Path, state: dict) -> pa.Table | None:
    """The index set a previous attempt wrote, if it is intact and the worker layout is known."""
    if not state.get("index_set_sha256") or not state.get("workers"):
        return None
    try:
        return read_verified_table(run_dir / "index_set.parquet", state["index_set_sha256"])
    except IntegrityError:
        return None


def _adopt_index_set(run_dir: Path, state: dict, infos: list[dict]) -> pa.Table:
    """Check the workers' index set against the run's, write it, and note the worker layout."""
    digest = infos[0]["index_set_hash"]
    if state.get("index_set_hash") not in (None, digest):
        raise JobError("the index set drawn now differs from the one the stored run was computed with "
                       "(another distinf, numpy or model version, or compression settings?); choose a new "
                       "output folder")
    table = infos[0]["index_set"]
    path = run_dir / "index_set.parquet"
    if not is_file(path) or file_sha256(path) != state.get("index_set_sha256"):
        atomic_write_table(table, path)
    state.update(
        index_set_hash=digest, index_set_sha256=file_sha256(path),
        params={"total": infos[0]["total_params"], "tracked": infos[0]["tracked_params"],
                "tracked_fraction": infos[0]["tracked_params"] / infos[0]["total_params"]},
        workers=[{"rank": i["rank"], "host": i["host"], "node_ip": i["node_ip"], "node_id": i["node_id"],
                  "local_params": i["local_params"], "setup_seconds": i["setup_seconds"], "memory": i["memory"]}
                 for i in infos],
    )
    write_manifest(run_dir, state)
    return table


def _record_memory(run_dir: Path, state: dict, peaks: list[dict]) -> None:
    """Each rank's peak memory of the gradient pass, beside its setup peak (bytes; None where the
    platform does not report it)."""
    for worker, peak in zip(state["workers"], peaks):
        worker["memory"] = {**worker.get("memory", {}), **peak}
    write_manifest(run_dir, state)


def rank_share(data: Tokenized, parts: list[list[int]]) -> tuple[list, list[str], list[list[int]]]:
    """What one rank is sent for its chunks: only its own examples and ids, and its chunks'
    positions renumbered into them (PAD kept), so no worker receives the whole dataset.

    A rank whose every slot is padding gets the first example to run them on.
    """
    used = sorted({p for part in parts for p in part if p != PAD}) or [0]
    local = {p: i for i, p in enumerate(used)}
    return ([data.examples[p] for p in used], [data.ids[p] for p in used],
            [[PAD if p == PAD else local[p] for p in part] for part in parts])


def _compress(cfg: JobConfig, group: WorkerGroup, run_dir: Path, split: str, work: SplitWork, pad_token_id: int,
              todo: list[int], attempt: int, run_id: str) -> list[dict]:
    """Run the chunks `todo` of one split on every rank; returns their ledger records."""
    data, positions = work.data, work.positions
    progress = Progress.remote()
    futures = []
    for rank, worker in enumerate(group.workers):
        examples, ids, parts = rank_share(data, [positions[c][rank] for c in todo])
        futures.append(worker.compress.remote(split, ray.put(examples), ray.put(ids), list(zip(todo, parts)),
                                              pad_token_id, progress, attempt, run_id))
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
            examples, chunks = ray.get(progress.value.remote())
            metrics.examples_done(cfg.name, split, examples - seen[0])
            metrics.chunks_committed(cfg.name, split, chunks - seen[1])
            seen[:] = examples, chunks
            done = committed + examples
            if done > bar.n:
                bar.update(done - bar.n)
            if time.monotonic() - logged >= 60:
                logged = time.monotonic()
                log.info(f"gradients/{split}: {done} of {len(data.ids)} examples",
                         extra={"event": "progress", "done": done, **fields})
            return done

        try:
            records = [record for records in _await_group(futures, run_dir, poll, cfg.runtime.stall_timeout,
                                                          f"gradients/{split}")
                       for record in records]
            poll()  # the last batches and commits, which may land after the last poll
        finally:
            ray.kill(progress)
    log.info(f"gradients/{split}: {len(records)} chunk part(s) committed",
             extra={"event": "stage_done", "stage": "gradients", "parts": len(records), **fields})
    return records


# ---------------------------------------------------------------------------------------------
# Curvature and scoring


def _reduce_and_score(cfg: JobConfig, run_dir: Path, out: Path, query_order: list[str], gradients: Gradients,
                      state: dict, lap: Callable[[str], None]) -> tuple[dict, dict]:
    """Reducer then scoring tasks, restarted together (scoring reads the reducer's objects),
    reading the chunks of run_dir and writing curvature/ and scores/ into the version folder `out`.

    Returns the reducer's result and the counts of scored examples.
    """
    chunks = {s: chunk_files(run_dir, gradients.records[s]) for s in SPLITS}
    index_set = IndexSet.from_table(gradients.index_table, _shapes_from(gradients.index_table))
    slices = block_slices(index_set, cfg.hessian.blocks)
    stored_sums, curvature_chunks = None, chunks["train"]
    pending = state.get(APPEND_PENDING)
    if pending is not None and cfg.hessian.method == "gauss_newton":
        stored_sums = _stored_gram_sums(run_dir, pending["base"], slices)
        if stored_sums is not None:  # the stored run's sums, plus this append's chunks only
            curvature_chunks = chunk_files(run_dir, [r for r in gradients.records["train"]
                                                     if r.get("segment") == pending["segment"]])
    state["curvature_input"] = {"stored_gram_sums": stored_sums is not None, "chunks_read": len(curvature_chunks)}
    max_restarts = cfg.runtime.max_restarts
    for attempt in range(max_restarts + 1):
        reducer = None
        try:
            reducer = Reducer.options(runtime_env={"env_vars": worker_env()}).remote(slices, cfg.hessian.model_dump())
            reduced = ray.get(reducer.reduce.remote(curvature_chunks, chunks["queries"], str(out / "curvature"),
                                                    attempt, stored_sums), timeout=cfg.runtime.stall_timeout)
            lap("curvature")
            counts = score_outputs(cfg, out, chunks["train"], reduced["queries"][0], reduced["curvature"][0],
                                   reduced["query_ids"], query_order, version=_version_of(state))
            lap("scoring")
            return reduced, counts
        except (RayError, Stalled) as error:
            fatal = _fatal(error, run_dir)
            if fatal is not None:
                raise fatal from None
            if isinstance(error, GetTimeoutError):
                error = Stalled(f"the reducer returned nothing for {cfg.runtime.stall_timeout:g} s "
                                "(runtime.stall_timeout)")
            state["restarts"].append({"stage": "curvature and scoring", "attempt": attempt,
                                      "error": _headline(error)})
            metrics.restarted(cfg.name, "curvature and scoring")
            if attempt < max_restarts:
                log.warning(f"curvature and scoring failed ({_headline(error)}); restarting "
                            f"({attempt + 1} of {max_restarts} restarts)",
                            extra={"event": "restart", "stage": "curvature and scoring", "attempt": attempt + 1})
            if attempt == max_restarts:
                raise JobError(f"curvature and scoring failed on attempt {attempt + 1} ({_headline(error)}); gave "
                               f"up after runtime.max_restarts = {max_restarts} restart(s). The gradients are "
                               "kept: run again with --resume to continue") from None
        finally:
            if reducer is not None:  # only now: the scoring tasks read objects the reducer owns
                ray.kill(reducer)
    raise AssertionError("unreachable")


def _stored_gram_sums(run_dir: Path, base: dict, slices: list[slice]) -> tuple[str, str, int] | None:
    """(path, sha256, count) of the Gram sums the run an append extends stored, if they are intact
    and of the same blocks; else None, and the curvature is summed over every chunk again (a
    failed append's reducer may have rewritten them since)."""
    files = base.get("files", {})
    try:
        layout = json.loads(read_verified_bytes(run_dir / curvature_files.LAYOUT, files[curvature_files.LAYOUT]))
        path = run_dir / curvature_files.ARRAYS
        if file_sha256(path) != files[curvature_files.ARRAYS]:
            raise IntegrityError(str(path))
    except (KeyError, OSError, ValueError):
        log.info("the stored Gram sums are not the run's any more; summing every chunk again",
                 extra={"event": "gram_sums_recomputed"})
        return None
    if layout.get("method") != "gauss_newton" or \
            [(b["start"], b["stop"]) for b in layout["blocks"]] != [(s.start, s.stop) for s in slices]:
        return None
    return str(path), files[curvature_files.ARRAYS], int(layout["count"])


def _shapes_from(index_table: pa.Table) -> list[tuple[str, tuple[int, ...]]]:
    # Scoring needs only the block layout, which the table's param runs give; shapes are unused.
    names = list(dict.fromkeys(index_table.column("param").to_pylist()))
    return [(name, (0,)) for name in names]


def chunk_files(run_dir: Path, records: list[dict]) -> list[tuple[str, str]]:
    """(path, sha256) of the records' chunk files, in their order; parts that kept no row have none."""
    return [(str(run_dir / r["file"]), r["sha256"]) for r in records if r["file"]]


def score_outputs(cfg: JobConfig, run_dir: Path, train_chunks: list[tuple[str, str]], preconditioned: Any,
                  curvature: Any, query_ids: list[str], query_order: list[str],
                  carried: pa.Table | None = None, version: tuple[str, datetime] | None = None) -> dict:
    """Scoring tasks over the train chunks (given in input order), merged into scores/top_k.parquet,
    scores/train_values.parquet and, with scoring.dense, scores/dense/ under run_dir.

    `preconditioned` [k, m] and `curvature` are object refs; `query_ids` are the columns of
    `preconditioned`, `query_order` the query file's order. `carried`, a stored run's
    train_values table, supplies self_influence instead of computing it again (distinf query).
    `version` (run_id, as_of) stamps every row of top_k and train_values with them.
    Returns the counts of scored train examples and queries.
    """
    dense_dir = run_dir / "scores" / "dense"
    with_self_influence = cfg.scoring.self_influence and carried is None
    futures = [
        score_train_chunk.remote(path, sha256, preconditioned, curvature, cfg.scoring.top_k, with_self_influence,
                                 query_ids, str(dense_dir / Path(path).name) if cfg.scoring.dense else None,
                                 version)
        for path, sha256 in train_chunks
    ]
    chunks = _await_tasks(futures, cfg.runtime.stall_timeout, "scoring")
    train_ids = [i for chunk in chunks for i in chunk.ids]  # input order, rejected examples left out
    position = {train_id: i for i, train_id in enumerate(train_ids)}
    n = len(train_ids)
    losses, score_mean, self_inf = np.zeros(n), np.zeros(n), np.full(n, np.nan)
    top = TopK(len(query_ids), cfg.scoring.top_k)
    for chunk in chunks:
        rows = np.array([position[i] for i in chunk.ids])
        losses[rows], score_mean[rows] = chunk.losses, chunk.score_mean
        if chunk.self_influence is not None:
            self_inf[rows] = chunk.self_influence
        top.update(chunk.top_scores, np.vectorize(position.get, otypes=[np.int64])(chunk.top_ids))

    if carried is not None:
        stored = dict(zip(carried.column("train_id").to_pylist(), carried.column("self_influence").to_numpy()))
        self_inf = np.array([stored[i] for i in train_ids], dtype=np.float64)

    # Rows of the outputs follow the input files' order, whatever the partitioning.
    query_rank = {q: i for i, q in enumerate(query_order)}
    rows_in_order = np.argsort([query_rank[q] for q in query_ids], kind="stable")
    top_table = top_k_table([query_ids[i] for i in rows_in_order], train_ids,
                            top.scores[rows_in_order], top.positions[rows_in_order])
    values = train_values_table(train_ids, losses, score_mean, self_inf if cfg.scoring.self_influence else None)
    if version is not None:
        top_table, values = stamp(top_table, *version), stamp(values, *version)
    atomic_write_table(top_table, run_dir / "scores" / "top_k.parquet")
    atomic_write_table(values, run_dir / "scores" / "train_values.parquet")
    return {"train": n, "queries": len(query_ids)}


def _await_tasks(futures: list, stall: float | None, what: str) -> list:
    """Results of independent tasks, in order; Stalled if none finishes for `stall` seconds."""
    pending, since = list(futures), time.monotonic()
    while pending:
        ready, pending = ray.wait(pending, num_returns=len(pending), timeout=1.0)
        if ready:
            since = time.monotonic()
        elif stall is not None and time.monotonic() - since > stall:
            raise Stalled(f"no {what} task finished for {stall:g} s (runtime.stall_timeout); "
                          f"{len(pending)} of {len(futures)} still running")
    return ray.get(futures)


def rejected_rows(plan: Plan, gradients: Gradients, splits: tuple[str, ...] = SPLITS) -> list[tuple]:
    """Rows left out by the data checks and by the workers (non-finite values), of `splits`:
    (example_id, split, row in its file, reason)."""
    rows = []
    for split in splits:
        data = plan.split(split)
        rows += [(r.example_id, split, r.row, r.reason) for r in data.rejected]
        row_of = dict(zip(data.ids, data.rows))
        rows += [(x["example_id"], split, row_of[x["example_id"]], x["reason"])
                 for record in gradients.records[split] for x in record.get("rejected", [])]
    return rows


def _write_rejected(run_dir: Path, rows: list[tuple], version: tuple[str, datetime]) -> dict[str, int]:
    """rejected.parquet; returns the count per split."""
    atomic_write_table(stamp(rejected_table(rows), *version), run_dir / "rejected.parquet")
    return {split: sum(row[1] == split for row in rows) for split in SPLITS}


def output_checksums(run_dir: Path, names: list[str]) -> dict[str, str]:
    """sha256 of the named outputs and of every scores/dense part (the gradient chunks are listed
    in the manifest with their rows instead)."""
    names = names + [str(p.relative_to(run_dir)) for p in list_files(run_dir / "scores" / "dense")
                     if p.name.startswith("part-")]
    return {name: file_sha256(run_dir / name) for name in names}


VERSIONED_OUTPUTS = ["rejected.parquet", curvature_files.ARRAYS, curvature_files.LAYOUT,
                     "scores/top_k.parquet", "scores/train_values.parquet"]
"""What each run or append stages in its version folder, then publishes (with scores/dense/ parts)."""
RUN_OUTPUTS = ["index_set.parquet"] + VERSIONED_OUTPUTS


def _version_of(state: dict) -> tuple[str, datetime]:
    return state["run_id"], datetime.fromisoformat(state["as_of"])


# ---------------------------------------------------------------------------------------------
# The job


def run_job(cfg: JobConfig, run_dir: str | Path | None = None, resume: bool = False, append: bool = False,
            discard_pending: bool = False) -> dict:
    """Run the whole job; returns the manifest written last to run_dir/manifest.json.

    With `resume`, a run directory left by a killed or failed run (or a complete one with a
    damaged file) is continued: it must hold the same job, and only the chunks and outputs
    that are missing or fail their checksum are computed again.

    With `append`, run_dir holds a stored run and the job adds the training rows whose ids it
    lacks, in place (distinf.runtime.incremental); running it again finishes a failed append. An
    empty or missing run_dir gets a fresh run, so a schedule can always pass `append`.
    """
    configure_logging()
    run_dir = run_path(run_dir or cfg.output.path)
    if is_file(run_dir):
        raise JobError(f"output.path: '{display(run_dir)}' is a file, not a folder")
    purpose = "an append" if append else "a resumed run" if resume else "a run"
    try:
        lease = acquire(run_dir, f"distinf run, {purpose}", cfg.runtime.lease_seconds)
    except OSError as error:
        raise unwritable(run_dir, "output.path", error) from None
    try:
        with terminated_as_error():
            return _run_job(cfg, run_dir, resume, append, discard_pending, lease.run_id)
    finally:
        lease.release()


def _run_job(cfg: JobConfig, run_dir: Path, resume: bool, append: bool, discard_pending: bool, run_id: str) -> dict:
    """run_job inside the run directory's lease."""
    if append and is_unused(run_dir):  # the first night of a schedule: there is nothing to append to yet
        log.info(f"'{display(run_dir)}' holds no run yet; starting one there", extra={"event": "first_run"})
        append = False
    if append:
        stored, base = open_for_append(run_dir)
    else:
        stored, base = open_run_dir(run_dir, resume), None
        if stored is not None and APPEND_PENDING in stored:
            raise JobError(f"--resume: '{display(run_dir)}' holds an unfinished append; finish it by running "
                           f"`distinf run JOB --append-to {display(run_dir)}` again")
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = round(now - clock, 3)
        clock = now
        metrics.stage_seconds(cfg.name, name, timings[name])
        log.info(f"stage {name} done in {timings[name]:.1f} s", extra={"event": "stage_done", "stage": name,
                                                                        "seconds": timings[name]})

    config = json.loads(json.dumps(cfg.model_dump(), default=str))  # as the manifest stores it
    if base is None:
        plan = plan_job(cfg)
        fingerprints = {"model_fingerprint": model_fingerprint(cfg.model),
                        "data_fingerprint": {s: fingerprint(plan.split(s)) for s in SPLITS}}
        state = {"status": "running", "run_id": run_id, "name": cfg.name, "config": config, **fingerprints,
                 "restarts": []}
        if stored is not None:
            check_same_job(stored, config, fingerprints, run_dir)
            if stored.get("status") == "complete" and not damaged_files(run_dir, stored):
                return stored  # nothing is missing or damaged: nothing to do
            state.update({key: stored[key] for key in _CARRIED if key in stored})
            state["resumed"] = stored.get("resumed", 0) + 1
        work = {s: split_work(cfg, plan.split(s)) for s in SPLITS}
        existing = sum(size for s in SPLITS for size in list_files(gradient_dir(run_dir, s)).values())
        need = estimated_bytes(cfg.compression.k, len(plan.train.ids), len(plan.queries.ids),
                               cfg.output.gradient_dtype, cfg.scoring.dense, cfg.hessian.blocks == "full") - existing
    else:
        model = model_fingerprint(cfg.model)
        plan = plan_job(cfg, stored_train_ids=base.train_ids)
        queries = fingerprint(plan.queries)
        check_appendable(base.manifest, config, model, queries, run_dir)
        if stored.get("status") == "complete" and not plan.train.ids and not plan.train.rejected:
            log.info(f"every training row of data.train is in '{display(run_dir)}' already; nothing to append",
                     extra={"event": "nothing_to_append"})
            return stored
        # Restarts so far: the stored run's, and those of this append's failed tries.
        state = append_state(cfg, config, base, model, queries, fingerprint(plan.train), stored.get("restarts", []))
        state["run_id"] = run_id
        work = {"train": split_work(cfg, plan.train, base.first_chunk, base.manifest["chunks"]["train"],
                                    base.segment),
                "queries": SplitWork(plan.queries, {}, base.manifest["chunks"]["queries"])}
        refuse_or_discard(run_dir, stale_chunks(run_dir, "train", base.first_chunk, work["train"].planned()),
                          discard_pending)
        need = estimated_bytes(cfg.compression.k, len(plan.train.ids), 0, cfg.output.gradient_dtype,
                               cfg.scoring.dense, cfg.hessian.blocks == "full")
    check_free_space(run_dir, need)
    lap("plan")
    try:
        return _run(cfg, run_dir, plan, work, state, timings, lap)
    except OSError as error:
        explained = write_error(error, run_dir)
        _mark_failed(run_dir, state, explained)
        raise explained from None
    except BaseException as error:  # any exit but success leaves a "failed" manifest, never "running"
        stopped = interruption(error)
        _mark_failed(run_dir, state, stopped or error)
        if stopped is not None and not isinstance(error, (Interrupted, KeyboardInterrupt)):
            raise stopped from None
        raise


# What an append carries over from the run it extends; the rest is recomputed.
_CARRIED_BY_APPEND = ("index_set_hash", "index_set_sha256", "params", "workers")


def append_state(cfg: JobConfig, config: dict, base: Base, model: str, queries: str, new_rows: str,
                 restarts: list[dict]) -> dict:
    """The manifest of an append while it runs: "running", with the stored run it extends."""
    stored = base.manifest
    return {
        "status": "running", "name": cfg.name, "config": config, "model_fingerprint": model,
        "data_fingerprint": {"train": chain_fingerprint(stored["data_fingerprint"]["train"], new_rows),
                             "queries": queries},
        **{key: stored[key] for key in _CARRIED_BY_APPEND if key in stored},
        "restarts": list(restarts),
        APPEND_PENDING: {"base": stored, "rejected": base.rejected, "first_chunk": base.first_chunk,
                         "segment": base.segment, "data_fingerprint": new_rows, "stored_ids": len(base.train_ids)},
    }


def _mark_failed(run_dir: Path, state: dict, error: Exception) -> None:
    try:
        write_manifest(run_dir, {**state, "status": "failed", "error": str(error)})
    except (OSError, LeaseLost):
        pass  # the error being reported may be this very disk, or the lease itself


def chunk_entry(record: dict) -> dict:
    """A chunk as the manifest lists it; chunks of an append carry their segment."""
    entry = {key: record[key] for key in ("file", "chunk", "rank", "rows", "sha256")}
    return {**entry, "segment": record["segment"]} if record.get("segment") else entry


def _run(cfg: JobConfig, run_dir: Path, plan: Plan, work: dict[str, SplitWork], state: dict, timings: dict,
         lap: Callable[[str], None]) -> dict:
    state["as_of"] = versions.now().isoformat()
    write_manifest(run_dir, state)  # "running" before anything else is touched
    out = versions.version_dir(run_dir, state["run_id"])  # outputs are staged here, published at the end
    started_ray = _connect(cfg)
    arm_sigterm()
    for stage, seconds in timings.items():  # timed before Ray was connected, so not recorded yet
        metrics.stage_seconds(cfg.name, stage, seconds)
    try:
        gradients = _gradient_pass(cfg, run_dir, work, plan.pad_token_id, state)
        lap("gradients")
        reduced, counts = _reduce_and_score(cfg, run_dir, out, plan.queries.ids, gradients, state, lap)
    finally:
        if started_ray:
            ray.shutdown()
    pending = state.pop(APPEND_PENDING, None)
    if pending is None:
        rejected = _write_rejected(out, rejected_rows(plan, gradients), _version_of(state))
        truncated = plan.train.truncated
    else:  # the stored run's rows, then the new training rows'
        rejected = _write_rejected(out, [tuple(row[:4]) for row in pending["rejected"]]
                                   + rejected_rows(plan, gradients, ("train",)), _version_of(state))
        truncated = pending["base"]["counts"]["truncated_train"] + plan.train.truncated
    chunks = {s: [chunk_entry(r) for r in gradients.records[s] if r["file"]] for s in SPLITS}
    manifest = {
        **state,
        "status": "complete",
        "versions": _versions(),
        "k": gradients.index_table.num_rows,
        "counts": {"train": counts["train"], "queries": counts["queries"],
                   "truncated_train": truncated, "truncated_queries": plan.queries.truncated,
                   "rejected_train": rejected["train"], "rejected_queries": rejected["queries"],
                   "train_chunks": len(chunks["train"]), "query_chunks": len(chunks["queries"])},
        "damping": reduced["damping"],
        "zero_blocks": zero_block_entries(gradients.index_table, reduced.get("zero_blocks", [])),
        "timings": timings,
        "chunks": chunks,
        "outputs": {"top_k": "scores/top_k.parquet", "train_values": "scores/train_values.parquet",
                    "dense": "scores/dense/" if cfg.scoring.dense else None, "rejected": "rejected.parquet",
                    "gradients": ["gradients/train/", "gradients/queries/"], "curvature": "curvature/"},
    }
    if pending is not None:
        base = pending["base"]
        manifest["appends"] = base.get("appends", []) + [{
            "segment": pending["segment"], "train_path": cfg.data.train.path,
            "new_rows": len(plan.train.ids), "rows_already_stored": plan.stored_train,
            "stored_rows_not_in_file": pending["stored_ids"] - plan.stored_train,
            "first_chunk": pending["first_chunk"],
            "new_chunks": sum(r.get("segment") == pending["segment"] for r in chunks["train"]),
            "data_fingerprint": pending["data_fingerprint"],
            "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }]
    return _switch_to(cfg, run_dir, out, manifest)


def _switch_to(cfg: JobConfig, run_dir: Path, out: Path, manifest: dict) -> dict:
    """Publish the complete version staged in `out`: its own manifest first, then each output over
    the run directory's, then the run directory's manifest, last and only now "complete"."""
    staged = output_checksums(out, VERSIONED_OUTPUTS)
    atomic_write_json({**manifest, "files": staged}, out / MANIFEST)
    kept = versions.prune(run_dir, cfg.output.keep_versions, manifest["run_id"])
    versions.publish(run_dir, out, list(staged))
    manifest = {**manifest, "version": manifest["run_id"], "history": kept,
                "files": output_checksums(run_dir, RUN_OUTPUTS)}
    if manifest["files"].items() - ({"index_set.parquet": manifest["files"]["index_set.parquet"]} | staged).items():
        raise JobError(f"output.path: publishing version {manifest['run_id']} changed bytes on the way; run again")
    write_manifest(run_dir, manifest)
    return manifest


def _versions() -> dict:
    import deepspeed
    import torch
    import transformers

    import distinf

    return {"distinf": distinf.__version__, "torch": torch.__version__, "deepspeed": deepspeed.__version__,
            "ray": ray.__version__, "transformers": transformers.__version__, "pyarrow": pa.__version__,
            "python": platform.python_version()}


def summary(manifest: dict, run_dir: Path) -> str:
    """The one-screen summary printed at the end of a run."""
    counts, damping = manifest["counts"], manifest["damping"]
    lines = [
        f"distinf run '{manifest['name']}' complete: {display(run_dir)}",
        f"  examples   train {counts['train']} ({counts['truncated_train']} truncated), "
        f"queries {counts['queries']} ({counts['truncated_queries']} truncated)",
        f"  index set  k = {manifest['k']} of {manifest['params']['tracked']:,} tracked entries "
        f"({manifest['params']['tracked_fraction']:.1%} of {manifest['params']['total']:,} parameters)",
        f"  damping    {len(damping)} block(s), min {min(damping):.3g}, median {float(np.median(damping)):.3g}, "
        f"max {max(damping):.3g}",
        *([f"  zero       {len(manifest['zero_blocks'])} block(s) with a zero gradient, left out of every score: "
           + "; ".join(f"columns {z['columns']} ({', '.join(z['params'])})" for z in manifest["zero_blocks"][:5])
           + (" ..." if len(manifest["zero_blocks"]) > 5 else "")] if manifest.get("zero_blocks") else []),
        "  workers    " + ", ".join(f"rank {w['rank']} on {w['host']}: {w['local_params']:,} params"
                                  for w in manifest["workers"]),
        "  time       " + ", ".join(f"{k} {v:.1f}s" for k, v in manifest["timings"].items()),
        f"  outputs    {display(run_dir)}/scores/top_k.parquet, scores/train_values.parquet, gradients/, curvature/",
    ]
    if manifest.get("appends"):
        last = manifest["appends"][-1]
        lines.insert(2, f"  appended   {last['new_rows']} new training rows ({last['rows_already_stored']} of the file "
                        f"stored already, {last['stored_rows_not_in_file']} stored rows not in it, kept)")
    rejected = counts.get("rejected_train", 0) + counts.get("rejected_queries", 0)
    if rejected:
        lines.insert(2, f"  rejected   train {counts['rejected_train']}, queries {counts['rejected_queries']}: "
                        f"{display(run_dir)}/rejected.parquet (data.on_bad_row: skip)")
    if manifest.get("restarts"):
        lines.append("  restarts   " + "; ".join(f"{r['stage']}: {r.get('worker', '')} {r['error']}".replace("  ", " ")
                                               for r in manifest["restarts"]))
    return "\n".join(lines)
