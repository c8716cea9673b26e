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
from dataclasses import replace
from pathlib import Path

import numpy as np
import ray
import torch
from ray.exceptions import RayError

from distinf.config import HessianConfig, JobConfig, apply_override, parse_config
from distinf.core.curvature import precondition
from distinf.core.scoring import query_divisors
from distinf.inputs import fingerprint, plan_job
from distinf.models import model_fingerprint
from distinf.runtime.curvature_files import FILES as CURVATURE, read_solver
from distinf.runtime.errors import JobError
from distinf.runtime.ledger import input_order
from distinf.runtime.failures import fatal, headline
from distinf.runtime.gradient_pass import split_work
from distinf.runtime.layout import TRAIN_VALUES
from distinf.runtime.manifest import Manifest, software_versions
from distinf.runtime.outputs import (QUERY_OUTPUTS, chunk_entry, output_checksums, outputs_listing, rejected_rows,
                                     write_rejected)
from distinf.runtime.pipeline import Job, compute_gradients, run_stages
from distinf.runtime.reduce_score import chunk_files, score_outputs
from distinf.runtime.run import Run
from distinf.runtime.run_dir import RunDir, check_queryable
from distinf.store import IntegrityError, read_verified_table
from distinf.tables import gradients_of


def query_run(run_dir: str | Path, queries: str | Path, output: str | Path | None = None,
              overrides: list[str] = ()) -> tuple[dict, Path]:
    """Score the queries of `queries` against the run in `run_dir`; returns (manifest, output folder)."""
    source = RunDir.at(run_dir)
    found = source.stored_manifest("distinf query")
    stored = found.last_complete()  # while an append runs, or after one failed: the version it started from
    if stored is None:
        raise JobError(f"distinf query: '{source}' is not a complete run (status "
                       f"{found.status!r}); finish it with --resume first")
    job = copy.deepcopy(stored.config)
    job["data"]["queries"]["path"] = str(queries)
    for assignment in overrides:
        apply_override(job, assignment)
    cfg: JobConfig = parse_config(job, JobConfig, source="distinf query")
    config = json.loads(json.dumps(cfg.model_dump(), default=str))
    check_queryable(stored, config)
    of = _identity(source, stored)
    solver = _load_solver(source, stored, cfg.hessian)
    model = model_fingerprint(cfg.model, like=stored.model_fingerprint)
    if model != stored.model_fingerprint:
        raise JobError(f"distinf query: the model at model.path ({cfg.model.path}) is not the one "
                       f"'{source}' was computed with (its config or weights differ)")
    plan = plan_job(cfg, splits=("queries",))
    manifest = Manifest(status="running", name=cfg.name, config=config, query_of=of, model_fingerprint=model,
                        data_fingerprint={"queries": fingerprint(plan.queries)},
                        index_set_hash=stored.index_set_hash, restarts=[])
    with Run.open(output or source.query_dir(queries), "query", cfg.name, "distinf query", cfg.runtime,
                  key="--output") as out:
        previous = out.stored
        if not out.unused and not _same_queries(previous, manifest):
            raise JobError(f"--output: '{out}' is not empty and holds no results of these queries for "
                           "this run; choose another --output")
        if previous is not None:
            if previous.status == "complete" and previous.query_of == of and not out.folder.damaged_files(previous):
                return previous.to_dict(), out.root  # these queries are scored against this very run already
            manifest.carry_from(previous)
        out.lap("plan")
        work = {"queries": split_work(cfg, plan.queries)}
        scored = Job(cfg, out, plan, work, manifest, results={"source": source, "stored": stored, "solver": solver})
        return run_stages(scored, QUERY_STAGES), out.root


def score_queries(job: Job) -> None:
    """The new queries' gradients, preconditioned by the stored curvature, against the stored
    training chunks: the scores a run with these queries would have written."""
    cfg, out, records = job.cfg, job.run, job.gradients.records["queries"]
    source, stored, solver = job.results["source"], job.results["stored"], job.results["solver"]
    try:
        tables = [read_verified_table(path, sha256) for path, sha256 in chunk_files(out.folder, records)]
        if not tables:
            raise JobError(f"distinf query: no query of '{cfg.data.queries.path}' could be scored (all rejected)")
        query_ids = [i for t in tables for i in t.column("example_id").to_pylist()]
        grads = torch.from_numpy(np.concatenate([gradients_of(t) for t in tables]))
        preconditioned = precondition(solver, grads).T.contiguous().numpy()  # [k, m], as the reducer forms it
        divisors = query_divisors(cfg.scoring.normalize, grads, torch.from_numpy(preconditioned))
        train_chunks = chunk_files(source, sorted(stored.chunks["train"], key=input_order))
        carried = read_verified_table(source.committed(stored) / TRAIN_VALUES,
                                      stored.files[TRAIN_VALUES])
        job.results["counts"] = score_outputs(cfg, out.root, train_chunks, ray.put(preconditioned), ray.put(solver),
                                              query_ids, job.plan.queries.ids, carried,
                                              version=out.manifest.version_stamp(), query_divisors=divisors)
    except IntegrityError as error:
        raise JobError(f"distinf query: {error}") from None
    except RayError as error:  # a scoring task that failed after Ray's own retries
        raise fatal(error, out.root) or JobError(f"distinf query: scoring failed ({headline(error)}); run the "
                                                 "same command again to retry") from None
    out.lap("scoring")


def complete_query(job: Job) -> None:
    """The rejected rows, then the query's manifest, "complete" and written last."""
    cfg, out, plan, gradients, counts = job.cfg, job.run, job.plan, job.gradients, job.results["counts"]
    rows = rejected_rows(plan, gradients, ("queries",))
    write_rejected(out.root, rows, out.manifest.version_stamp())
    complete = replace(
        out.manifest, status="complete", versions=software_versions(), k=gradients.index_table.num_rows,
        counts={"train": counts["train"], "queries": counts["queries"],
                "truncated_queries": plan.queries.truncated, "rejected_queries": len(rows),
                "query_chunks": sum(bool(r["file"]) for r in gradients.records["queries"])},
        timings=out.timings,
        chunks={"queries": [chunk_entry(r) for r in gradients.records["queries"] if r["file"]]},
        files=output_checksums(out.root, QUERY_OUTPUTS),
        outputs=outputs_listing(cfg.scoring.dense, ("queries",)),
    )
    job.written = out.complete(complete)


QUERY_STAGES = (compute_gradients, score_queries, complete_query)


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


def _same_queries(previous: Manifest | None, manifest: Manifest) -> bool:
    """Whether an output folder's manifest is an earlier query of the same queries for the same run."""
    return previous is not None and previous.query_of is not None and all(
        getattr(previous, key) == getattr(manifest, key)
        for key in ("model_fingerprint", "data_fingerprint", "index_set_hash"))


def _load_solver(run: RunDir, manifest: Manifest, hessian: HessianConfig):
    try:
        return read_solver(run.committed(manifest), manifest.files, hessian)
    except IntegrityError as error:
        raise JobError(f"distinf query: {error}".replace("run the job again with --resume to recompute it",
                                                         "repair the run with --resume first")) from None
    except ValueError as error:
        raise JobError(f"distinf query: '{run}': {error}") from None
