"""The driver of `distinf run`: plan, gradient pass, curvature and scoring, manifest last.

Planning only: the job is planned against what the run directory holds (new, resumed, or an
append), then run as a list of stages (runtime.pipeline: the gradient pass, curvature and scoring,
the publication of the version) by the one owner of the folder, a `Run` (runtime.run).

Nothing committed is lost to a failure: a chunk committed intact in the ledger is never computed
again, and each stage is restarted whole after a failure (runtime.restarts). A killed
driver is resumed with `run_job(..., resume=True)` (`distinf run --resume`), which first checks
that the folder holds the same job. Outputs are staged in a version folder and published last
(runtime.versions), so a failed run never leaves half-rewritten outputs.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from pathlib import Path

from distinf.config import JobConfig
from distinf.inputs import fingerprint, plan_job
from distinf.log import configure as configure_logging
from distinf.models import model_fingerprint
from distinf.runtime import versions
from distinf.runtime.gradient_pass import SplitWork, split_work
from distinf.runtime.incremental import append_manifest, refuse_or_discard
from distinf.runtime.layout import SPLITS
from distinf.runtime.manifest import Manifest, software_versions
from distinf.runtime.outputs import (VERSIONED_OUTPUTS, chunk_entry, output_checksums, outputs_listing, rejected_rows,
                                     write_rejected)
from distinf.runtime.pipeline import Job, compute_gradients, run_stages
from distinf.runtime.reduce_score import reduce_and_score
from distinf.runtime.reducer import zero_block_entries
from distinf.runtime.run import Run
from distinf.runtime.run_dir import estimated_bytes

__all__ = ["run_job"]

log = logging.getLogger("distinf.driver")


def run_job(cfg: JobConfig, run_dir: str | Path | None = None, resume: bool = False, append: bool = False,
            discard_pending: bool = False) -> dict:
    """Run the whole job; returns the manifest written last to run_dir/manifest.json.

    With `resume`, a run directory left by a killed or failed run (or a complete one with a
    damaged file) is continued: it must hold the same job, and only the chunks and outputs
    that are missing or fail their checksum are computed again.

    With `append`, run_dir holds a stored run and the job adds the training rows whose ids it
    lacks, in place (distinf.runtime.incremental); running it again finishes a failed append. An
    empty or missing run_dir gets a fresh run, and a failed first run is resumed, so a schedule
    can always pass `append`.
    """
    configure_logging()
    mode = "append" if append else "resume" if resume else "new"
    purpose = {"new": "a run", "resume": "a resumed run", "append": "an append"}[mode]
    with Run.open(run_dir or cfg.output.path, mode, cfg.name, f"distinf run, {purpose}", cfg.runtime) as run:
        job = plan_append(cfg, run, discard_pending) if run.mode == "append" else plan_run(cfg, run)
        if job is None:  # nothing is missing, damaged or new: nothing to do
            return run.stored.to_dict()
        run.lap("plan")
        return run_stages(job, RUN_STAGES)


def plan_run(cfg: JobConfig, run: Run) -> Job | None:
    """A new run, or the rest of a stored one (--resume): every chunk the ledger lacks, then all
    outputs. None when a complete run has nothing missing or damaged."""
    stored = run.stored
    plan = plan_job(cfg)
    manifest = Manifest(status="running", name=cfg.name, config=_as_stored(cfg),
                        model_fingerprint=model_fingerprint(cfg.model, like=stored and stored.model_fingerprint),
                        data_fingerprint={s: fingerprint(plan.split(s)) for s in SPLITS}, restarts=[])
    last = None
    if stored is not None:
        run.check_same_job(manifest.config, manifest.model_fingerprint, manifest.data_fingerprint)
        if stored.status == "complete" and not run.folder.damaged_files(stored):
            versions.repair(run.root, stored.to_dict())  # its marker and root copies, if they lag
            return None
        manifest.carry_from(stored)
        manifest.restarts, manifest.resumed = stored.restarts or [], (stored.resumed or 0) + 1
        last = stored.last_complete()
    run.check_room(estimated_bytes(cfg.compression.k, len(plan.train.ids), len(plan.queries.ids),
                                   cfg.output.gradient_dtype, cfg.scoring.dense, cfg.hessian.blocks == "full"))
    work = {s: split_work(cfg, plan.split(s)) for s in SPLITS}
    return Job(cfg, run, plan, work, manifest, committed=last.version if last is not None else None)


def plan_append(cfg: JobConfig, run: Run, discard_pending: bool) -> Job | None:
    """The training rows the stored run lacks, in chunks after every chunk it holds, then every
    output again. None when there is nothing new to append."""
    stored, base = run.stored, run.base
    if stored.status == "complete":  # a driver killed after its switch: finish its version first
        versions.repair(run.root, stored.to_dict())
    model = model_fingerprint(cfg.model, like=base.manifest.model_fingerprint)
    plan = plan_job(cfg, stored_train_ids=base.train_ids)
    queries = fingerprint(plan.queries)
    config = _as_stored(cfg)
    run.check_same_job(config, model, {"queries": queries})
    if stored.status == "complete" and not plan.train.ids and not plan.train.rejected:
        log.info(f"every training row of data.train is in '{run}' already; nothing to append",
                 extra={"event": "nothing_to_append"})
        return None
    manifest = append_manifest(cfg.name, config, base, model, queries, fingerprint(plan.train), stored.restarts or [])
    work = {"train": split_work(cfg, plan.train, base.first_chunk, base.manifest.chunks["train"], base.segment),
            "queries": SplitWork(plan.queries, {}, base.manifest.chunks["queries"])}
    refuse_or_discard(run.folder, run.folder.stale_chunks("train", base.first_chunk, work["train"].planned()),
                      discard_pending)
    run.check_room(estimated_bytes(cfg.compression.k, len(plan.train.ids), 0, cfg.output.gradient_dtype,
                                   cfg.scoring.dense, cfg.hessian.blocks == "full"))
    return Job(cfg, run, plan, work, manifest, committed=base.manifest.version)


def _as_stored(cfg: JobConfig) -> dict:
    """The job's config as its manifest stores it (JSON values only)."""
    return json.loads(json.dumps(cfg.model_dump(), default=str))


def curvature_and_scores(job: Job) -> None:
    """The curvature, its factorisation and every score, staged in the version's own folder."""
    run = job.run
    job.results["reduced"], job.results["counts"] = reduce_and_score(
        job.cfg, run, run.version_dir, job.plan.queries.ids, job.gradients)


def publish_version(job: Job) -> None:
    """The version's last outputs and its complete manifest, committed in one write (Run.publish)."""
    cfg, run, plan, gradients = job.cfg, job.run, job.plan, job.gradients
    manifest, reduced, counts = run.manifest, job.results["reduced"], job.results["counts"]
    out = run.version_dir
    pending = manifest.append  # kept in the manifest a failure leaves, until the switch
    if pending is None:
        rejected = write_rejected(out, rejected_rows(plan, gradients), manifest.version_stamp())
        truncated = plan.train.truncated
    else:  # the stored run's rows, then the new training rows'
        rejected = write_rejected(out, [tuple(row) for row in pending.rejected]
                                  + rejected_rows(plan, gradients, ("train",)), manifest.version_stamp())
        truncated = pending.base.counts["truncated_train"] + plan.train.truncated
    chunks = {s: [chunk_entry(r) for r in gradients.records[s] if r["file"]] for s in SPLITS}
    complete = replace(
        manifest, status="complete", append=None, versions=software_versions(), k=gradients.index_table.num_rows,
        counts={"train": counts["train"], "queries": counts["queries"],
                "truncated_train": truncated, "truncated_queries": plan.queries.truncated,
                "rejected_train": rejected["train"], "rejected_queries": rejected["queries"],
                "train_chunks": len(chunks["train"]), "query_chunks": len(chunks["queries"])},
        damping=reduced["damping"],
        zero_blocks=zero_block_entries(gradients.index_table, reduced.get("zero_blocks", [])),
        timings=run.timings, chunks=chunks, outputs=outputs_listing(cfg.scoring.dense),
    )
    if pending is not None:
        complete.appends = (pending.base.appends or []) + [{
            "segment": pending.segment, "train_path": cfg.data.train.path,
            "new_rows": len(plan.train.ids), "rows_already_stored": plan.stored_train,
            "stored_rows_not_in_file": pending.stored_ids - plan.stored_train,
            "first_chunk": pending.first_chunk,
            "new_chunks": sum(r.get("segment") == pending.segment for r in chunks["train"]),
            "data_fingerprint": pending.data_fingerprint,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }]
    job.written = run.publish(complete, job.committed, cfg.output.keep_versions,
                               output_checksums(out, VERSIONED_OUTPUTS))


RUN_STAGES = (compute_gradients, curvature_and_scores, publish_version)
