"""The nightly submitter (distinf.nightly_submitter) against a real local Ray head's Jobs API.

The head's PATH holds a fake `distinf` that exits with the codes a test queues (or sleeps), so each
test costs a Ray job's start, not a distinf run; the real entrypoint string is what is submitted."""

import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from distinf import nightly_submitter

pytestmark = pytest.mark.distributed
VENV_BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]
RUN_DIR = "s3://bucket/distinf/nightly"

FAKE_DISTINF = """#!/usr/bin/env bash
echo "$*" >> {dir}/calls
code=$(head -n 1 {dir}/codes); sed -i 1d {dir}/codes
if [[ $code == sleep ]]; then exec sleep 600; fi
exit "${{code:-0}}"
"""


@pytest.fixture(scope="module")
def head():
    """A Ray head with the Jobs API on 127.0.0.1; yields (address, the fake distinf's folder)."""
    temp = Path(tempfile.mkdtemp(prefix="rs", dir="/tmp"))  # short: Ray's socket paths have a length limit
    fake = temp / "bin"
    fake.mkdir()
    (fake / "distinf").write_text(FAKE_DISTINF.format(dir=fake))
    (fake / "distinf").chmod(0o755)
    (fake / "codes").write_text("")
    env = {**os.environ, "PATH": f"{fake}:{VENV_BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "disabled"}
    subprocess.run([VENV_BIN / "ray", "start", "--head", "--node-ip-address=127.0.0.1", "--port=6393",
                    "--num-cpus=2", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                    "--dashboard-port=8293", "--metrics-export-port=8294", f"--temp-dir={temp}",
                    "--disable-usage-stats"],
                   check=True, env=env, capture_output=True)
    try:
        from ray.job_submission import JobSubmissionClient

        address = "http://127.0.0.1:8293"
        client = JobSubmissionClient(address)
        started = time.time()
        while True:  # the job agent may come up a little after `ray start` returns
            try:
                client.submit_job(entrypoint="true")
                break
            except RuntimeError as error:
                if "No available agent" not in str(error) or time.time() - started > 120:
                    raise
                time.sleep(2)
        yield address, fake
    finally:
        # Stop only this head's processes (`ray stop` would stop every Ray on the machine).
        subprocess.run(["pkill", "-9", "-f", str(temp)], capture_output=True)
        shutil.rmtree(temp, ignore_errors=True)


def env_for(head, night, **more):
    address, _ = head
    return {**os.environ, "RAY_ADDRESS": address, "RAY_AUTH_MODE": "disabled", "RUN_DIR": RUN_DIR,
            "NIGHT": night, "POLL_SECONDS": "0.5", "DISTINF_ARGS": "--set runtime.num_workers=16", **more}


def queue(head, *codes):
    (head[1] / "codes").write_text("".join(f"{c}\n" for c in codes))


def jobs_of(head, night):
    from ray.job_submission import JobSubmissionClient

    jobs = JobSubmissionClient(head[0]).list_jobs()
    return {j.submission_id: j for j in jobs if j.submission_id and f"-{night}-" in j.submission_id}


def wait_for(predicate, timeout=90):
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline
        time.sleep(0.5)


def test_the_nightly_append_is_submitted_once_under_a_stable_id(head):
    queue(head, 0)
    assert nightly_submitter.main(env_for(head, "2026-01-01")) == 0
    [(sid, job)] = jobs_of(head, "2026-01-01").items()
    assert sid == "distinf-nightly-2026-01-01-1" and job.driver_exit_code == 0
    assert shlex.split(job.entrypoint) == ["distinf", "run", "/app/jobs/nightly.yaml", "--append-to", RUN_DIR,
                                           "--set", f"output.path={RUN_DIR}", "--set", "runtime.num_workers=16"]
    # A retried pod, or a second CronJob run the same night: nothing is submitted again.
    assert nightly_submitter.main(env_for(head, "2026-01-01")) == 0
    assert len(jobs_of(head, "2026-01-01")) == 1


def test_exit_code_2_fails_the_night_and_is_never_resubmitted(head):
    queue(head, 2, 0)
    assert nightly_submitter.main(env_for(head, "2026-01-02")) == 2
    assert nightly_submitter.main(env_for(head, "2026-01-02")) == 2   # had the Job retried anyway
    assert list(jobs_of(head, "2026-01-02")) == ["distinf-nightly-2026-01-02-1"]


def test_exit_code_1_is_retried_with_the_same_command_under_the_next_id(head):
    queue(head, 1, 0)
    assert nightly_submitter.main(env_for(head, "2026-01-03")) == 1
    assert nightly_submitter.main(env_for(head, "2026-01-03")) == 0
    jobs = jobs_of(head, "2026-01-03")
    assert sorted(jobs) == ["distinf-nightly-2026-01-03-1", "distinf-nightly-2026-01-03-2"]
    first, second = (jobs[f"distinf-nightly-2026-01-03-{n}"] for n in (1, 2))
    assert (first.driver_exit_code, second.driver_exit_code) == (1, 0)
    assert first.entrypoint == second.entrypoint


def test_the_deadline_stops_the_ray_job(head):
    from ray.job_submission import JobStatus

    queue(head, "sleep")
    started = time.time()
    assert nightly_submitter.main(env_for(head, "2026-01-04", DEADLINE_SECONDS="3")) == 1
    assert time.time() - started < 60
    wait_for(lambda: jobs_of(head, "2026-01-04")["distinf-nightly-2026-01-04-1"].status == JobStatus.STOPPED)


def submitter_process(head, night):
    return subprocess.Popen([sys.executable, "-m", "distinf.nightly_submitter"], env=env_for(head, night),
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigterm_stops_the_ray_job_and_a_restarted_submitter_continues_with_the_next_attempt(head):
    from ray.job_submission import JobStatus

    queue(head, "sleep")
    process = submitter_process(head, "2026-01-05")
    sid = "distinf-nightly-2026-01-05-1"
    wait_for(lambda: sid in jobs_of(head, "2026-01-05") and jobs_of(head, "2026-01-05")[sid].status == JobStatus.RUNNING)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 1, stderr
    assert "SIGTERM" in stderr
    wait_for(lambda: jobs_of(head, "2026-01-05")[sid].status == JobStatus.STOPPED)
    queue(head, 0)  # the Job's retry: the stopped attempt is spent, the next id runs the same command
    assert nightly_submitter.main(env_for(head, "2026-01-05")) == 0
    assert sorted(jobs_of(head, "2026-01-05")) == [sid, "distinf-nightly-2026-01-05-2"]


def test_a_job_stopped_by_an_operator_while_followed_is_not_retried(head):
    from ray.job_submission import JobStatus, JobSubmissionClient

    queue(head, "sleep")
    process = submitter_process(head, "2026-01-06")
    sid = "distinf-nightly-2026-01-06-1"
    wait_for(lambda: sid in jobs_of(head, "2026-01-06") and jobs_of(head, "2026-01-06")[sid].status == JobStatus.RUNNING)
    JobSubmissionClient(head[0]).stop_job(sid)  # `ray job stop`
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 3, stderr


def test_missing_settings_are_a_configuration_error():
    assert nightly_submitter.main({"RUN_DIR": RUN_DIR}) == 2


def test_the_metrics_reach_prometheus_under_the_names_the_readme_gives(head):
    """distinf's metrics recorded on a real Ray node, scraped from its metrics agent as Prometheus
    would: every exported name the README and docs/ document is there (ray_ prefix, _total on counters)."""
    import re
    import urllib.request

    import ray

    from distinf.runtime import metrics

    docs = "".join(path.read_text() for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))])
    documented = set(re.findall(r"`(ray_distinf_[a-z_]+)`", docs))
    assert {"ray_distinf_examples_done_total", "ray_distinf_examples_planned",
            "ray_distinf_last_success_timestamp_seconds"} <= documented
    ray.init(address="127.0.0.1:6393", log_to_driver=False)
    metrics.reset()
    try:
        job = "metrics-test"
        deadline = time.time() + 90
        while True:  # record again each round: the agent may not be listening yet at first
            metrics.examples_done(job, "train", 3)
            metrics.chunks_committed(job, "train", 1)
            metrics.restarted(job, "gradients")
            metrics.stage_seconds(job, "gradients", 2.5)
            metrics.examples_progress(job, "train", 3, 10)
            metrics.stage_progress(job, "scoring", 1, 4)
            metrics.succeeded(job, 1.7e9)
            text = urllib.request.urlopen("http://127.0.0.1:8294/metrics", timeout=10).read().decode()
            exported = {name for name in re.findall(r"^(ray_distinf_[a-z_]+)\{", text, re.M)
                        if f'job="{job}"' in text}
            if documented <= exported or time.time() > deadline:
                break
            time.sleep(3)
        assert documented <= exported, (documented - exported, sorted(exported))
        assert exported <= documented, exported - documented  # nothing exported goes undocumented
        assert re.search(r'^ray_distinf_examples_planned\{[^}]*split="train"[^}]*\} 10(\.0)?$', text, re.M)
    finally:
        metrics.reset()
        ray.shutdown()
