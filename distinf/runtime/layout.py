"""The names inside a run directory, and nothing else: the one place a file's path is spelled.

    manifest.json                     written last; says what the folder holds (runtime.manifest)
    lease.json                        the one writer's lease (runtime.lease)
    index_set.parquet                 the tracked entries every gradient column stands for
    rejected.parquet                  rows left out, and why
    gradients/{split}/part-RRRRR-CCCCC.parquet   chunk C of rank R
    factors/train/part-RRRRR-CCCCC.safetensors   its Kronecker factor sums (kfac, kfac_mix, ekfac);
                                      outside gradients/, which stays a folder of Parquet files only
                                      (runs before issue 28 kept them there: their ledger records name them)
    ledger/{split}/part-RRRRR-CCCCC.json         its commit record (distinf.runtime.ledger)
    curvature/                        the solver's files (runtime.curvature_files)
    scores/top_k.parquet, scores/train_values.parquet, scores/dense/part-*.parquet
    versions/{run_id}/                a version's outputs, staged, then published (runtime.versions)
    queries/{stem}/                   `distinf query` outputs, each a small run directory of its own

`RunDir` (runtime.run_dir) is the object the runtime goes through; this module has no imports of
the runtime so that the ledger, the lease and the workers can name files too.
"""

from __future__ import annotations

import re
from pathlib import Path

from distinf.store import IntegrityError, list_files

SPLITS = ("train", "queries")
"""The two splits a run holds gradients of (gradients/{split}/, ledger/{split}/)."""
MANIFEST = "manifest.json"
LEASE = "lease.json"
INDEX_SET = "index_set.parquet"
REJECTED = "rejected.parquet"
TOP_K = "scores/top_k.parquet"
TRAIN_VALUES = "scores/train_values.parquet"
DENSE = "scores/dense"
CURVATURE = "curvature"
VERSIONS = "versions"
QUERIES = "queries"


def safe_name(name: object, where: str) -> str:
    """`name`, a file's name relative to the run directory as a record or manifest gives it, unless
    it could leave the folder (absolute, a drive or URI, or a `..` part): a record read back is
    data, and `--discard-pending` deletes what records name. `where` names the record."""
    if (not isinstance(name, str) or not name or name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:|.*://", name)
            or ".." in re.split(r"[/\\]", name)):
        raise IntegrityError(f"{where} names the file {name!r}, which is not a relative path inside the run "
                             "directory; the record was not written by distinf: remove it or choose a new output "
                             "folder")
    return name


def run_file(run_dir: str | Path, name: object, where: str = "a record of the run directory") -> Path:
    """The file of the run directory that a record names (`safe_name`)."""
    return Path(run_dir) / safe_name(name, where)


def gradient_dir(run_dir: str | Path, split: str) -> Path:
    return Path(run_dir) / "gradients" / split


def chunk_path(run_dir: str | Path, split: str, rank: int, chunk: int) -> Path:
    """Chunk `chunk` of `rank`: names come from numbers only, never from example ids."""
    return gradient_dir(run_dir, split) / f"part-{rank:05d}-{chunk:05d}.parquet"


def factors_path(run_dir: str | Path, split: str, rank: int, chunk: int) -> Path:
    """The Kronecker factor sums (hessian.method kfac, kfac_mix, ekfac) of chunk `chunk` of `rank`,
    in a folder of their own, so that `gradients/{split}/` reads as one Parquet dataset."""
    return Path(run_dir) / "factors" / split / f"part-{rank:05d}-{chunk:05d}.safetensors"


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
