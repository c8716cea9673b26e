"""Liveness that matches the work (issue 27): the reducer counts as stalled only when it stops
making progress (chunk groups merged, blocks factorised, queries preconditioned), never for the
length of a legitimate factorisation; a real Reducer actor, on synthetic committed chunks."""

from __future__ import annotations

import time

import numpy as np
import pytest

from distinf.config import HessianConfig
from distinf.runtime.failures import Stalled
from distinf.runtime.reduce_score import await_reducer
from distinf.runtime.reducer import Reducer
from distinf.runtime.workers import worker_env
from distinf.store import commit_table
from distinf.tables import gradient_table

pytestmark = pytest.mark.distributed

SLICES = [slice(0, 4), slice(4, 8), slice(8, 12), slice(12, 16)]  # four blocks to factorise


def chunk(path, prefix: str, rows: int, seed: int) -> tuple[str, str]:
    grads = np.random.default_rng(seed).standard_normal((rows, 16))
    table = gradient_table([f"{prefix}{i}" for i in range(rows)], np.zeros(rows), grads)
    return str(path), commit_table(table, path)["sha256"]


def warm_workers(env: dict, n: int = 2) -> None:
    """Start the worker processes the reducer's tasks will run in (a runtime_env of their own), so
    that no step waits on a process start, which takes seconds on a loaded machine."""
    import ray

    @ray.remote(num_cpus=0)
    def ready() -> int:
        time.sleep(0.5)  # held a moment, so that the n calls need n processes
        return 0

    ray.get([ready.options(runtime_env={"env_vars": {**worker_env(), **env}}).remote() for _ in range(n)])


def reduce(tmp_path, env: dict, stall: float) -> tuple[dict, float]:
    train = [chunk(tmp_path / f"train-{i}.parquet", f"t{i}-", 8, i) for i in range(2)]
    queries = [chunk(tmp_path / "queries.parquet", "q", 3, 9)]
    reducer = Reducer.options(runtime_env={"env_vars": {**worker_env(), **env}}).remote(
        SLICES, HessianConfig().model_dump())
    began = time.monotonic()
    try:
        result = await_reducer(reducer, reducer.reduce.remote(train, queries, str(tmp_path / "curvature")), stall)
        return result, time.monotonic() - began
    finally:
        import ray

        ray.kill(reducer)


def test_a_long_reduction_that_keeps_making_progress_is_not_a_stall(shared_ray, tmp_path):
    """Each of its 6 or more steps takes 3 s, so it runs far past the 12 s stall timeout in all;
    a cap on its total time (ray.get(..., timeout=stall)) would kill it and start it again from zero.
    The task workers are started first: on a loaded machine a process start alone can take 12 s."""
    env = {"DISTINF_TEST_SLOW_STEPS": "reducer", "DISTINF_TEST_STEP_DELAY": "3"}
    warm_workers(env)
    result, seconds = reduce(tmp_path, env, stall=12.0)
    assert seconds > 18.0 and result["count"] == 16 and result["query_ids"] == ["q0", "q1", "q2"]


def test_a_reducer_that_makes_no_progress_is_a_stall_naming_what_it_had_done(shared_ray, tmp_path):
    with pytest.raises(Stalled, match="no progress for 3 s.*0 blocks factorised"):
        reduce(tmp_path, {"DISTINF_TEST_HANG": "reducer"}, stall=3.0)
