"""distinf report: a self-contained report.html, opened in headless Chromium and screenshotted."""

import shutil

import numpy as np
import pytest

import browser
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

    shot, pixels = browser.screenshot(run_dir / "report.html", tmp_path, 1300, 1800)
    assert browser.blue_pixels(pixels) > 2000  # the histograms rendered, not just the text
    shutil.copy(shot, run_dir / "report_screenshot.png")


def test_report_refuses_an_incomplete_run(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "not a complete distinf run" in capsys.readouterr().err
