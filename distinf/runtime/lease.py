"""One writer per run directory: an exclusive lease, `lease.json`, held while a job writes there.

The lease names its holder (run id, host, pid, what it is doing) and carries a heartbeat that a
thread of the holder renews every `ttl / 4` seconds. Taking it is one atomic step where the
bytes live:

- on a local (or NFS) disk, creating the file with O_CREAT | O_EXCL;
- on S3, a conditional PUT (`If-None-Match: *`), and every renewal or takeover a PUT
  `If-Match` the ETag last seen, so two writers can never both believe they hold it.

A lease whose heartbeat is older than its ttl (the holder was killed: SIGKILL, a lost node) is
taken over, by one taker only: locally through a marker file created with O_EXCL for that very
stale heartbeat, on S3 through the If-Match. A holder on this host whose pid is gone is stale at
once. Clocks of the hosts are assumed to agree within a few seconds (NTP); the ttl is minutes.
Other object stores (gs://, hdfs://) offer pyarrow no conditional write: there the lease is taken
by write-then-read-back, which narrows but does not close the race, and the docs say so.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from distinf.runtime.errors import JobError
from distinf.runtime.layout import LEASE, MANIFEST
from distinf.store import resolve, split_uri, atomic_write_json, display, read_bytes, remove

_held: dict[str, "Lease"] = {}
"""The leases this process holds, by run directory: every manifest write checks its own first."""


class LeaseHeld(JobError):
    """Another live process writes this run directory."""


class LeaseLost(JobError):
    """This process's lease was taken over (its heartbeat had expired): it must stop writing."""


def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ-", time.gmtime()) + uuid.uuid4().hex[:8]


@dataclass
class Lease:
    """A held lease. `renew()` refreshes the heartbeat; `check()` raises LeaseLost once it is gone."""

    run_dir: Path
    run_id: str
    purpose: str
    ttl: float
    _etag: str | None = None
    _lost: str | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    @property
    def path(self) -> Path:
        return self.run_dir / LEASE

    def body(self) -> dict:
        now = time.time()
        return {"run_id": self.run_id, "purpose": self.purpose, "host": socket.gethostname(), "pid": os.getpid(),
                "heartbeat": now, "expires": now + self.ttl, "ttl": self.ttl}

    def renew(self) -> None:
        """Refresh the heartbeat, if the lease is still this process's."""
        if self._lost:
            raise LeaseLost(self._lost)
        current, etag = _read(self.path)
        if current is None or current.get("run_id") != self.run_id:
            holder = "nobody" if current is None else describe(current)
            self._lost = (f"'{display(self.run_dir)}': this run's lease was taken over by {holder} after its heartbeat "
                          "expired; this run stops writing there")
            raise LeaseLost(self._lost)
        self._etag = _put(self.path, self.body(), if_match=etag if _is_s3(self.path) else None)

    def check(self) -> None:
        """Raise LeaseLost if the lease is no longer this process's (before writing a manifest)."""
        if self._lost:
            raise LeaseLost(self._lost)
        current, _ = _read(self.path)
        if current is None or current.get("run_id") != self.run_id:
            self._lost = (f"'{display(self.run_dir)}': this run no longer holds the run directory's lease"
                          + (f" ({describe(current)} does)" if current else ""))
            raise LeaseLost(self._lost)

    def start_heartbeat(self) -> None:
        def beat() -> None:
            while not self._stop.wait(self.ttl / 4):
                try:
                    self.renew()
                except LeaseLost:
                    return
                except OSError:
                    pass  # a transient storage error: the next beat tries again, well inside the ttl

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
            current, _ = _read(self.path)
            if current is not None and current.get("run_id") == self.run_id:
                remove(self.path)
            if not split_uri(self.run_dir):
                for marker in Path(self.run_dir).glob(".lease-takeover-*"):
                    marker.unlink(missing_ok=True)
        except OSError:
            pass  # it expires by itself

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def write_manifest(run_dir: Path, manifest: dict) -> None:
    """The one way a job writes a manifest: only while this process holds the folder's lease,
    so that a run whose lease was taken over never writes over its successor's manifest."""
    lease = _held.get(str(run_dir))
    if lease is None:
        raise LeaseLost(f"'{display(run_dir)}': this process holds no lease on it, so it writes no manifest there")
    lease.check()
    atomic_write_json({**manifest, "run_id": lease.run_id}, Path(run_dir) / MANIFEST)


def acquire(run_dir: Path, purpose: str, ttl: float, run_id: str | None = None,
            now: Callable[[], float] = time.time) -> Lease:
    """Take the run directory's lease, or raise LeaseHeld naming its live holder."""
    lease = _take(run_dir, purpose, ttl, run_id, now)
    lease._etag = _read(lease.path)[1]
    lease.start_heartbeat()
    _held[str(run_dir)] = lease
    return lease


def _take(run_dir: Path, purpose: str, ttl: float, run_id: str | None, now: Callable[[], float]) -> Lease:
    lease = Lease(run_dir, run_id or new_run_id(), purpose, ttl)
    if _create(lease.path, lease.body()):
        return lease
    current, etag = _read(lease.path)
    if current is None:  # released between our create and read: try once more
        return _take(run_dir, purpose, ttl, lease.run_id, now)
    if not _stale(current, now()):
        left = max(0.0, float(current.get("expires", 0)) - now())
        raise LeaseHeld(f"'{display(run_dir)}' is being written by {describe(current)}, heartbeat "
                        f"{now() - float(current.get('heartbeat', 0)):.0f} s ago. One run directory has one writer: "
                        f"wait for it to finish, or, if that process is gone, run again after its lease expires "
                        f"(in {left:.0f} s)")
    if not _take_over(lease.path, current, etag, lease.body()):
        raise LeaseHeld(f"'{display(run_dir)}': another process is taking over the expired lease of "
                        f"{describe(current)} right now; one run directory has one writer")
    logging.getLogger("distinf.lease").warning(f"took over the expired lease of {describe(current)} on "
                                               f"'{display(run_dir)}'", extra={"event": "lease_taken_over"})
    return lease


def describe(holder: dict) -> str:
    return (f"run {holder.get('run_id')} ({holder.get('purpose', 'a job')}, pid {holder.get('pid')} on "
            f"{holder.get('host')})")


def _stale(holder: dict, now: float) -> bool:
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int) and holder["pid"] != os.getpid():
        if not _alive(holder["pid"]):
            return True  # its process on this very host is gone: no need to wait out the ttl
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
# Storage: atomic create and compare-and-swap, per backend


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


def _read(path: Path) -> tuple[dict | None, str | None]:
    """(lease body, S3 ETag) or (None, None) when there is no lease."""
    if _is_s3(path):
        client = _s3_client()
        bucket, key = _bucket_key(path)
        try:
            got = client.get_object(Bucket=bucket, Key=key)
        except client.exceptions.NoSuchKey:
            return None, None
        return _parse(got["Body"].read()), got["ETag"]
    try:
        return _parse(read_bytes(path)), None
    except FileNotFoundError:
        return None, None


def _parse(data: bytes) -> dict:
    try:
        body = json.loads(data.decode("utf-8"))
    except ValueError:
        body = None
    return body if isinstance(body, dict) else {"run_id": None, "expires": 0}  # unreadable: stale


def _encode(body: dict) -> bytes:
    return json.dumps(body, indent=2).encode("utf-8")


def _put(path: Path, body: dict, if_match: str | None = None) -> str | None:
    """Write the lease over the one there; on S3 only if it is still `if_match` (LeaseLost if not)."""
    if _is_s3(path):
        client = _s3_client()
        bucket, key = _bucket_key(path)
        extra = {"IfMatch": if_match} if if_match else {}
        try:
            return client.put_object(Bucket=bucket, Key=key, Body=_encode(body), **extra)["ETag"]
        except Exception as error:
            if _precondition_failed(error):
                raise LeaseLost(f"'{display(path.parent)}': the lease changed under this run") from None
            raise
    atomic_write_json(body, path)
    return None


def _create(path: Path, body: dict) -> bool:
    """Create the lease if there is none; False if one exists."""
    if _is_s3(path):
        client = _s3_client()
        bucket, key = _bucket_key(path)
        try:
            client.put_object(Bucket=bucket, Key=key, Body=_encode(body), IfNoneMatch="*")
            return True
        except Exception as error:
            if _precondition_failed(error):
                return False
            raise
    filesystem, local = resolve(path)
    if filesystem is not None:  # no conditional write: write if absent, then read back
        if _read(path)[0] is not None:
            return False
        atomic_write_json(body, path)
        time.sleep(0.5)
        return (_read(path)[0] or {}).get("run_id") == body["run_id"]
    Path(local).parent.mkdir(parents=True, exist_ok=True)
    try:
        handle = os.open(local, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(handle, "wb") as out:
        out.write(_encode(body))
        out.flush()
        os.fsync(out.fileno())
    return True


def _take_over(path: Path, stale: dict, etag: str | None, body: dict) -> bool:
    """Replace the stale lease `stale` by `body`, if no other taker does so first."""
    if _is_s3(path):
        try:
            _put(path, body, if_match=etag)
            return True
        except LeaseLost:
            return False
    filesystem, local = resolve(path)
    if filesystem is None:
        # One taker per stale heartbeat: the marker's name is that heartbeat, created exclusively.
        marker = Path(local).with_name(f".lease-takeover-{stale.get('run_id')}-{stale.get('heartbeat')}")
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            return False
        current, _ = _read(path)  # kept until release, so a late taker of the same heartbeat loses too
        if current is not None and (current.get("run_id"), current.get("heartbeat")) != \
                (stale.get("run_id"), stale.get("heartbeat")):
            return False
        atomic_write_json(body, path)
        return True
    atomic_write_json(body, path)
    time.sleep(0.5)
    return (_read(path)[0] or {}).get("run_id") == body["run_id"]
