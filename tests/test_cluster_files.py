"""The cluster manifests and job files parse and carry the fields their kinds require."""

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from distinf.config import load_job

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"


def load(name):
    return yaml.safe_load((CLUSTER / name).read_text())


def gpu_limit(pod_template):
    return pod_template["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")


def check_ray_cluster_spec(spec):
    assert spec["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    groups = spec["workerGroupSpecs"]
    assert groups and all(g["groupName"] and g["replicas"] >= 1 for g in groups)
    assert all(int(gpu_limit(g["template"])) >= 1 for g in groups)


def test_raycluster_has_head_and_gpu_worker_groups():
    doc = load("kuberay/raycluster.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayCluster") and doc["metadata"]["name"]
    check_ray_cluster_spec(doc["spec"])


def test_rayjob_runs_distinf_on_its_own_cluster():
    doc = load("kuberay/rayjob.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayJob") and doc["metadata"]["name"]
    assert doc["spec"]["entrypoint"].startswith("distinf run ")
    assert doc["spec"]["shutdownAfterJobFinishes"] is True
    check_ray_cluster_spec(doc["spec"]["rayClusterSpec"])


def test_nightly_cronjob_submits_the_nightly_job_once_a_day():
    doc = load("kuberay/nightly-cronjob.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("batch/v1", "CronJob")
    assert re.fullmatch(r"(\S+\s+){4}\S+", doc["spec"]["schedule"])
    assert doc["spec"]["concurrencyPolicy"] == "Forbid"
    pod = doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["restartPolicy"] in {"Never", "OnFailure"}
    command = pod["containers"][0]["command"]
    assert command[:3] == ["ray", "job", "submit"] and "jobs/nightly.yaml" in command


def test_cluster_launcher_has_gpu_worker_nodes():
    doc = load("launcher.yaml")
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type"):
        assert key in doc
    assert doc["head_node_type"] in doc["available_node_types"]
    assert any(t["resources"].get("GPU", 0) >= 1 for t in doc["available_node_types"].values())


@pytest.mark.parametrize("job", sorted((ROOT / "jobs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_job_file_validates(job):
    load_job(job)


def test_local_cluster_script_is_valid_bash_and_explains_itself():
    script = CLUSTER / "local_cluster.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    result = subprocess.run(["bash", str(script)], capture_output=True, text=True)
    assert result.returncode == 2 and "usage" in result.stderr
