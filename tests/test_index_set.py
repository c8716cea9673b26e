"""The shared index set: deterministic, duplicate-free, stratified or uniform, O(k) memory."""

import math
import subprocess
import sys
import tracemalloc

import numpy as np
import pyarrow.parquet as pq
import pytest

from distinf.core.index_set import IndexSet, draw_index_set, stratified_allocation

SHAPES = [("embed.weight", (1000, 64)), ("layer.0.weight", (256, 64)), ("layer.0.bias", (256,)),
          ("layer.1.weight", (64, 256)), ("head.bias", (3,))]


@pytest.mark.parametrize("allocation", ["stratified", "uniform"])
def test_entries_are_distinct_sorted_in_range_and_sum_to_k(allocation):
    s = draw_index_set(SHAPES, 5000, seed=7, allocation=allocation)
    assert s.k == 5000
    for name, shape, idx in zip(s.names, s.shapes, s.flat_indices):
        assert dict(SHAPES)[name] == shape
        assert len(np.unique(idx)) == len(idx)
        assert np.all(np.diff(idx) > 0)
        assert idx.min() >= 0 and idx.max() < math.prod(shape)


def test_stratified_share_is_proportional_to_size_with_at_least_one():
    sizes = [math.prod(shape) for _, shape in SHAPES]
    alloc = stratified_allocation(sizes, 5000)
    assert sum(alloc) == 5000
    assert all(a >= 1 for a in alloc)
    for size, a in zip(sizes, alloc):
        assert abs(a - 5000 * size / sum(sizes)) <= 1.0 + 1e-9


def test_same_seed_same_set_other_seed_other_set():
    a, b = draw_index_set(SHAPES, 3000, seed=1), draw_index_set(SHAPES, 3000, seed=1)
    assert a.fingerprint() == b.fingerprint()
    assert draw_index_set(SHAPES, 3000, seed=2).fingerprint() != a.fingerprint()


def test_identical_in_a_separate_process():
    code = ("from distinf.core.index_set import draw_index_set;"
            f"print(draw_index_set({SHAPES!r}, 3000, seed=5).fingerprint(),"
            f" draw_index_set({SHAPES!r}, 3000, seed=5, allocation='uniform').fingerprint())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == [draw_index_set(SHAPES, 3000, seed=5).fingerprint(),
                   draw_index_set(SHAPES, 3000, seed=5, allocation="uniform").fingerprint()]


def test_one_parameters_draw_does_not_depend_on_the_others():
    """A tensor's entries depend on its own name and share, not on unrelated tensors' order."""
    a = draw_index_set([("x", (100, 100)), ("y", (100, 100))], 400, seed=0)
    b = draw_index_set([("y", (100, 100)), ("x", (100, 100))], 400, seed=0)
    assert np.array_equal(a.flat_indices[0], b.flat_indices[1])


def test_uniform_draw_over_ten_billion_entries_needs_only_o_of_k_memory():
    shapes = [(f"block.{i}.weight", (100_000, 10_000)) for i in range(10)]  # p = 10^10
    tracemalloc.start()
    s = draw_index_set(shapes, 100_000, seed=0, allocation="uniform")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert s.k == 100_000
    assert peak < 64 * 2**20  # O(k) bytes: a p-sized mask would need 10 GB
    per_block = np.array(s.sizes)
    assert np.all(np.abs(per_block - 10_000) < 5 * math.sqrt(10_000))  # uniform over p


def test_table_round_trip_through_parquet(tmp_path):
    s = draw_index_set(SHAPES, 2000, seed=3)
    pq.write_table(s.to_table(), tmp_path / "index_set.parquet")
    table = pq.read_table(tmp_path / "index_set.parquet")
    assert table.schema.field("param").type == "string" and table.schema.field("flat_index").type == "int64"
    back = IndexSet.from_table(table, SHAPES)
    assert back.fingerprint() == s.fingerprint()


def test_k_is_capped_at_p_and_small_k_is_refused_clearly():
    assert draw_index_set([("a", (3, 4)), ("b", (5,))], 10**6).k == 17
    with pytest.raises(ValueError, match="compression.k=2 is smaller than the 5 tracked"):
        draw_index_set(SHAPES, 2)
