"""The steps of one chunk: its examples grouped by length, every rank the same number of steps,
and a step's examples collated into one batch.

A step pads its examples to the longest of them, so consecutive examples of a corpus that mixes
20- and 2,000-token rows compute mostly padding. Here each rank's examples of a chunk are sorted
by length (longest first, so the first step shows the peak) and cut into steps of at most
`batch_size` examples, or, with a token budget, of as many as fit in `tokens_per_step` padded
tokens. ZeRO-3 gathers every layer collectively, so every rank must run the same number of
forward/backward steps (their sizes may differ): a rank with fewer steps splits its largest
ones, and one with fewer examples than steps runs stand-in steps (`PAD`: an example whose outputs
are dropped). Outputs are put back in input order by the worker, so the ledger never sees the
sort.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from distinf.partition import PAD


def length_steps(positions: Sequence[int], lengths: Sequence[int], batch_size: int,
                 tokens_per_step: int | None) -> list[list[int]]:
    """One rank's positions (PAD slots ignored) as steps of examples of similar length.

    Without a budget, consecutive runs of at most `batch_size` examples of the sorted order, so as
    many steps as consecutive batches would take. With one, a step holds examples while
    count × longest ≤ tokens_per_step (an example longer than the budget runs alone), cut where
    the fewest steps compute the fewest padded tokens (`budget_cuts`).
    """
    real = sorted((p for p in positions if p != PAD), key=lambda p: (-lengths[p], p))
    if tokens_per_step is None:
        return [real[i:i + batch_size] for i in range(0, len(real), batch_size)]
    cuts = budget_cuts(np.array([lengths[p] for p in real], dtype=np.int64), tokens_per_step)
    return [real[a:b] for a, b in zip(cuts[:-1], cuts[1:])]


def budget_cuts(lengths: np.ndarray, budget: int) -> list[int]:
    """Step boundaries [0, ..., n] of lengths sorted longest first: the fewest steps with
    count × longest ≤ budget each (or one example), and among those the fewest padded tokens.

    A shortest path over boundaries: a step [i, j) costs one step and (j - i) × lengths[i]
    tokens, weighted so that one step outweighs every token of the chunk.
    """
    n = len(lengths)
    if n == 0:
        return [0]
    step_cost = int(lengths[0]) * n + 1
    best = np.full(n + 1, np.iinfo(np.int64).max // 4, dtype=np.int64)
    best[0] = 0
    back = np.zeros(n + 1, dtype=np.int64)
    for i in range(n):
        stop = min(n, i + max(1, budget // int(lengths[i])))
        j = np.arange(i + 1, stop + 1)
        cost = best[i] + step_cost + (j - i) * int(lengths[i])
        better = cost < best[i + 1:stop + 1]
        best[i + 1:stop + 1][better] = cost[better]
        back[i + 1:stop + 1][better] = i
    cuts = [n]
    while cuts[-1] > 0:
        cuts.append(int(back[cuts[-1]]))
    return cuts[::-1]


def equal_step_counts(per_rank: list[list[list[int]]], lengths: Sequence[int]) -> list[list[list[int]]]:
    """Every rank's steps brought to the largest count: split the step with the most padded tokens
    in two, or, where every step holds one example, add a stand-in step."""
    target = max((len(steps) for steps in per_rank), default=0)
    out = []
    for steps in per_rank:
        steps = [list(s) for s in steps]
        while len(steps) < target:
            splittable = [i for i, s in enumerate(steps) if len(s) > 1]
            if not splittable:
                steps.append([PAD])
                continue
            i = max(splittable, key=lambda i: (len(steps[i]) * lengths[steps[i][0]], -i))
            half = (len(steps[i]) + 1) // 2
            steps[i:i + 1] = [steps[i][:half], steps[i][half:]]
        out.append(steps)
    return out


def chunk_steps(parts: list[list[int]], lengths: Sequence[int], batch_size: int,
                tokens_per_step: int | None) -> list[list[list[int]]]:
    """`steps[r]`: rank r's steps for one chunk (`parts[r]` its positions), equal counts."""
    return equal_step_counts([length_steps(part, lengths, batch_size, tokens_per_step) for part in parts],
                             lengths)


def consecutive_steps(positions: Sequence[int], batch_size: int) -> list[list[int]]:
    """The steps of consecutive batches, PAD slots included (the layout before length grouping)."""
    return [list(positions[i:i + batch_size]) for i in range(0, len(positions), batch_size)]


def padded_tokens(steps: Sequence[Sequence[int]], lengths: Sequence[int], stand_in: int = 0) -> tuple[int, int]:
    """(tokens carrying an example, tokens computed) over `steps`; a PAD slot computes `stand_in`'s
    length and carries nothing."""
    useful = computed = 0
    for step in steps:
        sizes = [lengths[stand_in if p == PAD else p] for p in step]
        computed += len(step) * max(sizes)
        useful += sum(lengths[p] for p in step if p != PAD)
    return useful, computed


def collate(examples: list[dict[str, torch.Tensor]], pad_token_id: int = 0) -> dict[str, torch.Tensor]:
    """Stack per-example tensors into a batch: [N, T] for 1-D fields, [N] for 0-d ones.

    1-D tensors of different lengths are right-padded to the longest: input_ids with
    `pad_token_id`, attention_mask with 0, labels with -100 (ignored by cross-entropy), any
    other field with 0. Tensors of equal shape are stacked as they are.
    """
    if not examples:
        raise ValueError("collate: no examples")
    keys = list(examples[0])
    for i, example in enumerate(examples):
        if set(example) != set(keys):
            raise ValueError(f"collate: example {i} has keys {sorted(example)}, "
                             f"example 0 has {sorted(keys)}")
    pad_values = {"input_ids": pad_token_id, "attention_mask": 0, "labels": -100}
    batch = {}
    for key in keys:
        tensors = [example[key] for example in examples]
        shapes = {tuple(t.shape) for t in tensors}
        if len(shapes) == 1:
            batch[key] = torch.stack(tensors)
        elif all(t.dim() == 1 for t in tensors):
            length = max(t.shape[0] for t in tensors)
            out = torch.full((len(tensors), length), pad_values.get(key, 0),
                             dtype=tensors[0].dtype)
            for row, t in enumerate(tensors):
                out[row, : t.shape[0]] = t
            batch[key] = out
        else:
            raise ValueError(f"collate: '{key}' has shapes {sorted(shapes)}; only 1-D tensors "
                             "of different lengths can be padded")
    return batch
