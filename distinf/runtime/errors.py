"""What stops a job, in words: JobError and its causes (a signal, Ctrl-C, a failed write).

No Ray here: the driver, `distinf query` and the run directory raise these, and the CLI prints
their message as it is.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import threading
from pathlib import Path
from typing import Iterator

from distinf.store import display


class JobError(RuntimeError):
    """The job cannot go on; the message says what failed and what to do."""


class Refused(JobError):
    """No retry of the same command can succeed: a person must act, as the message says (the CLI
    exits 2, which a scheduler treats as "do not retry")."""


class Interrupted(JobError):
    """The driver was told to stop (SIGTERM: `ray job stop`, a pod's deletion, a scheduler's timeout)."""


def _terminated(signum, frame):
    raise Interrupted("terminated by SIGTERM; committed chunks are kept: run again with --resume to continue")


def interruption(error: BaseException) -> Interrupted | None:
    """The Interrupted behind `error` (Ray's C code wraps what a signal handler raises in a
    SystemError), or one for Ctrl-C; None for any other error."""
    if isinstance(error, KeyboardInterrupt):
        return Interrupted("interrupted (Ctrl-C); committed chunks are kept: run again with --resume to continue")
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, Interrupted):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def arm_sigterm() -> None:
    """SIGTERM raises Interrupted (main thread only: the only one that receives signals). Called
    again once Ray is connected, because ray.init installs a handler of its own that aborts."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminated)


@contextlib.contextmanager
def terminated_as_error() -> Iterator[None]:
    """Turn SIGTERM into Interrupted inside the block, so that the run is marked failed, its lease
    released and its Ray stopped, as for any other error."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def unwritable(run_dir: Path, key: str, error: OSError) -> JobError:
    return JobError(f"{key}: cannot write to '{display(run_dir)}': {error.strerror or error}; "
                    "choose a folder you can write to")


def write_error(error: OSError, run_dir: Path) -> JobError:
    """A failed write in the run directory, in words: which file, why, and how to go on."""
    name = display(error.filename or run_dir)
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        then = "free some space, then run again with --resume: committed chunks are kept"
    elif error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        then = "make the output folder writable, then run again with --resume"
    else:
        then = "fix it, then run again with --resume"
    # An object store's error has no errno: its message is the reason.
    reason = error.strerror or (os.strerror(error.errno) if error.errno else str(error))
    return JobError(f"output.path: cannot write '{name}': {reason}; {then}")
