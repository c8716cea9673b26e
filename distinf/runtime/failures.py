"""Sorting a failure: what no restart can fix, which rank to blame, and a hung stage.

A failed worker brings its whole group down (ZeRO-3 needs every rank), and when one rank dies its
peers soon fail too, inside their collectives. Ray reports whichever failure it sees first; the
functions here name the rank that died, so that the manifest's restarts and the final error point
at the right process.
"""

from __future__ import annotations

import errno
import time
from pathlib import Path
from typing import Any, Callable

import ray
from ray.exceptions import RayActorError, RayError, RayTaskError

from distinf.config import ConfigError
from distinf.core.numerics import NumericalError
from distinf.inputs import DataError
from distinf.models import ModelError
from distinf.runtime.errors import JobError, write_error
from distinf.runtime.lease import tick
from distinf.store import IntegrityError


class GroupFailed(Exception):
    """A call on the worker group failed; `rank` is the worker to blame (the dead one, if one died),
    None for a stage without ranks."""

    def __init__(self, rank: int | None, error: BaseException):
        super().__init__(f"rank {rank}: {error}")
        self.rank, self.error = rank, error


class Stalled(RuntimeError):
    """A stage made no progress for runtime.stall_timeout seconds: hung, and restarted like a failure."""


def cause(error: BaseException) -> BaseException:
    """The exception raised inside a task or actor call, or the error itself."""
    return error.cause if isinstance(error, RayTaskError) and error.cause is not None else error


FATAL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS})
"""The storage errors a restart cannot fix: a full disk, a quota, a permission, a read-only
filesystem. Every other OSError is retried within runtime.max_restarts."""


def fatal(error: BaseException, run_dir: Path) -> Exception | None:
    """What to raise at once for a failure no restart can fix: bad data, a corrupt chunk, a full
    disk (or quota, permission, read-only filesystem), an actor whose constructor raises."""
    if isinstance(error, RayActorError) and error.actor_init_failed:
        return JobError(f"an actor of the job could not start: {error}")
    inner = cause(error)
    if isinstance(inner, (ConfigError, DataError, JobError, ModelError)):  # the same on every restart
        return inner
    if isinstance(inner, (IntegrityError, NumericalError)):
        return JobError(str(inner))
    if isinstance(inner, OSError) and inner.errno in FATAL_ERRNOS:
        return write_error(inner, run_dir)
    return None  # other OSErrors (object-store throttling, a reset connection, a timeout) pass


def headline(error: BaseException) -> str:
    """The failure in one line: the inner exception's type and its message's first line."""
    inner = cause(error)
    lines = [line.strip() for line in str(inner).splitlines() if line.strip()]
    return f"{type(inner).__name__}: {lines[0][:300] if lines else ''}"


def await_group(futures: list, run_dir: Path, poll: Callable[[], int] | None = None,
                stall: float | None = None, what: str = "the call") -> list:
    """Results of one call on every worker, in rank order; a failure raises GroupFailed.

    `poll` returns a progress count; `stall` seconds without a new result or more progress
    raise GroupFailed(Stalled) (a hung rank, a collective that never completes).
    """
    pending = list(futures)
    seen, since = None, time.monotonic()
    while pending:
        ready, pending = ray.wait(pending, num_returns=len(pending), timeout=1.0)
        tick()  # the driver's loop advances: its lease's heartbeat goes on (LeaseLost once it is lost)
        for ref in ready:
            try:
                ray.get(ref)
            except RayError as error:
                raise _blame(futures, ref, error, run_dir) from None
        progress = (len(futures) - len(pending), poll() if poll is not None else 0)
        if progress != seen:
            seen, since = progress, time.monotonic()
        elif pending and stall is not None and time.monotonic() - since > stall:
            waiting = [futures.index(ref) for ref in pending]
            raise GroupFailed(waiting[0], Stalled(f"no progress in {what} for {stall:g} s (runtime.stall_timeout); "
                                                  f"still waiting on rank(s) {waiting}"))
    return ray.get(futures, timeout=60)  # every one is ready


def _blame(futures: list, failed: Any, error: RayError, run_dir: Path) -> GroupFailed:
    # When a rank dies its peers soon fail too, inside their collectives: name the one that died.
    if not isinstance(error, RayActorError) and fatal(error, run_dir) is None:
        others = [ref for ref in futures if ref != failed]
        ready, _ = ray.wait(others, num_returns=len(others), timeout=5.0)
        for ref in ready:
            try:
                ray.get(ref)
            except RayActorError as died:
                return GroupFailed(futures.index(ref), died)
            except RayError:
                pass
    return GroupFailed(futures.index(failed), error)


def await_tasks(futures: list, stall: float | None, what: str,
                progress: Callable[[int, int], None] | None = None) -> list:
    """Results of independent tasks, in order; Stalled if none finishes for `stall` seconds.
    `progress(done, total)` is told as tasks finish."""
    pending, since = list(futures), time.monotonic()
    if progress is not None:
        progress(0, len(futures))
    while pending:
        ready, pending = ray.wait(pending, num_returns=len(pending), timeout=1.0)
        tick()
        if ready:
            since = time.monotonic()
            if progress is not None:
                progress(len(futures) - len(pending), len(futures))
        elif stall is not None and time.monotonic() - since > stall:
            raise Stalled(f"no {what} task finished for {stall:g} s (runtime.stall_timeout); "
                          f"{len(pending)} of {len(futures)} still running")
    return ray.get(futures, timeout=60)  # every one is ready
