"""The chunk writer thread: commits in order, off the caller's path, and a failed commit fails the caller."""

import threading
import time

import pytest

from distinf.runtime.chunk_writer import ChunkWriter


def test_commits_land_in_submission_order_while_the_caller_goes_on():
    landed, release = [], threading.Event()

    def commit(i):
        if i == 0:
            release.wait(5)  # the first commit is slow: a store that stalls
        landed.append(i)
        return f"record {i}"

    writer = ChunkWriter(depth=2)
    began = time.perf_counter()
    for i in range(3):  # the first is being written, two wait in the queue: none blocks the caller
        writer.submit(commit, i)
    assert time.perf_counter() - began < 1 and landed == []
    release.set()
    assert writer.close() == ["record 0", "record 1", "record 2"] and landed == [0, 1, 2]


def test_a_full_queue_makes_the_caller_wait_and_counts_the_wait():
    writer = ChunkWriter(depth=1)
    for i in range(3):
        writer.submit(time.sleep, 0.2)
    writer.close()
    assert writer.wait_seconds >= 0.3 and writer.write_seconds >= 0.6


def test_depth_zero_commits_inside_submit():
    landed = []
    writer = ChunkWriter(depth=0)
    writer.submit(landed.append, 1)
    assert landed == [1]
    writer.close()


@pytest.mark.parametrize("depth", [0, 2])
def test_a_failed_commit_surfaces_in_the_caller_and_nothing_after_it_lands(depth):
    landed = []

    def commit(i):
        if i == 1:
            raise OSError("disk full")
        landed.append(i)

    writer = ChunkWriter(depth=depth)
    with pytest.raises(OSError, match="disk full"):  # from a later submit or from close, never a hang
        for i in range(50):
            writer.submit(commit, i)
            time.sleep(0.01)
        writer.close()
    writer.abandon()
    assert landed == [0]
