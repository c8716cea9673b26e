"""Appending to a stored run (`distinf run JOB --append-to RUN_DIR`): what it starts from, and what
it refuses. No Ray here; the driver runs the pass.

An append computes gradients only for the training rows whose ids the run does not hold yet, and
keeps every stored chunk as it is. The run is the union: rows the stored run holds but the new
training file lacks are kept (the file may be the whole training set or only the night's new
rows); a row whose id is stored is never recomputed, even if its text changed (give an edited
row a new id). Then the curvature is summed again over all chunks, factorised, and every score is
computed again, so the result is the run a from-scratch job on the union would have produced.

In place. The append works in RUN_DIR itself: the manifest says "running" (with the stored
run it started from under "append") until every output is rewritten, then "complete" again.
New chunks are numbered after every chunk the folder has ever held, as their own segment, so
their names never collide with stored ones and input order is (segment, rank, chunk). A killed
or failed append is finished by running the same command again: chunks it committed are kept. An
append of another file over a failed one is refused, naming the failed one's rows, unless
--discard-pending says to delete them.
"""

from __future__ import annotations

import hashlib
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from distinf.runtime.errors import JobError
from distinf.runtime.layout import REJECTED
from distinf.runtime.manifest import AppendPending, Manifest
from distinf.runtime.run_dir import RunDir
from distinf.store import IntegrityError, is_file, read_bytes, read_verified_table, remove


@dataclass
class Base:
    """The complete run an append starts from."""

    manifest: Manifest
    train_ids: set[str]
    """Every training id it holds: scored, or rejected (data.on_bad_row: skip)."""
    rejected: list[list]
    """Its rejected.parquet rows: example_id, split, row, reason, file."""
    first_chunk: int
    """The number of the append's first training chunk."""
    segment: int

    def pending(self, new_rows: str) -> AppendPending:
        """What the manifest of an append in progress records of it, with the new rows' fingerprint."""
        return AppendPending(self.manifest, self.rejected, self.first_chunk, self.segment, new_rows,
                             len(self.train_ids))


def open_for_append(run_dir: RunDir) -> tuple[Manifest, Base]:
    """The stored manifest and the run to append to: a complete run, or the one an unfinished
    append started from. Refuses anything else, and a run with a missing or damaged chunk.
    (`Run.open` asks this for an append, then checks that the folder is writable.)"""
    stored = run_dir.stored_manifest("--append-to")
    if stored.status == "complete":
        manifest = stored
        rejected = _stored_rejected(run_dir, manifest)
        numbers = [c["chunk"] for c in manifest.chunks["train"]] + run_dir.chunk_numbers("train")
        first_chunk = max(numbers, default=-1) + 1
        segment = max((c.get("segment", 0) for c in manifest.chunks["train"]), default=0) + 1
    elif stored.append is not None:
        pending = stored.append
        manifest, rejected = pending.base, pending.rejected
        first_chunk, segment = pending.first_chunk, pending.segment
    else:
        raise JobError(f"--append-to: '{run_dir}' holds an unfinished run (status "
                       f"{stored.status!r}); finish it first with `distinf run JOB --output "
                       f"{run_dir} --resume`")
    ids = _stored_train_ids(run_dir, manifest)
    ids |= {row[0] for row in rejected if row[1] == "train" and row[0] is not None}
    return stored, Base(manifest, ids, rejected, first_chunk, segment)


def _stored_rejected(run_dir: RunDir, manifest: Manifest) -> list[list]:
    sha256 = (manifest.files or {}).get(REJECTED)
    if sha256 is None:
        return []
    try:
        table = read_verified_table(run_dir.committed(manifest) / REJECTED, sha256)
    except IntegrityError as error:
        raise JobError(f"--append-to: {error}".replace("run the job again with --resume to recompute it",
                                                       "the run cannot be appended to")) from None
    # By name: a run written before rejected.parquet had a file column has none.
    return [[row["example_id"], row["split"], row["row"], row["reason"], row.get("file")] for row in table.to_pylist()]


def _stored_train_ids(run_dir: RunDir, manifest: Manifest) -> set[str]:
    """The ids in the stored training chunks, each chunk read once and checked against its sha256."""
    chunks = manifest.chunks["train"]

    def ids(chunk: dict) -> list[str] | None:
        try:
            table = read_verified_table(run_dir.path(chunk["file"]), chunk["sha256"], columns=["example_id"])
        except IntegrityError:
            return None
        return table.column("example_id").to_pylist()

    with ThreadPoolExecutor(8) as pool:
        found = list(pool.map(ids, chunks))
    damaged = [c["file"] for c, got in zip(chunks, found) if got is None]
    if damaged:
        shown = ", ".join(damaged[:5]) + (f" and {len(damaged) - 5} more" if len(damaged) > 5 else "")
        raise JobError(f"--append-to: '{run_dir}' has missing or damaged gradient chunks ({shown}); "
                       "an append keeps every stored chunk, so it cannot go on. Repair the run first "
                       "(`distinf run JOB --output RUN_DIR --resume` with the job that made it), or start "
                       "a new run")
    return {i for got in found for i in got}


def append_manifest(name: str, config: dict, base: Base, model: str, queries: str, new_rows: str,
                    restarts: list[dict]) -> Manifest:
    """The manifest of an append while it runs: "running", with the stored run it extends, and the
    restarts so far (the stored run's, and those of this append's failed tries)."""
    stored = base.manifest
    manifest = Manifest(status="running", name=name, config=config, model_fingerprint=model,
                        data_fingerprint={"train": chain_fingerprint(stored.data_fingerprint["train"], new_rows),
                                          "queries": queries},
                        restarts=list(restarts), append=base.pending(new_rows))
    manifest.carry_from(stored)
    return manifest


def chain_fingerprint(stored: str, appended: str) -> str:
    """The data fingerprint of a run after an append: the stored run's, then the new rows'."""
    return hashlib.sha256(f"{stored}+{appended}".encode()).hexdigest()


def refuse_or_discard(run_dir: RunDir, stale: list[Path], discard: bool) -> None:
    """A failed append's rows are never deleted behind the user's back: refuse, naming them, unless
    `discard` (--discard-pending) says to delete them."""
    if not stale:
        return
    if discard:
        run_dir.check_lease()
        for path in stale:
            remove(path)
        logging.getLogger("distinf.driver").warning(
            f"discarded {len(stale)} file(s) of an unfinished append (--discard-pending)",
            extra={"event": "discarded_pending", "files": len(stale)})
        return
    ids = []
    for path in (p for p in stale if p.suffix == ".parquet" and is_file(p)):
        try:
            ids += pq.read_table(pa.BufferReader(read_bytes(path)), columns=["example_id"]).column("example_id").to_pylist()
        except (OSError, ValueError):
            ids.append(f"(unreadable {path.name})")
    shown = ", ".join(repr(i) for i in ids[:5]) + (f" and {len(ids) - 5} more" if len(ids) > 5 else "")
    raise JobError(f"--append-to: '{run_dir}' holds {len(ids)} row(s) committed by an unfinished append of "
                   f"another training file ({shown}), which this append does not include. Finish that append by "
                   "running it again with its own training file, or pass --discard-pending to delete those rows")
