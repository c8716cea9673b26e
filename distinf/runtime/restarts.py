"""The restart policy of a stage: a failed attempt is stopped whole and the stage runs again, at
most runtime.max_restarts times; a failure no restart can fix stops the job at once.

Every restart is recorded in the run's manifest with the rank to blame (runtime.failures), so a
user reading a complete run still sees what it survived.
"""

from __future__ import annotations

import logging
from typing import Callable, TypeVar

from ray.exceptions import RayError

from distinf.runtime.errors import JobError
from distinf.runtime.failures import GroupFailed, Stalled, fatal, headline
from distinf.runtime.run import Run

T = TypeVar("T")
log = logging.getLogger("distinf.driver")


def with_restarts(run: Run, max_restarts: int, stage: str, label: str, fn: Callable[[int], T], kept: str,
                  stop: Callable[[], None] = lambda: None,
                  name_of: Callable[[int], str] = lambda rank: f"worker rank {rank}",
                  after_failure: Callable[[], None] | None = None) -> T:
    """`fn(attempt)` until it returns; `stop()` after every attempt. Each restart is recorded under
    `stage`; the last failure is a JobError that starts with `label` and says what is `kept`.
    `name_of(rank)` names a failed rank; `after_failure` runs once a failed attempt is stopped (to
    take stock of what it committed)."""
    for attempt in range(max_restarts + 1):
        try:
            return fn(attempt)
        except (GroupFailed, RayError, Stalled) as error:
            failure = error if isinstance(error, GroupFailed) else GroupFailed(None, error)
            must_stop = fatal(failure.error, run.root)
            if must_stop is not None:
                raise must_stop from None
            who = name_of(failure.rank) if failure.rank is not None else None
            what = headline(failure.error)
            run.record_restart(stage, attempt, who, what)
            failed = f"{label}: {who} failed" if who else f"{label} failed"
            if attempt == max_restarts:
                raise JobError(f"{failed} on attempt {attempt + 1} ({what}); gave up after "
                               f"runtime.max_restarts = {max_restarts} restart(s). {kept}: run again with "
                               "--resume to continue") from None
            log.warning(f"{who or label} failed ({what}); restarting ({attempt + 1} of {max_restarts} restarts)",
                        extra={"event": "restart", "stage": stage, "attempt": attempt + 1})
        finally:
            stop()
        if after_failure is not None:
            after_failure()
    raise AssertionError("unreachable")
