"""The one way a benchmark hands over its section: printed, and appended to --out when given."""

from __future__ import annotations

import os
import time
from pathlib import Path


def publish(section: str, out: str | Path | None) -> None:
    """Print `section`; append it to `out` (benchmarks/RESULTS.md, or a scratch file) after a blank line."""
    print("\n" + section)
    if out:
        with Path(out).open("a", encoding="utf-8") as handle:
            handle.write("\n" + section.rstrip("\n") + "\n")


def run_line(script: str, pairs: int, threads: int, started: float) -> str:
    """The 'Command: … (minutes; torch, threads, nproc, load)' opening of a one-process paired benchmark."""
    import torch

    return (f"Command: `.venv/bin/python benchmarks/{script} --pairs {pairs} --threads {threads}` "
            f"({(time.perf_counter() - started) / 60:.1f} min; torch {torch.__version__}, {threads} thread(s), "
            f"nproc {os.cpu_count()}, load average {os.getloadavg()[0]:.1f} at the end).")
