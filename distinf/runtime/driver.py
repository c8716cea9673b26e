"""The driver of `distinf run`: plan, gradient pass, curvature and scoring, manifest last.

Scheduling only: the math lives in distinf.core, reached through the gradient pass
(runtime.gradient_pass) and the reducer and scoring tasks (runtime.reduce_score); the run
directory's files and manifest through runtime.run_dir.

Nothing committed is lost to a failure: a chunk committed intact in the ledger is never computed
again, and each stage is restarted whole after a failure (runtime.workers.WorkerGroup). A killed
driver is resumed with `run_job(..., resume=True)` (`distinf run --resume`), which first checks
that the folder holds the same job. Outputs are staged in a version folder and published last
(runtime.versions), so a failed run never leaves half-rewritten outputs.
"""

from __future__ import annotations

import json
import logging
import shlex
import time
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import ray

from distinf.config import JobConfig
from distinf.inputs import Plan, fingerprint, plan_job
from distinf.log import configure as configure_logging
from distinf.models import model_fingerprint
from distinf.runtime import metrics, versions
from distinf.runtime.errors import (Interrupted, JobError, Refused, arm_sigterm, interruption,
                                    terminated_as_error, unwritable, write_error)
from distinf.runtime.gradient_pass import SplitWork, gradient_pass, split_work
from distinf.runtime.history import append_history
from distinf.runtime.incremental import append_manifest, open_for_append, refuse_or_discard
from distinf.runtime.layout import INDEX_SET
from distinf.runtime.lease import acquire, tick, tick_window
from distinf.runtime.manifest import Manifest, software_versions
from distinf.runtime.outputs import (SPLITS, VERSIONED_OUTPUTS, chunk_entry, output_checksums,
                                     rejected_rows, write_rejected)
from distinf.runtime.reduce_score import reduce_and_score
from distinf.runtime.reducer import zero_block_entries
from distinf.runtime.run_dir import NotResumable, RunDir, check_appendable, check_resumable, estimated_bytes
from distinf.runtime.workers import connect
from distinf.store import file_sha256, is_file, is_remote, list_files

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
    empty or missing run_dir gets a fresh run, so a schedule can always pass `append`.
    """
    configure_logging()
    folder = RunDir.at(run_dir or cfg.output.path)
    if is_file(folder.root):
        raise JobError(f"output.path: '{folder}' is a file, not a folder")
    purpose = "an append" if append else "a resumed run" if resume else "a run"
    try:
        lease = acquire(folder.root, f"distinf run, {purpose}", cfg.runtime.lease_seconds,
                        tick_window=tick_window(cfg.runtime.stall_timeout, cfg.runtime.lease_seconds))
    except OSError as error:
        raise unwritable(folder.root, "output.path", error) from None
    try:
        with terminated_as_error():
            return _run_job(cfg, folder, resume, append, discard_pending, lease.run_id)
    finally:
        lease.release()


def _has_complete_version(run_dir: RunDir) -> bool:
    try:
        stored = run_dir.read_manifest()
    except (OSError, ValueError):
        return False
    return stored is not None and stored.last_complete() is not None


def _move_aside(run_dir: RunDir) -> str:
    failed = f"{run_dir}.failed-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    if is_remote(run_dir.root):
        return f"aws s3 mv --recursive {run_dir} {failed}"
    return f"mv {shlex.quote(str(run_dir))} {shlex.quote(failed)}"


class Stages:
    """Each stage's wall time, for the manifest, the log and the metrics."""

    def __init__(self, job: str):
        self.job, self.timings, self.clock = job, {}, time.perf_counter()

    def lap(self, name: str) -> None:
        tick()
        now = time.perf_counter()
        self.timings[name] = round(now - self.clock, 3)
        self.clock = now
        metrics.stage_seconds(self.job, name, self.timings[name])
        log.info(f"stage {name} done in {self.timings[name]:.1f} s",
                 extra={"event": "stage_done", "stage": name, "seconds": self.timings[name]})


def _run_job(cfg: JobConfig, run_dir: RunDir, resume: bool, append: bool, discard_pending: bool,
             run_id: str) -> dict:
    """run_job inside the run directory's lease: plan the job against what the folder holds."""
    if append and run_dir.is_unused():  # the first night of a schedule: there is nothing to append to yet
        log.info(f"'{run_dir}' holds no run yet; starting one there", extra={"event": "first_run"})
        append = False
    config = json.loads(json.dumps(cfg.model_dump(), default=str))  # as the manifest stores it
    if append and not _has_complete_version(run_dir):  # a failed first night: resume it, as --resume would
        log.info(f"'{run_dir}' holds no complete version yet; resuming the run there",
                 extra={"event": "first_run_resumed"})
        try:
            return _run_job(cfg, run_dir, True, False, discard_pending, run_id)
        except NotResumable as error:
            raise Refused(f"{error}. The folder holds a failed first run that this job cannot resume, so no "
                          f"night's append can go on until it is moved aside: run `{_move_aside(run_dir)}`, "
                          "and the next append starts a new run there") from None
    if append:
        stored, base = open_for_append(run_dir)
        committed = base.manifest.version
        if stored.status == "complete":  # a driver killed after its switch: finish its version first
            versions.repair(run_dir.root, stored.to_dict())
        stages = Stages(cfg.name)  # planning starts once the folder is open
        model = model_fingerprint(cfg.model, like=base.manifest.model_fingerprint)
        plan = plan_job(cfg, stored_train_ids=base.train_ids)
        queries = fingerprint(plan.queries)
        check_appendable(base.manifest, config, model, queries, run_dir)
        if stored.status == "complete" and not plan.train.ids and not plan.train.rejected:
            log.info(f"every training row of data.train is in '{run_dir}' already; nothing to append",
                     extra={"event": "nothing_to_append"})
            return stored.to_dict()
        manifest = append_manifest(cfg.name, config, base, model, queries, fingerprint(plan.train),
                                   stored.restarts or [])
        work = {"train": split_work(cfg, plan.train, base.first_chunk, base.manifest.chunks["train"], base.segment),
                "queries": SplitWork(plan.queries, {}, base.manifest.chunks["queries"])}
        refuse_or_discard(run_dir, run_dir.stale_chunks("train", base.first_chunk, work["train"].planned()),
                          discard_pending)
        need = estimated_bytes(cfg.compression.k, len(plan.train.ids), 0, cfg.output.gradient_dtype,
                               cfg.scoring.dense, cfg.hessian.blocks == "full")
    else:
        stored = run_dir.open_for_resume(resume)
        if stored is not None and stored.append is not None:
            raise JobError(f"--resume: '{run_dir}' holds an unfinished append; finish it by running "
                           f"`distinf run JOB --append-to {run_dir}` again")
        last = stored.last_complete() if stored is not None else None
        committed = last.version if last is not None else None
        stages = Stages(cfg.name)
        plan = plan_job(cfg)
        manifest = Manifest(status="running", name=cfg.name, config=config,
                            model_fingerprint=model_fingerprint(cfg.model, like=stored and stored.model_fingerprint),
                            data_fingerprint={s: fingerprint(plan.split(s)) for s in SPLITS}, restarts=[])
        if stored is not None:
            check_resumable(stored, config, manifest.model_fingerprint, manifest.data_fingerprint, run_dir)
            if stored.status == "complete" and not run_dir.damaged_files(stored):
                versions.repair(run_dir.root, stored.to_dict())  # its marker and root copies, if they lag
                return stored.to_dict()  # nothing is missing or damaged: nothing to do
            manifest.carry_from(stored)
            manifest.restarts, manifest.resumed = stored.restarts or [], (stored.resumed or 0) + 1
        work = {s: split_work(cfg, plan.split(s)) for s in SPLITS}
        existing = sum(size for s in SPLITS for size in list_files(run_dir.gradient_dir(s)).values())
        need = estimated_bytes(cfg.compression.k, len(plan.train.ids), len(plan.queries.ids),
                               cfg.output.gradient_dtype, cfg.scoring.dense, cfg.hessian.blocks == "full") - existing
    manifest.run_id = run_id
    run_dir.check_free_space(need)
    stages.lap("plan")
    try:
        return _run(cfg, run_dir, plan, work, manifest, stages, committed)
    except OSError as error:
        explained = write_error(error, run_dir.root)
        run_dir.mark_failed(manifest, explained)
        raise explained from None
    except BaseException as error:  # any exit but success leaves a "failed" manifest, never "running"
        stopped = interruption(error)
        run_dir.mark_failed(manifest, stopped or error)
        if stopped is not None and not isinstance(error, (Interrupted, KeyboardInterrupt)):
            raise stopped from None
        raise


def _run(cfg: JobConfig, run_dir: RunDir, plan: Plan, work: dict[str, SplitWork], manifest: Manifest,
         stages: Stages, committed: str | None) -> dict:
    """The stages, on Ray; then the complete manifest, published with the version's outputs."""
    manifest.as_of = versions.now().isoformat()
    run_dir.write_manifest(manifest)  # "running" before anything else is touched
    out = run_dir.version_dir(manifest.run_id)  # outputs are staged here, published at the end
    started_ray = connect(cfg)
    arm_sigterm()
    for stage, seconds in stages.timings.items():  # timed before Ray was connected, so not recorded yet
        metrics.stage_seconds(cfg.name, stage, seconds)
    base = manifest.last_complete()  # an append's (or a resume's) last success, shown while this run runs
    if base is not None and base.as_of:
        metrics.succeeded(cfg.name, datetime.fromisoformat(base.as_of).timestamp())
    try:
        gradients = gradient_pass(cfg, run_dir, work, plan.pad_token_id, manifest)
        stages.lap("gradients")
        reduced, counts = reduce_and_score(cfg, run_dir, out, plan.queries.ids, gradients, manifest, stages.lap)
    finally:
        if started_ray:
            ray.shutdown()
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
        timings=stages.timings, chunks=chunks,
        outputs={"top_k": "scores/top_k.parquet", "train_values": "scores/train_values.parquet",
                 "dense": "scores/dense/" if cfg.scoring.dense else None, "rejected": "rejected.parquet",
                 "gradients": ["gradients/train/", "gradients/queries/"], "curvature": "curvature/"},
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
    return _publish(cfg, run_dir, out, complete, committed)


def _publish(cfg: JobConfig, run_dir: RunDir, out: Path, manifest: Manifest, committed: str | None) -> dict:
    """Commit the version staged whole in `out` (runtime.versions): the run directory's manifest
    says "complete" for it in one write, the switch; then its completion marker, the pruning of
    old versions and the root copies, which may lag."""
    staged = output_checksums(out, VERSIONED_OUTPUTS)
    manifest = replace(manifest, version=manifest.run_id,
                       history=versions.history(run_dir.root, committed, cfg.output.keep_versions, manifest.run_id),
                       files={INDEX_SET: file_sha256(run_dir.path(INDEX_SET)), **staged})
    run_dir.write_manifest(manifest)  # the commit point
    versions.finish(run_dir.root, manifest.to_dict())
    metrics.succeeded(cfg.name, time.time())  # recorded while Ray is connected (a job on a cluster)
    try:  # complete versions only; after the commit, so a failure here never unmakes a complete run
        append_history(run_dir.root, out, manifest.run_id, manifest.as_of)
    except OSError as error:
        log.warning(f"version {manifest.run_id} is complete but its score history was not written: {error}",
                    extra={"event": "history_not_written"})
    return manifest.to_dict()
