"""A job as an operator watches it: one `distinf run` through distinf.cli.main with its own local
Ray. Its log lines are structured (the driver's and, through log_to_driver, the workers'), stdout
ends with the summary, and the Ray metrics it records add up to the job's examples, chunks and
stages (restarts: test_faults.py)."""

from __future__ import annotations

import json
import logging
import re

import pytest

import job_fixtures
from distinf.cli import main
from distinf.log import JsonFormatter, KeyValueFormatter, StderrHandler, configure

pytestmark = pytest.mark.distributed


def test_log_lines_are_key_value_or_json_at_the_level_asked(monkeypatch):
    record = logging.LogRecord("distinf.driver", logging.WARNING, "", 0, "rank 1 failed (x = y)", None, None)
    record.event, record.stage = "restart", "gradients"
    line = KeyValueFormatter().format(record)
    assert line.split(" ", 1)[1].startswith('level=warning logger=distinf.driver msg="rank 1 failed (x = y)" '
                                            'event=restart stage=gradients')
    assert json.loads(JsonFormatter().format(record))["event"] == "restart"
    monkeypatch.setenv("DISTINF_LOG_LEVEL", "warning")
    assert configure().level == logging.WARNING
    monkeypatch.setenv("DISTINF_LOG_LEVEL", "INFO")
    # One handler of its own however often it is configured (pytest may add its capture handlers).
    assert configure().level == logging.INFO
    assert sum(isinstance(h, StderrHandler) for h in configure().handlers) == 1


def test_nothing_is_recorded_before_ray_is_connected(monkeypatch):
    import ray

    from distinf.runtime import metrics

    assert not ray.is_initialized()
    made = job_fixtures.recording_metrics(monkeypatch)
    metrics.stage_seconds("test", "plan", 0.5)  # the driver sets it again once connected
    assert made == {} and metrics._made == {}


def test_a_run_shows_in_structured_logs_and_metrics_and_stdout_ends_with_the_summary(tmp_path, monkeypatch,
                                                                                  capfd):
    made = job_fixtures.recording_metrics(monkeypatch)
    # 12 training rows and 6 queries on one rank, 2 per batch, 4 per chunk: 3 and 2 chunks.
    model = job_fixtures.tiny_model_dir(tmp_path, "gpt2")
    job = job_fixtures.job_file(tmp_path, model, *job_fixtures.corpus_files(tmp_path / "data", 2, 1),
                                runtime={"num_workers": 1, "batch_size": 2, "chunk_examples": 4},
                                scoring={"dense": False})
    assert main(["run", str(job)]) == 0
    out, err = capfd.readouterr()

    # stdout ends with the summary; only Ray's own prefixed lines, if any, come before it.
    summary = out[out.index("distinf run 'test' complete"):]
    assert summary.rstrip().splitlines()[-1].startswith("  outputs")
    assert "level=" not in out
    assert not any("gradients/" in part and "%|" in part for part in re.split("[\r\n]", err))  # no bar off a terminal
    lines = err.splitlines()
    assert any("level=info logger=distinf.driver" in line and "event=stage_done stage=scoring" in line
               for line in lines), err[-3000:]
    # The worker's own lines, through log_to_driver (Ray prefixes them with the actor and its pid).
    committed = [line for line in lines if "event=chunk_committed" in line]
    assert any("GradientWorker pid=" in line and "logger=distinf.worker" in line and "split=queries" in line
               for line in committed), err[-3000:]

    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert made["distinf_examples_done"].values == {("test", "train"): 12, ("test", "queries"): 6}
    assert made["distinf_chunks_committed"].values == {("test", "train"): 3, ("test", "queries"): 2}
    assert "distinf_restarts" not in made or not made["distinf_restarts"].values
    # Percent done and progress through curvature and scoring (the reducer's own metrics are its process's).
    assert made["distinf_examples_planned"].values == {("test", "train"): 12, ("test", "queries"): 6}
    assert made["distinf_examples_committed"].values == {("test", "train"): 12, ("test", "queries"): 6}
    assert made["distinf_stage_tasks"].values == made["distinf_stage_tasks_done"].values == {("test", "scoring"): 3}
    seconds = made["distinf_stage_seconds"].values
    assert seconds == {("test", stage): value for stage, value in manifest["timings"].items()}
    assert set(manifest["timings"]) == {"plan", "gradients", "curvature", "scoring"}
    assert made["distinf_examples_done"].kind == "Counter" and made["distinf_stage_seconds"].kind == "Gauge"
