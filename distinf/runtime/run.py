"""The one owner of a run directory while a job works in it (`distinf run`, and `distinf query`
into its own output folder).

`Run.open(path, mode, ...)` takes the folder's lease, and with it the fencing token, and answers
once what the folder holds for a job of that mode: nothing (a new run), a run to resume, a
complete run to append to, or an earlier query's results. The Run then holds the job's manifest,
which only it writes, and the clock of the job's stages. The stages ask it by intent: `begin`,
then `adopt_index_set`, `record_workers`, `record_restart`, `note`, and at the end `publish` (a
run's new version) or `complete` (a query's results); `fail` whatever stopped the job. Workers get
a `RunView`, the folder and the fence, picklable. Where each file lives, reading the manifest and
the ledger, and the allow-lists are the folder's (`RunDir`); the versions' switch is
runtime.versions.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, Literal

import pyarrow as pa

from distinf.config import RuntimeConfig
from distinf.runtime import metrics, versions
from distinf.runtime.errors import JobError, Refused, terminated_as_error, unwritable
from distinf.runtime.history import append_history
from distinf.runtime.incremental import Base, open_for_append
from distinf.runtime.layout import INDEX_SET, SPLITS
from distinf.runtime.lease import Fence, Lease, LeaseLost, acquire, tick, tick_window
from distinf.runtime.manifest import Manifest
from distinf.runtime.run_dir import NotResumable, RunDir, check_appendable, check_free_space, check_resumable
from distinf.store import (IntegrityError, atomic_write_json, atomic_write_table, file_sha256, is_file, make_folder,
                           read_verified_table, remove)

__all__ = ["Mode", "Run", "RunView"]

log = logging.getLogger("distinf.driver")

Mode = Literal["new", "resume", "append", "query"]
"""What a job does in the folder: start a run in an empty one, resume the run there, append to
the complete run there (`distinf run --append-to`), or write a query's results (`distinf query`)."""


@dataclass(frozen=True)
class RunView:
    """What a worker needs of the run it writes for: the folder, and the fence it checks before
    each commit (a holder whose lease was taken over commits nothing more)."""

    root: str
    fence: Fence


class Run:
    """A run directory held by this job: its lease, what it held when the job opened it, the job's
    manifest and its stages' clock."""

    def __init__(self, folder: RunDir, lease: Lease, job: str):
        self.folder, self.job = folder, job
        self._lease = lease
        self.mode: Mode = "new"
        self.stored: Manifest | None = None
        """The manifest the folder held: the run to resume, the stored run an append extends (or the
        unfinished append's), an earlier query's; None for an unused folder."""
        self.base: Base | None = None
        """What an append starts from (mode "append")."""
        self.unused = True
        """The folder held no run when the job opened it (nothing, or only its lease)."""
        self.first_night = False
        """An append found a failed first run and resumes it (mode "resume"), as --resume would."""
        self._manifest: Manifest | None = None
        self.timings: dict[str, float] = {}
        self._clock = time.perf_counter()

    @classmethod
    @contextlib.contextmanager
    def open(cls, path: str | Path, mode: Mode, job: str, purpose: str, runtime: RuntimeConfig,
             key: str = "output.path") -> Iterator[Run]:
        """Hold the folder at `path` (named by the job-file or command-line `key` in errors) for the
        block, and find what it holds for a job of `mode`: LeaseHeld while another job works there,
        a JobError when it holds something this job may not work on. SIGTERM inside the block is
        an error like any other."""
        folder = RunDir.at(path)
        if is_file(folder.root):
            raise JobError(f"{key}: '{folder}' is a file, not a folder")
        try:
            lease = acquire(folder.root, purpose, runtime.lease_seconds,
                            tick_window=tick_window(runtime.stall_timeout, runtime.lease_seconds))
        except OSError as error:
            raise unwritable(folder.root, key, error) from None
        try:
            with terminated_as_error():
                run = cls(folder, lease, job)
                run._find(mode, key)
                yield run
        finally:
            lease.release()

    def _find(self, mode: Mode, key: str) -> None:
        """What the folder holds for a job of `mode`, checked before anything in it is touched;
        then the folder made (if local), checked writable, and cleared of what a killed writer left."""
        folder = self.folder
        self.unused = folder.is_unused()
        if mode == "append" and self.unused:  # the first night of a schedule: nothing to append to yet
            log.info(f"'{folder}' holds no run yet; starting one there", extra={"event": "first_run"})
            mode = "new"
        elif mode == "append" and not _has_complete_version(folder):  # a failed first night: resume it
            log.info(f"'{folder}' holds no complete version yet; resuming the run there",
                     extra={"event": "first_run_resumed"})
            mode, self.first_night = "resume", True
        self.mode = mode
        if mode == "append":
            self.stored, self.base = open_for_append(folder)
            key = "--append-to"
        elif mode == "query":
            self.stored = None if self.unused else _readable_manifest(folder)
        elif not self.unused:
            if mode == "new":
                raise JobError(f"output.path: '{folder}' is not empty; choose a new output folder, or pass "
                               "--resume to continue the run in it")
            with self._first_night():
                self.stored = folder.stored_manifest("--resume")
            if self.stored.append is not None:
                raise JobError(f"--resume: '{folder}' holds an unfinished append; finish it by running "
                               f"`distinf run JOB --append-to {folder}` again")
        try:  # create the folder if it is local, and write and delete a probe file in it
            make_folder(self.root)
            remove(atomic_write_json({}, self.root / ".write-probe"))
        except OSError as error:
            raise unwritable(self.root, key, error) from None
        if self.stored is not None:
            folder.remove_leftovers()

    @contextlib.contextmanager
    def _first_night(self) -> Iterator[None]:
        """A failed first night that this job cannot resume stops the schedule, naming the command
        that moves the folder aside (retrying cannot help: Refused)."""
        try:
            yield
        except NotResumable as error:
            if not self.first_night:
                raise
            raise Refused(f"{error}. The folder holds a failed first run that this job cannot resume, so no "
                          "night's append can go on until it is moved aside: run "
                          f"`{self.folder.move_aside_command()}`, and the next append starts a new run there"
                          ) from None

    def check_same_job(self, config: dict, model: str, data: dict[str, str]) -> None:
        """Refuse a job that would not compute what the stored run did: a resume and an append each
        have their allow-list of keys that may change (runtime.run_dir)."""
        if self.mode == "append":
            check_appendable(self.base.manifest, config, model, data["queries"], self.folder)
        elif self.stored is not None:
            with self._first_night():
                check_resumable(self.stored, config, model, data, self.folder)

    def check_room(self, writes: int) -> None:
        """Refuse to start unless the folder has room for the `writes` bytes the job writes, less
        the gradient chunks a resumed run holds already."""
        if self.mode == "resume":
            writes -= sum(self.folder.gradient_bytes(s) for s in SPLITS)
        check_free_space(self.root, writes)

    def __str__(self) -> str:
        return str(self.folder)

    @property
    def root(self) -> Path:
        return self.folder.root

    @property
    def run_id(self) -> str:
        return self._lease.run_id

    @property
    def version_dir(self) -> Path:
        """Where this job stages the version it publishes last (runtime.versions)."""
        return self.folder.version_dir(self.run_id)

    @property
    def manifest(self) -> Manifest:
        """The manifest as this job last wrote it; change it only through the methods below."""
        if self._manifest is None:
            raise JobError("the run has not begun: no manifest yet")
        return self._manifest

    def view(self) -> RunView:
        return RunView(str(self.root), self._lease.fence())

    # -- the stages' clock -------------------------------------------------------------------------

    def lap(self, stage: str) -> None:
        """`stage` is done: its wall time goes to the manifest, the log and the metrics."""
        tick()
        now = time.perf_counter()
        self.timings[stage] = round(now - self._clock, 3)
        self._clock = now
        metrics.stage_seconds(self.job, stage, self.timings[stage])
        log.info(f"stage {stage} done in {self.timings[stage]:.1f} s",
                 extra={"event": "stage_done", "stage": stage, "seconds": self.timings[stage]})

    # -- the manifest, written by this job only ------------------------------------------------------

    def begin(self, manifest: Manifest) -> None:
        """The job's manifest, "running", before anything else in the folder is touched."""
        manifest.run_id = self.run_id
        manifest.as_of = manifest.as_of or versions.now().isoformat()
        self._manifest = manifest  # failed, if even this write fails
        self._write()

    def stored_index_set(self) -> pa.Table | None:
        """The index set an earlier attempt wrote, if it is intact and the worker layout is known."""
        manifest = self.manifest
        if not manifest.index_set_sha256 or not manifest.workers:
            return None
        try:
            return read_verified_table(self.folder.path(INDEX_SET), manifest.index_set_sha256)
        except IntegrityError:
            return None

    def adopt_index_set(self, infos: list[dict]) -> pa.Table:
        """Check the workers' index set against the run's, write it, and note the worker layout."""
        manifest, first = self.manifest, infos[0]
        if manifest.index_set_hash not in (None, first["index_set_hash"]):
            raise JobError("the index set drawn now differs from the one the stored run was computed with "
                           "(another distinf, numpy or model version, or compression settings?); choose a new "
                           "output folder")
        path = self.folder.path(INDEX_SET)
        self._lease.check()
        if not is_file(path) or file_sha256(path) != manifest.index_set_sha256:
            atomic_write_table(first["index_set"], path)
        manifest.index_set_hash, manifest.index_set_sha256 = first["index_set_hash"], file_sha256(path)
        manifest.params = {"total": first["total_params"], "tracked": first["tracked_params"],
                           "tracked_fraction": first["tracked_params"] / first["total_params"]}
        manifest.workers = [{"rank": i["rank"], "host": i["host"], "node_ip": i["node_ip"], "node_id": i["node_id"],
                             "local_params": i["local_params"], "dtype": i["dtype"],
                             "weight_check": i["weight_check"], "setup_seconds": i["setup_seconds"],
                             "memory": i["memory"]} for i in infos]
        self._write()
        return first["index_set"]

    def record_workers(self, peaks: list[dict], timings: list[dict]) -> None:
        """Each rank's peak memory in the gradient pass (beside its setup peak; bytes, None where the
        platform does not say) and where its time went: steps, and waits on commits."""
        for worker, peak, spent in zip(self.manifest.workers, peaks, timings):
            worker["memory"] = {**worker.get("memory", {}), **peak}
            worker["gradient_pass"] = spent
        self._write()

    def record_restart(self, stage: str, attempt: int, worker: str | None, error: str) -> None:
        self.manifest.restarts.append({"stage": stage, "attempt": attempt, **({"worker": worker} if worker else {}),
                                       "error": error})
        metrics.restarted(self.job, stage)
        self._write()

    def note(self, **fields) -> None:
        """Fields the next write of the manifest carries (how the curvature was formed, say)."""
        for key, value in fields.items():
            setattr(self.manifest, key, value)

    def fail(self, error: BaseException) -> None:
        """Leave a "failed" manifest, never "running", whatever stopped the job; but never over the
        version this very job committed already (stopped while finishing it: runtime.versions)."""
        manifest = self._manifest
        if manifest is None:
            return
        try:
            current = self.folder.read_manifest()
            if current is not None and current.status == "complete" and current.run_id == manifest.run_id:
                return
        except (OSError, ValueError):
            pass
        try:
            self._lease.write_manifest(replace(manifest, status="failed", error=str(error)).to_dict())
        except (OSError, LeaseLost):
            pass  # the error being reported may be this very disk, or the lease itself

    def complete(self, manifest: Manifest) -> dict:
        """A query's results: its manifest says "complete", last."""
        self._write(manifest)
        return manifest.to_dict()

    def publish(self, manifest: Manifest, committed: str | None, keep: int, staged: dict[str, str]) -> dict:
        """Commit the version staged whole in `version_dir` (runtime.versions): the manifest says
        "complete" for it in one write, the switch; then its completion marker, the pruning of old
        versions and the root copies, which may lag, and the score history."""
        manifest = replace(manifest, version=manifest.run_id,
                           history=versions.history(self.root, committed, keep, manifest.run_id),
                           files={INDEX_SET: file_sha256(self.folder.path(INDEX_SET)), **staged})
        self._write(manifest)  # the commit point
        versions.finish(self.root, manifest.to_dict())
        metrics.succeeded(self.job, time.time())
        try:  # complete versions only; after the commit, so a failure here never unmakes a complete run
            append_history(self.root, self.version_dir, manifest.run_id, manifest.as_of)
        except OSError as error:
            log.warning(f"version {manifest.run_id} is complete but its score history was not written: {error}",
                        extra={"event": "history_not_written"})
        return manifest.to_dict()

    def _write(self, manifest: Manifest | None = None) -> None:
        """Write `manifest` (default: the current one, changed); only once written is it the job's:
        a job stopped by a failed write still leaves its last written state "failed"."""
        manifest = manifest or self.manifest
        self._lease.write_manifest(manifest.to_dict())
        self._manifest = manifest


def _has_complete_version(folder: RunDir) -> bool:
    try:
        stored = folder.read_manifest()
    except (OSError, ValueError):
        return False
    return stored is not None and stored.last_complete() is not None


def _readable_manifest(folder: RunDir) -> Manifest | None:
    try:
        return folder.read_manifest()
    except (OSError, ValueError):
        return None
