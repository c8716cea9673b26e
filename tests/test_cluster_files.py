"""The cluster manifests and job files parse, carry the fields their kinds require, and mean what
the README says: the nightly command continues a failed run, submission is idempotent, exit code 2
is never retried, every path the job reads or writes is mounted (or on object storage), and the
image, rayVersion and the Dockerfile's Ray agree."""

import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from distinf.config import load_job
from distinf.nightly_submitter import Settings

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"


def load(name):
    return yaml.safe_load((CLUSTER / name).read_text())


def gpu_limit(pod_template):
    return pod_template["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")


def check_ray_cluster_spec(spec):
    assert spec["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    groups = spec["workerGroupSpecs"]
    assert groups and all(g["groupName"] and g["maxReplicas"] >= 1 for g in groups)
    assert all(int(gpu_limit(g["template"])) >= 1 for g in groups)


def test_raycluster_has_head_and_gpu_worker_groups():
    doc = load("kuberay/raycluster.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayCluster") and doc["metadata"]["name"]
    check_ray_cluster_spec(doc["spec"])


def test_rayjob_runs_distinf_on_its_own_cluster():
    doc = load("kuberay/rayjob.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayJob") and doc["metadata"]["name"]
    assert distinf_args(doc["spec"]["entrypoint"])[0] == "run"
    assert doc["spec"]["shutdownAfterJobFinishes"] is True
    check_ray_cluster_spec(doc["spec"]["rayClusterSpec"])


def test_nightly_cronjob_submits_the_nightly_job_once_a_day():
    doc = load("kuberay/nightly-cronjob.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("batch/v1", "CronJob")
    assert re.fullmatch(r"(\S+\s+){4}\S+", doc["spec"]["schedule"])
    assert doc["spec"]["concurrencyPolicy"] == "Forbid"
    pod = doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["restartPolicy"] in {"Never", "OnFailure"}
    [container] = pod["containers"]
    assert container["command"] == ["python", "-m", "distinf.nightly_submitter"]
    assert env_of(container)["JOB_FILE"] == "/app/jobs/nightly.yaml"


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


# ---------------------------------------------------------------------------------------------
# Issue 18, section 1: the manifests read against KubeRay's semantics.

KUBERAY = CLUSTER / "kuberay"
DOCKERFILE = ROOT / "Dockerfile"
ENTRYPOINT = KUBERAY / "distinf-entrypoint.sh"


def settings():
    """The base's ConfigMap distinf-settings (kustomization.yaml's configMapGenerator literals)."""
    [generator] = yaml.safe_load((KUBERAY / "kustomization.yaml").read_text())["configMapGenerator"]
    return dict(literal.split("=", 1) for literal in generator["literals"])


def env_of(container):
    """name -> value; a value from the ConfigMap distinf-settings as the base sets it, any other
    valueFrom as written."""
    env = {}
    for e in container.get("env", []):
        ref = e.get("valueFrom", {}).get("configMapKeyRef")
        env[e["name"]] = settings()[ref["key"]] if ref and ref["name"] == "distinf-settings" else \
            e.get("value", e.get("valueFrom"))
    return env


def load_all(name):
    return [d for d in yaml.safe_load_all((KUBERAY / name).read_text()) if d]


def cluster_specs():
    """(manifest, RayClusterSpec) of every Ray cluster the manifests create."""
    return [("raycluster.yaml", load("kuberay/raycluster.yaml")["spec"]),
            ("rayjob.yaml", load("kuberay/rayjob.yaml")["spec"]["rayClusterSpec"])]


def ray_pods(spec):
    """(role, pod template) of the head and of every worker group."""
    return [("head", spec["headGroupSpec"]["template"])] + [
        (g["groupName"], g["template"]) for g in spec["workerGroupSpecs"]]


def all_images():
    images = []
    for _, spec in cluster_specs():
        for _, pod in ray_pods(spec):
            images += [c["image"] for c in pod["spec"]["containers"]]
    cron = load("kuberay/nightly-cronjob.yaml")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    images += [c["image"] for c in cron["containers"]]
    images += [c["image"] for c in load("kuberay/rayjob.yaml")["spec"]["submitterPodTemplate"]["spec"]["containers"]]
    return images


def dockerfile_ray_version():
    text = DOCKERFILE.read_text()
    [version] = re.findall(r"^ARG RAY_VERSION=(\S+)$", text, re.M)
    return version, text


def test_image_tag_ray_version_and_the_dockerfile_agree():
    from packaging.requirements import Requirement

    tomllib = pytest.importorskip("tomllib")               # Python 3.11+

    version, text = dockerfile_ray_version()
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_VERSION\}-py3\d+-gpu$", text, re.M)
    # pip may not replace the base image's Ray: the lock every pip step uses pins the same one
    assert f"ray=={version}" in (ROOT / "constraints.txt").read_text().splitlines()
    assert "pip install" in text and '".[s3]"' in text     # distinf itself, with boto3 for the S3 lease
    for name, spec in cluster_specs():
        assert spec["rayVersion"] == version, name
    images = all_images()
    assert len(set(images)) == 1, images                    # head, workers and submitters: one image
    repo, tag = images[0].rsplit(":", 1)
    assert tag != "latest" and f"ray{version}" in tag
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    [ray_req] = [Requirement(r) for r in dependencies if Requirement(r).name == "ray"]
    assert ray_req.specifier.contains(version), (ray_req, version)
    setup = " ".join(load("launcher.yaml")["setup_commands"])
    assert "-c /app/constraints.txt" in setup              # the cluster launcher installs the same Ray


def test_autoscaling_is_consistent_with_the_replica_bounds():
    for name, spec in cluster_specs():
        autoscaling = spec.get("enableInTreeAutoscaling", False)
        for group in spec["workerGroupSpecs"]:
            low, high, replicas = group["minReplicas"], group["maxReplicas"], group.get("replicas", 0)
            assert low <= replicas <= high, (name, group["groupName"])
            # Without the autoscaler KubeRay keeps `replicas` pods forever: bounds would be a lie.
            assert autoscaling or low == high == replicas, (name, group["groupName"])
    long_lived = dict(cluster_specs())["raycluster.yaml"]
    assert long_lived["enableInTreeAutoscaling"] is True     # GPU pods only while a job asks for GPUs
    assert all(g["minReplicas"] == 0 for g in long_lived["workerGroupSpecs"])
    assert long_lived["autoscalerOptions"]["idleTimeoutSeconds"] > 0


def test_the_clusters_have_room_for_the_workers_the_nightly_command_asks_for():
    def gpus(spec, bound):
        return sum(g[bound] * int(gpu_limit(g["template"])) for g in spec["workerGroupSpecs"])

    specs = dict(cluster_specs())
    assert gpus(specs["raycluster.yaml"], "maxReplicas") >= nightly_config().runtime.num_workers
    assert gpus(specs["rayjob.yaml"], "replicas") >= rayjob_config().runtime.num_workers


def test_no_pod_sizes_dev_shm_itself():
    # KubeRay mounts a memory-backed /dev/shm sized to the container's memory; one of our own shrinks it.
    for name, spec in cluster_specs():
        for role, pod in ray_pods(spec):
            for container in pod["spec"]["containers"]:
                assert all(m["mountPath"] != "/dev/shm" for m in container.get("volumeMounts", [])), (name, role)
            assert all(v.get("emptyDir", {}).get("medium") != "Memory" for v in pod["spec"].get("volumes", [])), \
                (name, role)


def test_token_auth_network_policy_and_dashboard_exposure():
    policies = {p["metadata"]["name"]: p for p in load_all("networkpolicy.yaml")}
    assert all(p["kind"] == "NetworkPolicy" and p["apiVersion"] == "networking.k8s.io/v1" for p in policies.values())

    def selected(policy, labels):
        return policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()

    cron_pod = load("kuberay/nightly-cronjob.yaml")["spec"]["jobTemplate"]["spec"]["template"]
    rayjob_submitter = load("kuberay/rayjob.yaml")["spec"]["submitterPodTemplate"]
    for name, spec in cluster_specs():
        assert spec["authOptions"]["mode"] == "token", name
        assert tuple(map(int, spec["rayVersion"].split("."))) >= (2, 52, 0)   # KubeRay's minimum for token
        for role, pod in ray_pods(spec):
            labels = {**pod["metadata"]["labels"], "ray.io/node-type": "head" if role == "head" else "worker"}
            covering = [p for p in policies.values() if selected(p, labels)]
            assert covering, (name, role)                          # no Ray pod open to every pod
            for policy in covering:
                for rule in policy["spec"]["ingress"]:
                    sources = [f.get("podSelector", {}).get("matchLabels", {}) for f in rule["from"]]
                    assert {} not in sources and all(f.get("podSelector") for f in rule["from"])
                    if "ports" not in rule:                        # any port: only other Ray pods
                        assert all(s.items() <= labels.items() for s in sources), policy["metadata"]["name"]
                    elif [p["port"] for p in rule["ports"]] == [8080]:  # Ray's metrics: Prometheus only
                        assert sources == [{"app.kubernetes.io/name": "prometheus"}]
                        assert all(f["namespaceSelector"]["matchLabels"] for f in rule["from"])
                    else:
                        assert [p["port"] for p in rule["ports"]] == [8265] and role == "head"
        head = spec["headGroupSpec"]
        assert head["rayStartParams"].get("num-cpus") == "0"
        assert "serviceType" not in head or head["serviceType"] == "ClusterIP"   # never a LoadBalancer
    jobs_api = policies["distinf-jobs-api"]["spec"]["ingress"][0]["from"]
    allowed = [f["podSelector"]["matchLabels"] for f in jobs_api]
    assert cron_pod["metadata"]["labels"] in allowed and rayjob_submitter["metadata"]["labels"] in allowed
    # The submitter authenticates with the Secret KubeRay generates for the RayCluster.
    env = env_of(cron_pod["spec"]["containers"][0])
    assert env["RAY_AUTH_MODE"] == "token"
    assert env["RAY_AUTH_TOKEN"]["secretKeyRef"] == {"name": load("kuberay/raycluster.yaml")["metadata"]["name"],
                                                     "key": "auth_token"}
    assert env["RAY_ADDRESS"] == f"http://{load('kuberay/raycluster.yaml')['metadata']['name']}-head-svc:8265"


def test_pods_that_write_s3_run_as_the_service_account_with_the_cloud_role():
    accounts = {a["metadata"]["name"]: a for a in load_all("serviceaccount.yaml")}
    for name, spec in cluster_specs():
        for role, pod in ray_pods(spec):
            account = accounts[pod["spec"]["serviceAccountName"]]
            assert "eks.amazonaws.com/role-arn" in account["metadata"]["annotations"], (name, role)
    cron = load("kuberay/nightly-cronjob.yaml")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert accounts[cron["serviceAccountName"]].get("automountServiceAccountToken") is False


# -- what the nightly command reads and writes --------------------------------------------------

def distinf_args(entrypoint):
    """The arguments distinf gets from an entrypoint that runs distinf-entrypoint.sh."""
    words = shlex.split(entrypoint)
    if words[0] == "distinf":
        return words[1:]
    assert words[0] == "/app/cluster/kuberay/distinf-entrypoint.sh" or Path(words[0]) == ENTRYPOINT, words
    words = words[1:]
    while words and words[0] in ("--retries", "--pause"):
        words = words[2:]
    return words


def job_of(args):
    """(JobConfig as distinf would load it, the run directory argument) from `run JOB ...` arguments."""
    assert args[0] == "run"
    job = Path(args[1])
    job = ROOT / job.relative_to("/app") if job.is_absolute() else ROOT / job
    sets = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    run_dir = next((args[i + 1] for i, a in enumerate(args) if a in ("--append-to", "--output")), None)
    return load_job(job, sets), run_dir


def rayjob_config():
    return job_of(distinf_args(load("kuberay/rayjob.yaml")["spec"]["entrypoint"]))[0]


def nightly_config():
    return job_of(distinf_args(submitted_entrypoint()))[0]


def cron_env():
    cron = load("kuberay/nightly-cronjob.yaml")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return {k: v for k, v in env_of(cron["containers"][0]).items() if isinstance(v, str)}


def submitted_entrypoint():
    """The entrypoint the CronJob's submitter sends, from the CronJob's environment."""
    return Settings.from_env({**cron_env(), "RAY_ADDRESS": "http://x:8265"}).entrypoint()


def mounts_cover(pod, path, write):
    """Whether `path` is on object storage, or under a mount of `pod`'s Ray container that is
    backed by a PersistentVolumeClaim defined in storage.yaml (and, to be written, mounted
    read-write from a ReadWriteMany claim, as several pods write it)."""
    if re.match(r"^(s3|gs|gcs|abfss?|hdfs)://", path):
        return True
    claims = {c["metadata"]["name"]: c for c in load_all("storage.yaml")}
    volumes = {v["name"]: v for v in pod["spec"].get("volumes", [])}
    for mount in pod["spec"]["containers"][0].get("volumeMounts", []):
        root = mount["mountPath"].rstrip("/")
        if path == root or path.startswith(root + "/"):
            claim = volumes[mount["name"]]["persistentVolumeClaim"]["claimName"]
            modes = claims[claim]["spec"]["accessModes"]
            assert {"ReadWriteMany", "ReadOnlyMany"} & set(modes), claim   # several nodes mount it
            if not write:
                return True
            return not mount.get("readOnly") and "ReadWriteMany" in modes
    return False


@pytest.mark.parametrize("manifest", ["raycluster.yaml", "rayjob.yaml"])
def test_every_path_the_nightly_job_reads_or_writes_is_mounted_or_on_object_storage(manifest):
    if manifest == "rayjob.yaml":
        cfg, run_dir = job_of(distinf_args(load("kuberay/rayjob.yaml")["spec"]["entrypoint"]))
    else:   # the cluster the CronJob's submitter sends its command to
        cfg, run_dir = job_of(distinf_args(submitted_entrypoint()))
    reads = [cfg.model.path, cfg.data.train.path, cfg.data.queries.path]
    writes = [cfg.output.path, run_dir]
    assert run_dir == cfg.output.path
    spec = dict(cluster_specs())[manifest]
    # The driver runs on the head; gradient workers, the reducer and scoring tasks on the workers.
    for role, pod in ray_pods(spec):
        for path in reads:
            assert mounts_cover(pod, path, write=False), (manifest, role, path)
        for path in writes:
            assert mounts_cover(pod, path, write=True), (manifest, role, path)


def test_every_claim_a_pod_mounts_is_defined():
    claims = {c["metadata"]["name"] for c in load_all("storage.yaml") if c["kind"] == "PersistentVolumeClaim"}
    for name, spec in cluster_specs():
        for role, pod in ray_pods(spec):
            for volume in pod["spec"].get("volumes", []):
                if "persistentVolumeClaim" in volume:
                    assert volume["persistentVolumeClaim"]["claimName"] in claims, (name, role)


# -- retries ------------------------------------------------------------------------------------

def test_the_rayjob_continues_a_failed_run_and_never_retries_exit_2():
    spec = load("kuberay/rayjob.yaml")["spec"]
    entrypoint = spec["entrypoint"]
    # KubeRay's K8sJobMode submitter pastes the entrypoint into its own bash line: no shell syntax.
    assert not re.search(r"[;&|$`<>]", entrypoint), entrypoint
    words = shlex.split(entrypoint)
    retries = int(words[words.index("--retries") + 1])
    args = distinf_args(entrypoint)
    assert retries >= 1 and ("--append-to" in args or "--resume" in args)
    # KubeRay's backoffLimit retries every FAILED Ray job (exit 2 too), each on a new cluster.
    assert spec.get("backoffLimit", 0) == 0
    assert spec["submissionMode"] == "K8sJobMode" and spec["shutdownAfterJobFinishes"] is True
    assert 0 < spec["preRunningDeadlineSeconds"] < spec["activeDeadlineSeconds"]
    [submitter] = spec["submitterPodTemplate"]["spec"]["containers"]
    assert submitter["resources"]["requests"] and submitter["resources"]["limits"]
    assert "command" not in submitter                       # KubeRay's status-or-submit command


def fake_distinf(bin_dir: Path, codes):
    """A `distinf` that exits with the next code of `codes` and logs its arguments."""
    (bin_dir / "codes").write_text("\n".join(map(str, codes)) + "\n")
    script = bin_dir / "distinf"
    script.write_text(f"""#!/usr/bin/env bash
echo "$*" >> {bin_dir}/calls
code=$(head -n 1 {bin_dir}/codes); sed -i 1d {bin_dir}/codes
exit "${{code:-0}}"
""")
    script.chmod(0o755)


@pytest.mark.parametrize("codes, retries, calls, final", [
    ([0], 2, 1, 0), ([1, 1, 0], 2, 3, 0), ([1, 1, 1, 0], 2, 3, 1), ([2, 0], 2, 1, 2), ([1, 2, 0], 2, 2, 2),
    ([1, 0], 0, 1, 1)])
def test_the_entrypoint_retries_exit_1_only_and_prints_the_exit_code_last(tmp_path, codes, retries, calls, final):
    fake_distinf(tmp_path, codes)
    result = subprocess.run([str(ENTRYPOINT), "--retries", str(retries), "--pause", "0", "run", "jobs/x.yaml",
                             "--append-to", "s3://b/run"], capture_output=True, text=True,
                            env={**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"})
    assert result.returncode == final
    assert result.stdout.strip().splitlines()[-1] == f"distinf-exit-code={final}"
    assert (tmp_path / "calls").read_text().splitlines() == ["run jobs/x.yaml --append-to s3://b/run"] * calls


def test_the_cronjob_retries_exit_1_and_fails_at_once_on_exit_2():
    doc = load("kuberay/nightly-cronjob.yaml")
    job = doc["spec"]["jobTemplate"]["spec"]
    pod = job["template"]["spec"]
    [container] = pod["containers"]
    assert pod["restartPolicy"] == "Never"                  # podFailurePolicy requires it
    assert job["backoffLimit"] >= 1
    rules = job["podFailurePolicy"]["rules"]
    fail = [r for r in rules if r["action"] == "FailJob"]
    assert any(r["onExitCodes"]["operator"] == "In" and 2 in r["onExitCodes"]["values"]
               and r["onExitCodes"]["containerName"] == container["name"] for r in fail)
    assert not any(1 in r.get("onExitCodes", {}).get("values", []) for r in rules if r["action"] != "Count")
    assert container["resources"]["requests"] and container["resources"]["limits"]
    assert doc["spec"]["startingDeadlineSeconds"] > 0 and job["activeDeadlineSeconds"] > 0
    # Every retry of a night runs on that night's UTC date, so it finds that night's submission ids.
    minute, hour = doc["spec"]["schedule"].split()[:2]
    assert doc["spec"]["timeZone"] == "Etc/UTC"
    assert int(hour) * 3600 + int(minute) * 60 + doc["spec"]["startingDeadlineSeconds"] + job["activeDeadlineSeconds"] \
        < 24 * 3600
    # The module the CronJob runs is installed in the image.
    assert "COPY --chown=ray:users distinf ./distinf" in DOCKERFILE.read_text()
    assert "COPY --chown=ray:users cluster ./cluster" in DOCKERFILE.read_text() and "WORKDIR /app" in DOCKERFILE.read_text()


# -- the submitter ------------------------------------------------------------------------------
# Its behaviour against a real Ray head: tests/test_nightly_submitter.py.

def test_the_submitter_sends_the_nightly_append_with_the_cronjobs_settings():
    args = shlex.split(submitted_entrypoint())
    run_dir = cron_env()["RUN_DIR"]
    assert args[:3] == ["distinf", "run", "/app/jobs/nightly.yaml"] and args[args.index("--append-to") + 1] == run_dir
    assert "--resume" not in args and "--output" not in args          # refused with --append-to
    settings = Settings.from_env({**cron_env(), "RAY_ADDRESS": "http://x:8265"})
    # The submitter stops its Ray job before the Job's own deadline kills the pod.
    job = load("kuberay/nightly-cronjob.yaml")["spec"]["jobTemplate"]["spec"]
    assert 0 < settings.deadline_seconds < job["activeDeadlineSeconds"]
    assert 0 < settings.pending_deadline < settings.deadline_seconds
