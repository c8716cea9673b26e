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
