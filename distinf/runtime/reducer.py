"""The reducer: Gram sums of every train chunk -> damping -> Cholesky -> preconditioned queries.

That is hessian.method gauss_newton; the other methods are solved over the chunks by
distinf.runtime.solve and written to the same curvature/ files. It holds O(k²) (the blocks)
and O(k·m) (the queries), never a model. Q goes into the object store once and every scoring
task reads that one copy. Chunks are (path, sha256) pairs and are
read only if they still match the checksum they were committed with.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import ray
import torch

from distinf.config import HessianConfig
from distinf.core.compressors.none import available_bytes, human_bytes
from distinf.core.curvature import Curvature, GramSums, factorize, precondition
from distinf.runtime.faults import injected_fault
from distinf.core.solvers import Solver
from distinf.runtime.solve import solve_chunks
from distinf.store import atomic_write_arrays, atomic_write_json, read_verified_table
from distinf.tables import gradients_of


@ray.remote(num_cpus=1)
def chunk_gram(path: str, sha256: str, slices: list[slice]) -> GramSums:
    """Partial Gram sums Σ ĝ ĝᵀ (float64) of one committed gradient chunk."""
    table = read_verified_table(path, sha256, columns=["grad"])
    return GramSums(slices).add(torch.from_numpy(gradients_of(table)))


@ray.remote(num_cpus=1)
class Reducer:
    def __init__(self, slices: list[slice], hessian: dict):
        self.slices = slices
        self.hessian = HessianConfig.model_validate(hessian)
        self.curvature: Curvature | Solver | None = None
        if self.hessian.method in ("gauss_newton", "datainf"):
            need = 16 * sum((s.stop - s.start) ** 2 for s in slices)  # float64 block and its factor
            if need > 0.8 * available_bytes():
                raise MemoryError(
                    f"hessian.blocks: {len(slices)} curvature block(s) of up to {max(s.stop - s.start for s in slices):,} "
                    f"columns need {human_bytes(need)} but only {human_bytes(available_bytes())} is available; "
                    "use blocks: layer, a smaller compression.k, or hessian.method: identity or lissa")

    def reduce(self, train_chunks: list[tuple[str, str]], query_chunks: list[tuple[str, str]],
               curvature_dir: str, attempt: int = 0) -> dict:
        """Sum the chunks' Gram sums, factorise, precondition the queries; returns object refs."""
        injected_fault("reducer", attempt)  # tests only
        if self.hessian.method == "gauss_newton":
            total = GramSums(self.slices)
            pending = [chunk_gram.remote(path, sha256, self.slices) for path, sha256 in train_chunks]
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                total.merge(ray.get(done[0]))
            self.curvature = factorize(total, self.hessian.damping)
            self._save(total, Path(curvature_dir))
            count = total.count
        else:
            self.curvature, arrays, count = solve_chunks(self.hessian, self.slices, train_chunks)
            self._write(arrays, count, Path(curvature_dir))

        query_tables = [read_verified_table(path, sha256) for path, sha256 in query_chunks]
        query_grads = torch.from_numpy(np.concatenate([gradients_of(t) for t in query_tables]))
        query_ids = [i for t in query_tables for i in t.column("example_id").to_pylist()]
        query_losses = np.concatenate([t.column("loss").to_numpy() for t in query_tables])
        preconditioned = precondition(self.curvature, query_grads).T.contiguous().numpy()  # [k, m]
        return {
            # Wrapped in a list so Ray hands the caller the reference, not the array.
            "queries": [ray.put(preconditioned)],
            "curvature": [ray.put(self.curvature)],
            "query_ids": query_ids,
            "query_losses": query_losses,
            "damping": self.curvature.damping,
            "count": count,
        }

    def _save(self, total: GramSums, folder: Path) -> None:
        arrays = {}
        for i, (block, factor) in enumerate(zip(total.blocks, self.curvature.cholesky)):
            arrays[f"gram_sum.{i}"] = block.numpy()
            arrays[f"cholesky.{i}"] = factor.numpy()
        self._write(arrays, total.count, folder)

    def _write(self, arrays: dict[str, np.ndarray], count: int, folder: Path) -> None:
        """blocks.safetensors (gauss_newton: gram_sum.i, cholesky.i; datainf: inverse.i; lissa:
        batch.j, the sampled rows; identity: nothing) and blocks.json."""
        atomic_write_arrays(arrays, folder / "blocks.safetensors")
        atomic_write_json({
            "method": self.hessian.method,
            "count": count,
            "blocks": [{"start": s.start, "stop": s.stop, "damping": lam}
                       for s, lam in zip(self.slices, self.curvature.damping)],
        }, folder / "blocks.json")
