"""Curvature and scoring: the reducer sums and factorises the curvature from the training chunks
and preconditions the queries; scoring tasks then score every training chunk against them.

Both are restarted together (scoring reads objects the reducer owns), and both read the chunks
of the run directory and write into the version folder the driver publishes at the end.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import ray
from ray.exceptions import GetTimeoutError

from distinf.config import JobConfig
from distinf.core.curvatures import curvature_method
from distinf.core.scoring import TopK
from distinf.runtime import curvature_files, metrics
from distinf.runtime.failures import Stalled, await_tasks
from distinf.runtime.gradient_pass import PROBE_TIMEOUT, Gradients
from distinf.runtime.layout import DENSE, SPLITS, TOP_K, TRAIN_VALUES, record_path, run_file
from distinf.runtime.lease import tick
from distinf.runtime.manifest import Manifest
from distinf.runtime.reducer import Reducer
from distinf.runtime.restarts import with_restarts
from distinf.runtime.run import Run
from distinf.runtime.run_dir import RunDir
from distinf.runtime.scoring import score_train_chunk
from distinf.runtime.versions import stamp
from distinf.runtime.workers import worker_env
from distinf.store import IntegrityError, atomic_write_table, file_sha256, read_bytes, read_verified_bytes
from distinf.tables import top_k_table, train_values_table

log = logging.getLogger("distinf.driver")


def reduce_and_score(cfg: JobConfig, run: Run, out: Path, query_order: list[str], gradients: Gradients
                     ) -> tuple[dict, dict]:
    """Reducer then scoring tasks, restarted together, reading the run's chunks and writing
    curvature/ and scores/ into the version folder `out`.

    Returns the reducer's result and the counts of scored examples.
    """
    folder, manifest = run.folder, run.manifest
    chunks = {s: chunk_files(folder, gradients.records[s]) for s in SPLITS}
    slices = curvature_slices(gradients.index_table, cfg.hessian.blocks)
    stored_sums, curvature_chunks = None, chunks["train"]
    pending, method = manifest.append, curvature_method(cfg.hessian)
    if pending is not None and method.extends_stored_sums:
        stored_sums = _stored_gram_sums(folder, pending.base, slices, method.name)
        if stored_sums is not None:  # the stored run's sums, plus this append's chunks only
            curvature_chunks = chunk_files(folder, [r for r in gradients.records["train"]
                                                    if r.get("segment") == pending.segment])
    # kfac and its kin: every train chunk's factor sums, appended or not (they are additive).
    factor_chunks = factor_files(folder, gradients.records["train"]) if method.needs_factors else []
    run.note(curvature_input={"stored_gram_sums": stored_sums is not None, "chunks_read": len(curvature_chunks)})

    def attempt(number: int) -> tuple[dict, dict]:
        reducer = None
        try:
            reducer = Reducer.options(runtime_env={"env_vars": worker_env()}).remote(slices, cfg.hessian.model_dump(),
                                                                                     cfg.name)
            reduced = await_reducer(reducer, reducer.reduce.remote(
                curvature_chunks, chunks["queries"], str(out / "curvature"), number, stored_sums,
                cfg.scoring.normalize, factor_chunks, gradients.index_table), cfg.runtime.stall_timeout)
            run.lap("curvature")
            counts = score_outputs(cfg, out, chunks["train"], reduced["queries"][0], reduced["curvature"][0],
                                   reduced["query_ids"], query_order, version=manifest.version_stamp(),
                                   query_divisors=reduced["query_divisors"])
            run.lap("scoring")
            return reduced, counts
        finally:
            if reducer is not None:  # only now: the scoring tasks read objects the reducer owns
                ray.kill(reducer)

    return with_restarts(run, cfg.runtime.max_restarts, "curvature and scoring", "curvature and scoring", attempt,
                         "The gradients are kept")


def await_reducer(reducer: Any, result: Any, stall: float | None, every: float = 1.0) -> dict:
    """The reducer's result; Stalled once its progress (chunk groups merged, blocks factorised,
    queries preconditioned) has not moved for `stall` seconds. A long factorisation that keeps
    making progress is never cut short."""
    seen, since = None, time.monotonic()
    while True:
        ready, _ = ray.wait([result], timeout=every)
        tick()
        if ready:
            return ray.get(result, timeout=PROBE_TIMEOUT)
        try:
            progress = ray.get(reducer.progress.remote(), timeout=PROBE_TIMEOUT)
        except GetTimeoutError:
            progress = seen  # no answer is no progress
        if progress != seen:
            seen, since = progress, time.monotonic()
            log.debug(f"reducer: {progress}", extra={"event": "reducer_progress", **(progress or {})})
        elif stall is not None and time.monotonic() - since > stall:
            raise Stalled(f"the reducer made no progress for {stall:g} s (runtime.stall_timeout); it had done "
                          + ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in (seen or {}).items()))


def curvature_slices(index_table: pa.Table, blocks: str) -> list[slice]:
    """The curvature's blocks over the columns of a stored index set: one per tracked parameter
    (its rows are contiguous) with hessian.blocks: layer, one k x k block with full."""
    params = index_table.column("param").to_pylist()
    if blocks == "full":
        return [slice(0, len(params))]
    slices, start = [], 0
    for _, run in itertools.groupby(params):
        size = sum(1 for _ in run)
        slices.append(slice(start, start + size))
        start += size
    return slices


def _stored_gram_sums(run_dir: RunDir, base: Manifest, slices: list[slice],
                      method: str) -> tuple[str, str, int] | None:
    """(path, sha256, count) of the Gram sums the run an append extends stored, if they are intact
    and of the same blocks; else None, and the curvature is summed over every chunk again (a
    failed append's reducer may have rewritten them since)."""
    files = base.files or {}
    source = run_dir.committed(base)
    try:
        layout = json.loads(read_verified_bytes(source / curvature_files.LAYOUT, files[curvature_files.LAYOUT]))
        path = source / curvature_files.ARRAYS
        if file_sha256(path) != files[curvature_files.ARRAYS]:
            raise IntegrityError(str(path))
    except (KeyError, OSError, ValueError):
        log.info("the stored Gram sums are not the run's any more; summing every chunk again",
                 extra={"event": "gram_sums_recomputed"})
        return None
    if layout.get("method") != method or \
            [(b["start"], b["stop"]) for b in layout["blocks"]] != [(s.start, s.stop) for s in slices]:
        return None
    return str(path), files[curvature_files.ARRAYS], int(layout["count"])


def chunk_files(run_dir: RunDir | Path, records: list[dict]) -> list[tuple[str, str]]:
    """(path, sha256) of the records' chunk files, in their order; parts that kept no row have none."""
    root = run_dir.root if isinstance(run_dir, RunDir) else Path(run_dir)
    return [(str(run_file(root, r["file"])), r["sha256"]) for r in records if r["file"]]


def factor_files(run_dir: RunDir, records: list[dict]) -> list[tuple[str, str]]:
    """(path, sha256) of the Kronecker factor sums of the records' train chunks that kept rows.

    A record the gradient pass verified names them; a stored run's chunk (an append), listed in
    its manifest without them, is looked up in its ledger record, which must be of the same file."""
    files = []
    for r in records:
        if not r["file"]:
            continue
        entry = r.get("factors")
        if entry is None:
            path = record_path(run_dir.root, "train", r["rank"], r["chunk"])
            try:
                stored = json.loads(read_bytes(path).decode("utf-8"))
            except (OSError, ValueError):
                stored = {}
            entry = stored.get("factors") if stored.get("sha256") == r["sha256"] else None
            if entry is None:
                raise IntegrityError(f"'{r['file']}': no Kronecker factor sums recorded for it (ledger record "
                                     f"'{path}'); hessian.method kfac and kfac_mix need the chunks computed with "
                                     "one of them: choose a new output folder")
        files.append((str(run_dir.path(entry["file"])), entry["sha256"]))
    return files


def score_outputs(cfg: JobConfig, out: Path, train_chunks: list[tuple[str, str]], preconditioned: Any,
                  curvature: Any, query_ids: list[str], query_order: list[str],
                  carried: pa.Table | None = None, version: tuple[str, datetime] | None = None,
                  query_divisors: np.ndarray | None = None) -> dict:
    """Scoring tasks over the train chunks (given in input order), merged into scores/top_k.parquet,
    scores/train_values.parquet and, with scoring.dense, scores/dense/ under `out`.

    `preconditioned` [k, m] and `curvature` are object refs; `query_ids` are the columns of
    `preconditioned`, `query_order` the query file's order. `carried`, a stored run's
    train_values table, supplies self_influence instead of computing it again (distinf query).
    `version` (run_id, as_of) stamps every row of top_k and train_values with them.
    `query_divisors` [m] (in `query_ids` order) divide each query's scores as scoring.normalize says.
    Returns the counts of scored train examples and queries.
    """
    out = Path(out)
    dense_dir = out / DENSE
    with_self_influence = cfg.scoring.self_influence and carried is None
    futures = [
        score_train_chunk.remote(path, sha256, preconditioned, curvature, cfg.scoring.top_k, with_self_influence,
                                 query_ids, str(dense_dir / Path(path).name) if cfg.scoring.dense else None,
                                 version, cfg.scoring.normalize, query_divisors)
        for path, sha256 in train_chunks
    ]
    chunks = await_tasks(futures, cfg.runtime.stall_timeout, "scoring",
                         lambda done, total: metrics.stage_progress(cfg.name, "scoring", done, total))
    train_ids = [i for chunk in chunks for i in chunk.ids]  # input order, rejected examples left out
    position = {train_id: i for i, train_id in enumerate(train_ids)}
    n = len(train_ids)
    losses, score_mean, influence_mean, self_inf = np.zeros(n), np.zeros(n), np.zeros(n), np.full(n, np.nan)
    top, bottom = TopK(len(query_ids), cfg.scoring.top_k), TopK(len(query_ids), cfg.scoring.top_k)
    for chunk in chunks:
        rows = np.array([position[i] for i in chunk.ids])
        losses[rows], score_mean[rows], influence_mean[rows] = chunk.losses, chunk.score_mean, chunk.influence_mean
        if chunk.self_influence is not None:
            self_inf[rows] = chunk.self_influence
        top.update(chunk.top_scores, np.vectorize(position.get, otypes=[np.int64])(chunk.top_ids),
                   chunk.top_influence)
        bottom.update(-chunk.bottom_scores, np.vectorize(position.get, otypes=[np.int64])(chunk.bottom_ids),
                      chunk.bottom_influence)

    if carried is not None:
        stored = dict(zip(carried.column("train_id").to_pylist(), carried.column("self_influence").to_numpy()))
        self_inf = np.array([stored[i] for i in train_ids], dtype=np.float64)

    # Rows of the outputs follow the input files' order, whatever the partitioning.
    query_rank = {q: i for i, q in enumerate(query_order)}
    rows_in_order = np.argsort([query_rank[q] for q in query_ids], kind="stable")
    top_table = top_k_table([query_ids[i] for i in rows_in_order], train_ids,
                            top.scores[rows_in_order], top.positions[rows_in_order], top.values[rows_in_order],
                            -bottom.scores[rows_in_order], bottom.positions[rows_in_order],
                            bottom.values[rows_in_order])
    values = train_values_table(train_ids, losses, score_mean, self_inf if cfg.scoring.self_influence else None,
                                influence_mean)
    if version is not None:
        top_table, values = stamp(top_table, *version), stamp(values, *version)
    atomic_write_table(top_table, out / TOP_K)
    atomic_write_table(values, out / TRAIN_VALUES)
    return {"train": n, "queries": len(query_ids)}
