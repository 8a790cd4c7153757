"""A bounded pool of threads for work that may block: at most `most` threads run the
jobs in the order given; one starts when a job finds none idle, and each ends after
WORKER_IDLE_S without work, so an idle daemon holds no thread but its loop's. It
knows nothing of what the jobs do (server.py gives them)."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable

log = logging.getLogger(__name__)

WORKER_IDLE_S = 2.0


class Workers:
    """At most `most` threads running jobs in the order given; a thread starts when a
    job finds none idle, and ends after WORKER_IDLE_S without work or at `close`."""

    def __init__(self, most: int) -> None:
        self._most = most
        self._lock = threading.Lock()
        self._work_came = threading.Condition(self._lock)
        self._jobs: deque[Callable[[], None]] = deque()
        self._threads: set[threading.Thread] = set()
        self._idle = 0  # threads waiting for a job
        self._closed = False

    def submit(self, job: Callable[[], None]) -> None:
        with self._lock:
            self._jobs.append(job)
            # Each idle thread takes one job when it wakes: wake one if the idle threads
            # are at least as many as the jobs not yet taken, otherwise start one.
            if self._idle >= len(self._jobs):
                self._work_came.notify()
            elif len(self._threads) < self._most:
                thread = threading.Thread(target=self._work, name="worker", daemon=True)
                self._threads.add(thread)
                thread.start()

    def close(self) -> None:
        """Run the jobs still queued, then end every thread."""
        with self._lock:
            self._closed = True
            self._work_came.notify_all()
            threads = list(self._threads)
        for thread in threads:
            thread.join()

    def _work(self) -> None:
        while True:
            with self._lock:
                deadline = time.monotonic() + WORKER_IDLE_S
                while not self._jobs:
                    left = deadline - time.monotonic()
                    if self._closed or left <= 0:
                        self._threads.discard(threading.current_thread())
                        return
                    self._idle += 1
                    self._work_came.wait(left)
                    self._idle -= 1
                job = self._jobs.popleft()
            try:
                job()
            except Exception:
                log.exception("a worker's job failed")
