"""The score history: every complete version's score tables, appended under

    history/top_k/date=YYYY-MM-DD/<run_id>.parquet
    history/train_values/date=YYYY-MM-DD/<run_id>.parquet

Hive-style partitions by the UTC date of the version's `as_of`, one file per version, never
rewritten and never pruned (`output.keep_versions` prunes `versions/` only), so trends go back to
the first night: DuckDB reads it as
`read_parquet('RUN/history/train_values/*/*.parquet', hive_partitioning = true)`, Spark and
Polars discover the `date` column from the folder names. Each row keeps its version's `run_id`
and `as_of`, as in the run directory's own tables.
"""

from __future__ import annotations

import io
from datetime import datetime
from pathlib import Path

import pyarrow.parquet as pq

from distinf.runtime.layout import TOP_K, TRAIN_VALUES
from distinf.store import atomic_write_table, read_bytes

HISTORY = "history"
TABLES = {"top_k": TOP_K, "train_values": TRAIN_VALUES}


def history_path(run_dir: str | Path, table: str, run_id: str, as_of: str) -> Path:
    date = datetime.fromisoformat(as_of).strftime("%Y-%m-%d")
    return Path(run_dir) / HISTORY / table / f"date={date}" / f"{run_id}.parquet"


def append_history(run_dir: str | Path, version: str | Path, run_id: str, as_of: str) -> list[Path]:
    """Copy the complete version's score tables (staged in `version`) into the history; returns
    the files written. Written again under the same name by a retry, never duplicated."""
    written = []
    for table, name in TABLES.items():
        rows = pq.read_table(io.BytesIO(read_bytes(Path(version) / name)))
        written.append(atomic_write_table(rows, history_path(run_dir, table, run_id, as_of)))
    return written
