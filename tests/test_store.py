"""The run directory's storage layer without Ray: URIs in both spellings, whole-file commits, listing,
and reading a stored curvature back for every hessian.method (the reducer's file format)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from distinf.config import HessianConfig
from distinf.core.solvers import fit_solver
from distinf.runtime.query import load_solver
from distinf.store import (atomic_write_arrays, atomic_write_json, commit_table, display, file_sha256, is_empty,
                           is_remote, list_files, read_verified_table, run_path)


def test_a_uri_keeps_its_meaning_when_pathlib_folds_its_slashes():
    folded = Path("s3://bucket/runs/x") / "scores" / "top_k.parquet"
    assert str(folded) == "s3:/bucket/runs/x/scores/top_k.parquet"  # what pathlib makes of it
    assert is_remote(folded) and is_remote("gs://b/k") and not is_remote("runs/s3/x") and not is_remote("C:/x")
    assert display(folded) == "s3://bucket/runs/x/scores/top_k.parquet"
    assert run_path("s3://bucket/runs/x") == Path("s3://bucket/runs/x")  # not made relative to the cwd
    assert run_path("runs/x") == Path("runs/x").resolve()


def test_a_committed_table_is_whole_with_its_checksum_and_no_temporary_file_is_left(tmp_path):
    table = pa.table({"a": list(range(100))})
    record = commit_table(table, tmp_path / "deep" / "part-00000-00000.parquet")
    path = tmp_path / "deep" / "part-00000-00000.parquet"
    assert record == {"rows": 100, "bytes": path.stat().st_size, "sha256": file_sha256(path)}
    assert read_verified_table(path, record["sha256"]).equals(table)
    assert list(list_files(tmp_path, recursive=True)) == [path]
    assert not is_empty(tmp_path) and is_empty(tmp_path / "nothing")


@pytest.mark.parametrize("method", ["gauss_newton", "identity", "datainf", "lissa"])
def test_a_stored_curvature_reads_back_to_the_solver_it_was_written_from(tmp_path, method):
    torch.manual_seed(0)
    slices = [slice(0, 6), slice(6, 10)]
    train = torch.randn(40, 10, dtype=torch.float64)
    solver = fit_solver(method, slices, train, train_ids=[str(i) for i in range(40)], lissa_batch_size=8)
    # The reducer's layout: blocks.safetensors (gauss_newton: cholesky.i; datainf: inverse.i;
    # lissa: batch.j; identity: nothing) and blocks.json (method, count, per-block damping).
    arrays = {"gauss_newton": lambda: {f"cholesky.{i}": f.numpy() for i, f in enumerate(solver.cholesky)},
              "identity": dict,
              "datainf": lambda: {f"inverse.{i}": m.numpy() for i, m in enumerate(solver.inverses)},
              "lissa": lambda: {f"batch.{j}": b.numpy() for j, b in enumerate(solver.batches)}}[method]()
    run_dir = tmp_path / "run"
    atomic_write_arrays(arrays, run_dir / "curvature" / "blocks.safetensors")
    atomic_write_json({"method": method, "count": 40,
                       "blocks": [{"start": s.start, "stop": s.stop, "damping": d}
                                  for s, d in zip(slices, solver.damping)]}, run_dir / "curvature" / "blocks.json")
    files = {name: file_sha256(run_dir / name) for name in ("curvature/blocks.json", "curvature/blocks.safetensors")}
    loaded = load_solver(run_dir, {"files": files}, HessianConfig(method=method))
    queries = torch.randn(3, 10, dtype=torch.float64)
    np.testing.assert_allclose(loaded.precondition(queries).numpy(), solver.precondition(queries).numpy(),
                               rtol=1e-12, atol=1e-12)
