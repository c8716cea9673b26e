"""A job's stages, run in order under one lifecycle: `distinf run` and `distinf query` are two
lists of the same kind of stage (driver.RUN_STAGES, query.QUERY_STAGES).

The lifecycle is the same for both: the manifest says "running" before anything is touched, Ray
is connected (and shut down after, if the job started it), SIGTERM stops the job as an error, and
any exit but success leaves the manifest "failed", never "running".
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Callable, Iterator, Sequence

import ray

from distinf.config import JobConfig
from distinf.inputs import Plan
from distinf.runtime import metrics
from distinf.runtime.errors import Interrupted, arm_sigterm, interruption, write_error
from distinf.runtime.gradient_pass import Gradients, SplitWork, gradient_pass
from distinf.runtime.manifest import Manifest
from distinf.runtime.run import Run
from distinf.runtime.workers import connect


@dataclass
class Job:
    """What the stages of one job share: each stage reads what the earlier ones left here."""

    cfg: JobConfig
    run: Run
    plan: Plan
    work: dict[str, SplitWork]
    manifest: Manifest
    """The job's manifest as it begins ("running"); the Run writes it and every later state."""
    committed: str | None = None
    """The run's last complete version before this job (None: none yet)."""
    gradients: Gradients | None = None
    results: dict[str, Any] = field(default_factory=dict)
    """What the scoring stages computed, for the last stage's manifest."""
    written: dict | None = None
    """The manifest the last stage committed."""


Stage = Callable[[Job], None]


def run_stages(job: Job, stages: Sequence[Stage]) -> dict:
    """Each stage in order, under the lifecycle; returns the manifest the last one committed."""
    with working(job.cfg, job.run, job.manifest):
        for stage in stages:
            stage(job)
    return job.written


def compute_gradients(job: Job) -> None:
    """The first stage of every job: each chunk of its splits that the ledger lacks."""
    job.gradients = gradient_pass(job.cfg, job.run, job.work, job.plan.pad_token_id)
    job.run.lap("gradients")


@contextlib.contextmanager
def working(cfg: JobConfig, run: Run, manifest: Manifest) -> Iterator[None]:
    try:
        run.begin(manifest)  # "running" before anything else is touched
        started_ray = connect(cfg)
        arm_sigterm()  # again: ray.init installs a handler of its own
        for stage, seconds in run.timings.items():  # timed before Ray was connected, so not recorded yet
            metrics.stage_seconds(cfg.name, stage, seconds)
        base = manifest.last_complete()  # an append's (or a resume's) last success, shown while this job runs
        if base is not None and base.as_of:
            metrics.succeeded(cfg.name, datetime.fromisoformat(base.as_of).timestamp())
        try:
            yield
        finally:
            if started_ray:
                ray.shutdown()
    except OSError as error:
        explained = write_error(error, run.root)
        run.fail(explained)
        raise explained from None
    except BaseException as error:
        stopped = interruption(error)
        run.fail(stopped or error)
        if stopped is not None and not isinstance(error, (Interrupted, KeyboardInterrupt)):
            raise stopped from None
        raise
