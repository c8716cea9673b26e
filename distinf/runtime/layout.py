"""The names inside a run directory, and nothing else: the one place a file's path is spelled.

    manifest.json                     written last; says what the folder holds (runtime.manifest)
    lease.json                        the one writer's lease (runtime.lease)
    index_set.parquet                 the tracked entries every gradient column stands for
    rejected.parquet                  rows left out, and why
    gradients/{split}/part-RRRRR-CCCCC.parquet   chunk C of rank R
    gradients/train/part-RRRRR-CCCCC.factors.safetensors   its Kronecker factor sums (kfac, kfac_mix)
    ledger/{split}/part-RRRRR-CCCCC.json         its commit record (distinf.ledger)
    curvature/                        the solver's files (runtime.curvature_files)
    scores/top_k.parquet, scores/train_values.parquet, scores/dense/part-*.parquet
    versions/{run_id}/                a version's outputs, staged, then published (runtime.versions)
    queries/{stem}/                   `distinf query` outputs, each a small run directory of its own

`RunDir` (runtime.run_dir) is the object the runtime goes through; this module has no imports of
the runtime so that the ledger, the lease and the workers can name files too.
"""

from __future__ import annotations

from pathlib import Path

from distinf.store import list_files

MANIFEST = "manifest.json"
LEASE = "lease.json"
INDEX_SET = "index_set.parquet"
REJECTED = "rejected.parquet"
TOP_K = "scores/top_k.parquet"
TRAIN_VALUES = "scores/train_values.parquet"
DENSE = "scores/dense"
VERSIONS = "versions"
QUERIES = "queries"


def gradient_dir(run_dir: str | Path, split: str) -> Path:
    return Path(run_dir) / "gradients" / split


def chunk_path(run_dir: str | Path, split: str, rank: int, chunk: int) -> Path:
    """Chunk `chunk` of `rank`: names come from numbers only, never from example ids."""
    return gradient_dir(run_dir, split) / f"part-{rank:05d}-{chunk:05d}.parquet"


def factors_path(run_dir: str | Path, split: str, rank: int, chunk: int) -> Path:
    """The Kronecker factor sums (hessian.method kfac, kfac_mix) of chunk `chunk` of `rank`, beside it."""
    return gradient_dir(run_dir, split) / f"part-{rank:05d}-{chunk:05d}.factors.safetensors"


def list_chunks(run_dir: str | Path, split: str) -> list[Path]:
    """Committed gradient chunks of a split, in (rank, chunk) order."""
    return [p for p in list_files(gradient_dir(run_dir, split))
            if p.name.startswith("part-") and p.name.endswith(".parquet")]


def ledger_dir(run_dir: str | Path, split: str) -> Path:
    return Path(run_dir) / "ledger" / split


def record_path(run_dir: str | Path, split: str, rank: int, chunk: int) -> Path:
    return ledger_dir(run_dir, split) / f"part-{rank:05d}-{chunk:05d}.json"


def version_dir(run_dir: str | Path, run_id: str) -> Path:
    return Path(run_dir) / VERSIONS / run_id
