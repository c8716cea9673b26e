"""Steps grouped by length under a token budget: every example once, equal step counts, less padding."""

import numpy as np
import pytest

from distinf.batching import chunk_steps, consecutive_steps, padded_tokens
from distinf.partition import PAD, chunk_plan


def long_tailed_lengths(n: int, seed: int = 0) -> np.ndarray:
    """Mostly short rows and a few long ones, as instruction corpora are (lognormal, 8-512 tokens)."""
    return np.clip(np.random.default_rng(seed).lognormal(3.5, 1.0, n), 8, 512).astype(int)


@pytest.mark.parametrize("n, world_size, batch_size, tokens", [(37, 2, 4, None), (37, 2, 4, 256), (64, 3, 8, 600),
                                                              (5, 4, 2, None), (5, 4, 2, 64), (100, 1, 8, 2048)])
def test_every_example_runs_once_and_every_rank_runs_the_same_number_of_steps(n, world_size, batch_size, tokens):
    lengths = long_tailed_lengths(n)
    for parts in chunk_plan(n, world_size, batch_size, 16):
        steps = chunk_steps(parts, lengths, batch_size, tokens)
        assert len({len(s) for s in steps}) == 1  # ZeRO-3 lockstep
        for part, rank_steps in zip(parts, steps):
            ran = [p for step in rank_steps for p in step if p != PAD]
            assert sorted(ran) == sorted(p for p in part if p != PAD)  # each real example exactly once
            assert all(step for step in rank_steps)
            for step in rank_steps:
                real = [p for p in step if p != PAD]
                assert real or step == [PAD]
                if tokens is None:
                    assert len(step) <= batch_size
                elif len(step) > 1:
                    assert len(step) * max(lengths[p] for p in step) <= tokens


def test_without_a_budget_no_rank_runs_more_steps_than_consecutive_batches():
    lengths = long_tailed_lengths(203)
    for parts in chunk_plan(203, 3, 8, 64):
        steps = chunk_steps(parts, lengths, 8, None)
        assert len(steps[0]) == len(consecutive_steps(parts[0], 8))


def test_grouping_by_length_computes_less_padding_than_consecutive_batches():
    lengths = long_tailed_lengths(512)
    before = after = np.zeros(2)
    for parts in chunk_plan(512, 2, 8, 256):
        for part, steps in zip(parts, chunk_steps(parts, lengths, 8, 8 * 128)):
            before = before + padded_tokens(consecutive_steps(part, 8), lengths)
            after = after + padded_tokens(steps, lengths)
    assert before[0] == after[0] == lengths.sum()  # the same useful tokens
    assert 1 - after[0] / after[1] < 0.5 * (1 - before[0] / before[1])


def test_a_rank_with_fewer_examples_than_steps_runs_stand_in_steps():
    lengths = [100, 100, 100, 10]
    steps = chunk_steps([[0, 1, 2], [3, PAD, PAD]], lengths, 4, 100)
    assert steps == [[[0], [1], [2]], [[3], [PAD], [PAD]]]
    # A rank with fewer but fuller steps splits its largest one instead.
    steps = chunk_steps([[0, 1], [2, 3]], [100, 100, 10, 10], 4, 100)
    assert steps == [[[0], [1]], [[2], [3]]]


def test_budget_cuts_are_the_fewest_steps_and_then_the_least_padding_by_brute_force():
    from itertools import combinations

    from distinf.batching import budget_cuts

    rng = np.random.default_rng(1)
    for _ in range(60):
        lengths = np.sort(rng.integers(1, 40, rng.integers(1, 10)))[::-1]
        budget = int(rng.integers(20, 120))

        def cost(cuts):  # (steps, padded tokens), or None where a step breaks the budget
            steps = list(zip(cuts[:-1], cuts[1:]))
            if any(b - a > 1 and (b - a) * lengths[a] > budget for a, b in steps):
                return None
            return len(steps), sum((b - a) * lengths[a] for a, b in steps)

        n = len(lengths)
        every = [c for r in range(n) for inner in combinations(range(1, n), r)
                 if (c := cost([0, *inner, n])) is not None]
        assert cost(budget_cuts(lengths, budget)) == min(every)
