"""The job's Ray metrics (`ray.util.metrics`), for the Ray dashboard and Prometheus.

    distinf_examples_done{job, split}        counter: examples whose gradients are computed
    distinf_chunks_committed{job, split}     counter: gradient chunk parts committed to the ledger
    distinf_restarts{job, stage}             counter: restarts of a failed or stalled stage
    distinf_stage_seconds{job, stage}        gauge: wall seconds of each finished stage
    distinf_examples_planned{job, split}     gauge: examples this run computes (an append: its new rows)
    distinf_examples_committed{job, split}   gauge: of those, how many have committed gradients
    distinf_stage_tasks{job, stage}          gauge: tasks of curvature or scoring (one per chunk group / chunk)
    distinf_stage_tasks_done{job, stage}     gauge: of those, how many finished
    distinf_last_success_timestamp_seconds{job}  gauge: when the last run or append completed (Unix time):
                                             the stored version's at the start, this run's at its end

Prometheus sees them as Ray exports them: with a `ray_` prefix, and counters with `_total` appended
(`ray_distinf_examples_done_total`); docs/operations.md, "Logs and metrics", lists the exported names.

Recorded by the driver only (it sees every rank's progress), and created on first use once Ray
is connected; before that nothing is recorded (the driver sets the stages timed so far again once
it has connected). A metric that cannot be created or recorded (no metrics agent, an older Ray)
is skipped: metrics never fail a job.
"""

from __future__ import annotations

from typing import Any, Callable

_DEFINITIONS = {
    "examples_done": ("Counter", "distinf_examples_done", "examples whose gradients are computed", ("job", "split")),
    "chunks_committed": ("Counter", "distinf_chunks_committed", "gradient chunks committed to the ledger",
                         ("job", "split")),
    "restarts": ("Counter", "distinf_restarts", "restarts of a failed or stalled stage", ("job", "stage")),
    "stage_seconds": ("Gauge", "distinf_stage_seconds", "wall seconds of the last finished stage", ("job", "stage")),
    "examples_planned": ("Gauge", "distinf_examples_planned", "examples of the split this run computes",
                         ("job", "split")),
    "examples_committed": ("Gauge", "distinf_examples_committed", "examples of the split with committed gradients",
                           ("job", "split")),
    "stage_tasks": ("Gauge", "distinf_stage_tasks", "tasks of the curvature or scoring stage", ("job", "stage")),
    "stage_tasks_done": ("Gauge", "distinf_stage_tasks_done", "finished tasks of the curvature or scoring stage",
                         ("job", "stage")),
    "last_success": ("Gauge", "distinf_last_success_timestamp_seconds", "Unix time the last run or append completed",
                     ("job",)),
}

_made: dict[str, Any] = {}


def _ray_factory(kind: str, name: str, description: str, tag_keys: tuple[str, ...]) -> Any:
    from ray.util import metrics

    return getattr(metrics, kind)(name, description=description, tag_keys=tag_keys)


factory: Callable[[str, str, str, tuple[str, ...]], Any] = _ray_factory
"""Makes a metric object; tests swap in a recording fake."""


def _metric(key: str) -> Any:
    if key not in _made:
        try:
            _made[key] = factory(*_DEFINITIONS[key])
        except Exception:  # metrics are best effort: a job must run without them
            _made[key] = None
    return _made[key]


def _record(key: str, method: str, value: float, tags: dict[str, str]) -> None:
    import ray

    if not ray.is_initialized():  # a metric made before ray.init may never reach the metrics agent
        return
    metric = _metric(key)
    if metric is None:
        return
    try:
        getattr(metric, method)(value, tags=tags)
    except Exception:
        pass


def reset() -> None:
    """Forget the metric objects (after `factory` changes)."""
    _made.clear()


def examples_done(job: str, split: str, n: int) -> None:
    if n > 0:
        _record("examples_done", "inc", n, {"job": job, "split": split})


def chunks_committed(job: str, split: str, n: int) -> None:
    if n > 0:
        _record("chunks_committed", "inc", n, {"job": job, "split": split})


def restarted(job: str, stage: str) -> None:
    _record("restarts", "inc", 1, {"job": job, "stage": stage})


def stage_seconds(job: str, stage: str, seconds: float) -> None:
    _record("stage_seconds", "set", seconds, {"job": job, "stage": stage})


def examples_progress(job: str, split: str, committed: int, planned: int) -> None:
    _record("examples_planned", "set", planned, {"job": job, "split": split})
    _record("examples_committed", "set", committed, {"job": job, "split": split})


def stage_progress(job: str, stage: str, done: int, total: int) -> None:
    _record("stage_tasks", "set", total, {"job": job, "stage": stage})
    _record("stage_tasks_done", "set", done, {"job": job, "stage": stage})


def succeeded(job: str, timestamp: float) -> None:
    _record("last_success", "set", timestamp, {"job": job})
