"""Chunk commits off the compute's path: a writer thread fed by a bounded queue, commits in order.

Encoding a chunk's Parquet (zstd, byte-stream-split), its sha256, the upload and the ledger record
are I/O and single-threaded encoding that the next chunk's forward and backward need not wait for.
The worker hands each finished chunk to `ChunkWriter.submit` and goes on; the thread commits them
one at a time in the order given, so a chunk's record never lands before an earlier one's. The
queue holds at most `depth` chunks, which bounds the memory of rows waiting to be written (and
makes a slow store slow the compute down rather than fill the host).

A commit that raises stops the writer: the error comes back from the next `submit` or from
`close`, so the worker fails as it would have with the commit inline, and never waits on a dead
thread (the remaining queue is drained unwritten).
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any, Callable

_DONE = object()


class ChunkWriter:
    def __init__(self, depth: int = 2):
        """`depth`: chunks that may wait for their commit; 0 commits each inside `submit`."""
        self.depth = depth
        self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self._results: list[Any] = []
        self._error: BaseException | None = None
        self.wait_seconds = 0.0
        """Time the caller spent blocked in submit and close: the compute's wait on I/O."""
        self.write_seconds = 0.0
        """Time the thread spent in commits."""
        self._thread = threading.Thread(target=self._run, name="distinf-chunk-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not _DONE:
            if self._error is None:  # else drained unwritten: no record may land after a failed one
                commit, args = item
                began = time.perf_counter()
                try:
                    self._results.append(commit(*args))
                except BaseException as error:  # noqa: BLE001 - handed to the caller's thread as is
                    self._error = error
                self.write_seconds += time.perf_counter() - began
            self._queue.task_done()

    def submit(self, commit: Callable[..., Any], *args: Any) -> None:
        """Queue `commit(*args)` after every earlier one; blocks while the queue is full. Raises the
        error of an earlier commit that failed."""
        self._raise_failure()
        began = time.perf_counter()
        self._queue.put((commit, args))
        if self.depth == 0:
            self.flush()
        self.wait_seconds += time.perf_counter() - began
        if self.depth == 0:
            self._raise_failure()

    def flush(self) -> None:
        """Wait until every queued commit has landed (or the writer has failed)."""
        self._queue.join()

    def close(self) -> list[Any]:
        """Wait for every queued commit; their results in submission order. Raises a commit's error."""
        began = time.perf_counter()
        if self._thread.is_alive():
            self._queue.put(_DONE)
            self._thread.join()
        self.wait_seconds += time.perf_counter() - began
        self._raise_failure()
        return self._results

    def abandon(self) -> None:
        """After the caller failed: let the queued commits (whole chunks) land, swallow their errors."""
        try:
            self.close()
        except BaseException:  # noqa: BLE001 - the caller's own error is the one to report
            pass

    def _raise_failure(self) -> None:
        if self._error is not None:
            raise self._error
