"""What a run or a query lists in its manifest besides the scores: its chunks, its rejected rows,
and the sha256 of each output file."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from distinf.inputs import Plan
from distinf.runtime import curvature_files
from distinf.runtime.gradient_pass import Gradients
from distinf.runtime.layout import CURVATURE, DENSE, INDEX_SET, REJECTED, SPLITS, TOP_K, TRAIN_VALUES, gradient_dir
from distinf.runtime.versions import stamp
from distinf.store import atomic_write_table, file_sha256, list_files
from distinf.tables import rejected_table

VERSIONED_OUTPUTS = [REJECTED, curvature_files.ARRAYS, curvature_files.LAYOUT, TOP_K, TRAIN_VALUES]
"""What each run or append stages in its version folder, then publishes (with scores/dense/ parts)."""
QUERY_OUTPUTS = [INDEX_SET, REJECTED, TOP_K, TRAIN_VALUES]


def outputs_listing(dense: bool, splits: tuple[str, ...] = SPLITS) -> dict:
    """The manifest's `outputs`: where a reader finds each kind of result (a query has no curvature)."""
    listing = {"top_k": TOP_K, "train_values": TRAIN_VALUES, "dense": f"{DENSE}/" if dense else None,
               "rejected": REJECTED, "gradients": [f"{gradient_dir('', s).as_posix()}/" for s in splits]}
    if "train" in splits:
        listing["curvature"] = f"{CURVATURE}/"
    return listing


def chunk_entry(record: dict) -> dict:
    """A chunk as the manifest lists it; chunks of an append carry their segment."""
    entry = {key: record[key] for key in ("file", "chunk", "rank", "rows", "sha256")}
    return {**entry, "segment": record["segment"]} if record.get("segment") else entry


def rejected_rows(plan: Plan, gradients: Gradients, splits: tuple[str, ...] = SPLITS) -> list[tuple]:
    """Rows left out by the data checks and by the workers (non-finite values), of `splits`:
    (example_id, split, row in its file, reason, file or None)."""
    rows = []
    for split in splits:
        data = plan.split(split)
        rows += [(r.example_id, split, r.row, r.reason, r.file) for r in data.rejected]
        place = dict(zip(data.ids, zip(data.rows, data.files or [None] * len(data.ids))))
        for record in gradients.records[split]:
            for x in record.get("rejected", []):
                row, file = place[x["example_id"]]
                rows.append((x["example_id"], split, row, x["reason"], file))
    return rows


def write_rejected(folder: Path, rows: list[tuple], version: tuple[str, datetime]) -> dict[str, int]:
    """rejected.parquet; returns the count per split."""
    atomic_write_table(stamp(rejected_table(rows), *version), folder / REJECTED)
    return {split: sum(row[1] == split for row in rows) for split in SPLITS}


def output_checksums(folder: Path, names: list[str]) -> dict[str, str]:
    """sha256 of the named outputs and of every scores/dense part (the gradient chunks are listed
    in the manifest with their rows instead)."""
    names = names + [str(p.relative_to(folder)) for p in list_files(folder / DENSE) if p.name.startswith("part-")]
    return {name: file_sha256(folder / name) for name in names}
