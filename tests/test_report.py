"""distinf report: a self-contained report.html, opened in headless Chromium and screenshotted."""

import os
import shutil
import subprocess

import matplotlib.image
import numpy as np
import pytest

from distinf.cli import main
from distinf.report import roc_curve

pytestmark = pytest.mark.distributed


def test_roc_curve_matches_the_rank_statistic():
    rng = np.random.default_rng(0)
    labels = rng.random(200) < 0.3
    scores = rng.normal(size=200) + labels
    _, _, auc = roc_curve(labels, scores)
    pairs = (scores[labels][:, None] > scores[~labels][None, :]).mean()  # Mann-Whitney U / (n+ n-)
    assert auc == pytest.approx(pairs, abs=1e-12)


def test_report_embeds_plots_and_texts_and_renders_in_chromium(tiny_run, tmp_path):
    run_dir, _ = tiny_run
    assert main(["report", str(run_dir), "--noisy-column", "flipped"]) == 0
    page = (run_dir / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2  # distributions + ROC
    assert "strongest opponents" in page and "Most self-influential" in page
    assert "http://" not in page.split("<body>")[0]  # self-contained: nothing fetched

    chromium = shutil.which("chromium")
    if chromium is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: .ci/run installs it")
        pytest.skip("chromium not installed (.ci/run installs it)")
    shot = tmp_path / "report.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1300,1800",
                    f"--screenshot={shot}", (run_dir / "report.html").as_uri()],
                   check=True, capture_output=True, timeout=120)
    pixels = matplotlib.image.imread(shot)[..., :3]
    assert pixels.shape[:2] == (1800, 1300)
    # The histograms' fill colours are on screen, so the plots rendered, not just the text.
    blue = np.all(np.abs(pixels - np.array([0x3B, 0x6E, 0xA5]) / 255) < 0.03, axis=-1)
    assert blue.sum() > 2000
    shutil.copy(shot, run_dir / "report_screenshot.png")


def test_report_refuses_an_incomplete_run(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "not a complete distinf run" in capsys.readouterr().err
