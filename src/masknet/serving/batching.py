"""Dynamic batching: concurrent requests merged into one forward pass, on one inference thread.

    batcher = Batcher(scorer, max_batch_rows=4096, max_wait_ms=2, max_queue_rows=8192)
    future = batcher.submit(x)          # concurrent.futures.Future of (x's scores, Timing); Overloaded if full
    scores, timing = await asyncio.wrap_future(future)

One thread runs every forward pass, so passes never fight over the cores (each uses all of
them through the runtime's intra-op threads) and the event loop never waits on one. The thread
takes the oldest request, then adds queued ones while the batch stays within `max_batch_rows`.
It waits up to `max_wait_ms` for more only while other requests are still being decoded
(`arriving()`): a lone request is never held back, while a burst fills one batch. Scores are
split back per request. A request that would take the rows waiting beyond `max_queue_rows` is
refused (Overloaded: the service answers 503 with Retry-After) unless nothing is waiting, so
the wait before a pass, and with it p99, stays bounded under overload.

The thread is started on first use and is a daemon (it holds no state that needs saving).
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections import deque
from dataclasses import dataclass
from concurrent.futures import Future
from typing import Any, Callable, Iterator

import numpy as np


@dataclass
class Timing:
    """Where one request's time with the batcher went (seconds), and the pass it shared."""

    queued_s: float  # from submit to the start of its forward pass
    forward_s: float  # the forward pass (of the whole batch)
    batch_rows: int
    batch_requests: int


class Overloaded(Exception):
    """The queue is full; `retry_after` (whole seconds) is how long the waiting rows will take."""

    def __init__(self, queued_rows: int, retry_after: int):
        super().__init__(f"the server is overloaded ({queued_rows:,} rows waiting for the model); retry in {retry_after} s")
        self.retry_after = retry_after


def _concat(xs: list) -> Any:
    """One model input from several requests' (ndarrays, or EncodedRows with multi-valued ids)."""
    from ..data.batch import EncodedRows

    return EncodedRows.concat(xs) if isinstance(xs[0], EncodedRows) else np.concatenate(xs)


class Batcher:
    def __init__(self, score: Callable[[np.ndarray], np.ndarray], max_batch_rows: int, max_wait_ms: float, max_queue_rows: int):
        self.score = score
        self.max_batch_rows = max_batch_rows
        self.max_wait_s = max_wait_ms / 1000
        self.max_queue_rows = max_queue_rows
        self._queue: deque[tuple[np.ndarray, Future, float]] = deque()  # (x, future, submitted at)
        self._queued_rows = 0
        self._arriving = 0
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._rows_per_s = 0.0  # measured, for Retry-After
        self.stats = {"batches": 0, "rows_scored": 0, "requests_scored": 0, "rejected": 0}

    @contextlib.contextmanager
    def arriving(self) -> Iterator[None]:
        """Mark a request as on its way (being decoded): the thread may wait for it to fill a batch."""
        with self._cond:
            self._arriving += 1
        try:
            yield
        finally:
            with self._cond:
                self._arriving -= 1
                self._cond.notify()

    def submit(self, x: np.ndarray) -> Future:
        fut: Future = Future()
        with self._cond:
            if self._queue and self._queued_rows + len(x) > self.max_queue_rows:
                self.stats["rejected"] += 1
                rate = self._rows_per_s or 1_000.0
                raise Overloaded(self._queued_rows, max(1, math.ceil(self._queued_rows / rate)))
            self._queue.append((x, fut, time.perf_counter()))
            self._queued_rows += len(x)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="masknet-inference", daemon=True)
                self._thread.start()
            self._cond.notify()
        return fut

    def _next_batch(self) -> list[tuple[np.ndarray, Future, float]]:
        with self._cond:
            while not self._queue:
                self._cond.wait()
            batch = [self._queue.popleft()]
            rows = len(batch[0][0])
            deadline = time.monotonic() + self.max_wait_s
            while rows < self.max_batch_rows:
                if self._queue:
                    if rows + len(self._queue[0][0]) > self.max_batch_rows:
                        break
                    batch.append(self._queue.popleft())
                    rows += len(batch[-1][0])
                    continue
                left = deadline - time.monotonic()
                if self._arriving == 0 or left <= 0:
                    break
                self._cond.wait(left)
            self._queued_rows -= rows
            return batch

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            xs = [x for x, _, _ in batch]
            t0 = time.perf_counter()
            try:
                scores = self.score(xs[0] if len(xs) == 1 else _concat(xs))
            except BaseException as exc:  # a bug in the model: each waiting request gets the error
                for _, fut, _ in batch:
                    fut.set_exception(exc)
                continue
            dt = time.perf_counter() - t0
            rows = sum(len(x) for x in xs)
            self._rows_per_s = rows / dt if dt > 0 else self._rows_per_s
            self.stats["batches"] += 1
            self.stats["rows_scored"] += rows
            self.stats["requests_scored"] += len(batch)
            start = 0
            for x, fut, submitted in batch:
                fut.set_result((scores[start : start + len(x)], Timing(t0 - submitted, dt, rows, len(batch))))
                start += len(x)
