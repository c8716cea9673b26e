"""distinf on a running Ray cluster: submitted through the Ray Jobs API, and spread over two nodes."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray

import job_fixtures
from distinf.config import load_job
from distinf.runtime.driver import run_job

pytestmark = pytest.mark.distributed
VENV_BIN = Path(sys.executable).parent


@pytest.fixture
def job_dir(tmp_path):
    """A working dir like a user's: the job file and its data, with paths relative to it."""
    model_dir = job_fixtures.tiny_model_dir(tmp_path / "models", "gpt2")
    work = tmp_path / "work"
    train, queries = job_fixtures.corpus_files(work / "data", n_train_per_source=2)
    job_fixtures.job_file(work, model_dir, train.relative_to(work), queries.relative_to(work),
                          output={"path": "runs/submitted"})
    return work


def test_job_submitted_through_the_ray_jobs_api_completes(job_dir, tmp_path):
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "disabled",
           "DS_ACCELERATOR": "cpu"}
    temp = Path(tempfile.mkdtemp(prefix="rj", dir="/tmp"))  # short: Ray's socket paths have a length limit
    subprocess.run([VENV_BIN / "ray", "start", "--head", "--node-ip-address=127.0.0.1", "--port=6391",
                    "--num-cpus=2", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                    "--dashboard-port=8291", f"--temp-dir={temp}", "--disable-usage-stats"],
                   check=True, env=env, capture_output=True)
    try:
        from ray.job_submission import JobStatus, JobSubmissionClient

        client = JobSubmissionClient("http://127.0.0.1:8291")
        output = job_dir / "runs" / "submitted"
        started = time.time()
        while True:  # the head's job agent may come up a little after `ray start` returns
            try:
                job_id = client.submit_job(
                    entrypoint=f"distinf run job.yaml --set runtime.address=auto --output {output}",
                    runtime_env={"working_dir": str(job_dir)},
                )
                break
            except RuntimeError as error:
                if "No available agent" not in str(error) or time.time() - started > 120:
                    raise
                time.sleep(2)
        deadline = time.time() + 420
        while client.get_job_status(job_id) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
            assert time.time() < deadline, client.get_job_logs(job_id)[-3000:]
            time.sleep(2)
        logs = client.get_job_logs(job_id)
        assert client.get_job_status(job_id) == JobStatus.SUCCEEDED, logs[-3000:]
        assert "complete" in logs and "top_k.parquet" in logs
        manifest = json.loads((output / "manifest.json").read_text())
        assert manifest["status"] == "complete" and len(manifest["workers"]) == 2
        assert pq.read_table(output / "scores" / "top_k.parquet").num_rows == 2 * 5 * manifest["counts"]["queries"]
    finally:
        # Stop only this head's processes (`ray stop` would stop every Ray on the machine).
        subprocess.run(["pkill", "-9", "-f", str(temp)], capture_output=True)
        shutil.rmtree(temp, ignore_errors=True)


def test_workers_spread_over_two_nodes_of_a_local_cluster(tmp_path):
    from ray.cluster_utils import Cluster

    model_dir = job_fixtures.tiny_model_dir(tmp_path, "gpt2")
    train, queries = job_fixtures.corpus_files(tmp_path / "data", n_train_per_source=2)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    try:
        ray.init(address=cluster.address)
        cfg = load_job(job_fixtures.job_file(tmp_path, model_dir, train, queries,
                                             runtime={"address": cluster.address}))
        manifest = run_job(cfg)
        node_ids = {node["NodeID"] for node in ray.nodes() if node["Alive"]}
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert manifest["status"] == "complete"
    assert len(node_ids) == 2
    assert len({w["node_id"] for w in manifest["workers"]}) == 2  # one worker per node
