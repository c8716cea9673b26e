"""The committed training chunks as a hessian.method's chunked solve reads them: Ray tasks over the chunks.

`CommittedChunks` is the runtime's distinf.core.curvatures.base.TrainChunks: each method's class
says what to compute (sums, traces, ids, sampled rows), and this spreads it over the chunks.
Chunks are (path, sha256) pairs, read only if they still match their checksum.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import pyarrow as pa
import ray
import torch

from distinf.core.compressors.none import available_bytes
from distinf.core.curvature import GramSums
from distinf.core.kfac import FactorSums
from distinf.core.numerics import require_finite_columns
from distinf.core.solvers import block_traces
from distinf.runtime.chunk_factors import add_factor_sums, read_factor_sums
from distinf.store import read_arrays, read_verified_table
from distinf.tables import gradients_of

Chunk = tuple[str, str]  # (path, sha256)


def chunk_groups(chunks: list[Chunk], slices: list[slice]) -> list[list[Chunk]]:
    """The chunks dealt round-robin into groups, one per task that sums k_l x k_l blocks.

    Each task holds one set of blocks however many chunks it reads, and its result is one set in
    the object store until the reducer has added it, so there are as many groups as CPUs are free
    in the cluster, at most one per chunk, and no more than a quarter of this node's free memory
    holds as sets of blocks.
    """
    if not chunks:
        return []
    set_bytes = 8 * sum((s.stop - s.start) ** 2 for s in slices)
    cpus = int(ray.available_resources().get("CPU", 0))
    count = max(1, min(len(chunks), cpus, available_bytes() // (4 * max(1, set_bytes))))
    return [chunks[g::count] for g in range(count)]


def merge_blocks(futures: list, total: Any, progress: Callable[[int, int], None] | None = None) -> None:
    """Add each task's (numpy blocks, count) into `total` (GramSums, DataInfSums, ...) as it arrives:
    the blocks are read from the object store without a copy, added in place and dropped at once.
    `progress(done, total)` is told before the first and after each merge, for the reducer's
    progress and metrics."""
    pending = list(futures)
    if progress is not None:
        progress(0, len(futures))
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        blocks, count = ray.get(done[0])
        for mine, theirs in zip(total.blocks, blocks, strict=True):
            view = mine.numpy()
            np.add(view, theirs, out=view)
        total.count += count
        del blocks, done
        if progress is not None:
            progress(len(futures) - len(pending), len(futures))


def chunk_grads(path: str, sha256: str, slices: list[slice]) -> torch.Tensor:
    """A committed chunk's gradients [n, k], refused (naming the file and block) unless finite."""
    grads = gradients_of(read_verified_table(path, sha256, columns=["grad"]))
    require_finite_columns(grads, slices, f"gradient chunk {path}")
    return torch.from_numpy(grads)


@ray.remote(num_cpus=1)
def chunk_sums(chunks: list[Chunk], slices: list[slice], empty: Callable[[], Any]) -> tuple[list[np.ndarray], int]:
    """Additive sums (`empty()`: GramSums, DataInfSums, ...; float64 blocks, as numpy) and the example
    count of a group of committed gradient chunks, read one at a time: one set of blocks per task,
    whatever the group."""
    sums = empty()
    for path, sha256 in chunks:
        sums.add(chunk_grads(path, sha256, slices))
    return [block.numpy() for block in sums.blocks], sums.count


@ray.remote(num_cpus=1)
def chunk_traces(path: str, sha256: str, slices: list[slice]) -> tuple[list[float], int]:
    grads = chunk_grads(path, sha256, slices)
    return block_traces(grads, slices), grads.shape[0]


@ray.remote(num_cpus=1)
def chunk_ids(path: str, sha256: str) -> list[str]:
    return read_verified_table(path, sha256, columns=["example_id"]).column("example_id").to_pylist()


@ray.remote(num_cpus=1)
def chunk_rows(path: str, sha256: str, rows: list[int]) -> np.ndarray:
    return gradients_of(read_verified_table(path, sha256, columns=["grad"]))[rows]


def _reduce(futures: list, merge: Callable[[Any], None]) -> None:
    pending = list(futures)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        merge(ray.get(done[0]))


class CommittedChunks:
    """The train chunks a reducer solves over (distinf.core.curvatures.base.TrainChunks).

    `stored_sums`: (path, sha256, count) of an extended run's blocks.safetensors, whose gram_sum.i
    are the sums over every chunk not in `chunks` (an append of a method that extends them);
    `factor_chunks`, (path, sha256) of every train chunk's Kronecker factor sums, and `index_table`,
    the run's index set, for the methods that need factors. `progress(done, total)` hears of each
    merged group of chunks, `step(name)` of each other step.
    """

    def __init__(self, slices: list[slice], chunks: list[Chunk], stored_sums: tuple[str, str, int] | None = None,
                 factor_chunks: list[Chunk] = (), index_table: pa.Table | None = None,
                 progress: Callable[[int, int], None] | None = None, step: Callable[[str], None] | None = None):
        self.slices, self.chunks = slices, chunks
        self.stored_sums, self.factor_chunks, self.index_table = stored_sums, factor_chunks, index_table
        self.progress, self._step = progress, step
        self._ids: list[list[str]] | None = None

    def sum(self, empty: Callable[[], Any], start: Any = None) -> Any:
        total = empty() if start is None else start
        merge_blocks([chunk_sums.remote(group, self.slices, empty) for group in chunk_groups(self.chunks, self.slices)],
                     total, self.progress)
        return total

    def traces(self) -> tuple[list[float], int]:
        traces, count = [0.0] * len(self.slices), 0

        def merge(result: tuple[list[float], int]) -> None:
            nonlocal count
            for i, t in enumerate(result[0]):
                traces[i] += t
            count += result[1]

        _reduce([chunk_traces.remote(path, sha256, self.slices) for path, sha256 in self.chunks], merge)
        if count == 0:
            raise ValueError("no training examples: the curvature is undefined")
        return traces, count

    def _ids_per_chunk(self) -> list[list[str]]:
        if self._ids is None:
            self._ids = ray.get([chunk_ids.remote(p, s) for p, s in self.chunks])
        return self._ids

    def ids(self) -> list[str]:
        return [i for ids in self._ids_per_chunk() for i in ids]

    def rows(self, positions: Sequence[int]) -> torch.Tensor:
        owner = [(c, r) for c, ids in enumerate(self._ids_per_chunk()) for r in range(len(ids))]
        by_chunk: dict[int, list[int]] = {}
        for c, r in sorted({owner[p] for p in positions}):
            by_chunk.setdefault(c, []).append(r)
        fetched = dict(zip(by_chunk, ray.get([chunk_rows.remote(*self.chunks[c], rows)
                                              for c, rows in by_chunk.items()])))
        row_of = {(c, r): fetched[c][i] for c, rows in by_chunk.items() for i, r in enumerate(rows)}
        return torch.from_numpy(np.stack([row_of[owner[p]] for p in positions]))

    def stored_gram_sums(self) -> GramSums | None:
        if self.stored_sums is None:
            return None
        path, sha256, count = self.stored_sums
        stored = read_arrays(path, sha256)
        total = GramSums(self.slices)
        for i, block in enumerate(total.blocks):
            block.copy_(torch.from_numpy(stored[f"gram_sum.{i}"]))
        total.count = count
        return total

    def factor_sums(self) -> FactorSums:
        """The sum of every chunk's Kronecker factor sums, read one file at a time."""
        total = None
        for path, sha256 in self.factor_chunks:
            total = add_factor_sums(total, read_factor_sums(read_arrays(path, sha256), self.index_table, path), path)
        if total is None:
            raise ValueError("no training examples: the curvature is undefined")
        return total

    def step(self, name: str) -> None:
        if self._step is not None:
            self._step(name)
