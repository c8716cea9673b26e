"""The reducer: Gram sums of every train chunk -> damping -> Cholesky -> preconditioned queries.

That is hessian.method gauss_newton, and kfac / kfac_mix, whose blocks are built from the Gram sums
and the chunks' Kronecker factor sums (runtime.chunk_factors) before the same Cholesky; the other methods are solved over the chunks by
distinf.runtime.solve and written to the same curvature/ files. Chunks are (path, sha256) pairs and
are read only if they still match the checksum they were committed with.

Memory: the reducer holds one set of k_l x k_l float64 blocks, the queries and one result at a
time, never a model. Gram tasks each sum a group of chunks, read one at a time, and return numpy
blocks that the reducer reads from Ray's object store without a copy and adds into its total in
place. The total is written to curvature/blocks.safetensors as it is (gram_sum.i), then each block
is turned into its Cholesky factor in its own storage and written too (cholesky.i); the file is
streamed, never built in memory. The factors and Q go into the object store once, as numpy
arrays (Curvature pickles so), and every scoring task reads that one copy; the reducer drops its
own. The files' names and layout per method: distinf.runtime.curvature_files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import ray
import torch

from distinf.config import HessianConfig
from distinf.core.compressors.none import available_bytes, human_bytes
from distinf.core.curvature import Curvature, GramSums, factorize_or_zero_, precondition, zero_blocks
from distinf.core.kfac import KFAC_METHODS, FactorSums
from distinf.core.numerics import require_finite_columns
from distinf.core.scoring import query_divisors
from distinf.runtime import metrics
from distinf.runtime.chunk_factors import add_factor_sums, read_factor_sums
from distinf.runtime.curvature_files import ARRAYS, ARRAYS_OF, SUM_ARRAYS, write_layout
from distinf.runtime.faults import injected_fault, injected_hang, injected_step_delay
from distinf.runtime.solve import Chunk, chunk_grads, chunk_groups, merge_blocks, solve_chunks
from distinf.store import (atomic_write_array_stream, atomic_write_arrays, read_arrays,
                           read_verified_table, safetensors_layout)
from distinf.tables import gradients_of


@ray.remote(num_cpus=1)
def chunk_gram(chunks: list[Chunk], slices: list[slice]) -> tuple[list[np.ndarray], int]:
    """Partial Gram sums Σ ĝ ĝᵀ (float64 blocks, as numpy) and the example count of a group of
    committed gradient chunks, read one at a time: one set of blocks per task, whatever the group."""
    sums = GramSums(slices)
    for path, sha256 in chunks:
        sums.add(chunk_grads(path, sha256, slices))
    return [block.numpy() for block in sums.blocks], sums.count


def zero_block_entries(index_table, spans: list[tuple[int, int]]) -> list[dict]:
    """The manifest's zero_blocks: each block's columns "a:b" and the parameter tensors in them."""
    params = index_table.column("param").to_pylist()
    return [{"columns": f"{a}:{b}", "params": list(dict.fromkeys(params[a:b]))} for a, b in spans]


@ray.remote(num_cpus=1, max_concurrency=2)  # a second thread answers `progress` while `reduce` works
class Reducer:
    def __init__(self, slices: list[slice], hessian: dict, job: str = ""):
        self.steps = {"chunk_groups_merged": 0, "blocks_factorised": 0, "queries_preconditioned": 0}
        """What `reduce` has done so far: the driver counts a stall as a time without any step."""
        self.slices = slices
        self.job = job  # the job's name, for its progress metrics
        self.hessian = HessianConfig.model_validate(hessian)
        if self.hessian.method in ("gauss_newton", "datainf", *KFAC_METHODS):
            # The blocks (factorised in place) and their copy in the object store, on this node.
            need = 16 * sum((s.stop - s.start) ** 2 for s in slices)
            if need > 0.8 * available_bytes():
                raise MemoryError(
                    f"hessian.blocks: {len(slices)} curvature block(s) of up to {max(s.stop - s.start for s in slices):,} "
                    f"columns need {human_bytes(need)} but only {human_bytes(available_bytes())} is available; "
                    "use blocks: layer, a smaller compression.k, or hessian.method: identity or lissa")

    def reduce(self, train_chunks: list[Chunk], query_chunks: list[Chunk],
               curvature_dir: str, attempt: int = 0, stored_sums: tuple[str, str, int] | None = None,
               normalize: str = "none", factor_chunks: list[Chunk] = (), index_table=None) -> dict:
        """Sum the chunks' Gram sums, factorise, precondition the queries; returns object refs.

        `stored_sums` (gauss_newton, an append): (path, sha256, count) of a stored run's
        blocks.safetensors, whose gram_sum.i are the sums over every chunk not in `train_chunks`;
        they are the starting point, so only the new chunks are read. `factor_chunks` (kfac,
        kfac_mix): (path, sha256) of every train chunk's factor sums; `index_table` the run's index set."""
        injected_fault("reducer", attempt)  # tests only
        injected_hang("reducer", attempt)
        if self.hessian.method in ("gauss_newton", *KFAC_METHODS):
            factors = (self._factor_sums(factor_chunks, index_table) if self.hessian.method in KFAC_METHODS
                       else None)
            curvature, count = self._gauss_newton(train_chunks, Path(curvature_dir), stored_sums, factors)
        else:
            curvature, count = solve_chunks(self.hessian, self.slices, train_chunks)
            atomic_write_arrays(ARRAYS_OF[self.hessian.method](curvature), Path(curvature_dir) / Path(ARRAYS).name)
            write_layout(Path(curvature_dir), self.hessian.method, count, self.slices, curvature.damping)

        query_tables = [read_verified_table(path, sha256) for path, sha256 in query_chunks]
        for (path, _), table in zip(query_chunks, query_tables):
            require_finite_columns(gradients_of(table), self.slices, f"query gradient chunk {path}")
        query_grads = torch.from_numpy(np.concatenate([gradients_of(t) for t in query_tables]))
        query_ids = [i for t in query_tables for i in t.column("example_id").to_pylist()]
        query_losses = np.concatenate([t.column("loss").to_numpy() for t in query_tables])
        del query_tables
        preconditioned = precondition(curvature, query_grads).T.contiguous().numpy()  # [k, m]
        divisors = query_divisors(normalize, query_grads, torch.from_numpy(preconditioned))
        del query_grads
        require_finite_columns(preconditioned.T, self.slices, "the preconditioned queries Ĥ⁻¹ĝ")
        self._step("queries_preconditioned")
        zero = getattr(curvature, "zero_blocks", [])
        result = {
            # Wrapped in a list so Ray hands the caller the reference, not the array.
            "queries": [ray.put(preconditioned)],
            "curvature": [ray.put(curvature)],
            "query_ids": query_ids,
            "query_losses": query_losses,
            "query_divisors": divisors,  # scoring.normalize's per-query factor [m]
            "damping": curvature.damping,
            "count": count,
            "zero_blocks": [(self.slices[i].start, self.slices[i].stop) for i in zero],
        }
        # The object store holds them now; this process keeps no copy of its own.
        del preconditioned, curvature
        return result

    def progress(self) -> dict[str, int]:
        return dict(self.steps)

    def _merged(self, done: int, tasks: int) -> None:
        metrics.stage_progress(self.job, "curvature", done, tasks)
        if done:
            self._step("chunk_groups_merged")

    def _step(self, name: str) -> None:
        self.steps[name] += 1
        injected_step_delay("reducer")  # tests only

    def _factor_sums(self, factor_chunks: list[Chunk], index_table) -> FactorSums:
        """The sum of every chunk's Kronecker factor sums, read one file at a time."""
        total = None
        for path, sha256 in factor_chunks:
            total = add_factor_sums(total, read_factor_sums(read_arrays(path, sha256), index_table, path), path)
        if total is None:
            raise ValueError("no training examples: the curvature is undefined")
        return total

    def _gauss_newton(self, train_chunks: list[Chunk], folder: Path,
                      stored_sums: tuple[str, str, int] | None = None,
                      factors: FactorSums | None = None) -> tuple[Curvature, int]:
        """gauss_newton; with `factors` (kfac, kfac_mix) the summed blocks are turned into
        (1 − mix)·n·K_S + mix·Σ ĝĝᵀ first, as distinf.attribute does, then factorised alike."""
        total = GramSums(self.slices)
        if stored_sums is not None:
            path, sha256, count = stored_sums
            stored = read_arrays(path, sha256)
            for i, block in enumerate(total.blocks):
                block.copy_(torch.from_numpy(stored[f"gram_sum.{i}"]))
            total.count = count
            del stored
        pending = [chunk_gram.remote(group, self.slices) for group in chunk_groups(train_chunks, self.slices)]
        merge_blocks(pending, total, self._merged)
        if total.count == 0:
            raise ValueError("no training examples: the curvature is undefined")
        if factors is not None:
            total = factors.curvature_sums(total, self.hessian.gram_share, self.hessian.eigen_corrected)
        count, lambdas = total.count, []
        sum_name = SUM_ARRAYS[self.hessian.method]
        zero = zero_blocks([float(torch.trace(b)) for b in total.blocks], count, self.slices)

        def arrays():
            # Gram sums first, as they are; then each block becomes its factor in place.
            for i, block in enumerate(total.blocks):
                yield f"{sum_name}.{i}", block.numpy()
            for i, (block, part) in enumerate(zip(total.blocks, self.slices)):
                lam, factor = factorize_or_zero_(block, count, self.hessian.damping, part, i in zero)
                total.blocks[i] = factor
                lambdas.append(lam)
                self._step("blocks_factorised")
                yield f"cholesky.{i}", factor.numpy()

        shapes = {f"{kind}.{i}": (np.float64, (s.stop - s.start,) * 2)
                  for kind in (sum_name, "cholesky") for i, s in enumerate(self.slices)}
        atomic_write_array_stream(safetensors_layout(shapes), arrays(), folder / Path(ARRAYS).name)
        write_layout(folder, self.hessian.method, count, self.slices, lambdas, zero)
        return Curvature(self.slices, total.blocks, lambdas, count, zero), count
