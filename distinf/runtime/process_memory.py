"""This process's resident memory, as Linux reports it: what a worker records in the manifest.

Peak RSS is VmHWM from /proc/self/status; writing 5 to /proc/self/clear_refs resets it, so the
setup peak and the gradient-pass peak are told apart. Elsewhere (or without permission) the
readings are None and nothing is reset.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from pathlib import Path

_STATUS = Path("/proc/self/status")

# glibc, for the job's processes (read when a process starts). A ZeRO-3 rank gathers and frees a
# whole layer's weights (tens of MB) per module per step; with glibc's defaults such blocks are
# carved from per-thread heaps (its mmap threshold rises to 32 MiB after the first large free) and
# the holes they leave stay resident, about 0.8 GiB on a 1B model. A fixed threshold maps every
# block of 256 KiB or more on its own and returns it on free; two arenas bound per-thread heaps.
HOST_ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": str(256 * 1024), "MALLOC_ARENA_MAX": "2"}


def _status_bytes(key: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_rss() -> int | None:
    """Bytes: the highest resident set since the process started or since reset_peak_rss()."""
    return _status_bytes("VmHWM")


def current_rss() -> int | None:
    return _status_bytes("VmRSS")


def reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


@functools.cache
def _malloc_trim():
    # Looked up once: find_library runs ldconfig, and this is called after every batch.
    try:
        return ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim
    except (OSError, AttributeError, TypeError):
        return None


def release_free_memory() -> None:
    """Hand memory freed inside glibc's heap back to the system (malloc_trim), so a transient
    such as one module's full weights during construction stops counting as resident."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
