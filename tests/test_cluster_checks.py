"""What a scheduler and an operator rely on before and around a run: `distinf validate`'s capacity
and free-space checks, runtime.placement_timeout, the exit codes of `distinf.cli.main`, and Ray
metrics that never fail a job. One local Ray (2 CPUs) stands in for a cluster."""

from __future__ import annotations

import json

import pytest
import ray

import job_fixtures
from distinf.cli import main
from distinf.runtime import metrics
from distinf.runtime.run_dir import config_differences
from distinf.runtime.workers import WORKER_ENV, capacity_shortfall


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": WORKER_ENV})
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster_checks")
    model = job_fixtures.tiny_model_dir(root, "gpt2")
    return job_fixtures.job_file(root, model, *job_fixtures.corpus_files(root / "data", 2, 1))


def test_capacity_is_the_worker_bundles_against_the_clusters_totals():
    assert capacity_shortfall({"CPU": 64.0, "GPU": 8.0}, 8, "cuda") is None
    short = capacity_shortfall({"CPU": 64.0, "GPU": 4.0}, 8, "cuda")
    assert short == "runtime.num_workers: 8 workers of {'CPU': 1, 'GPU': 1} need 8 GPU (the cluster has 4)"
    assert "need 3 CPU (the cluster has 2)" in capacity_shortfall({"CPU": 2.0}, 3, "cpu")
    assert "8 GPU (the cluster has 0)" in capacity_shortfall({"CPU": 16.0}, 8, "cuda")  # a CPU-only head


def test_validate_refuses_an_output_disk_without_room_for_the_run(job, monkeypatch, capsys):
    assert main(["validate", str(job)]) == 0
    assert "output.path: about" in capsys.readouterr().out
    monkeypatch.setattr("distinf.runtime.run_dir.free_bytes", lambda folder: 1024)
    assert main(["validate", str(job)]) == 2
    assert "has 1.0 KiB free and this run writes about" in capsys.readouterr().err


def test_validate_reads_the_capacity_of_a_real_cluster(local_ray, job, capsys):
    assert main(["validate", str(job), "--set", f"runtime.address={local_ray}"]) == 0
    assert "runtime.address: the cluster has 2 CPU, 0 GPU for 2 worker(s)" in capsys.readouterr().out
    assert main(["validate", str(job), "--set", f"runtime.address={local_ray}", "--set", "runtime.num_workers=3"]) == 0
    out = capsys.readouterr().out
    assert "warning: runtime.num_workers: 3 workers of {'CPU': 1} need 3 CPU (the cluster has 2)" in out
    assert "runtime.placement_timeout = 600 s" in out


def test_exit_codes_placement_timeout_fails_1_an_invalid_key_2(local_ray, job, tmp_path, capsys):
    """The codes of README's "Exit codes" table through distinf.cli.main: a job the cluster cannot
    place fails after runtime.placement_timeout with 1 (a runtime failure: retry), an invalid
    value is 2 (do not retry); 0 is a complete run (test_bad_input, test_incremental)."""
    run_dir = tmp_path / "run"
    args = ["run", str(job), "--output", str(run_dir), "--set", "runtime.num_workers=3"]
    assert main([*args, "--set", "runtime.placement_timeout=0"]) == 2
    assert "runtime.placement_timeout: Input should be greater than 0" in capsys.readouterr().err
    assert main([*args, "--set", "runtime.placement_timeout=2"]) == 1
    err = capsys.readouterr().err
    assert "could not place 3 workers ({'CPU': 1} each) within 2 s (runtime.placement_timeout)" in err
    assert json.loads((run_dir / "manifest.json").read_text())["status"] == "failed"


def test_a_resumed_run_may_wait_longer_for_its_placement():
    assert config_differences({"runtime": {"placement_timeout": 600}}, {"runtime": {"placement_timeout": 3600}}) == []


def test_metrics_are_real_ray_metrics_and_never_fail_a_job(local_ray, monkeypatch):
    metrics.reset()
    try:
        metrics.examples_done("t", "train", 3)
        metrics.chunks_committed("t", "train", 1)
        metrics.restarted("t", "gradients")
        metrics.stage_seconds("t", "plan", 1.5)
        assert isinstance(metrics._made["examples_done"], ray.util.metrics.Counter)
        assert isinstance(metrics._made["stage_seconds"], ray.util.metrics.Gauge)
        metrics.reset()

        def broken(*args):
            raise RuntimeError("no metrics agent")

        monkeypatch.setattr(metrics, "factory", broken)
        metrics.examples_done("t", "train", 3)  # skipped, not raised
        assert metrics._made["examples_done"] is None
    finally:
        metrics.reset()
