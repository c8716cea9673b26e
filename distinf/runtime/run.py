"""The one owner of a run directory while a job works in it (`distinf run`, and `distinf query`
into its own output folder).

A `Run` holds the folder's lease, and with it the fencing token; the job's manifest, which only
it writes; and the clock of the job's stages. The stages ask it by intent: `begin`, then
`adopt_index_set`, `record_workers`, `record_restart`, `note`, and at the end `publish` (a run's
new version) or `complete` (a query's results); `fail` whatever stopped the job. Workers get a
`RunView`, the folder and the fence, picklable. The files themselves are the folder's
(`RunDir`: where each lives, the ledger, the allow-lists), and the versions' switch is
runtime.versions.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import pyarrow as pa

from distinf.config import RuntimeConfig
from distinf.runtime import metrics, versions
from distinf.runtime.errors import JobError, terminated_as_error, unwritable
from distinf.runtime.history import append_history
from distinf.runtime.layout import INDEX_SET
from distinf.runtime.lease import Fence, Lease, acquire, tick, tick_window
from distinf.runtime.manifest import Manifest
from distinf.runtime.run_dir import RunDir
from distinf.store import IntegrityError, atomic_write_table, file_sha256, is_file, read_verified_table

__all__ = ["Run", "RunView"]

log = logging.getLogger("distinf.driver")


@dataclass(frozen=True)
class RunView:
    """What a worker needs of the run it writes for: the folder, and the fence it checks before
    each commit (a holder whose lease was taken over commits nothing more)."""

    root: str
    fence: Fence


class Run:
    """A run directory held by this job: its lease, its manifest and its stages' clock."""

    def __init__(self, folder: RunDir, lease: Lease, job: str):
        self.folder, self.job = folder, job
        self._lease = lease
        self._manifest: Manifest | None = None
        self.timings: dict[str, float] = {}
        self._clock = time.perf_counter()

    @classmethod
    @contextlib.contextmanager
    def open(cls, path: str | Path, job: str, purpose: str, key: str, runtime: RuntimeConfig) -> Iterator[Run]:
        """Hold the folder at `path` (named by the job-file or command-line `key` in errors) for the
        block: LeaseHeld while another job works there. SIGTERM inside it is an error like any other."""
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
                yield cls(folder, lease, job)
        finally:
            lease.release()

    def __str__(self) -> str:
        return str(self.folder)

    @property
    def root(self) -> Path:
        return self.folder.root

    @property
    def run_id(self) -> str:
        return self._lease.run_id

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
        self.folder.check_lease()
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
        """Leave a "failed" manifest, never "running", whatever stopped the job (runtime.run_dir)."""
        if self._manifest is not None:
            self.folder.mark_failed(self._manifest, error)

    def complete(self, manifest: Manifest) -> dict:
        """A query's results: its manifest says "complete", last."""
        self._write(manifest)
        return manifest.to_dict()

    def publish(self, manifest: Manifest, version: Path, committed: str | None, keep: int,
                staged: dict[str, str]) -> dict:
        """Commit the version staged whole in `version` (runtime.versions): the manifest says
        "complete" for it in one write, the switch; then its completion marker, the pruning of old
        versions and the root copies, which may lag, and the score history."""
        manifest = replace(manifest, version=manifest.run_id,
                           history=versions.history(self.root, committed, keep, manifest.run_id),
                           files={INDEX_SET: file_sha256(self.folder.path(INDEX_SET)), **staged})
        self._write(manifest)  # the commit point
        versions.finish(self.root, manifest.to_dict())
        metrics.succeeded(self.job, time.time())
        try:  # complete versions only; after the commit, so a failure here never unmakes a complete run
            append_history(self.root, version, manifest.run_id, manifest.as_of)
        except OSError as error:
            log.warning(f"version {manifest.run_id} is complete but its score history was not written: {error}",
                        extra={"event": "history_not_written"})
        return manifest.to_dict()

    def _write(self, manifest: Manifest | None = None) -> None:
        """Write `manifest` (default: the current one, changed); only once written is it the job's:
        a job stopped by a failed write still leaves its last written state "failed"."""
        manifest = manifest or self.manifest
        self.folder.write_manifest(manifest)
        self._manifest = manifest
