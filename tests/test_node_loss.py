"""A node lost mid-run (issue 27): a real two-node Ray cluster (ray.cluster_utils.Cluster), one
distinf worker per node, and the worker node removed during the gradient pass or during scoring.

The job either goes on, on a node added back within runtime.placement_timeout, and ends with
scores equal to the one-process core's; or it fails with exit 1 and a manifest that says why, and
`--resume` then completes it with the same scores.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pytest
from transformers import AutoModelForCausalLM

import distinf
import job_fixtures
from distinf.config import load_job
from distinf.inputs import plan_job

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A tiny GPT-2, real texts, and distinf.attribute's dense scores on them (the independent answer)."""
    root = tmp_path_factory.mktemp("node_loss")
    model_dir = job_fixtures.tiny_model_dir(root, "gpt2")
    train, queries = job_fixtures.corpus_files(root / "data")
    cfg = load_job(job_fixtures.job_file(root, model_dir, train, queries))
    plan = plan_job(cfg)
    reference = distinf.attribute(
        AutoModelForCausalLM.from_pretrained(cfg.model.path), plan.train.examples, plan.queries.examples,
        config=cfg.model_dump(include={"compression", "hessian", "scoring"}), train_ids=plan.train.ids,
        query_ids=plan.queries.ids, batch_size=3, pad_token_id=plan.pad_token_id)
    return model_dir, train, queries, plan, reference.scores


@contextlib.contextmanager
def two_nodes(monkeypatch, **delays: str) -> Iterator:
    """A head and a worker node of 1 CPU each (so the job's 2 workers land one per node); shut down
    whatever happens. `delays` (DISTINF_TEST_* variables) are set before the nodes start, so their
    raylets hand them to every task and actor."""
    from ray.cluster_utils import Cluster

    for name, value in delays.items():
        monkeypatch.setenv(name, value)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        yield cluster, cluster.add_node(num_cpus=1)
    finally:
        cluster.shutdown()


def run(tmp_path: Path, *args: str, remove: tuple | None = None, back_after: float | None = None) -> int:
    """`distinf run` in a driver process of its own, joined to the cluster by runtime.address; with
    `remove` (cluster, node, when), the node is removed once `when()` holds and, `back_after`
    seconds later (None: never), a node of 1 CPU is added. Returns the exit code."""
    log = tmp_path / f"driver-{len(list(tmp_path.glob('driver-*.log')))}.log"
    with log.open("w") as out:
        driver = subprocess.Popen([sys.executable, "-m", "distinf", "run", *args], stdout=out, stderr=out)
        try:
            if remove is not None:
                cluster, node, when = remove
                while not when():
                    assert driver.poll() is None, f"the job ended before the node was removed:\n{log.read_text()[-3000:]}"
                    time.sleep(0.1)
                cluster.remove_node(node)
                if back_after is not None:
                    time.sleep(back_after)
                    cluster.add_node(num_cpus=1)
            code = driver.wait(timeout=900)
        finally:
            if driver.poll() is None:
                driver.kill()
                driver.wait()
    print(log.read_text()[-5000:])  # shown by pytest when the test fails
    return code


def committed_chunk(run_dir: Path) -> Callable[[], bool]:
    """True once the gradient pass has committed its first chunk part (its ledger record exists)."""
    return lambda: any((run_dir / "ledger" / "train").glob("part-*.json"))


def scored_chunk(run_dir: Path) -> Callable[[], bool]:
    """True once the first scoring task has written its dense part into the staged version."""
    return lambda: any(run_dir.glob("versions/*/scores/dense/*.parquet"))


def job(tmp_path: Path, inputs, cluster, **runtime) -> Path:
    model_dir, train, queries, _, _ = inputs
    return job_fixtures.job_file(tmp_path, model_dir, train, queries,
                                 runtime={"address": cluster.address, **runtime})


def assert_scores_equal_the_core(run_dir: Path, inputs) -> None:
    _, _, _, plan, reference = inputs
    scores = job_fixtures.dense_scores(run_dir, plan.queries.ids, plan.train.ids)
    assert not np.isnan(scores).any()  # every (query, train) pair, once
    np.testing.assert_allclose(scores, reference, rtol=1e-4, atol=1e-4 * np.abs(reference).max())


def manifest_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "manifest.json").read_text())


def test_a_node_lost_in_the_gradient_pass_and_one_added_back_the_job_completes_with_the_cores_scores(
        monkeypatch, tmp_path, inputs):
    with two_nodes(monkeypatch, DISTINF_TEST_BATCH_DELAY="0.5") as (cluster, worker_node):
        path = job(tmp_path, inputs, cluster)
        code = run(tmp_path, str(path), remove=(cluster, worker_node, committed_chunk(tmp_path / "run")), back_after=5)
    manifest = manifest_of(tmp_path / "run")
    assert code == 0 and manifest["status"] == "complete", manifest.get("error")
    assert [r["stage"] for r in manifest["restarts"]][:1] == ["gradients"]  # the loss was seen, and survived
    assert_scores_equal_the_core(tmp_path / "run", inputs)


def test_a_node_lost_in_the_gradient_pass_with_none_to_replace_it_fails_with_exit_1_and_resumes(
        monkeypatch, tmp_path, inputs):
    with two_nodes(monkeypatch, DISTINF_TEST_BATCH_DELAY="0.5") as (cluster, worker_node):
        path = job(tmp_path, inputs, cluster, placement_timeout=10)
        code = run(tmp_path, str(path), remove=(cluster, worker_node, committed_chunk(tmp_path / "run")))
        failed = manifest_of(tmp_path / "run")
        assert code == 1 and failed["status"] == "failed"
        assert "could not place 2 workers" in failed["error"] and "runtime.placement_timeout" in failed["error"]
        assert list((tmp_path / "run" / "ledger" / "train").glob("part-*.json"))  # kept, for --resume
        resumes_once_a_node_is_added(tmp_path, path, cluster, inputs)


def test_a_node_lost_during_scoring_and_one_added_back_the_job_completes_with_the_cores_scores(
        monkeypatch, tmp_path, inputs):
    with two_nodes(monkeypatch, DISTINF_TEST_SLOW_STEPS="scoring", DISTINF_TEST_STEP_DELAY="2") as (cluster, node):
        path = job(tmp_path, inputs, cluster)
        code = run(tmp_path, str(path), remove=(cluster, node, scored_chunk(tmp_path / "run")), back_after=5)
    manifest = manifest_of(tmp_path / "run")
    assert code == 0 and manifest["status"] == "complete", manifest.get("error")
    assert_scores_equal_the_core(tmp_path / "run", inputs)


def test_a_node_lost_during_scoring_with_none_to_replace_it_fails_with_exit_1_and_resumes(
        monkeypatch, tmp_path, inputs):
    """The reducer keeps one CPU while the scoring tasks run: with the other node gone, either the
    reducer died with its node (its objects lost) or the tasks wait for a CPU until the stall
    timeout. Either way exit 1, a manifest that says so, and the gradients kept for --resume."""
    with two_nodes(monkeypatch, DISTINF_TEST_SLOW_STEPS="scoring", DISTINF_TEST_STEP_DELAY="2") as (cluster, node):
        path = job(tmp_path, inputs, cluster, stall_timeout=45, max_restarts=0)
        code = run(tmp_path, str(path), remove=(cluster, node, scored_chunk(tmp_path / "run")))
        failed = manifest_of(tmp_path / "run")
        assert code == 1 and failed["status"] == "failed"
        assert failed["error"].startswith("curvature and scoring") and "--resume" in failed["error"]
        resumes_once_a_node_is_added(tmp_path, path, cluster, inputs)


def resumes_once_a_node_is_added(tmp_path, path, cluster, inputs) -> None:
    """After a failed run: a node added back, `--resume` completes it with the core's scores."""
    cluster.add_node(num_cpus=1)
    code = run(tmp_path, str(path), "--resume")
    manifest = manifest_of(tmp_path / "run")
    assert code == 0 and manifest["status"] == "complete", manifest.get("error")
    assert manifest["resumed"] == 1
    assert_scores_equal_the_core(tmp_path / "run", inputs)
