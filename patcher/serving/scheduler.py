"""A bounded queue in front of a fixed number of worker threads: the server's admission control.

Why not ONNX Runtime GenAI's `Engine` (continuous batching): the installed GenAI (0.18) refuses these
multimodal artifacts ("Expected a decoder-only model"; checked when this was written). So each worker
runs one greedy generation at a time; at most `queue_size` more requests wait; beyond that a request is
answered at once with 429 and a `Retry-After` from the recent mean service time, rather than piling up.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        super().__init__(f"the server is busy; retry after {retry_after} s")
        self.retry_after = retry_after


class Scheduler:
    def __init__(self, workers: int, queue_size: int):
        self.workers, self.queue_size = workers, queue_size
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="sasa-serve-worker")
        self._lock = threading.Lock()
        self._admitted = 0  # waiting + running
        self._running = 0
        self._mean_seconds = 1.0  # exponentially weighted service time, for Retry-After

    @property
    def waiting(self) -> int:
        with self._lock:
            return self._admitted - self._running

    @property
    def running(self) -> int:
        with self._lock:
            return self._running

    def retry_after(self) -> int:
        """Seconds until a slot is likely free: the queue ahead, served by the workers at the mean time."""
        with self._lock:
            waves = (self._admitted - self.workers + 1) / self.workers
            return max(1, math.ceil(max(waves, 1) * self._mean_seconds))

    def submit(self, job: Callable[[], Any]) -> Future:
        """Run `job` on a worker; QueueFull when `workers + queue_size` requests are already admitted."""
        with self._lock:
            full = self._admitted >= self.workers + self.queue_size
            if not full:
                self._admitted += 1
        if full:
            raise QueueFull(self.retry_after())
        future = self._executor.submit(self._run, job)
        future.add_done_callback(self._forget_if_cancelled)
        return future

    def _run(self, job: Callable[[], Any]) -> Any:
        import time

        with self._lock:
            self._running += 1
        started = time.perf_counter()
        try:
            return job()
        finally:
            with self._lock:
                self._running -= 1
                self._admitted -= 1
                self._mean_seconds = 0.8 * self._mean_seconds + 0.2 * (time.perf_counter() - started)

    def _forget_if_cancelled(self, future: Future) -> None:
        if future.cancelled():  # cancelled while waiting: `_run` never ran
            with self._lock:
                self._admitted -= 1

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True)
