"""The chunk ledger: which gradient chunks are committed, and still intact.

Chunk c of a split always holds the same examples (`partition.chunk_plan`). A rank commits its part of
a chunk in two steps: the Parquet file, then a record `ledger/{split}/part-RRRRR-CCCCC.json` with
the file's row count and sha256, a digest of the example ids the plan gave it and one of their
tokenised rows (so a file regenerated with the same ids but other texts is computed again), and the examples
it left out (non-finite loss or gradient, under `data.on_bad_row: skip`). With hessian.method
kfac or kfac_mix a train part also has the Kronecker factor sums of its rows, a safetensors file
written before the record, which names it under "factors" with its size and sha256. The record is
the commit point. A part counts as done only when its record matches the plan and its file matches
the record, so a part that is missing, truncated, corrupt or from another plan is computed again.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pyarrow as pa

from distinf.runtime.layout import chunk_path, factors_path, record_path, run_file
from distinf.store import atomic_write_arrays, atomic_write_json, commit_table, file_sha256, file_size, read_bytes

Planned = dict[int, list[list[str]]]
"""planned[c][r]: the example ids (padding slots left out) rank r commits as chunk c. Chunk numbers
need not start at 0: an appended run numbers its new chunks after the stored ones."""


def ids_digest(ids: Sequence[str]) -> str:
    return hashlib.sha256("\0".join(ids).encode()).hexdigest()


def rows_digest(examples: Sequence[dict]) -> str:
    """sha256 over the tokenised rows of a part (each a dict of int tensors), in order."""
    digest = hashlib.sha256()
    for example in examples:
        for name in sorted(example):
            digest.update(f"{name}\0{tuple(example[name].shape)}\0".encode())
            digest.update(example[name].numpy().astype("<i8").tobytes())
        digest.update(b"\1")
    return digest.hexdigest()


def commit_chunk(run_dir: str | Path, split: str, rank: int, chunk: int, planned_ids: Sequence[str],
                 table: pa.Table | None, rejected: list[dict], attempt: int = 0, run_id: str | None = None,
                 factors: dict[str, np.ndarray] | None = None, fence: Callable[[], None] | None = None,
                 rows: str | None = None) -> dict:
    """Write one rank's part of a chunk (`table` None when no row is left), its factor sums
    (`factors`, arrays of chunk_factors.factor_arrays; only with rows) and then its record, with
    `rows`, the `rows_digest` of the planned examples.

    `attempt` (which worker group of the driver computed it) and `run_id` (which run, under the
    run directory's lease) are kept for the record only. `fence` (the lease's Fence.check) runs
    before each write, so a writer whose lease was taken over commits nothing more.
    """
    fence = fence or (lambda: None)
    record = {"split": split, "rank": rank, "chunk": chunk, "ids": ids_digest(planned_ids),
              "file": None, "rows": 0, "bytes": 0, "sha256": None, "rejected": rejected, "attempt": attempt,
              "run_id": run_id, "rows_digest": rows}
    if table is not None and table.num_rows:
        if factors is not None:
            path = factors_path(run_dir, split, rank, chunk)
            fence()
            atomic_write_arrays(factors, path)
            record["factors"] = {"file": str(path.relative_to(run_dir)), "bytes": file_size(path),
                                 "sha256": file_sha256(path)}
        path = chunk_path(run_dir, split, rank, chunk)
        fence()
        record.update(commit_table(table, path), file=str(path.relative_to(run_dir)))
    fence()  # the commit point: checked last, just before the record
    atomic_write_json(record, record_path(run_dir, split, rank, chunk))
    return record


def check_record(run_dir: str | Path, split: str, rank: int, chunk: int,
                 planned_ids: Sequence[str], with_factors: bool = False, rows: str | None = None) -> dict | None:
    """The part's record if the part is committed and intact, else None. `with_factors`: a part
    with rows must have its factor sums too, intact. `rows`: the planned examples' `rows_digest`,
    which the record must hold (a part of the same ids but other texts is not this plan's)."""
    try:
        record = json.loads(read_bytes(record_path(run_dir, split, rank, chunk)).decode("utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("ids") != ids_digest(planned_ids):
        return None
    if rows is not None and record.get("rows_digest") != rows:
        return None
    if record.get("file") is None:
        return record if record.get("rows") == 0 else None
    files = [record] + ([record["factors"]] if isinstance(record.get("factors"), dict) else [])
    if with_factors and len(files) == 1:
        return None
    for entry in files:
        path = run_file(run_dir, entry.get("file"), f"the ledger record '{record_path(run_dir, split, rank, chunk)}'")
        try:
            if file_size(path) != entry.get("bytes") or file_sha256(path) != entry.get("sha256"):
                return None
        except OSError:
            return None
    return record


def verified_records(run_dir: str | Path, split: str, planned: Planned,
                     chunks: Sequence[int] | None = None, with_factors: bool = False,
                     rows: dict[int, list[str]] | None = None) -> dict[tuple[int, int], dict]:
    """{(chunk, rank): record} of every part (of `chunks`, default all) committed and intact
    (`with_factors`: its factor sums too; `rows[c][r]`: of these tokenised rows).

    Reads each file once, to check its sha256.
    """
    found = {}
    for chunk in planned if chunks is None else chunks:
        for rank, ids in enumerate(planned[chunk]):
            record = check_record(run_dir, split, rank, chunk, ids, with_factors,
                                  rows[chunk][rank] if rows is not None else None)
            if record is not None:
                found[(chunk, rank)] = record
    return found


def pending_chunks(planned: Planned, records: dict[tuple[int, int], dict]) -> list[int]:
    """Chunks that some rank has not committed intact: all ranks compute these, in lockstep."""
    return [chunk for chunk, ranks in planned.items()
            if any((chunk, rank) not in records for rank in range(len(ranks)))]


def input_order(record: dict) -> tuple[int, int, int]:
    """Chunks sorted by this key list the examples in input order: each rank holds a contiguous
    run of its segment's examples, cut into consecutive chunks; appended segments come after."""
    return record.get("segment", 0), record["rank"], record["chunk"]
