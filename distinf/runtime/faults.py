"""Test-only fault injection into real Ray processes.

The driver hands every DISTINF_TEST_* variable of its environment to its actors, so that a test
can make a real worker or reducer die where a node loss would. Unset, as in every real run,
these functions do nothing.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Callable


def injected_fault(where: str, attempt: int, before: Callable[[], None] | None = None) -> None:
    """SIGKILL this process if DISTINF_TEST_KILL names `where` ("rank1:batch3", "reducer"), on the
    first attempt only, so that the restarted one goes through; `before` runs first."""
    if attempt == 0 and os.environ.get("DISTINF_TEST_KILL") == where:
        if before is not None:
            before()
        os.kill(os.getpid(), signal.SIGKILL)


def injected_delay() -> None:
    """Sleep DISTINF_TEST_BATCH_DELAY seconds, so that a test can act in the middle of a pass."""
    time.sleep(float(os.environ.get("DISTINF_TEST_BATCH_DELAY", 0)))


def injected_hang(where: str, attempt: int) -> None:
    """Sleep for good if DISTINF_TEST_HANG names `where` ("reducer"), on the first attempt only: a
    stage that makes no progress at all, for the stall timeout to catch."""
    if attempt == 0 and os.environ.get("DISTINF_TEST_HANG") == where:
        while True:
            time.sleep(60)


def injected_step_delay(where: str) -> None:
    """Sleep DISTINF_TEST_STEP_DELAY seconds at each step of `where` named by DISTINF_TEST_SLOW_STEPS
    ("reducer", "scoring"): a long stage that keeps making progress."""
    if os.environ.get("DISTINF_TEST_SLOW_STEPS") == where:
        time.sleep(float(os.environ.get("DISTINF_TEST_STEP_DELAY", 0)))
