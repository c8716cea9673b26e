"""The nightly submitter: `python -m distinf.nightly_submitter`, run by the CronJob
(cluster/kuberay/nightly-cronjob.yaml) in the distinf image. It submits

    distinf run $JOB_FILE --append-to $RUN_DIR --set output.path=$RUN_DIR $DISTINF_ARGS

to the RayCluster's Jobs API once per night, follows it, and exits with a code the Kubernetes Job
around it acts on:
    0  the run (or append) is complete
    1  a runtime failure (distinf exit 1, a lost driver or node, an unreachable head, a job stuck
       PENDING, the deadline, SIGTERM): retried; the retry submits the same command, and
       --append-to finishes the failed append
    2  configuration, data or model error (distinf exit 2): not retried (podFailurePolicy FailJob)
    3  the Ray job this submitter followed was stopped by someone else (`ray job stop`): not retried

Everything is read from the Jobs API's structured answers (`JobStatus`, `driver_exit_code`), never
from log text. Idempotent, as KubeRay's own submitter: each night's Ray jobs have the submission
ids $SUBMISSION_PREFIX-$NIGHT-N (N = 1, 2, ... one per attempt). A (re)started submitter walks them
in order: one that succeeded ends the night; one pending or running is followed, never submitted
twice; one that failed with exit code 2 fails the night; one that failed otherwise, or was stopped,
is a spent attempt; the first id not used yet is submitted.

On SIGTERM (pod deleted or evicted, the Job's activeDeadlineSeconds) and at DEADLINE_SECONDS the
submitter stops the Ray job it follows before it exits, so that no driver keeps running, and
holding the run directory's lease, with nobody watching it.

Environment: RAY_ADDRESS (http://HEAD-SVC:8265), RAY_AUTH_MODE/RAY_AUTH_TOKEN when the cluster uses
token auth, RUN_DIR (s3://...), JOB_FILE (default /app/jobs/nightly.yaml), DISTINF_ARGS (more
arguments for distinf run, split as a shell would), NIGHT (default today's UTC date),
SUBMISSION_PREFIX (distinf-nightly), MAX_ATTEMPTS (5), POLL_SECONDS (30), PENDING_DEADLINE (900 s a
job may stay PENDING), DEADLINE_SECONDS (42900: a little less than the Job's activeDeadlineSeconds).
"""

from __future__ import annotations

import os
import shlex
import signal
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable

OK, RUNTIME_FAILURE, CONFIG_ERROR, STOPPED_BY_OPERATOR = 0, 1, 2, 3


class Terminated(BaseException):
    """SIGTERM arrived: stop the submitted or followed job, then exit. A BaseException, so that no
    `except Exception` around a Jobs API call swallows it."""


def log(message: str) -> None:
    print(f"submit-nightly: {message}", file=sys.stderr, flush=True)


@dataclass
class Settings:
    run_dir: str
    job_file: str = "/app/jobs/nightly.yaml"
    distinf_args: list[str] = field(default_factory=list)
    night: str = ""
    prefix: str = "distinf-nightly"
    max_attempts: int = 5
    poll_seconds: float = 30.0
    pending_deadline: float = 900.0
    deadline_seconds: float = 42900.0

    @classmethod
    def from_env(cls, env: dict[str, str]) -> "Settings":
        missing = [name for name in ("RAY_ADDRESS", "RUN_DIR") if not env.get(name)]
        if missing:
            raise ValueError(f"set {' and '.join(missing)} (e.g. RAY_ADDRESS=http://distinf-head-svc:8265, "
                             "RUN_DIR=s3://bucket/distinf/nightly)")
        try:
            return cls(
                run_dir=env["RUN_DIR"], job_file=env.get("JOB_FILE", cls.job_file),
                distinf_args=shlex.split(env.get("DISTINF_ARGS", "")),
                night=env.get("NIGHT") or datetime.now(timezone.utc).strftime("%Y-%m-%d"),
                prefix=env.get("SUBMISSION_PREFIX", cls.prefix),
                max_attempts=int(env.get("MAX_ATTEMPTS", cls.max_attempts)),
                poll_seconds=float(env.get("POLL_SECONDS", cls.poll_seconds)),
                pending_deadline=float(env.get("PENDING_DEADLINE", cls.pending_deadline)),
                deadline_seconds=float(env.get("DEADLINE_SECONDS", cls.deadline_seconds)),
            )
        except ValueError as error:
            raise ValueError(f"a numeric setting is not a number: {error}") from None

    def entrypoint(self) -> str:
        """The Ray job's shell command: distinf itself, so that its exit code is the driver's."""
        return shlex.join(["distinf", "run", self.job_file, "--append-to", self.run_dir,
                           "--set", f"output.path={self.run_dir}", *self.distinf_args])

    def submission_id(self, attempt: int) -> str:
        return f"{self.prefix}-{self.night}-{attempt}"


class Night:
    """One night's walk over its submission ids against a `JobSubmissionClient`."""

    def __init__(self, client, settings: Settings, clock: Callable[[], float] = time.monotonic):
        self.client, self.settings, self.clock = client, settings, clock
        self.started = clock()
        self.current: str | None = None  # the id submitted or followed, stopped on SIGTERM

    def run(self) -> int:
        try:
            return self.walk()
        except Terminated:
            if self.current is None:
                log("SIGTERM before any job was submitted or followed")
                return RUNTIME_FAILURE
            return self.stop(self.current, "SIGTERM")

    def walk(self) -> int:
        from ray.job_submission import JobStatus

        jobs = {job.submission_id: job for job in self.client.list_jobs() if job.submission_id}
        for attempt in range(1, self.settings.max_attempts + 1):
            sid = self.settings.submission_id(attempt)
            job = jobs.get(sid)
            if job is None:
                self.current = sid
                log(f"submitting {sid}: {self.settings.entrypoint()}")
                try:
                    self.client.submit_job(entrypoint=self.settings.entrypoint(), submission_id=sid)
                except Exception as error:  # head unreachable, or the id taken meanwhile by another submitter
                    log(f"could not submit {sid}: {error}; retried")
                    return RUNTIME_FAILURE
                return self.follow(sid)
            if job.status == JobStatus.SUCCEEDED:
                log(f"{sid} already succeeded")
                return OK
            if job.status == JobStatus.FAILED and job.driver_exit_code == CONFIG_ERROR:
                return self.outcome(sid, job)
            if job.status in (JobStatus.FAILED, JobStatus.STOPPED):
                log(f"{sid} ended {job.status.value} (driver exit code {job.driver_exit_code}): a spent attempt; "
                    "the next one continues it")
                continue
            log(f"{sid} is {job.status.value}: following it, not submitting again")
            self.current = sid
            return self.follow(sid)
        log(f"all {self.settings.max_attempts} attempts of {self.settings.night} are spent; "
            "run the command by hand after reading their logs")
        return RUNTIME_FAILURE

    def follow(self, sid: str) -> int:
        """Poll `sid` to its end, printing its new log lines; stop it at a deadline or on SIGTERM."""
        from ray.job_submission import JobStatus

        printed, pending_since = 0, self.clock()
        while True:
            job = self.client.get_job_info(sid)
            printed = self.print_logs(sid, printed)
            if job.status.is_terminal():
                return self.outcome(sid, job)
            now = self.clock()
            if job.status != JobStatus.PENDING:
                pending_since = now
            elif now - pending_since > self.settings.pending_deadline:
                return self.stop(sid, f"still PENDING after {self.settings.pending_deadline:g} s")
            if now - self.started > self.settings.deadline_seconds:
                return self.stop(sid, f"the submitter's deadline of {self.settings.deadline_seconds:g} s passed")
            time.sleep(self.settings.poll_seconds)

    def print_logs(self, sid: str, printed: int) -> int:
        try:
            logs = self.client.get_job_logs(sid)
        except Exception:  # logs are for people; their absence changes nothing
            return printed
        if len(logs) > printed:
            sys.stdout.write(logs[printed:])
            sys.stdout.flush()
        return len(logs)

    def stop(self, sid: str, why: str) -> int:
        log(f"{why}: stopping {sid} (a runtime failure, retried)")
        try:
            self.client.stop_job(sid)
        except Exception as error:
            log(f"could not stop {sid}: {error}")
        return RUNTIME_FAILURE

    @staticmethod
    def outcome(sid: str, job) -> int:
        from ray.job_submission import JobStatus

        if job.status == JobStatus.SUCCEEDED:
            log(f"{sid} succeeded")
            return OK
        if job.status == JobStatus.STOPPED:
            log(f"{sid} was stopped by an operator; not retried")
            return STOPPED_BY_OPERATOR
        if job.driver_exit_code == CONFIG_ERROR:
            log(f"{sid} failed with exit code 2 (configuration, data or model error): not retried")
            return CONFIG_ERROR
        log(f"{sid} failed (driver exit code {job.driver_exit_code}, {job.message}): a runtime failure, retried "
            "with the same command")
        return RUNTIME_FAILURE


def main(env: dict[str, str] | None = None) -> int:
    env = dict(os.environ if env is None else env)
    try:
        settings = Settings.from_env(env)
    except ValueError as error:
        log(str(error))
        return CONFIG_ERROR

    def terminate(signum, frame):
        raise Terminated()

    signal.signal(signal.SIGTERM, terminate)
    from ray.job_submission import JobSubmissionClient

    try:
        client = JobSubmissionClient(env["RAY_ADDRESS"])
        return Night(client, settings).run()
    except Terminated:
        log("SIGTERM before the Jobs API answered")
        return RUNTIME_FAILURE
    except Exception as error:  # the head is unreachable or answers with an error: worth a retry
        log(f"the Jobs API at {env['RAY_ADDRESS']} failed: {type(error).__name__}: {error}")
        return RUNTIME_FAILURE


if __name__ == "__main__":
    sys.exit(main())
