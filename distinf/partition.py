"""Which examples each rank computes, chunk by chunk: the rank partition and the chunk plan of the
gradient pass. Pure functions, no Ray."""

from __future__ import annotations

import math

PAD = -1
"""Partition entry of a padding slot: the rank runs some real example there and drops its outputs."""


def partition(n_examples: int, world_size: int, batch_size: int) -> list[list[int]]:
    """Split positions 0..n-1 into `world_size` contiguous, balanced, equal-length lists.

    Rank r gets a contiguous run of real positions (the first n % world_size ranks one more
    than the others), followed by `PAD` (-1) entries up to L = ceil(n / world_size), so every
    list has length L. Cutting each list into consecutive batches of `batch_size` then gives
    every rank the same number of steps, `steps_per_rank(...)`, with the same batch sizes —
    the lockstep ZeRO-3 needs, since each forward/backward gathers parameters collectively.

    A padding slot is at most the last entry of a rank's list (a rank with no real example,
    when n < world_size, has one). The worker runs some real example in its place (position 0
    serves on every rank) and drops that row's outputs, so a padding step does all the
    collectives of a real one and writes nothing. At most world_size - 1 slots are padding.

    `batch_size` is only validated: the lists do not depend on it, so a partition is valid for
    any batch size.
    """
    if n_examples <= 0:
        raise ValueError(f"partition: n_examples must be > 0, got {n_examples}")
    if world_size <= 0:
        raise ValueError(f"partition: world_size must be > 0, got {world_size}")
    if batch_size <= 0:
        raise ValueError(f"partition: batch_size must be > 0, got {batch_size}")
    length = math.ceil(n_examples / world_size)
    base, extra = divmod(n_examples, world_size)
    parts, start = [], 0
    for rank in range(world_size):
        size = base + (rank < extra)
        parts.append(list(range(start, start + size)) + [PAD] * (length - size))
        start += size
    return parts


def chunk_plan(n_examples: int, world_size: int, batch_size: int,
               chunk_examples: int) -> list[list[list[int]]]:
    """The gradient pass as fixed units of work: `plan[c][r]` is the positions (PAD for a
    padding slot) that rank r computes and commits as chunk c.

    Each rank's `partition` list is cut into runs of ceil(chunk_examples / batch_size) whole
    batches. Every rank has the same number of chunks and, chunk for chunk, the same batches,
    so any subset of chunks can be (re)computed with all ranks in lockstep, and chunk c always
    covers the same examples, whichever attempt computes it.
    """
    if chunk_examples <= 0:
        raise ValueError(f"chunk_plan: chunk_examples must be > 0, got {chunk_examples}")
    parts = partition(n_examples, world_size, batch_size)
    span = math.ceil(chunk_examples / batch_size) * batch_size
    return [[part[start:start + span] for part in parts] for start in range(0, len(parts[0]), span)]


def steps_per_rank(n_examples: int, world_size: int, batch_size: int) -> int:
    """Forward/backward steps every rank runs over its `partition(...)` list: ceil(L / batch)."""
    if n_examples <= 0 or world_size <= 0 or batch_size <= 0:
        raise ValueError("steps_per_rank: n_examples, world_size and batch_size must be > 0")
    return math.ceil(math.ceil(n_examples / world_size) / batch_size)
