"""One writer per run directory: an exclusive lease, `lease.json`, held while a job writes there,
and the fencing token every write of the job checks.

The lease names its holder (run id, host, pid, what it is doing), carries a heartbeat that a
thread of the holder renews every `ttl / 4` seconds, and a `generation` that grows with every
take (the microseconds of the take, and always past the generation it took over). Every change of
the lease is one compare-and-swap where the bytes live:

- on a local (or NFS) disk, read-compare-write under an exclusive `flock` of `.lease.json.lock`
  (the lease itself is replaced by rename, so it is never seen half-written);
- on S3, a conditional PUT: `If-None-Match: *` to create, `If-Match` the ETag last seen to renew,
  take over or delete. A store that ignores these headers (older MinIO, Ceph) is refused: the
  first take in a run directory probes that a second conditional create fails.

Fencing: the writers of a job (the driver before each manifest, prune, publish, leftover removal
and --discard-pending; every worker before each chunk commit) check first that the lease in the
run directory is still theirs, same run id and generation, and not expired (`Fence`). A holder
whose lease was taken over therefore stops at its next write, with LeaseLost. The check and the
write are two steps: a writer that stalls between them for longer than the ttl can still land one
write, which the reader's checksums (manifest, ledger) then refuse.

The heartbeat renews only while the driver's main loop advances (`tick()`, called by its polling
loops); it retries any error with backoff, and a lease not renewed within `ttl / 2` counts as lost:
the next `tick()` raises LeaseLost in the driver, which stops its worker group.

A lease whose heartbeat is older than its ttl (the holder was killed: SIGKILL, a lost node) is
taken over. An empty or unreadable lease counts as held until its mtime plus the ttl. A holder on
this host, in this PID namespace and this boot, whose pid is gone is stale at once. Clocks of the
hosts are assumed to agree within a few seconds (NTP); the ttl is minutes. Other object stores
(gs://, hdfs://) offer pyarrow no conditional write: there the lease is taken by
write-then-read-back, which narrows but does not close the race.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from distinf.runtime.errors import JobError
from distinf.runtime.layout import LEASE, MANIFEST
from distinf.store import resolve, split_uri, atomic_write_json, display, read_bytes, remove

_held: dict[str, "Lease"] = {}
"""The leases this process holds, by run directory: every manifest write checks its own first."""
_probed: set[str] = set()
"""S3 run directories whose conditional writes were probed by this process."""
log = logging.getLogger("distinf.lease")


class LeaseHeld(JobError):
    """Another live process writes this run directory."""


class LeaseLost(JobError):
    """This process's lease was taken over, expired or could not be renewed: it must stop writing."""


def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ-", time.gmtime()) + uuid.uuid4().hex[:8]


def _namespace() -> dict:
    """What makes a pid mean the same process: this PID namespace and this boot of the host."""
    try:
        pid_ns = str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        pid_ns = None
    try:
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot_id = None
    return {"pid_ns": pid_ns, "boot_id": boot_id}


@dataclass(frozen=True)
class Fence:
    """The fencing token of a held lease, picklable, for every process that writes for its holder:
    `check()` raises LeaseLost unless the run directory's lease is still this one and unexpired."""

    run_dir: str
    run_id: str
    generation: int

    def check(self) -> None:
        current, _, _ = _read(Path(self.run_dir) / LEASE)
        if current is None or (current.get("run_id"), current.get("generation")) != (self.run_id, self.generation):
            raise LeaseLost(f"'{display(self.run_dir)}': run {self.run_id} (generation {self.generation}) no longer "
                            "holds the run directory's lease" + (f"; {describe(current)} does" if current else "")
                            + "; it writes nothing more there")
        if time.time() > float(current.get("expires", 0)):
            raise LeaseLost(f"'{display(self.run_dir)}': the lease of run {self.run_id} expired (its heartbeat "
                            "stopped); it writes nothing more there")


@dataclass
class Lease:
    """A held lease. `renew()` refreshes the heartbeat; `check()` raises LeaseLost once it is gone."""

    run_dir: Path
    run_id: str
    purpose: str
    ttl: float
    generation: int = 0
    tick_window: float | None = None
    """Seconds without a `tick()` of the main loop after which the heartbeat stops renewing."""
    _lost: str | None = None
    _renewed: float = field(default_factory=time.monotonic)
    _ticked: float = field(default_factory=time.monotonic)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    @property
    def path(self) -> Path:
        return self.run_dir / LEASE

    def fence(self) -> Fence:
        return Fence(str(self.run_dir), self.run_id, self.generation)

    def body(self) -> dict:
        now = time.time()
        return {"run_id": self.run_id, "generation": self.generation, "purpose": self.purpose,
                "host": socket.gethostname(), "pid": os.getpid(), **_namespace(),
                "heartbeat": now, "expires": now + self.ttl, "ttl": self.ttl}

    def _lose(self, why: str) -> LeaseLost:
        self._lost = self._lost or why
        return LeaseLost(self._lost)

    def renew(self) -> None:
        """Refresh the heartbeat, if the lease is still this process's (one compare-and-swap)."""
        if self._lost:
            raise LeaseLost(self._lost)
        found = _swap(self.path, self._mine, self.body(), None)
        if found is not None:
            raise self._lose(f"'{display(self.run_dir)}': this run's lease was taken over by "
                             f"{describe(found) if found else 'nobody'} after its heartbeat expired; this run "
                             "stops writing there")
        self._renewed = time.monotonic()

    def _mine(self, current: dict | None) -> bool:
        return current is not None and (current.get("run_id"), current.get("generation")) == \
            (self.run_id, self.generation)

    def check(self) -> None:
        """Raise LeaseLost if the lease is no longer this process's (before any write)."""
        if self._lost:
            raise LeaseLost(self._lost)
        if time.monotonic() - self._renewed > self.ttl / 2:
            raise self._lose(f"'{display(self.run_dir)}': this run's lease was not renewed for "
                             f"{time.monotonic() - self._renewed:.0f} s (half its ttl); this run stops writing there")
        try:
            self.fence().check()
        except LeaseLost as error:
            raise self._lose(str(error)) from None

    def write_manifest(self, manifest: dict) -> None:
        """The one way a job writes a manifest: only while this lease is still held, so that a run
        whose lease was taken over never writes over its successor's manifest. Signed by the run."""
        self.check()
        atomic_write_json({**manifest, "run_id": self.run_id}, Path(self.run_dir) / MANIFEST)

    def tick(self) -> None:
        """The main loop advanced: the heartbeat may go on renewing. LeaseLost if the lease is gone."""
        self._ticked = time.monotonic()
        if self._lost:
            raise LeaseLost(self._lost)
        if time.monotonic() - self._renewed > self.ttl / 2:
            raise self._lose(f"'{display(self.run_dir)}': this run's lease was not renewed for "
                             f"{time.monotonic() - self._renewed:.0f} s (half its ttl); this run stops writing there")

    def start_heartbeat(self) -> None:
        def beat() -> None:
            first_retry = min(1.0, self.ttl / 16)
            delay, backoff = self.ttl / 4, first_retry
            while not self._stop.wait(delay):
                if self.tick_window is not None and time.monotonic() - self._ticked > self.tick_window:
                    self._lose(f"'{display(self.run_dir)}': the driver's main loop made no progress for "
                               f"{self.tick_window:g} s (runtime.stall_timeout); its lease is not renewed")
                    return
                try:
                    self.renew()
                    delay, backoff = self.ttl / 4, first_retry
                except LeaseLost:
                    return
                except Exception as error:  # noqa: BLE001: S3 throttling, an expired token, a network blip
                    if time.monotonic() - self._renewed > self.ttl / 2:
                        self._lose(f"'{display(self.run_dir)}': this run's lease could not be renewed for "
                                   f"{self.ttl / 2:g} s (half its ttl): {type(error).__name__}: {error}")
                        return
                    log.warning(f"could not renew the lease of '{display(self.run_dir)}' ({type(error).__name__}: "
                                f"{error}); retrying", extra={"event": "lease_renew_failed"})
                    delay, backoff = min(backoff, self.ttl / 8), backoff * 2

        self._thread = threading.Thread(target=beat, name="distinf-lease", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop the heartbeat and delete the lease, if it is still this process's."""
        self._stop.set()
        if _held.get(str(self.run_dir)) is self:
            del _held[str(self.run_dir)]
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            _swap(self.path, self._mine, None, None)
        except Exception:  # noqa: BLE001: it expires by itself
            pass

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def held(run_dir: Path) -> Lease:
    """This process's lease on `run_dir`; LeaseLost if it holds none."""
    lease = _held.get(str(run_dir))
    if lease is None:
        raise LeaseLost(f"'{display(run_dir)}': this process holds no lease on it, so it writes nothing there")
    return lease


def check_held(run_dir: Path) -> None:
    """Raise LeaseLost unless this process still holds `run_dir`'s lease: before every mutation."""
    held(run_dir).check()


def tick() -> None:
    """The driver's main loop advanced (called by its polling loops): keeps the heartbeats of the
    leases this process holds going, and raises LeaseLost as soon as one is lost."""
    for lease in list(_held.values()):
        lease.tick()


def tick_window(stall_timeout: float | None, ttl: float) -> float | None:
    """How long a driver's main loop may go without a `tick()` before its heartbeat stops renewing:
    runtime.stall_timeout (a hung loop is a stalled one), never less than a ttl (so that starting
    Ray or planning a large input is never mistaken for a hang); None with no stall timeout."""
    return None if stall_timeout is None else max(stall_timeout, ttl)


def write_manifest(run_dir: Path, manifest: dict) -> None:
    """Write `run_dir`'s manifest through the lease this process holds on it (`Lease.write_manifest`)."""
    held(run_dir).write_manifest(manifest)


def acquire(run_dir: Path, purpose: str, ttl: float, run_id: str | None = None,
            now: Callable[[], float] = time.time, tick_window: float | None = None) -> Lease:
    """Take the run directory's lease, or raise LeaseHeld naming its live holder. `tick_window`:
    renew only while `tick()` was called within that many seconds (None: always)."""
    lease = _take(run_dir, purpose, ttl, run_id, now)
    lease.tick_window = tick_window
    lease._renewed = lease._ticked = time.monotonic()
    lease.start_heartbeat()
    _held[str(run_dir)] = lease
    return lease


def _take(run_dir: Path, purpose: str, ttl: float, run_id: str | None, now: Callable[[], float]) -> Lease:
    if _is_s3(run_dir / LEASE):
        _probe_conditional_writes(run_dir)
    for _ in range(3):
        lease = Lease(run_dir, run_id or new_run_id(), purpose, ttl, generation=int(now() * 1e6))
        current, etag, mtime = _read(lease.path)
        if current is None:
            if _swap(lease.path, lambda found: found is None, lease.body(), None, create=True) is None:
                return lease
            continue  # created by another taker between our read and our create: look again
        if not _stale(current, mtime, ttl, now()):
            expires = float(current.get("expires") or (mtime + ttl))
            raise LeaseHeld(f"'{display(run_dir)}' is being written by {describe(current)}, heartbeat "
                            f"{now() - float(current.get('heartbeat') or mtime):.0f} s ago. One run directory has one "
                            f"writer: wait for it to finish, or, if that process is gone, run again after its lease "
                            f"expires (in {max(0.0, expires - now()):.0f} s)")
        lease.generation = max(lease.generation, int(current.get("generation") or 0) + 1)
        if _swap(lease.path, lambda found: found == current, lease.body(), etag) is None:
            log.warning(f"took over the expired lease of {describe(current)} on '{display(run_dir)}'",
                        extra={"event": "lease_taken_over"})
            return lease
        raise LeaseHeld(f"'{display(run_dir)}': another process is taking over the expired lease of "
                        f"{describe(current)} right now; one run directory has one writer")
    raise LeaseHeld(f"'{display(run_dir)}': the lease keeps changing under this run; one run directory has one writer")


def describe(holder: dict) -> str:
    if holder.get("unreadable"):
        return "an unreadable lease (a writer may be creating it)"
    return (f"run {holder.get('run_id')} ({holder.get('purpose', 'a job')}, pid {holder.get('pid')} on "
            f"{holder.get('host')})")


def _stale(holder: dict, mtime: float | None, ttl: float, now: float) -> bool:
    if holder.get("unreadable"):  # being written, or damaged: held until its mtime plus the ttl
        return now > (mtime or now) + ttl
    same_process_space = holder.get("host") == socket.gethostname() and \
        {k: holder.get(k) for k in ("pid_ns", "boot_id")} == _namespace() and None not in _namespace().values()
    if same_process_space and isinstance(holder.get("pid"), int) and holder["pid"] != os.getpid():
        if not _alive(holder["pid"]):
            return True  # its process in this very PID namespace is gone: no need to wait out the ttl
    return now > float(holder.get("expires", 0))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---------------------------------------------------------------------------------------------
# Storage: compare-and-swap, per backend


def _is_s3(path: Path) -> bool:
    uri = split_uri(path)
    return uri is not None and uri[0] == "s3"


def _s3_client():
    try:
        import boto3
    except ImportError:
        raise JobError("a run directory on S3 needs boto3 for its lease (conditional writes): "
                       "pip install 'distinf[s3]'") from None
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    return boto3.client("s3", region_name=region)  # honours AWS_ENDPOINT_URL(_S3), profiles, roles


def _bucket_key(path: Path) -> tuple[str, str]:
    bucket, _, key = split_uri(path)[1].partition("/")
    return bucket, key


def _precondition_failed(error: Exception) -> bool:
    response = getattr(error, "response", {}) or {}
    return response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict") or \
        response.get("ResponseMetadata", {}).get("HTTPStatusCode") in (409, 412)


def _read(path: Path) -> tuple[dict | None, str | None, float | None]:
    """(lease body, S3 ETag, mtime) or (None, None, None) when there is no lease."""
    if _is_s3(path):
        client = _s3_client()
        bucket, key = _bucket_key(path)
        try:
            got = client.get_object(Bucket=bucket, Key=key)
        except client.exceptions.NoSuchKey:
            return None, None, None
        return _parse(got["Body"].read()), got["ETag"], got["LastModified"].timestamp()
    filesystem, local = resolve(path)
    try:
        if filesystem is None:
            mtime = os.stat(local).st_mtime
        else:
            info = filesystem.get_file_info(local)
            mtime = info.mtime.timestamp() if info.mtime else time.time()
        return _parse(read_bytes(path)), None, mtime
    except FileNotFoundError:
        return None, None, None


def _parse(data: bytes) -> dict:
    try:
        body = json.loads(data.decode("utf-8"))
    except ValueError:
        body = None
    return body if isinstance(body, dict) else {"unreadable": True}


def _encode(body: dict) -> bytes:
    return json.dumps(body, indent=2).encode("utf-8")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive flock on the lease's lock file, for one read-compare-write (never deleted: a
    deleted lock file would let two processes lock two different files)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = os.open(path.with_name(f".{path.name}.lock"), os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        os.close(handle)  # releases the lock


def _swap(path: Path, expected: Callable[[dict | None], bool], body: dict | None, etag: str | None,
          create: bool = False) -> dict | None:
    """Replace the lease by `body` (None: delete it) if the one there is `expected`; returns None
    when done, else what was found there ({} for nothing)."""
    if _is_s3(path):
        return _swap_s3(path, expected, body, etag, create)
    filesystem, local = resolve(path)
    if filesystem is not None:  # no conditional write: compare, write, then read back
        current = _read(path)[0]
        if not expected(current):
            return current or {}
        if body is None:
            remove(path)
            return None
        atomic_write_json(body, path)
        time.sleep(0.5)
        current = _read(path)[0]
        return None if (current or {}).get("run_id") == body["run_id"] else (current or {})
    with _locked(Path(local)):
        current = _read(Path(local))[0]
        if not expected(current):
            return current or {}
        if body is None:
            Path(local).unlink(missing_ok=True)
        else:
            atomic_write_json(body, Path(local))
    return None


def _swap_s3(path: Path, expected: Callable[[dict | None], bool], body: dict | None, etag: str | None,
             create: bool) -> dict | None:
    client = _s3_client()
    bucket, key = _bucket_key(path)
    if etag is None and not create:  # what we compare against: the ETag of the lease as it is now
        current, etag, _ = _read(path)
        if not expected(current):
            return current or {}
    try:
        if body is None:
            client.delete_object(Bucket=bucket, Key=key, IfMatch=etag)
        elif create:
            client.put_object(Bucket=bucket, Key=key, Body=_encode(body), IfNoneMatch="*")
        else:
            client.put_object(Bucket=bucket, Key=key, Body=_encode(body), IfMatch=etag)
    except Exception as error:
        if _precondition_failed(error):
            return _read(path)[0] or {}
        raise
    return None


def _probe_conditional_writes(run_dir: Path) -> None:
    """Once per run directory and process: refuse an S3 store that ignores If-None-Match, on which
    no lease could exclude a second writer."""
    if str(run_dir) in _probed:
        return
    client = _s3_client()
    bucket, key = _bucket_key(run_dir / f".{LEASE}.probe-{uuid.uuid4().hex[:8]}")
    try:
        client.put_object(Bucket=bucket, Key=key, Body=b"1", IfNoneMatch="*")
        try:
            client.put_object(Bucket=bucket, Key=key, Body=b"2", IfNoneMatch="*")
        except Exception as error:
            if not _precondition_failed(error):
                raise
        else:
            raise JobError(f"'{display(run_dir)}': this S3 store ignores conditional writes (If-None-Match), so "
                           "no lease can keep a second writer out of the run directory; use a store that "
                           "supports them (AWS S3, a recent MinIO) or a local or NFS folder")
    finally:
        client.delete_object(Bucket=bucket, Key=key)
    _probed.add(str(run_dir))
