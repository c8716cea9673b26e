"""The reducer: Gram sums of every train chunk -> damping -> Cholesky -> preconditioned queries.

It holds O(k²) (the blocks) and O(k·m) (the queries), never a model. Q goes into the object
store once and every scoring task reads that one copy.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import ray
import torch

from distinf.core.curvature import Curvature, GramSums, factorize, precondition
from distinf.store import atomic_write_arrays, atomic_write_json
from distinf.tables import gradients_of


@ray.remote(num_cpus=1)
def chunk_gram(path: str, slices: list[slice]) -> GramSums:
    """Partial Gram sums Σ ĝ ĝᵀ (float64) of one committed gradient chunk."""
    return GramSums(slices).add(torch.from_numpy(gradients_of(pq.read_table(path, columns=["grad"]))))


@ray.remote(num_cpus=1)
class Reducer:
    def __init__(self, slices: list[slice], damping: str | float):
        self.slices, self.damping = slices, damping
        self.curvature: Curvature | None = None

    def reduce(self, train_chunks: list[str], query_chunks: list[str], curvature_dir: str) -> dict:
        """Sum the chunks' Gram sums, factorise, precondition the queries; returns object refs."""
        total = GramSums(self.slices)
        pending = [chunk_gram.remote(path, self.slices) for path in train_chunks]
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            total.merge(ray.get(done[0]))
        self.curvature = factorize(total, self.damping)
        self._save(total, Path(curvature_dir))

        query_tables = [pq.read_table(path) for path in query_chunks]
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
            "count": total.count,
        }

    def _save(self, total: GramSums, folder: Path) -> None:
        arrays = {}
        for i, (block, factor) in enumerate(zip(total.blocks, self.curvature.cholesky)):
            arrays[f"gram_sum.{i}"] = block.numpy()
            arrays[f"cholesky.{i}"] = factor.numpy()
        atomic_write_arrays(arrays, folder / "blocks.safetensors")
        atomic_write_json({
            "count": total.count,
            "blocks": [{"start": s.start, "stop": s.stop, "damping": lam}
                       for s, lam in zip(self.slices, self.curvature.damping)],
        }, folder / "blocks.json")
