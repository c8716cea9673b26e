"""`distinf query RUN_DIR --queries FILE`: score new queries against a stored, complete run.

Only the new queries' gradients are computed, by the same ZeRO-3 worker group as a run (the query
split alone). The training gradients and the curvature are the stored run's, each read back
against the sha256 its manifest lists; nothing of the training set is computed again. Scores are
the run's formula, score(i, q) = ĝ_qᵀ Ĥ⁻¹ ĝ_i, so they equal those of a fresh run that had these
queries.

The output folder (default RUN_DIR/queries/<file stem>) is a small run directory of its own:
manifest.json (written last; `query_of` names the run), index_set.parquet, gradients/queries/
and ledger/queries/ (the chunks, resumable as in a run), scores/top_k.parquet,
scores/train_values.parquet (score_mean over the new queries; loss and self_influence as the run
stored them), scores/dense/ with scoring.dense, and rejected.parquet. Running the same query
again reuses its committed chunks, and only rescores when the run has changed since (an append).
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import ray
import torch
from ray.exceptions import RayError

from distinf.config import HessianConfig, JobConfig, apply_override, parse_config
from distinf.core.curvature import precondition
from distinf.core.scoring import query_divisors
from distinf.inputs import Plan, fingerprint, plan_job
from distinf.models import model_fingerprint
from distinf.runtime.curvature_files import FILES as CURVATURE, read_solver
from distinf.runtime.ledger import input_order
from distinf.runtime.errors import (Interrupted, JobError, arm_sigterm, interruption, terminated_as_error,
                                    unwritable, write_error)
from distinf.runtime.failures import fatal, headline
from distinf.runtime.gradient_pass import gradient_pass, split_work
from distinf.runtime.layout import TRAIN_VALUES
from distinf.runtime.lease import acquire, tick_window
from distinf.runtime.manifest import Manifest, software_versions
from distinf.runtime.outputs import QUERY_OUTPUTS, chunk_entry, output_checksums, rejected_rows, write_rejected
from distinf.runtime.reduce_score import chunk_files, score_outputs
from distinf.runtime.run_dir import RunDir, check_queryable
from distinf.runtime.versions import committed_root, now
from distinf.runtime.workers import connect
from distinf.store import IntegrityError, is_file, read_verified_table
from distinf.tables import gradients_of


def query_run(run_dir: str | Path, queries: str | Path, output: str | Path | None = None,
              overrides: list[str] = ()) -> tuple[dict, Path]:
    """Score the queries of `queries` against the run in `run_dir`; returns (manifest, output folder)."""
    run = RunDir.at(run_dir)
    found = run.stored_manifest("distinf query")
    stored = found.last_complete()  # while an append runs, or after one failed: the version it started from
    if stored is None:
        raise JobError(f"distinf query: '{run}' is not a complete run (status "
                       f"{found.status!r}); finish it with --resume first")
    job = copy.deepcopy(stored.config)
    job["data"]["queries"]["path"] = str(queries)
    for assignment in overrides:
        apply_override(job, assignment)
    cfg: JobConfig = parse_config(job, JobConfig, source="distinf query")
    config = json.loads(json.dumps(cfg.model_dump(), default=str))
    check_queryable(stored, config)
    out = RunDir.at(output) if output else RunDir(run.query_dir(queries))
    of = _identity(run, stored)
    solver = _load_solver(run, stored, cfg.hessian)
    model = model_fingerprint(cfg.model, like=stored.model_fingerprint)
    if model != stored.model_fingerprint:
        raise JobError(f"distinf query: the model at model.path ({cfg.model.path}) is not the one "
                       f"'{run}' was computed with (its config or weights differ)")
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    plan = plan_job(cfg, splits=("queries",))
    manifest = Manifest(status="running", name=cfg.name, config=config, query_of=of, model_fingerprint=model,
                        data_fingerprint={"queries": fingerprint(plan.queries)},
                        index_set_hash=stored.index_set_hash, restarts=[])
    if is_file(out.root):
        raise JobError(f"--output: '{out}' is a file, not a folder")
    try:
        lease = acquire(out.root, "distinf query", cfg.runtime.lease_seconds,
                        tick_window=tick_window(cfg.runtime.stall_timeout, cfg.runtime.lease_seconds))
    except OSError as error:
        raise unwritable(out.root, "--output", error) from None
    manifest.run_id = lease.run_id
    try:
        with terminated_as_error():
            previous = _open_output(out, manifest)
            if previous is not None:
                if previous.status == "complete" and previous.query_of == of and not out.damaged_files(previous):
                    return previous.to_dict(), out.root  # these queries are scored against this very run already
                manifest.carry_from(previous)
            timings["plan"] = round(time.perf_counter() - clock, 3)
            try:
                return _query(cfg, run, stored, out, plan, solver, manifest, timings), out.root
            except OSError as error:
                explained = write_error(error, out.root)
                out.mark_failed(manifest, explained)
                raise explained from None
            except BaseException as error:  # any exit but success leaves a "failed" manifest
                stopped = interruption(error)
                out.mark_failed(manifest, stopped or error)
                if stopped is not None and not isinstance(error, (Interrupted, KeyboardInterrupt)):
                    raise stopped from None
                raise
    finally:
        lease.release()


def _query(cfg: JobConfig, run: RunDir, stored: Manifest, out: RunDir, plan: Plan, solver, manifest: Manifest,
           timings: dict) -> dict:
    out.write_manifest(manifest)  # "running" before anything else is touched
    version = (manifest.run_id, now())  # every output row carries them
    clock = time.perf_counter()
    started_ray = connect(cfg)
    arm_sigterm()
    try:
        gradients = gradient_pass(cfg, out, {"queries": split_work(cfg, plan.queries)}, plan.pad_token_id, manifest)
        timings["gradients"] = round(time.perf_counter() - clock, 3)
        clock = time.perf_counter()
        tables = [read_verified_table(path, sha256) for path, sha256 in chunk_files(out, gradients.records["queries"])]
        if not tables:
            raise JobError(f"distinf query: no query of '{cfg.data.queries.path}' could be scored (all rejected)")
        query_ids = [i for t in tables for i in t.column("example_id").to_pylist()]
        grads = torch.from_numpy(np.concatenate([gradients_of(t) for t in tables]))
        preconditioned = precondition(solver, grads).T.contiguous().numpy()  # [k, m], as the reducer forms it
        divisors = query_divisors(cfg.scoring.normalize, grads, torch.from_numpy(preconditioned))
        train_chunks = chunk_files(run, sorted(stored.chunks["train"], key=input_order))
        carried = read_verified_table(committed_root(run.root, stored.to_dict()) / TRAIN_VALUES,
                                      stored.files[TRAIN_VALUES])
        counts = score_outputs(cfg, out.root, train_chunks, ray.put(preconditioned), ray.put(solver), query_ids,
                               plan.queries.ids, carried, version=version, query_divisors=divisors)
        timings["scoring"] = round(time.perf_counter() - clock, 3)
    except IntegrityError as error:
        raise JobError(f"distinf query: {error}") from None
    except RayError as error:  # a scoring task that failed after Ray's own retries
        raise fatal(error, out.root) or JobError(f"distinf query: scoring failed ({headline(error)}); run the "
                                                 "same command again to retry") from None
    finally:
        if started_ray:
            ray.shutdown()
    rows = rejected_rows(plan, gradients, ("queries",))
    write_rejected(out.root, rows, version)
    complete = Manifest.from_dict({
        **manifest.to_dict(),
        "status": "complete",
        "versions": software_versions(),
        "k": gradients.index_table.num_rows,
        "counts": {"train": counts["train"], "queries": counts["queries"],
                   "truncated_queries": plan.queries.truncated, "rejected_queries": len(rows),
                   "query_chunks": sum(bool(r["file"]) for r in gradients.records["queries"])},
        "timings": timings,
        "chunks": {"queries": [chunk_entry(r) for r in gradients.records["queries"] if r["file"]]},
        "files": output_checksums(out.root, QUERY_OUTPUTS),
        "outputs": {"top_k": "scores/top_k.parquet", "train_values": "scores/train_values.parquet",
                    "dense": "scores/dense/" if cfg.scoring.dense else None, "rejected": "rejected.parquet",
                    "gradients": ["gradients/queries/"]},
    })
    out.write_manifest(complete)  # last, and only now "complete"
    return complete.to_dict()


def _identity(run: RunDir, stored: Manifest) -> dict:
    """What a query result depends on in the run: its training chunks and its curvature."""
    chunks = json.dumps(stored.chunks["train"], sort_keys=True).encode()
    files = stored.files or {}
    missing = [name for name in CURVATURE + (TRAIN_VALUES,) if name not in files]
    if missing:
        raise JobError(f"distinf query: the manifest of '{run}' lists no checksum for {missing[0]}; "
                       "it was written by an older distinf: run it again")
    return {"path": str(run), "train_chunks_sha256": hashlib.sha256(chunks).hexdigest(),
            **{name: files[name] for name in CURVATURE}}


def _open_output(out: RunDir, manifest: Manifest) -> Manifest | None:
    """The manifest of an earlier query of the same queries into `out`, or None for a new folder."""
    previous = None
    if not out.is_unused():
        try:
            previous = out.read_manifest()
        except (OSError, ValueError):
            previous = None
        same = previous is not None and previous.query_of is not None and all(
            getattr(previous, key) == getattr(manifest, key)
            for key in ("model_fingerprint", "data_fingerprint", "index_set_hash"))
        if not same:
            raise JobError(f"--output: '{out}' is not empty and holds no results of these queries for "
                           "this run; choose another --output")
    out.check_writable("--output")
    if previous is not None:
        out.remove_leftovers()
    return previous


def _load_solver(run: RunDir, manifest: Manifest, hessian: HessianConfig):
    try:
        return read_solver(committed_root(run.root, manifest.to_dict()), manifest.files, hessian)
    except IntegrityError as error:
        raise JobError(f"distinf query: {error}".replace("run the job again with --resume to recompute it",
                                                         "repair the run with --resume first")) from None
    except ValueError as error:
        raise JobError(f"distinf query: '{run}': {error}") from None
