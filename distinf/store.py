"""The run directory on disk: every file written under a temporary name, then renamed.

A reader therefore sees a file whole or not at all, and `manifest.json` with status "complete",
written last, is the only sign that a run is finished.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from safetensors.numpy import load_file, save_file

MANIFEST = "manifest.json"


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")


def atomic_write_table(table: pa.Table, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    pq.write_table(table, tmp)
    os.replace(tmp, path)
    return path


def atomic_write_json(data: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    tmp.write_text(json.dumps(data, indent=2, default=str), encoding="utf-8")
    os.replace(tmp, path)
    return path


def atomic_write_arrays(arrays: dict[str, np.ndarray], path: str | Path) -> Path:
    """safetensors (no pickle) of named numpy arrays."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    save_file({name: np.ascontiguousarray(a) for name, a in arrays.items()}, str(tmp))
    os.replace(tmp, path)
    return path


def read_arrays(path: str | Path) -> dict[str, np.ndarray]:
    return load_file(str(path))


def gradient_dir(run_dir: str | Path, split: str) -> Path:
    return Path(run_dir) / "gradients" / split


def chunk_path(run_dir: str | Path, split: str, rank: int, seq: int) -> Path:
    return gradient_dir(run_dir, split) / f"part-{rank:05d}-{seq:05d}.parquet"


def list_chunks(run_dir: str | Path, split: str) -> list[Path]:
    """Committed gradient chunks of a split, in (rank, sequence) order."""
    folder = gradient_dir(run_dir, split)
    return sorted(folder.glob("part-*.parquet")) if folder.is_dir() else []


def read_manifest(run_dir: str | Path) -> dict | None:
    path = Path(run_dir) / MANIFEST
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
