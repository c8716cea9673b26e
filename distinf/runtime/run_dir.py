"""One run directory as its files: where each lives (runtime.layout), the manifest as read, the
chunk ledger, whether a new job may work there (resume, append, query: one allow-list each), and
what a killed writer left. A job that works in the folder holds it through its `Run`
(runtime.run), the manifest's only writer; readers of a stored run use a `RunDir` alone.

No Ray here: these are the checks a job makes before it starts anything, on a local folder or an
object store alike (distinf.store does the bytes).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import time
from dataclasses import dataclass
from pathlib import Path

from distinf.runtime import ledger
from distinf.runtime import layout
from distinf.runtime.errors import JobError
from distinf.runtime.lease import check_held
from distinf.runtime.manifest import Manifest
from distinf.runtime.versions import committed_root
from distinf.store import display, file_sha256, free_bytes, is_remote, list_files, read_bytes, remove, run_path

RESUME_KEYS = ("runtime.address", "runtime.max_restarts", "runtime.stall_timeout", "runtime.lease_seconds",
               "runtime.placement_timeout", "output.path", "output.keep_versions", "model.path", "data.train.path",
               "data.queries.path")
"""Job keys a resumed run may change: where and how patiently it runs, not what it computes (moved
model and data files are checked by their fingerprints instead)."""

APPEND_KEYS = ("name", "runtime.", "output.path", "output.keep_versions", "model.path", "data.train.path",
               "data.queries.path")
"""Job keys an append may change from the stored run: where and how it runs, and which files it
reads. Everything else (model settings, columns, max_length, compression, hessian, scoring,
gradient_dtype) changes the numbers or the outputs' meaning and is refused."""

QUERY_KEYS = ("name", "runtime.", "output.path", "model.path", "data.queries.", "scoring.top_k", "scoring.dense",
              "scoring.normalize")
"""Job keys `distinf query --set` may change: where it runs, how the query file reads, how many
scores it writes and how they are normalised. The rest is the stored run's (its model, index set and curvature)."""

_PART = re.compile(r"^part-(\d{5})-(\d{5})\.(parquet|json)$")


class NotResumable(JobError):
    """The folder holds something a run of this job cannot continue: another job, or no run at all."""


@dataclass(frozen=True)
class RunDir:
    """A run directory: a local path or an object-store URI (distinf.store.run_path)."""

    root: Path

    @classmethod
    def at(cls, path: str | Path) -> RunDir:
        return cls(run_path(path))

    def __str__(self) -> str:
        return display(self.root)

    # -- names -----------------------------------------------------------------------------------

    def path(self, name: str) -> Path:
        """A file of the run by its name in the manifest ("scores/top_k.parquet", a chunk's "file");
        IntegrityError for a name that would leave the folder (layout.safe_name)."""
        return layout.run_file(self.root, name)

    def gradient_dir(self, split: str) -> Path:
        return layout.gradient_dir(self.root, split)

    def chunk_path(self, split: str, rank: int, chunk: int) -> Path:
        return layout.chunk_path(self.root, split, rank, chunk)

    def list_chunks(self, split: str) -> list[Path]:
        return layout.list_chunks(self.root, split)

    def ledger_dir(self, split: str) -> Path:
        return layout.ledger_dir(self.root, split)

    def version_dir(self, run_id: str) -> Path:
        return layout.version_dir(self.root, run_id)

    def committed(self, manifest: Manifest) -> Path:
        """The folder holding the outputs of the version `manifest` committed (runtime.versions)."""
        return committed_root(self.root, manifest.to_dict())

    def query_dir(self, queries: str | Path) -> Path:
        """Where `distinf query` writes the scores of a query file by default."""
        return self.root / layout.QUERIES / Path(str(queries)).stem

    # -- the manifest ----------------------------------------------------------------------------

    def read_manifest(self) -> Manifest | None:
        """The manifest, or None if there is none; ValueError if it is not a manifest."""
        try:
            data = json.loads(read_bytes(self.root / layout.MANIFEST).decode("utf-8"))
        except (FileNotFoundError, IsADirectoryError):
            return None
        if not isinstance(data, dict):
            raise ValueError(f"{display(self.root / layout.MANIFEST)}: not a JSON object")
        return Manifest.from_dict(data)

    def stored_manifest(self, option: str) -> Manifest:
        """The manifest of a distinf run directory, or a JobError naming `option`."""
        reason = ""
        try:
            stored = self.read_manifest()
        except (OSError, ValueError) as error:
            stored, reason = None, f" ({error})"
        if stored is None:
            raise NotResumable(f"{option}: '{self}' has no readable {layout.MANIFEST}{reason}, so it is not a "
                               "distinf run directory; choose a new output folder")
        return stored

    def check_lease(self) -> None:
        """LeaseLost unless this process still holds the folder's lease: before every mutation."""
        check_held(self.root)

    # -- the ledger ------------------------------------------------------------------------------

    def verified_records(self, split: str, planned: ledger.Planned, chunks: list[int] | None = None,
                         with_factors: bool = False, rows: dict[int, list[str]] | None = None
                         ) -> dict[tuple[int, int], dict]:
        """{(chunk, rank): record} of every planned part committed and intact (distinf.runtime.ledger);
        `with_factors`: with its Kronecker factor sums; `rows`: of these tokenised rows."""
        return ledger.verified_records(self.root, split, planned, chunks, with_factors, rows)

    def chunk_numbers(self, split: str) -> list[int]:
        """The numbers of every chunk the ledger holds a record of, committed or not."""
        return [int(m.group(2)) for p in list_files(self.ledger_dir(split)) if (m := _PART.match(p.name))]

    def stale_chunks(self, split: str, first_chunk: int, planned: ledger.Planned) -> list[Path]:
        """Ledger records numbered from `first_chunk`, and their chunk files, that `planned` does not
        hold as they are (another chunk, or other ids in it): a failed append of another training
        file committed them, and no complete manifest lists them."""
        stale = []
        for path in list_files(self.ledger_dir(split)):
            match = _PART.match(path.name)
            if match is None or int(match.group(2)) < first_chunk:
                continue
            rank, chunk = int(match.group(1)), int(match.group(2))
            try:
                record = json.loads(read_bytes(path).decode("utf-8"))
            except (OSError, ValueError):
                continue  # unreadable: never a commit, so no row of it was ever counted
            parts = planned.get(chunk, [])
            if rank >= len(parts) or record.get("ids") != ledger.ids_digest(parts[rank]):
                stale += [path] + ([self.path(record["file"])] if record.get("file") else [])
                if isinstance(record.get("factors"), dict):
                    stale.append(self.path(record["factors"]["file"]))
        return stale

    def damaged_files(self, manifest: Manifest | dict) -> list[str]:
        """Files of a complete run that are missing or no longer match the manifest's sha256."""
        if isinstance(manifest, Manifest):
            manifest = manifest.to_dict()
        source = committed_root(self.root, manifest)  # the committed version's own folder
        listed = {(source if name != layout.INDEX_SET else self.root) / name: (name, sha256)
                  for name, sha256 in manifest.get("files", {}).items()}
        for records in manifest.get("chunks", {}).values():
            listed.update({self.path(r["file"]): (r["file"], r["sha256"]) for r in records if r.get("file")})
        present = {**list_files(self.root, recursive=True), **list_files(source, recursive=True)}
        damaged = []
        for path, (name, sha256) in sorted(listed.items()):
            if path not in present or file_sha256(path) != sha256:
                damaged.append(name)
        return damaged

    # -- the folder ------------------------------------------------------------------------------

    def is_unused(self) -> bool:
        """True when the folder holds no run: nothing, or only its lease (taken before this check)."""
        if is_remote(self.root):
            return all(p.parent == Path(self.root) and _is_control(p.name)
                       for p in list_files(self.root, recursive=True))
        path = Path(self.root)
        return not path.exists() or (path.is_dir() and all(_is_control(e.name) for e in path.iterdir()))

    def remove_leftovers(self) -> None:
        """Temporary files half-written by a process that was killed; no reader ever sees them.

        Called only under the folder's lease. Folders below it that are run directories of their own
        (`distinf query` outputs under queries/, with their own lease) are left to their own writer,
        and so is the lease's own renewal. On an object store they are the temporary keys of uploads
        killed before their server-side copy to the name."""
        self.check_lease()
        root = self.root
        if is_remote(root):
            stored = list_files(root, recursive=True)
            nested = {p.parent for p in stored if p.name in (layout.MANIFEST, layout.LEASE)} - {root}
            for path in stored:
                if path.name.startswith(".") and path.name.endswith(".tmp") and not _is_control(path.name) \
                        and not any(folder in path.parents for folder in nested):
                    remove(path)
            return
        for folder, subfolders, files in os.walk(root):
            subfolders[:] = [d for d in subfolders if not any(
                os.path.exists(os.path.join(folder, d, name)) for name in (layout.MANIFEST, layout.LEASE))]
            for name in files:
                if name.startswith(".") and name.endswith(".tmp") and not _is_control(name):
                    Path(folder, name).unlink(missing_ok=True)

    def gradient_bytes(self, split: str) -> int:
        """What the split's gradient chunks take already (a resumed run writes only the rest)."""
        return sum(list_files(self.gradient_dir(split)).values())

    def move_aside_command(self) -> str:
        """The command that moves the folder out of a schedule's way, for a person to run."""
        failed = f"{self}.failed-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
        if is_remote(self.root):
            return f"aws s3 mv --recursive {self} {failed}"
        return f"mv {shlex.quote(str(self))} {shlex.quote(failed)}"


def _is_control(name: str) -> bool:
    return name == layout.LEASE or name.startswith((".lease-takeover-", f".{layout.LEASE}."))


# ---------------------------------------------------------------------------------------------
# Same job? One allow-list per mode: resume, append, query


def config_differences(stored: dict, current: dict, prefix: str = "",
                       allowed: tuple[str, ...] = RESUME_KEYS) -> list[str]:
    """Dotted keys whose values differ between two job configs, except the `allowed` ones (a key,
    or every key under a section written with a trailing dot, "runtime.")."""
    keys = []
    for key in sorted(set(stored) | set(current)):
        path = f"{prefix}{key}"
        if path in allowed or any(a.endswith(".") and path.startswith(a) for a in allowed):
            continue
        a, b = stored.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += config_differences(a, b, f"{path}.", allowed)
        elif a != b:
            keys.append(path)
    return keys


def config_value(config: dict, dotted: str):
    """The value at a dotted key of a config dict, or None."""
    for part in dotted.split("."):
        config = config.get(part) if isinstance(config, dict) else None
    return config


def _shown(stored: dict, config: dict, differ: list[str]) -> str:
    return ", ".join(f"{key} ({config_value(stored, key)!r} there, {config_value(config, key)!r} now)"
                     for key in differ[:5])


def check_resumable(stored: Manifest, config: dict, model: str, data: dict[str, str], run_dir: RunDir) -> None:
    """Refuse to resume a run directory that holds a different job (config, model or data)."""
    hint = "resume with the job it was started with, or choose a new output folder"
    differ = config_differences(stored.config, config, allowed=RESUME_KEYS)
    if differ:
        raise NotResumable(f"--resume: '{run_dir}' holds a different job: {_shown(stored.config, config, differ)}; {hint}")
    if stored.model_fingerprint not in (None, model):
        raise NotResumable(f"--resume: the model at model.path has changed since '{run_dir}' was started "
                       f"(its config or weights differ); {hint}")
    for role, digest in data.items():
        if (stored.data_fingerprint or {}).get(role) not in (None, digest):
            raise NotResumable(f"--resume: data.{role} has changed since '{run_dir}' was started (its ids, "
                           f"texts or labels differ); {hint}")


def check_appendable(base: Manifest, config: dict, model: str, queries: str, run_dir: RunDir) -> None:
    """Refuse an append whose job would not compute the numbers the stored run did."""
    hint = "run the job into a new output folder instead"
    differ = config_differences(base.config, config, allowed=APPEND_KEYS)
    if differ:
        raise JobError(f"--append-to: '{run_dir}' was computed with different settings: "
                       f"{_shown(base.config, config, differ)}; an append must compute the same numbers; {hint}")
    if base.model_fingerprint != model:
        raise JobError(f"--append-to: the model at model.path is not the one '{run_dir}' was computed "
                       f"with (its config or weights differ); {hint}")
    if (base.data_fingerprint or {}).get("queries") != queries:
        raise JobError(f"--append-to: data.queries differs from the queries of '{run_dir}' (ids, texts "
                       "or labels); an append keeps the stored queries. Score new queries with `distinf query "
                       f"{run_dir} --queries FILE`, or {hint}")


def check_queryable(stored: Manifest, config: dict) -> None:
    """Refuse `distinf query --set` of a key that would score against a different run."""
    differ = config_differences(stored.config, config, allowed=QUERY_KEYS)
    if differ:
        raise JobError(f"distinf query: --set {differ[0]} would score against a different run "
                       f"({config_value(stored.config, differ[0])!r} there); only {', '.join(QUERY_KEYS)} "
                       "may change")


# ---------------------------------------------------------------------------------------------
# Room


def estimated_bytes(k: int, n_train: int, n_queries: int, gradient_dtype: str, dense: bool,
                    full_block: bool) -> int:
    """A generous estimate of what a run writes: gradients, dense scores, a full curvature block."""
    per_example = k * (2 if gradient_dtype == "float16" else 4) + 64
    total = (n_train + n_queries) * per_example + (1 << 20)
    if dense:
        total += n_train * n_queries * 16
    if full_block:
        total += 2 * 8 * k * k  # Gram sum and Cholesky factor, float64
    return total


def check_free_space(folder: Path, need: int) -> None:
    free = free_bytes(folder)
    if free is not None and free < need:
        raise JobError(f"output.path: '{folder}' has {_size(free)} free and this run writes about "
                       f"{_size(need)}; free some space or choose another folder")


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
