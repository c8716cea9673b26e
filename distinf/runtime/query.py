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
from distinf.data import fingerprint
from distinf.ledger import input_order
from distinf.models import model_fingerprint
from distinf.runtime.driver import (_connect, _fatal, _gradient_pass, _headline, _mark_failed, _versions,
                                    chunk_entry, chunk_files, output_checksums, plan_job,
                                    rejected_rows, score_outputs, split_work)
from distinf.runtime.rundir import (Interrupted, JobError, arm_sigterm, check_writable, config_differences,
                                    config_value, damaged_files, interruption, is_unused, remove_leftovers,
                                    stored_manifest, terminated_as_error, unwritable, write_error)
from distinf.runtime.curvature_files import FILES as CURVATURE, read_solver
from distinf.runtime.lease import acquire, write_manifest
from distinf.runtime.versions import last_complete, now, stamp
from distinf.store import (IntegrityError, atomic_write_table, display, is_file, read_manifest, read_verified_table,
                           run_path)
from distinf.tables import gradients_of, rejected_table

QUERY_KEYS = ("name", "runtime.", "output.path", "model.path", "data.queries.", "scoring.top_k", "scoring.dense")
"""Job keys `distinf query --set` may change: where it runs, how the query file reads, and how many
scores it writes. The rest is the stored run's (its model, index set and curvature)."""

QUERY_OUTPUTS = ["index_set.parquet", "rejected.parquet", "scores/top_k.parquet", "scores/train_values.parquet"]


def query_run(run_dir: str | Path, queries: str | Path, output: str | Path | None = None,
              overrides: list[str] = ()) -> tuple[dict, Path]:
    """Score the queries of `queries` against the run in `run_dir`; returns (manifest, output folder)."""
    run_dir = run_path(run_dir)
    found = stored_manifest(run_dir, "distinf query")
    stored = last_complete(found)  # while an append runs, or after one failed: the version it started from
    if stored is None:
        raise JobError(f"distinf query: '{display(run_dir)}' is not a complete run (status "
                       f"{found.get('status')!r}); finish it with --resume first")
    job = copy.deepcopy(stored["config"])
    job["data"]["queries"]["path"] = str(queries)
    for assignment in overrides:
        apply_override(job, assignment)
    cfg: JobConfig = parse_config(job, JobConfig, source="distinf query")
    config = json.loads(json.dumps(cfg.model_dump(), default=str))
    differ = config_differences(stored["config"], config, allowed=QUERY_KEYS)
    if differ:
        raise JobError(f"distinf query: --set {differ[0]} would score against a different run "
                       f"({config_value(stored['config'], differ[0])!r} there); only {', '.join(QUERY_KEYS)} "
                       "may change")
    out = run_path(output) if output else run_dir / "queries" / Path(str(queries)).stem
    of = _identity(run_dir, stored)
    solver = _load_solver(run_dir, stored, cfg.hessian)
    model = model_fingerprint(cfg.model)
    if model != stored.get("model_fingerprint"):
        raise JobError(f"distinf query: the model at model.path ({cfg.model.path}) is not the one "
                       f"'{display(run_dir)}' was computed with (its config or weights differ)")
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    plan = plan_job(cfg, splits=("queries",))
    state = {"status": "running", "name": cfg.name, "config": config, "query_of": of, "model_fingerprint": model,
             "data_fingerprint": {"queries": fingerprint(plan.queries)},
             "index_set_hash": stored["index_set_hash"], "restarts": []}
    if is_file(out):
        raise JobError(f"--output: '{display(out)}' is a file, not a folder")
    try:
        lease = acquire(out, "distinf query", cfg.runtime.lease_seconds)
    except OSError as error:
        raise unwritable(out, "--output", error) from None
    state["run_id"] = lease.run_id
    try:
        with terminated_as_error():
            previous = _open_output(out, state)
            if previous is not None:
                if previous.get("status") == "complete" and previous["query_of"] == of and \
                        not damaged_files(out, previous):
                    return previous, out  # these queries are scored against this very run already
                state.update({key: previous[key] for key in ("index_set_sha256", "params", "workers")
                              if key in previous})
            timings["plan"] = round(time.perf_counter() - clock, 3)
            try:
                return _query(cfg, run_dir, stored, out, plan, solver, state, timings), out
            except OSError as error:
                explained = write_error(error, out)
                _mark_failed(out, state, explained)
                raise explained from None
            except BaseException as error:  # any exit but success leaves a "failed" manifest
                stopped = interruption(error)
                _mark_failed(out, state, stopped or error)
                if stopped is not None and not isinstance(error, (Interrupted, KeyboardInterrupt)):
                    raise stopped from None
                raise
    finally:
        lease.release()


def _query(cfg: JobConfig, run_dir: Path, stored: dict, out: Path, plan, solver, state: dict,
           timings: dict) -> dict:
    write_manifest(out, state)  # "running" before anything else is touched
    version = (state["run_id"], now())  # every output row carries them
    clock = time.perf_counter()
    started_ray = _connect(cfg)
    arm_sigterm()
    try:
        gradients = _gradient_pass(cfg, out, {"queries": split_work(cfg, plan.queries)}, plan.pad_token_id, state)
        timings["gradients"] = round(time.perf_counter() - clock, 3)
        clock = time.perf_counter()
        tables = [read_verified_table(path, sha256) for path, sha256 in chunk_files(out, gradients.records["queries"])]
        if not tables:
            raise JobError(f"distinf query: no query of '{cfg.data.queries.path}' could be scored (all rejected)")
        query_ids = [i for t in tables for i in t.column("example_id").to_pylist()]
        grads = torch.from_numpy(np.concatenate([gradients_of(t) for t in tables]))
        preconditioned = precondition(solver, grads).T.contiguous().numpy()  # [k, m], as the reducer forms it
        train_chunks = chunk_files(run_dir, sorted(stored["chunks"]["train"], key=input_order))
        carried = read_verified_table(run_dir / "scores" / "train_values.parquet",
                                      stored["files"]["scores/train_values.parquet"])
        counts = score_outputs(cfg, out, train_chunks, ray.put(preconditioned), ray.put(solver), query_ids,
                               plan.queries.ids, carried, version=version)
        timings["scoring"] = round(time.perf_counter() - clock, 3)
    except IntegrityError as error:
        raise JobError(f"distinf query: {error}") from None
    except RayError as error:  # a scoring task that failed after Ray's own retries
        raise _fatal(error, out) or JobError(f"distinf query: scoring failed ({_headline(error)}); run the "
                                             "same command again to retry") from None
    finally:
        if started_ray:
            ray.shutdown()
    rows = rejected_rows(plan, gradients, ("queries",))
    atomic_write_table(stamp(rejected_table(rows), *version), out / "rejected.parquet")
    manifest = {
        **state,
        "status": "complete",
        "versions": _versions(),
        "k": gradients.index_table.num_rows,
        "counts": {"train": counts["train"], "queries": counts["queries"],
                   "truncated_queries": plan.queries.truncated, "rejected_queries": len(rows),
                   "query_chunks": sum(bool(r["file"]) for r in gradients.records["queries"])},
        "timings": timings,
        "chunks": {"queries": [chunk_entry(r) for r in gradients.records["queries"] if r["file"]]},
        "files": output_checksums(out, QUERY_OUTPUTS),
        "outputs": {"top_k": "scores/top_k.parquet", "train_values": "scores/train_values.parquet",
                    "dense": "scores/dense/" if cfg.scoring.dense else None, "rejected": "rejected.parquet",
                    "gradients": ["gradients/queries/"]},
    }
    write_manifest(out, manifest)  # last, and only now "complete"
    return manifest


def _identity(run_dir: Path, stored: dict) -> dict:
    """What a query result depends on in the run: its training chunks and its curvature."""
    chunks = json.dumps(stored["chunks"]["train"], sort_keys=True).encode()
    files = stored.get("files", {})
    missing = [name for name in CURVATURE + ("scores/train_values.parquet",) if name not in files]
    if missing:
        raise JobError(f"distinf query: the manifest of '{display(run_dir)}' lists no checksum for {missing[0]}; "
                       "it was written by an older distinf: run it again")
    return {"path": display(run_dir), "train_chunks_sha256": hashlib.sha256(chunks).hexdigest(),
            **{name: files[name] for name in CURVATURE}}


def _open_output(out: Path, state: dict) -> dict | None:
    """The manifest of an earlier query of the same queries into `out`, or None for a new folder."""
    previous = None
    if not is_unused(out):
        try:
            previous = read_manifest(out)
        except (OSError, ValueError):
            previous = None
        same = previous is not None and "query_of" in previous and all(
            previous.get(key) == state[key] for key in ("model_fingerprint", "data_fingerprint", "index_set_hash"))
        if not same:
            raise JobError(f"--output: '{display(out)}' is not empty and holds no results of these queries for "
                           "this run; choose another --output")
    check_writable(out, "--output")
    if previous is not None:
        remove_leftovers(out)
    return previous


def _load_solver(run_dir: Path, manifest: dict, hessian: HessianConfig):
    try:
        return read_solver(run_dir, manifest["files"], hessian)
    except IntegrityError as error:
        raise JobError(f"distinf query: {error}".replace("run the job again with --resume to recompute it",
                                                         "repair the run with --resume first")) from None
    except ValueError as error:
        raise JobError(f"distinf query: '{display(run_dir)}': {error}") from None


def query_summary(manifest: dict, out: Path) -> str:
    counts = manifest["counts"]
    return "\n".join([
        f"distinf query complete: {display(out)}",
        f"  run        {manifest['query_of']['path']} ({counts['train']} training examples, stored gradients "
        "and curvature)",
        f"  queries    {counts['queries']} scored ({counts['truncated_queries']} truncated, "
        f"{counts['rejected_queries']} rejected)",
        "  time       " + ", ".join(f"{k} {v:.1f}s" for k, v in manifest["timings"].items()),
        f"  outputs    {display(out)}/scores/top_k.parquet, scores/train_values.parquet, gradients/queries/",
    ])
