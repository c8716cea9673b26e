"""The kustomize base (cluster/kuberay) and the example overlay (cluster/overlays/example) render
with the real `kubectl kustomize`, and the overlay sets each placeholder once: the image of every
container, the namespace, RUN_DIR and the region (one ConfigMap), the role ARN, the storage class."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BASE, OVERLAY = ROOT / "cluster" / "kuberay", ROOT / "cluster" / "overlays" / "example"


def render(folder: Path) -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        if os.environ.get("CI"):
            pytest.fail("kubectl is missing: .ci/run installs it")
        pytest.skip("kubectl not installed (Debian: apt-get install kubectl; .ci/run installs it)")
    out = subprocess.run([kubectl, "kustomize", str(folder)], check=True, capture_output=True, text=True)
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def containers(doc: dict) -> list[tuple[str, dict, dict]]:
    """(where, pod spec, container) of every container in a rendered object, CRDs included."""
    found = []

    def walk(node, where):
        if isinstance(node, dict):
            if isinstance(node.get("containers"), list):
                found.extend((where, node, c) for c in node["containers"])
            for key, value in node.items():
                walk(value, f"{where}.{key}")
        elif isinstance(node, list):
            for item in node:
                walk(item, where)

    walk(doc, f"{doc['kind']}/{doc['metadata']['name']}")
    return found


def by_kind(docs):
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


def overlay_settings():
    overlay = yaml.safe_load((OVERLAY / "kustomization.yaml").read_text())
    [generator] = overlay["configMapGenerator"]
    return overlay, dict(literal.split("=", 1) for literal in generator["literals"])


def test_the_base_renders_and_holds_everything_a_nightly_needs():
    objects = by_kind(render(BASE))
    for key in [("RayCluster", "distinf"), ("CronJob", "distinf-nightly"), ("Job", "distinf-loader"),
                ("ConfigMap", "distinf-settings"), ("ServiceAccount", "distinf"), ("ServiceAccount", "distinf-worker"),
                ("ServiceAccount", "distinf-submitter"), ("NetworkPolicy", "distinf-metrics"),
                ("PodMonitor", "distinf-ray"), ("PrometheusRule", "distinf-nightly"),
                ("PersistentVolumeClaim", "distinf-models"), ("PersistentVolumeClaim", "distinf-data")]:
        assert key in objects, key


def test_the_overlay_sets_image_namespace_settings_role_and_storage_once():
    docs = render(OVERLAY)
    overlay, settings = overlay_settings()
    [image] = overlay["images"]
    wanted = f"{image['newName']}:{image['newTag']}"
    rendered = yaml.safe_dump_all(docs)
    # No placeholder of the base is left anywhere.
    for placeholder in ("your-org", "your-bucket", "123456789012"):
        assert placeholder not in rendered, placeholder
    images = [(where, c["image"]) for doc in docs for where, _, c in containers(doc)]
    assert len(images) >= 4 and {i for _, i in images} == {wanted}, images   # head, workers, submitter, loader
    assert all(d["metadata"].get("namespace") == overlay["namespace"] for d in docs if d["kind"] != "Namespace")
    objects = by_kind(docs)
    assert objects[("ConfigMap", "distinf-settings")]["data"] == settings
    # Every RUN_DIR and AWS_REGION comes from that ConfigMap, under its rendered (unhashed) name.
    for doc in docs:
        for where, _, container in containers(doc):
            for env in container.get("env", []):
                if env["name"] in ("RUN_DIR", "AWS_REGION", "MODEL_SOURCE", "DATA_SOURCE"):
                    assert env["valueFrom"]["configMapKeyRef"] == {"name": "distinf-settings", "key": env["name"]}, where
    arn = {d["metadata"]["annotations"]["eks.amazonaws.com/role-arn"] for d in docs
           if d["kind"] == "ServiceAccount" and d["metadata"]["name"] in ("distinf", "distinf-worker")}
    assert arn == {"arn:aws:iam::210987654321:role/distinf-runs"}
    assert {d["spec"]["storageClassName"] for d in docs if d["kind"] == "PersistentVolumeClaim"} == {"efs-sc"}
    # The submitter's command and the job file's output agree with the ConfigMap's RUN_DIR.
    cron = objects[("CronJob", "distinf-nightly")]["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert cron["containers"][0]["command"] == ["python", "-m", "distinf.nightly_submitter"]


def test_gpu_workers_have_their_own_account_without_an_api_token():
    objects = by_kind(render(OVERLAY))
    cluster = objects[("RayCluster", "distinf")]["spec"]
    head = cluster["headGroupSpec"]["template"]["spec"]
    accounts = {name: d for (kind, name), d in objects.items() if kind == "ServiceAccount"}
    for group in cluster["workerGroupSpecs"]:
        pod = group["template"]["spec"]
        assert pod["serviceAccountName"] != head["serviceAccountName"]   # the autoscaler's Role is bound to the head's
        assert pod["automountServiceAccountToken"] is False
        assert accounts[pod["serviceAccountName"]]["automountServiceAccountToken"] is False
        assert "eks.amazonaws.com/role-arn" in accounts[pod["serviceAccountName"]]["metadata"]["annotations"]
    loader = objects[("Job", "distinf-loader")]["spec"]["template"]["spec"]
    assert loader["automountServiceAccountToken"] is False and loader["serviceAccountName"] == "distinf-worker"


def test_the_loader_writes_where_the_nightly_job_reads():
    from distinf.config import load_job

    cfg = load_job(ROOT / "jobs" / "nightly.yaml")
    objects = by_kind(render(OVERLAY))
    loader = objects[("Job", "distinf-loader")]["spec"]["template"]["spec"]
    mounts = {m["mountPath"]: m for m in loader["containers"][0]["volumeMounts"]}
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in loader["volumes"]}
    script = loader["containers"][0]["command"][-1]
    assert '"/models/current"' in script and cfg.model.path == "/models/current"
    for path in (cfg.model.path, cfg.data.train.path, cfg.data.queries.path):
        mount = next(m for root, m in mounts.items() if path.startswith(root + "/") or path == root)
        assert not mount.get("readOnly") and claims[mount["name"]] in ("distinf-models", "distinf-data")
    # jobs/nightly.yaml's output.path is the base's RUN_DIR, the run directory the submitter passes.
    base = by_kind(render(BASE))[("ConfigMap", "distinf-settings")]["data"]
    assert cfg.output.path == base["RUN_DIR"]


def test_metrics_are_scraped_and_a_missed_night_alerts():
    objects = by_kind(render(OVERLAY))
    monitor = objects[("PodMonitor", "distinf-ray")]["spec"]
    cluster = objects[("RayCluster", "distinf")]["spec"]
    pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for pod in pods:
        assert monitor["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
        ports = {p["name"]: p["containerPort"] for p in pod["spec"]["containers"][0].get("ports", [])}
        assert ports.get(monitor["podMetricsEndpoints"][0]["port"]) == 8080
    allowed = objects[("NetworkPolicy", "distinf-metrics")]["spec"]["ingress"][0]
    assert [p["port"] for p in allowed["ports"]] == [8080]
    rules = [r for g in objects[("PrometheusRule", "distinf-nightly")]["spec"]["groups"] for r in g["rules"]]
    exprs = " ".join(r["expr"] for r in rules)
    assert "kube_cronjob_status_last_successful_time" in exprs and 'cronjob="distinf-nightly"' in exprs
    assert "kube_job_status_failed" in exprs
    assert re.search(r"ray_distinf_examples_(committed|planned)", exprs)  # the names Ray exports
