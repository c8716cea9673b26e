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
import json
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from distinf.runtime.rundir import (JobError, check_writable, config_differences, config_value, remove_leftovers,
                                    stored_manifest)
import pyarrow as pa
import pyarrow.parquet as pq

from distinf.ledger import Planned, ids_digest
from distinf.store import IntegrityError, display, is_file, list_files, read_bytes, read_verified_table, remove

APPEND_KEYS = ("name", "runtime.", "output.path", "output.keep_versions", "model.path", "data.train.path",
               "data.queries.path")
"""Job keys an append may change from the stored run: where and how it runs, and which files it
reads. Everything else (model settings, columns, max_length, compression, hessian, scoring,
gradient_dtype) changes the numbers or the outputs' meaning and is refused."""

APPEND_PENDING = "append"
"""Manifest key of an unfinished append: the stored run it started from, and where its chunks go."""

_PART = re.compile(r"^part-(\d{5})-(\d{5})\.(parquet|json)$")


@dataclass
class Base:
    """The complete run an append starts from."""

    manifest: dict
    train_ids: set[str]
    """Every training id it holds: scored, or rejected (data.on_bad_row: skip)."""
    rejected: list[list]
    """Its rejected.parquet rows: example_id, split, row, reason."""
    first_chunk: int
    """The number of the append's first training chunk."""
    segment: int


def open_for_append(run_dir: Path) -> tuple[dict, Base]:
    """The stored manifest and the run to append to: a complete run, or the one an unfinished
    append started from. Refuses anything else, and a run with a missing or damaged chunk."""
    stored = stored_manifest(run_dir, "--append-to")
    if stored.get("status") == "complete":
        manifest = stored
        rejected = _stored_rejected(run_dir, manifest)
        numbers = [c["chunk"] for c in manifest["chunks"]["train"]]
        numbers += [int(m.group(2)) for p in list_files(run_dir / "ledger" / "train")
                    if (m := _PART.match(p.name))]
        first_chunk = max(numbers, default=-1) + 1
        segment = max((c.get("segment", 0) for c in manifest["chunks"]["train"]), default=0) + 1
    elif APPEND_PENDING in stored:
        pending = stored[APPEND_PENDING]
        manifest, rejected = pending["base"], pending["rejected"]
        first_chunk, segment = pending["first_chunk"], pending["segment"]
    else:
        raise JobError(f"--append-to: '{display(run_dir)}' holds an unfinished run (status "
                       f"{stored.get('status')!r}); finish it first with `distinf run JOB --output "
                       f"{display(run_dir)} --resume`")
    check_writable(run_dir, "--append-to")
    remove_leftovers(run_dir)
    ids = _stored_train_ids(run_dir, manifest)
    ids |= {row[0] for row in rejected if row[1] == "train" and row[0] is not None}
    return stored, Base(manifest, ids, rejected, first_chunk, segment)


def _stored_rejected(run_dir: Path, manifest: dict) -> list[list]:
    sha256 = manifest.get("files", {}).get("rejected.parquet")
    if sha256 is None:
        return []
    try:
        table = read_verified_table(run_dir / "rejected.parquet", sha256)
    except IntegrityError as error:
        raise JobError(f"--append-to: {error}".replace("run the job again with --resume to recompute it",
                                                       "the run cannot be appended to")) from None
    return [list(row.values()) for row in table.to_pylist()]


def _stored_train_ids(run_dir: Path, manifest: dict) -> set[str]:
    """The ids in the stored training chunks, each chunk read once and checked against its sha256."""
    chunks = manifest["chunks"]["train"]

    def ids(chunk: dict) -> list[str] | None:
        try:
            table = read_verified_table(run_dir / chunk["file"], chunk["sha256"], columns=["example_id"])
        except IntegrityError:
            return None
        return table.column("example_id").to_pylist()

    with ThreadPoolExecutor(8) as pool:
        found = list(pool.map(ids, chunks))
    damaged = [c["file"] for c, got in zip(chunks, found) if got is None]
    if damaged:
        shown = ", ".join(damaged[:5]) + (f" and {len(damaged) - 5} more" if len(damaged) > 5 else "")
        raise JobError(f"--append-to: '{display(run_dir)}' has missing or damaged gradient chunks ({shown}); "
                       "an append keeps every stored chunk, so it cannot go on. Repair the run first "
                       "(`distinf run JOB --output RUN_DIR --resume` with the job that made it), or start "
                       "a new run")
    return {i for got in found for i in got}


def check_appendable(base: dict, config: dict, model_fingerprint: str, queries_fingerprint: str,
                     run_dir: Path) -> None:
    """Refuse an append whose job would not compute the numbers the stored run did."""
    hint = "run the job into a new output folder instead"
    differ = config_differences(base["config"], config, allowed=APPEND_KEYS)
    if differ:
        shown = ", ".join(f"{key} ({config_value(base['config'], key)!r} there, {config_value(config, key)!r} now)"
                          for key in differ[:5])
        raise JobError(f"--append-to: '{display(run_dir)}' was computed with different settings: {shown}; "
                       f"an append must compute the same numbers; {hint}")
    if base.get("model_fingerprint") != model_fingerprint:
        raise JobError(f"--append-to: the model at model.path is not the one '{display(run_dir)}' was computed "
                       f"with (its config or weights differ); {hint}")
    if base.get("data_fingerprint", {}).get("queries") != queries_fingerprint:
        raise JobError(f"--append-to: data.queries differs from the queries of '{display(run_dir)}' (ids, texts "
                       "or labels); an append keeps the stored queries. Score new queries with `distinf query "
                       f"{display(run_dir)} --queries FILE`, or {hint}")


def chain_fingerprint(stored: str, appended: str) -> str:
    """The data fingerprint of a run after an append: the stored run's, then the new rows'."""
    return hashlib.sha256(f"{stored}+{appended}".encode()).hexdigest()


def stale_chunks(run_dir: Path, split: str, first_chunk: int, planned: Planned) -> list[Path]:
    """Ledger records numbered from `first_chunk`, and their chunk files, that this append does not
    plan as they are (another chunk, or other ids in it): a failed append of another training file
    committed them, and no complete manifest lists them."""
    stale = []
    for path in list_files(run_dir / "ledger" / split):
        match = _PART.match(path.name)
        if match is None or int(match.group(2)) < first_chunk:
            continue
        rank, chunk = int(match.group(1)), int(match.group(2))
        try:
            record = json.loads(read_bytes(path).decode("utf-8"))
        except (OSError, ValueError):
            continue  # unreadable: never a commit, so no row of it was ever counted
        parts = planned.get(chunk, [])
        if rank >= len(parts) or record.get("ids") != ids_digest(parts[rank]):
            stale += [path] + ([run_dir / record["file"]] if record.get("file") else [])
    return stale


def refuse_or_discard(run_dir: Path, stale: list[Path], discard: bool) -> None:
    """A failed append's rows are never deleted behind the user's back: refuse, naming them, unless
    `discard` (--discard-pending) says to delete them."""
    if not stale:
        return
    if discard:
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
    raise JobError(f"--append-to: '{display(run_dir)}' holds {len(ids)} row(s) committed by an unfinished append of "
                   f"another training file ({shown}), which this append does not include. Finish that append by "
                   "running it again with its own training file, or pass --discard-pending to delete those rows")
