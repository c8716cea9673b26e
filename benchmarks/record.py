"""The one way a benchmark hands over its section: printed, and appended to --out when given."""

from __future__ import annotations

from pathlib import Path


def publish(section: str, out: str | Path | None) -> None:
    """Print `section`; append it to `out` (benchmarks/RESULTS.md, or a scratch file) after a blank line."""
    print("\n" + section)
    if out:
        with Path(out).open("a", encoding="utf-8") as handle:
            handle.write("\n" + section.rstrip("\n") + "\n")
