"""The cluster manifests and job files parse, carry the fields their kinds require, and mean what
the README says: the nightly command continues a failed run, submission is idempotent, exit code 2
is never retried, every path the job reads or writes is mounted (or on object storage), and the
image, rayVersion and the Dockerfile's Ray agree."""

import json
import os
import re
import shlex
import subprocess
import sys
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
    assert container["command"] == ["/app/cluster/kuberay/submit-nightly.sh"]
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
SUBMITTER = KUBERAY / "submit-nightly.sh"
ENTRYPOINT = KUBERAY / "distinf-entrypoint.sh"


def env_of(container):
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


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


def submitted_entrypoint():
    """The entrypoint the CronJob's submitter sends, run against a fake `ray` CLI."""
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        fake = FakeRay(Path(scratch))
        assert fake.submitter().returncode == 0
        [(_, entrypoint)] = fake.submissions()
        return entrypoint


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
    # The script the CronJob runs is in the image where the CronJob looks for it.
    assert (ROOT / Path(container["command"][0]).relative_to("/app")) == SUBMITTER
    assert "COPY --chown=ray:users cluster ./cluster" in DOCKERFILE.read_text() and "WORKDIR /app" in DOCKERFILE.read_text()


# -- the submitter against a fake `ray` CLI -----------------------------------------------------

FAKE_RAY = r'''#!PYTHON
"""A `ray job` CLI that answers as Ray 2.60's does (status lines from
ray/dashboard/modules/job/cli.py::_log_job_status) and runs submitted entrypoints at once."""
import json, os, shlex, subprocess, sys
from pathlib import Path

state = Path(os.environ["FAKE_RAY_STATE"])
args = [a for a in sys.argv[1:] if a not in ("--no-wait", "--follow")]
assert args[0] == "job", args
verb, rest = args[1], args[2:]
with open(state / "calls", "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\n")

def job(i):
    p = state / f"job-{i}.json"
    return json.loads(p.read_text()) if p.exists() else None

def save(i, j):
    (state / f"job-{i}.json").write_text(json.dumps(j))

if verb == "submit":
    i = rest[rest.index("--submission-id") + 1]
    entry = shlex.join(rest[rest.index("--") + 1:])    # as Ray 2.60 joins the words, run in a shell
    if job(i):
        sys.exit(f"job {i} already exists")
    with open(state / "submitted", "a") as f:
        f.write(json.dumps([i, entry]) + "\n")
    out = subprocess.run(entry, shell=True, capture_output=True, text=True)
    save(i, {"status": "SUCCEEDED" if out.returncode == 0 else "FAILED", "logs": out.stdout + out.stderr})
elif verb == "status":
    i = rest[-1]
    j = job(i)
    if j is None:
        sys.exit(f"RuntimeError: Request failed with status code 404: Job {i} does not exist.")
    if j.get("polls", 0) > 0:
        j["polls"] -= 1
        if j["polls"] == 0:
            j["status"] = j.pop("then")
        save(i, j)
    s = j["status"]
    if s == "SUCCEEDED": print(f"Job '{i}' succeeded")
    elif s == "FAILED": print(f"Job '{i}' failed")
    elif s == "STOPPED": print(f"Job '{i}' was stopped")
    else: print(f"Status for job '{i}': {s}")
elif verb == "logs":
    j = job(rest[-1])
    if j is None:
        sys.exit(1)
    print(j.get("logs", ""), end="")
elif verb == "stop":
    j = job(rest[-1]); j["status"] = "STOPPED"; save(rest[-1], j)
else:
    sys.exit(f"unexpected: {sys.argv}")
'''


class FakeRay:
    NIGHT = "2026-11-30"

    def __init__(self, where: Path):
        self.state = where / "state"
        self.bin = where / "bin"
        self.state.mkdir(parents=True, exist_ok=True)
        self.bin.mkdir(parents=True, exist_ok=True)
        ray = self.bin / "ray"
        ray.write_text(FAKE_RAY.replace("PYTHON", sys.executable, 1))
        ray.chmod(0o755)
        self.distinf([0])

    def distinf(self, codes):
        fake_distinf(self.bin, codes)

    def job(self, attempt, **fields):
        (self.state / f"job-distinf-nightly-{self.NIGHT}-{attempt}.json").write_text(json.dumps(fields))

    def submissions(self):
        path = self.state / "submitted"
        return [tuple(json.loads(line)) for line in path.read_text().splitlines()] if path.exists() else []

    def calls(self):
        return [json.loads(line) for line in (self.state / "calls").read_text().splitlines()]

    def submitter(self, **env):
        """submit-nightly.sh with the CronJob's environment (secrets aside)."""
        cron = load("kuberay/nightly-cronjob.yaml")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        manifest_env = {k: v for k, v in env_of(cron["containers"][0]).items() if isinstance(v, str)}
        return subprocess.run(
            [str(SUBMITTER)], capture_output=True, text=True, timeout=60,
            env={**os.environ, **manifest_env, "PATH": f"{self.bin}:{os.environ['PATH']}",
                 "FAKE_RAY_STATE": str(self.state), "ENTRYPOINT": str(ENTRYPOINT), "NIGHT": self.NIGHT,
                 "POLL_SECONDS": "0", **env})


@pytest.fixture
def ray_cli(tmp_path):
    return FakeRay(tmp_path)


def test_the_submitter_submits_the_nightly_append_once_with_a_stable_id(ray_cli):
    result = ray_cli.submitter()
    assert result.returncode == 0, result.stderr
    [(submission_id, entrypoint)] = ray_cli.submissions()
    assert submission_id == f"distinf-nightly-{FakeRay.NIGHT}-1"
    args = distinf_args(entrypoint)
    cron = load("kuberay/nightly-cronjob.yaml")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    run_dir = env_of(cron["containers"][0])["RUN_DIR"]
    assert args[:2] == ["run", "/app/jobs/nightly.yaml"] and args[args.index("--append-to") + 1] == run_dir
    assert "--resume" not in args and "--output" not in args          # refused with --append-to
    # KubeRay's pattern: the status of the id is asked before anything is submitted.
    calls = ray_cli.calls()
    assert calls[0][:2] == ["job", "status"] and calls[0][-1] == submission_id
    assert calls[1][:2] == ["job", "submit"] and calls[1][calls[1].index("--submission-id") + 1] == submission_id
    # Run again (a retried pod, or a second CronJob run the same night): nothing is submitted.
    again = ray_cli.submitter()
    assert again.returncode == 0 and len(ray_cli.submissions()) == 1


def test_a_restarted_submitter_follows_the_running_job_instead_of_submitting(ray_cli):
    ray_cli.job(1, status="RUNNING", polls=2, then="SUCCEEDED", logs="distinf-exit-code=0\n")
    result = ray_cli.submitter()
    assert result.returncode == 0, result.stderr
    assert ray_cli.submissions() == []
    assert ["job", "logs", "--follow", f"distinf-nightly-{FakeRay.NIGHT}-1"] in ray_cli.calls()


def test_exit_code_2_fails_the_night_and_is_never_resubmitted(ray_cli):
    ray_cli.distinf([2])
    first = ray_cli.submitter()
    assert first.returncode == 2 and "not retried" in first.stderr
    retried = ray_cli.submitter()                       # had the Job retried anyway
    assert retried.returncode == 2 and len(ray_cli.submissions()) == 1


def test_exit_code_1_is_retried_with_the_same_command_under_the_next_id(ray_cli):
    ray_cli.distinf([1, 0])
    assert ray_cli.submitter().returncode == 1
    assert ray_cli.submitter().returncode == 0
    (first_id, first), (second_id, second) = ray_cli.submissions()
    assert (first_id, second_id) == (f"distinf-nightly-{FakeRay.NIGHT}-1", f"distinf-nightly-{FakeRay.NIGHT}-2")
    assert first == second and "--append-to" in distinf_args(second)
    assert ray_cli.submitter().returncode == 0 and len(ray_cli.submissions()) == 2


def test_a_job_that_failed_without_an_exit_code_counts_as_a_runtime_failure(ray_cli):
    ray_cli.job(1, status="FAILED", logs="driver lost\n")            # killed driver: no marker line
    assert ray_cli.submitter().returncode == 0
    assert [i for i, _ in ray_cli.submissions()] == [f"distinf-nightly-{FakeRay.NIGHT}-2"]


def test_a_job_stuck_pending_is_stopped_and_counted_as_a_runtime_failure(ray_cli):
    ray_cli.job(1, status="PENDING")
    result = ray_cli.submitter(PENDING_DEADLINE="-1")
    assert result.returncode == 1 and "PENDING" in result.stderr
    assert any(c[:2] == ["job", "stop"] for c in ray_cli.calls())


def test_a_job_stopped_by_an_operator_is_not_retried(ray_cli):
    ray_cli.job(1, status="STOPPED")
    assert ray_cli.submitter().returncode == 3 and ray_cli.submissions() == []


def test_the_ray_cli_says_what_the_submitter_reads():
    """The fake above answers as the Ray the image pins; check that Ray's CLI still words it so."""
    import ray
    import ray.dashboard.modules.job.cli as job_cli

    version, _ = dockerfile_ray_version()
    if ray.__version__ != version:
        pytest.skip(f"installed Ray {ray.__version__} is not the image's {version}")
    source = Path(job_cli.__file__).read_text()
    for phrase in ("f\"Job '{job_id}' succeeded\"", "f\"Job '{job_id}' was stopped\"", "f\"Job '{job_id}' failed\"",
                   "f\"Status for job '{job_id}': {info.status}\"", '"--submission-id"', '"--no-wait"', '"--follow"',
                   "shlex.join(entrypoint)"):
        assert phrase in source, phrase
