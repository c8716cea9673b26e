"""The job's Ray: connecting to it, and the ZeRO-3 worker group that a stage runs on.

A failed worker brings its whole group down (ZeRO-3 needs every rank); the group is stopped whole
and rebuilt on a new rendezvous port by the stage's restart policy (runtime.restarts).
"""

from __future__ import annotations

import logging
import os
from typing import Callable

import ray
from ray.exceptions import GetTimeoutError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from distinf.config import ConfigError, JobConfig
from distinf.runtime.errors import JobError
from distinf.runtime.failures import await_group
from distinf.runtime.process_memory import HOST_ALLOCATOR_ENV
from distinf.runtime.run import RunView
from distinf.runtime.worker import GradientWorker

WORKER_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
              **HOST_ALLOCATOR_ENV}
log = logging.getLogger("distinf.driver")


def worker_env(device: str = "cpu") -> dict:
    """The environment of the job's actors and tasks.

    DeepSpeed's accelerator is named for the job's device both ways: left to itself it picks CUDA
    wherever CUDA is visible, and a DS_ACCELERATOR=cpu inherited from the node would shard a GPU
    job onto the CPU. DISTINF_TEST_* reach the workers so that tests can inject faults into real
    worker processes.
    """
    return {**WORKER_ENV, "DS_ACCELERATOR": device,
            **{k: v for k, v in os.environ.items() if k.startswith("DISTINF_TEST_")}}


def connect(cfg: JobConfig) -> bool:
    """Join runtime.address, or start a local Ray; True if this job started it (and stops it).

    A local Ray on a loaded node can miss its own start-up window; one retry, then a JobError
    (recorded in the manifest) instead of a raw traceback. log_to_driver: the actors' log lines
    reach the driver's stderr, and so `ray job logs`.
    """
    if ray.is_initialized():
        return False
    if cfg.runtime.address:
        start, where = (lambda: ray.init(address=cfg.runtime.address, log_to_driver=True)), cfg.runtime.address
    else:
        # Token authentication for the local Ray this job starts, unless RAY_AUTH_MODE says otherwise
        # (Ray >= 2.52 makes and keeps the token in ~/.ray/auth_token; older Rays ignore the variable).
        os.environ.setdefault("RAY_AUTH_MODE", "token")
        start, where = (lambda: ray.init(include_dashboard=False, dashboard_host="127.0.0.1", log_to_driver=True,
                                         runtime_env={"env_vars": worker_env(cfg.runtime.device)})), "a local Ray"
    for _ in range(2):
        try:
            start()
            return not cfg.runtime.address
        except Exception as error:  # ray.init raises a bare Exception when its raylet misses the window
            ray.shutdown()
            failure = error
    raise JobError(f"could not start or join {where}: {failure}; committed chunks are kept, "
                   "run again with --resume") from failure


def worker_bundle(device: str) -> dict[str, int]:
    """One rank's placement-group bundle: a CPU, and on a GPU job the GPU Ray then makes its only visible one."""
    return {"CPU": 1, "GPU": 1} if device == "cuda" else {"CPU": 1}


def capacity_shortfall(resources: dict[str, float], num_workers: int, device: str) -> str | None:
    """What a cluster with `resources` (ray.cluster_resources(): totals) lacks for the job's worker
    bundles, in words; None when it has enough."""
    bundle = worker_bundle(device)
    short = [f"{need * num_workers:g} {name} (the cluster has {resources.get(name, 0):g})"
             for name, need in bundle.items() if resources.get(name, 0) < need * num_workers]
    if not short:
        return None
    return f"runtime.num_workers: {num_workers} workers of {bundle} need " + ", ".join(short)


def cluster_resources(address: str) -> dict[str, float]:
    """The total resources of the Ray cluster at `address`: connect, read, disconnect (a Ray this
    process has joined already is read and left as it is)."""
    if ray.is_initialized():
        return dict(ray.cluster_resources())
    try:
        ray.init(address=address, log_to_driver=False)
    except Exception as error:  # ray.init raises bare Exceptions for an address it cannot reach
        ray.shutdown()
        raise ConfigError(f"runtime.address: cannot connect to the Ray cluster at {address!r}: "
                          f"{str(error).splitlines()[0] if str(error) else type(error).__name__}") from None
    try:
        return dict(ray.cluster_resources())
    finally:
        ray.shutdown()


class WorkerGroup:
    """The job's gradient workers, one per rank, in one placement group: a pool, started and stopped
    whole. They write for the run they are handed (its folder, checked against its fence)."""

    def __init__(self, cfg: JobConfig, run: RunView, model_fingerprint: str | None):
        self.cfg, self.run, self.model_fingerprint = cfg, run, model_fingerprint
        self.placement = None
        self.workers: list = []
        self.infos: list[dict] = []
        """Each rank's setup report (worker.setup): host, pid, params, the index set it drew."""

    def start(self) -> None:
        """Place and start every rank, rendezvous, and load the model sharded across them."""
        cfg, world = self.cfg, self.cfg.runtime.num_workers
        bundle = worker_bundle(cfg.runtime.device)
        # The keys the job set, so that the worker's validation sees the same job as the driver's.
        job = cfg.model_dump(exclude_unset=True)
        self.placement = placement_group([bundle] * world, strategy="PACK")
        timeout = cfg.runtime.placement_timeout
        try:
            ray.get(self.placement.ready(), timeout=timeout)
        except GetTimeoutError:
            raise JobError(f"runtime.num_workers: could not place {world} workers ({bundle} each) within "
                           f"{timeout:g} s (runtime.placement_timeout); does the cluster have that many free "
                           "slots?") from None
        self.workers = [
            GradientWorker.options(
                num_cpus=bundle["CPU"], num_gpus=bundle.get("GPU", 0),
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.placement,
                                                                     placement_group_bundle_index=rank),
                runtime_env={"env_vars": worker_env(cfg.runtime.device)},
            ).remote(rank, world, job, self.run.root)
            for rank in range(world)
        ]
        addresses = self.call(lambda w: w.address.remote(), "start-up")
        # One machine (one node, or several nodes sharing an IP): rendezvous on loopback, since Ray
        # may report an address that is not bindable here; across machines, on rank 0's node.
        # A new port on every attempt: the last group's may still be held.
        host = "127.0.0.1" if len({a["ip"] for a in addresses}) == 1 else addresses[0]["ip"]
        [port] = await_group([self.workers[0].free_port.remote(host)], self.run.root,
                             stall=cfg.runtime.stall_timeout, what="start-up")
        self.infos = self.call(lambda w: w.setup.remote(host, port, self.model_fingerprint), "model setup")
        if len({info["index_set_hash"] for info in self.infos}) != 1:
            raise JobError("workers derived different index sets; the job cannot continue")

    def call(self, method: Callable, what: str, stall: float | None = None) -> list:
        """`method(worker)` on every rank; the results in rank order (GroupFailed names the rank).
        Stalled after `stall` seconds without a result (default runtime.stall_timeout)."""
        return await_group([method(w) for w in self.workers], self.run.root,
                           stall=stall or self.cfg.runtime.stall_timeout, what=what)

    def stop(self) -> None:
        # Kill rather than ask: after a failure a survivor may be blocked in a collective.
        for worker in self.workers:
            ray.kill(worker)
        if self.placement is not None:
            remove_placement_group(self.placement)
        self.placement, self.workers = None, []

    def worker_name(self, rank: int) -> str:
        info = next((i for i in self.infos if i["rank"] == rank), None)
        return f"worker rank {rank}" + (f" (pid {info['pid']} on {info['host']})" if info else "")
