"""The run directory's storage layer without Ray: URIs in both spellings, whole-file commits, listing,
and reading a stored curvature back for every hessian.method (the reducer's file format)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from distinf.config import HessianConfig
from distinf.core.curvatures import fit_solver
from distinf.runtime.curvature_files import read_solver
from safetensors.numpy import load_file, save

from distinf.store import (atomic_write_array_stream, atomic_write_arrays, atomic_write_json, commit_table, display,
                           file_sha256, is_empty, is_remote, list_files, read_arrays, read_verified_table, run_path,
                           safetensors_layout)


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
    loaded = read_solver(run_dir, files, HessianConfig(method=method))
    queries = torch.randn(3, 10, dtype=torch.float64)
    np.testing.assert_allclose(loaded.precondition(queries).numpy(), solver.precondition(queries).numpy(),
                               rtol=1e-12, atol=1e-12)


def _mixed_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "cholesky.0": np.asfortranarray(rng.standard_normal((3000, 700))),  # column-major: written in row bands
        "cholesky.1": rng.standard_normal((5, 5)),
        "gram_sum.10": rng.standard_normal((4, 3, 2)).transpose(2, 0, 1),    # neither C- nor F-order
        "scalar": np.array(2.5),
        "empty": np.zeros((0, 4)),
        "big_endian": np.arange(7, dtype=">f8"),
        "f32": rng.standard_normal(9).astype(np.float32),
        "i64": np.arange(-3, 3, dtype=np.int64),
        "flags": np.array([True, False, True]),
    }


def test_a_streamed_safetensors_file_reads_back_with_safetensors_own_loader(tmp_path):
    arrays = _mixed_arrays()
    path = atomic_write_arrays(arrays, tmp_path / "blocks.safetensors")
    loaded = load_file(path)
    assert sorted(loaded) == sorted(arrays)
    for name, array in arrays.items():
        assert loaded[name].shape == array.shape and loaded[name].dtype == array.dtype.newbyteorder("=")
        np.testing.assert_array_equal(loaded[name], array)
    assert {name: a.tolist() for name, a in read_arrays(path, file_sha256(path)).items()} == \
        {name: a.tolist() for name, a in loaded.items()}
    assert list_files(tmp_path) == {path: path.stat().st_size}  # no temporary file left


def test_streamed_arrays_of_one_dtype_are_the_bytes_safetensors_writes(tmp_path):
    arrays = {name: a for name, a in _mixed_arrays().items() if a.dtype == np.float64}
    path = atomic_write_arrays(arrays, tmp_path / "blocks.safetensors")
    assert path.read_bytes() == save({name: np.array(a, order="C") for name, a in arrays.items()})


def test_arrays_may_come_in_any_order_and_are_read_only_until_written(tmp_path):
    # The reducer's pattern: every Gram block is written, then each is overwritten by its factor.
    rng = np.random.default_rng(1)
    blocks = [rng.standard_normal((n, n)) for n in (30, 1, 12)]
    expected = {f"gram_sum.{i}": b.copy() for i, b in enumerate(blocks)}
    expected |= {f"cholesky.{i}": 2 * b.T for i, b in enumerate(blocks)}

    def produce():
        for i, block in enumerate(blocks):
            yield f"gram_sum.{i}", block
        for i, block in enumerate(blocks):
            block *= 2  # in place, after its Gram sum is on its way to disk
            yield f"cholesky.{i}", block.T

    layout = safetensors_layout({name: (a.dtype, a.shape) for name, a in expected.items()})
    path = atomic_write_array_stream(layout, produce(), tmp_path / "blocks.safetensors")
    loaded = load_file(path)
    assert sorted(loaded) == sorted(expected)
    for name, array in expected.items():
        np.testing.assert_array_equal(loaded[name], array)
    assert path.read_bytes() == save({name: np.array(a, order="C") for name, a in expected.items()})


@pytest.mark.parametrize("broken", ["missing", "shape", "unknown", "twice"])
def test_a_stream_that_does_not_match_its_header_is_refused_and_nothing_is_committed(tmp_path, broken):
    a, b = np.ones((2, 2)), np.zeros(3)
    layout = [("a", a.dtype, a.shape), ("b", b.dtype, b.shape)]
    arrays = {"missing": [("a", a)], "shape": [("a", a), ("b", np.zeros(4))],
              "unknown": [("a", a), ("c", b)], "twice": [("a", a), ("a", a), ("b", b)]}[broken]
    with pytest.raises(ValueError, match="safetensors"):
        atomic_write_array_stream(layout, iter(arrays), tmp_path / "blocks.safetensors")
    assert list_files(tmp_path) == {}


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_gradient_chunks_are_zstd_with_byte_stream_split_floats_and_read_back_in_pyarrow_and_duckdb(tmp_path, dtype):
    import duckdb
    import pyarrow.parquet as pq

    from distinf.tables import gradient_table, gradients_of

    grads = np.random.default_rng(0).standard_normal((16, 300)).astype(np.float32) * 1e-3
    table = gradient_table([f"ex-{i}" for i in range(16)], np.arange(16, dtype=np.float32), grads, dtype)
    path = tmp_path / "part-00000-00000.parquet"
    record = commit_table(table, path)
    meta = pq.ParquetFile(path).metadata.row_group(0)
    columns = {meta.column(i).path_in_schema: meta.column(i) for i in range(meta.num_columns)}
    assert {c.compression for c in columns.values()} == {"ZSTD"}
    assert "RLE_DICTIONARY" in columns["example_id"].encodings  # strings keep their dictionary
    assert "BYTE_STREAM_SPLIT" not in columns["loss"].encodings  # scalar floats stay plain, for every reader
    # float16 stays PLAIN: DuckDB refuses BYTE_STREAM_SPLIT on half floats.
    assert ("BYTE_STREAM_SPLIT" in columns["grad.list.element"].encodings) == (dtype == "float32")
    assert not any("DICTIONARY" in e for e in columns["grad.list.element"].encodings)
    stored = gradients_of(read_verified_table(path, record["sha256"]))
    np.testing.assert_array_equal(stored, grads.astype(dtype).astype(np.float32))
    rows = duckdb.sql(f"SELECT example_id, loss, grad FROM '{path}' ORDER BY loss").fetchall()
    assert [r[0] for r in rows] == [f"ex-{i}" for i in range(16)]
    np.testing.assert_array_equal(np.array([r[2] for r in rows], np.float32), stored)
