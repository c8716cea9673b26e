"""A page screenshotted in headless Chromium (Debian's package; .ci/run installs it)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

HISTOGRAM_BLUE = np.array([0x3B, 0x6E, 0xA5]) / 255
"""The report's histogram fill: on screen, the plots rendered, not just the text."""


def screenshot(page: Path, folder: Path, width: int, height: int) -> tuple[Path, np.ndarray]:
    """The PNG of `page` at width × height, and its RGB pixels; skipped without Chromium, except
    in CI, where its absence is a failure."""
    chromium = shutil.which("chromium")
    if chromium is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: .ci/run installs it")
        pytest.skip("chromium not installed (.ci/run installs it)")
    shot = folder / "report.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={folder / 'profile'}", f"--window-size={width},{height}",
                    f"--screenshot={shot}", page.as_uri()],
                   check=True, capture_output=True, timeout=120)
    pixels = matplotlib.image.imread(shot)[..., :3]
    assert pixels.shape[:2] == (height, width)
    return shot, pixels


def blue_pixels(pixels: np.ndarray) -> int:
    return int(np.all(np.abs(pixels - HISTOGRAM_BLUE) < 0.03, axis=-1).sum())
