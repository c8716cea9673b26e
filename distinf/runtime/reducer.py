"""The reducer: hessian.method's solve over every train chunk -> curvature/ -> preconditioned queries.

The method's class (distinf.core.curvatures) solves over the chunks as distinf.runtime.solve offers
them (for gauss_newton: Gram sums -> damping -> Cholesky; kfac and its kin build their blocks from
the Gram sums and the chunks' Kronecker factor sums first), and the arrays it gives are streamed
into curvature/blocks.safetensors. Chunks are (path, sha256) pairs and are read only if they still
match the checksum they were committed with.

Memory: the reducer holds one set of k_l x k_l float64 blocks, the queries and one result at a
time, never a model. Sum tasks each sum a group of chunks, read one at a time, and return numpy
blocks that the reducer reads from Ray's object store without a copy and adds into its total in
place. A Cholesky method's total is written as it is (gram_sum.i), then each block is turned into
its factor in its own storage and written too (cholesky.i); the file is streamed, never built in
memory. The factors and Q go into the object store once, as numpy
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
from distinf.core.curvature import precondition
from distinf.core.curvatures import curvature_method
from distinf.core.numerics import require_finite_columns
from distinf.core.scoring import query_divisors
from distinf.runtime import metrics
from distinf.runtime.curvature_files import ARRAYS, write_layout
from distinf.runtime.faults import injected_fault, injected_hang, injected_step_delay
from distinf.runtime.solve import Chunk, CommittedChunks
from distinf.store import atomic_write_array_stream, read_verified_table, safetensors_layout
from distinf.tables import gradients_of


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
        self.method = curvature_method(self.hessian)
        # The blocks (factorised in place) and their copy in the object store, on this node.
        need = self.method.block_bytes([s.stop - s.start for s in slices])
        if need > 0.8 * available_bytes():
            raise MemoryError(
                f"hessian.blocks: {len(slices)} curvature block(s) of up to {max(s.stop - s.start for s in slices):,} "
                f"columns need {human_bytes(need)} but only {human_bytes(available_bytes())} is available; "
                "use blocks: layer, a smaller compression.k, or hessian.method: identity or lissa")

    def reduce(self, train_chunks: list[Chunk], query_chunks: list[Chunk],
               curvature_dir: str, attempt: int = 0, stored_sums: tuple[str, str, int] | None = None,
               normalize: str = "none", factor_chunks: list[Chunk] = (), index_table=None) -> dict:
        """Solve the curvature over the chunks, write curvature/, precondition the queries; returns object refs.

        `stored_sums` (gauss_newton, an append): (path, sha256, count) of a stored run's
        blocks.safetensors, whose gram_sum.i are the sums over every chunk not in `train_chunks`;
        they are the starting point, so only the new chunks are read. `factor_chunks` (kfac and its
        kin): (path, sha256) of every train chunk's factor sums; `index_table` the run's index set."""
        injected_fault("reducer", attempt)  # tests only
        injected_hang("reducer", attempt)
        train = CommittedChunks(self.slices, train_chunks, stored_sums, factor_chunks, index_table,
                                progress=self._merged, step=self._step)
        solved = self.method.solve_chunks(self.slices, train)
        atomic_write_array_stream(safetensors_layout(solved.shapes), solved.arrays,
                                  Path(curvature_dir) / Path(ARRAYS).name)
        curvature, count = solved.solver(), solved.count
        del solved, train
        write_layout(Path(curvature_dir), self.hessian.method, count, self.slices, curvature.damping,
                     getattr(curvature, "zero_blocks", []))

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
