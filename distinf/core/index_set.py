"""The shared random index set S: which k of the p tracked gradient entries every example keeps.

S depends only on (seed, parameter names, shapes, k, allocation), never on world size, rank,
batch or device, so every worker, restart and later query run derives the same S. Order is
canonical: parameters in the order given (model.named_parameters()), flat indices ascending
inside each parameter.
"""

from __future__ import annotations

import hashlib
import math
import zlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pyarrow as pa

ParamShapes = Sequence[tuple[str, tuple[int, ...]]]


class Columns:
    """Where each tracked parameter's entries sit in an [N, k] compressed gradient: `sizes[i]`
    consecutive columns for `names[i]`, in order. IndexSet (dropout) and Layout (the projections)
    both describe their columns this way, so curvature blocks and scoring take either.
    """

    names: tuple[str, ...]
    sizes: Sequence[int]

    @property
    def k(self) -> int:
        return sum(self.sizes)

    @property
    def offsets(self) -> list[int]:
        """Start column of each parameter's entries."""
        return [0, *np.cumsum(self.sizes).tolist()][:-1]

    def slices(self) -> dict[str, slice]:
        return {name: slice(start, start + size) for name, start, size in zip(self.names, self.offsets, self.sizes)}


@dataclass(frozen=True)
class IndexSet(Columns):
    """S as one sorted int64 array of flat indices per tracked parameter."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    flat_indices: tuple[np.ndarray, ...]

    @property
    def sizes(self) -> list[int]:
        """k_l: the number of kept entries of each parameter."""
        return [len(idx) for idx in self.flat_indices]

    def to_table(self) -> pa.Table:
        """The run-directory form: param (string), flat_index (int64), in order."""
        params = [name for name, idx in zip(self.names, self.flat_indices) for _ in range(len(idx))]
        flat = np.concatenate(self.flat_indices) if self.flat_indices else np.zeros(0, np.int64)
        return pa.table({"param": pa.array(params, pa.string()), "flat_index": pa.array(flat, pa.int64())})

    @classmethod
    def from_table(cls, table: pa.Table, param_shapes: ParamShapes) -> "IndexSet":
        """Rebuild from `to_table()` output; shapes come from the model the set applies to."""
        shapes = dict(param_shapes)
        params = table.column("param").to_pylist()
        flat = table.column("flat_index").to_numpy()
        names, groups = [], []
        start = 0
        for end in range(1, len(params) + 1):
            if end == len(params) or params[end] != params[start]:
                names.append(params[start])
                groups.append(np.asarray(flat[start:end], dtype=np.int64))
                start = end
        unknown = [name for name in names if name not in shapes]
        if unknown:
            raise ValueError(f"index set names parameters the model lacks: {unknown[:5]}")
        return cls(tuple(names), tuple(tuple(shapes[n]) for n in names), tuple(groups))

    def fingerprint(self) -> str:
        """sha256 over names, shapes and indices: equal sets have equal fingerprints."""
        digest = hashlib.sha256()
        for name, shape, idx in zip(self.names, self.shapes, self.flat_indices):
            digest.update(f"{name}:{list(shape)}:".encode())
            digest.update(np.ascontiguousarray(idx, dtype="<i8").tobytes())
        return digest.hexdigest()


def seeded_rng(seed: int, label: str) -> np.random.Generator:
    # A stream per (seed, label) so one parameter's draw never shifts another's.
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, zlib.crc32(label.encode())])))


def sample_without_replacement(rng: np.random.Generator, population: int, count: int) -> np.ndarray:
    """`count` distinct integers from [0, population), sorted, in O(count) memory.

    Rejection of duplicates keeps memory independent of the population, so p = 10^10 is fine.
    """
    if count > population:
        raise ValueError(f"cannot draw {count} distinct entries from {population}")
    if count == population:
        return np.arange(population, dtype=np.int64)
    if count * 4 > population:  # dense draw: a permutation is cheap and rejection would stall
        return np.sort(rng.permutation(population)[:count]).astype(np.int64)
    drawn = np.zeros(0, dtype=np.int64)
    while len(drawn) < count:
        need = count - len(drawn)
        extra = rng.integers(0, population, size=need + need // 8 + 16, dtype=np.int64)
        merged = np.concatenate([drawn, extra])
        _, first = np.unique(merged, return_index=True)
        drawn = merged[np.sort(first)]  # keep the first occurrence, in draw order
    return np.sort(drawn[:count])


def stratified_allocation(sizes: Sequence[int], k: int) -> list[int]:
    """k_l proportional to each tensor's size, at least 1, summing to k (largest remainder)."""
    total = sum(sizes)
    if k < len(sizes):
        raise ValueError(
            f"compression.k={k} is smaller than the {len(sizes)} tracked parameter tensors; "
            "stratified allocation keeps at least one entry per tensor (raise k, narrow "
            "compression.modules, or use allocation: uniform)"
        )
    exact = [k * size / total for size in sizes]
    alloc = [min(size, max(1, math.floor(x))) for size, x in zip(sizes, exact)]
    order = sorted(range(len(sizes)), key=lambda i: exact[i] - math.floor(exact[i]), reverse=True)
    while sum(alloc) < k:
        progressed = False
        for i in order:
            if sum(alloc) == k:
                break
            if alloc[i] < sizes[i]:
                alloc[i] += 1
                progressed = True
        if not progressed:
            break
    while sum(alloc) > k:  # the minimum of 1 overshot: take from the largest shares
        i = max(range(len(alloc)), key=lambda j: alloc[j])
        alloc[i] -= 1
    return alloc


def draw_index_set(
    param_shapes: ParamShapes, k: int, seed: int = 0, allocation: str = "stratified"
) -> IndexSet:
    """Draw S for parameters given as (name, shape) in canonical order; k is capped at p."""
    names = tuple(name for name, _ in param_shapes)
    shapes = tuple(tuple(int(d) for d in shape) for _, shape in param_shapes)
    if len(set(names)) != len(names):
        raise ValueError("parameter names must be unique")
    sizes = [math.prod(shape) for shape in shapes]
    p = sum(sizes)
    if p == 0:
        raise ValueError("no tracked parameters: check compression.modules")
    k = min(k, p)
    if allocation == "stratified":
        groups = [
            sample_without_replacement(seeded_rng(seed, name), size, k_l)
            for name, size, k_l in zip(names, sizes, stratified_allocation(sizes, k))
        ]
    elif allocation == "uniform":
        # The paper's draw over all p entries at once, then split at the parameter boundaries.
        global_idx = sample_without_replacement(seeded_rng(seed, "uniform:" + ",".join(names)), p, k)
        bounds = np.cumsum([0, *sizes])
        cut = np.searchsorted(global_idx, bounds)
        groups = [global_idx[cut[i] : cut[i + 1]] - bounds[i] for i in range(len(sizes))]
        # A tensor that drew nothing is left out, so the set round-trips through its table.
        kept = [i for i, g in enumerate(groups) if len(g)]
        names, shapes = tuple(names[i] for i in kept), tuple(shapes[i] for i in kept)
        groups = [groups[i] for i in kept]
    else:
        raise ValueError(f"compression.allocation: unknown {allocation!r}")
    return IndexSet(names, shapes, tuple(groups))

