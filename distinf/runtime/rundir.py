"""The output folder before and after a run: fresh or resumed (and then the same job), writable,
with room, and, once complete, still what the manifest says.

No Ray here: these are the driver's checks before it starts anything, and the words for what
went wrong with the output folder.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import threading
from pathlib import Path
from typing import Iterator

from distinf.store import (MANIFEST, atomic_write_json, display, file_sha256, free_bytes, is_file, is_remote,
                           list_files, make_folder, read_manifest, remove)

RESUMABLE_KEYS = ("runtime.address", "runtime.max_restarts", "runtime.stall_timeout", "runtime.lease_seconds",
                  "runtime.placement_timeout", "output.path", "output.keep_versions", "model.path", "data.train.path", "data.queries.path")
"""Job keys a resumed run may change: where and how patiently it runs, not what it computes (moved
model and data files are checked by their fingerprints instead)."""


LEASE = "lease.json"
"""The run directory's lease (distinf.runtime.lease): one writer at a time."""


class JobError(RuntimeError):
    """The job cannot go on; the message says what failed and what to do."""


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


def _is_control(name: str) -> bool:
    return name == LEASE or name.startswith((".lease-takeover-", f".{LEASE}."))


def is_unused(run_dir: Path) -> bool:
    """True when the folder holds no run: nothing, or only its lease (taken before this check)."""
    if is_remote(run_dir):
        return all(p.parent == Path(run_dir) and _is_control(p.name) for p in list_files(run_dir, recursive=True))
    path = Path(run_dir)
    return not path.exists() or (path.is_dir() and all(_is_control(e.name) for e in path.iterdir()))


def open_run_dir(run_dir: Path, resume: bool) -> dict | None:
    """Make sure `run_dir` can hold the run; returns the stored manifest when resuming one.

    Without `resume` the folder must be empty or new. With it, an empty or new folder starts a
    fresh run, and anything else must be a distinf run directory.
    """
    if is_file(run_dir):
        raise JobError(f"output.path: '{display(run_dir)}' is a file, not a folder")
    stored = None
    if not is_unused(run_dir):
        if not resume:
            raise JobError(f"output.path: '{display(run_dir)}' is not empty; choose a new output folder, or pass "
                           "--resume to continue the run in it")
        stored = stored_manifest(run_dir, "--resume")
    check_writable(run_dir, "output.path")
    if stored is not None:
        remove_leftovers(run_dir)
    return stored


def stored_manifest(run_dir: Path, option: str) -> dict:
    """The manifest of the distinf run directory `run_dir`, or a JobError naming `option`."""
    try:
        stored = read_manifest(run_dir)
    except (OSError, ValueError):
        stored = None
    if stored is None or "config" not in stored:
        raise JobError(f"{option}: '{display(run_dir)}' has no readable {MANIFEST}, so it is not a distinf run "
                       "directory; choose a new output folder")
    return stored


def check_writable(run_dir: Path, key: str) -> None:
    """Create the folder if it is local, and write and delete a probe file in it."""
    try:
        make_folder(run_dir)
        probe = atomic_write_json({}, run_dir / ".write-probe")
        remove(probe)
    except OSError as error:
        raise unwritable(run_dir, key, error) from None


def unwritable(run_dir: Path, key: str, error: OSError) -> JobError:
    return JobError(f"{key}: cannot write to '{display(run_dir)}': {error.strerror or error}; "
                    "choose a folder you can write to")


def remove_leftovers(run_dir: Path) -> None:
    """Temporary files half-written by a process that was killed; no reader ever sees them.

    Called only under the folder's lease. Folders below it that are run directories of their own
    (`distinf query` outputs under queries/, with their own lease) are left to their own writer,
    and so is the lease's own renewal. On an object store they are the temporary keys of uploads
    killed before their server-side copy to the name."""
    if is_remote(run_dir):
        stored = list_files(run_dir, recursive=True)
        nested = {p.parent for p in stored if p.name in (MANIFEST, LEASE)} - {run_dir}
        for path in stored:
            if path.name.startswith(".") and path.name.endswith(".tmp") and not _is_control(path.name) \
                    and not any(folder in path.parents for folder in nested):
                remove(path)
        return
    for folder, subfolders, files in os.walk(run_dir):
        subfolders[:] = [d for d in subfolders
                         if not any(os.path.exists(os.path.join(folder, d, name)) for name in (MANIFEST, LEASE))]
        for name in files:
            if name.startswith(".") and name.endswith(".tmp") and not _is_control(name):
                Path(folder, name).unlink(missing_ok=True)


def config_differences(stored: dict, current: dict, prefix: str = "",
                       allowed: tuple[str, ...] = RESUMABLE_KEYS) -> list[str]:
    """Dotted keys whose values differ between two job configs, except the `allowed` ones (a key,
    or every key under a section written with a trailing dot, "runtime.")."""
    keys = []
    for key in sorted(set(stored) | set(current)):
        path = f"{prefix}{key}"
        if path in allowed or any(a.endswith(".") and path.startswith(a) for a in allowed):
            continue
        a, b = stored.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += config_differences(a, b, f"{path}.", allowed)
        elif a != b:
            keys.append(path)
    return keys


def check_same_job(stored: dict, config: dict, fingerprints: dict, run_dir: Path) -> None:
    """Refuse to resume a run directory that holds a different job (config, model or data)."""
    hint = "resume with the job it was started with, or choose a new output folder"
    differ = config_differences(stored["config"], config)
    if differ:
        shown = ", ".join(f"{key} ({config_value(stored['config'], key)!r} there, "
                          f"{config_value(config, key)!r} now)" for key in differ[:5])
        raise JobError(f"--resume: '{display(run_dir)}' holds a different job: {shown}; {hint}")
    if stored.get("model_fingerprint") not in (None, fingerprints["model_fingerprint"]):
        raise JobError(f"--resume: the model at model.path has changed since '{display(run_dir)}' was started "
                       f"(its config or weights differ); {hint}")
    for role, digest in fingerprints["data_fingerprint"].items():
        if stored.get("data_fingerprint", {}).get(role) not in (None, digest):
            raise JobError(f"--resume: data.{role} has changed since '{display(run_dir)}' was started (its ids, "
                           f"texts or labels differ); {hint}")


def config_value(config: dict, dotted: str):
    """The value at a dotted key of a config dict, or None."""
    for part in dotted.split("."):
        config = config.get(part) if isinstance(config, dict) else None
    return config


def damaged_files(run_dir: Path, manifest: dict) -> list[str]:
    """Files of a complete run that are missing or no longer match the manifest's sha256."""
    listed = dict(manifest.get("files", {}))
    for records in manifest.get("chunks", {}).values():
        listed.update({r["file"]: r["sha256"] for r in records if r.get("file")})
    present = list_files(run_dir, recursive=True)
    damaged = []
    for name, sha256 in sorted(listed.items()):
        path = run_dir / name
        if path not in present or file_sha256(path) != sha256:
            damaged.append(name)
    return damaged


def estimated_bytes(k: int, n_train: int, n_queries: int, gradient_dtype: str, dense: bool,
                    full_block: bool) -> int:
    """A generous estimate of what a run writes: gradients, dense scores, a full curvature block."""
    per_example = k * (2 if gradient_dtype == "float16" else 4) + 64
    total = (n_train + n_queries) * per_example + (1 << 20)
    if dense:
        total += n_train * n_queries * 16
    if full_block:
        total += 2 * 8 * k * k  # Gram sum and Cholesky factor, float64
    return total


def check_free_space(run_dir: Path, need: int) -> None:
    free = free_bytes(run_dir)
    if free is not None and free < need:
        raise JobError(f"output.path: '{run_dir}' has {_size(free)} free and this run writes about "
                       f"{_size(need)}; free some space or choose another folder")


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


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
