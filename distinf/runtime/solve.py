"""The reducer's solve for the hessian methods other than gauss_newton, as Ray tasks over train chunks.

The math is distinf.core.solvers; here it is only spread over the committed chunks:
identity needs no pass; datainf sums the chunks' traces (for `damping: auto`) and then their
weighted Gram sums, both additive; lissa sums the traces, reads every chunk's example ids, picks
each iteration's batch by id hash exactly as distinf.attribute does, and fetches those rows.
Chunks are (path, sha256) pairs, read only if they still match their checksum.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import ray
import torch

from distinf.config import HessianConfig
from distinf.core.compressors.none import available_bytes
from distinf.core.solvers import DataInf, DataInfSums, Identity, LiSSA, Solver, block_dampings, block_traces, lissa_samples
from distinf.core.numerics import require_finite_columns
from distinf.store import read_verified_table
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
    """Add each task's (numpy blocks, count) into `total` (GramSums, DataInfSums) as it arrives:
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
def chunk_traces(path: str, sha256: str, slices: list[slice]) -> tuple[list[float], int]:
    grads = chunk_grads(path, sha256, slices)
    return block_traces(grads, slices), grads.shape[0]


@ray.remote(num_cpus=1)
def chunk_datainf(chunks: list[Chunk], slices: list[slice], damping: list[float]) -> tuple[list[np.ndarray], int]:
    """DataInf's weighted Gram sums (numpy blocks) and count of a group of chunks, read one at a time."""
    sums = DataInfSums(slices, damping)
    for path, sha256 in chunks:
        sums.add(chunk_grads(path, sha256, slices))
    return [block.numpy() for block in sums.blocks], sums.count


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


def _dampings(hessian: HessianConfig, slices: list[slice], chunks: list[Chunk]) -> tuple[list[float], int]:
    traces, count = [0.0] * len(slices), 0

    def merge(result: tuple[list[float], int]) -> None:
        nonlocal count
        for i, t in enumerate(result[0]):
            traces[i] += t
        count += result[1]

    _reduce([chunk_traces.remote(path, sha256, slices) for path, sha256 in chunks], merge)
    if count == 0:
        raise ValueError("no training examples: the curvature is undefined")
    return block_dampings(traces, count, slices, hessian.damping), count


def solve_chunks(hessian: HessianConfig, slices: list[slice], chunks: list[Chunk]) -> tuple[Solver, int]:
    """(solver, training count) of hessian.method."""
    if hessian.method == "identity":
        count = sum(len(ids) for ids in ray.get([chunk_ids.remote(p, s) for p, s in chunks]))
        return Identity(slices), count
    damping, count = _dampings(hessian, slices, chunks)
    if hessian.method == "datainf":
        total = DataInfSums(slices, damping)
        merge_blocks([chunk_datainf.remote(group, slices, damping) for group in chunk_groups(chunks, slices)], total)
        solver: DataInf = total.solve_()  # the sums become the inverses: one set of blocks
        return solver, count
    if hessian.method == "lissa":
        ids_per_chunk = ray.get([chunk_ids.remote(p, s) for p, s in chunks])
        owner = [(c, r) for c, ids in enumerate(ids_per_chunk) for r in range(len(ids))]
        samples = lissa_samples([i for ids in ids_per_chunk for i in ids], hessian.lissa_iterations,
                                hessian.lissa_batch_size, hessian.lissa_seed)
        wanted = sorted({owner[p] for rows in samples for p in rows})
        by_chunk: dict[int, list[int]] = {}
        for c, r in wanted:
            by_chunk.setdefault(c, []).append(r)
        fetched = dict(zip(by_chunk, ray.get([chunk_rows.remote(*chunks[c], rows) for c, rows in by_chunk.items()])))
        row_of = {(c, r): fetched[c][i] for c, rows in by_chunk.items() for i, r in enumerate(rows)}
        batches = [torch.from_numpy(np.stack([row_of[owner[p]] for p in rows])) for rows in samples]
        solver = LiSSA.build(slices, damping, batches, hessian.lissa_scale)
        return solver, count
    raise ValueError(f"hessian.method: {hessian.method} is not solved over chunks")
