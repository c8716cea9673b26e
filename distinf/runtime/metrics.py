"""The job's Ray metrics (`ray.util.metrics`), for the Ray dashboard and Prometheus.

    distinf_examples_done{job, split}      counter: examples whose gradients are computed
    distinf_chunks_committed{job, split}   counter: gradient chunk parts committed to the ledger
    distinf_restarts{job, stage}           counter: restarts of a failed or stalled stage
    distinf_stage_seconds{job, stage}      gauge: wall seconds of each finished stage

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
