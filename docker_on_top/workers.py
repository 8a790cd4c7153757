"""A bounded pool of threads for work that may block: at most `most` threads run the
jobs in the order given; one starts when a job finds none idle, and each ends after
WORKER_IDLE_S without work, so an idle daemon holds no thread but its loop's. It
knows nothing of what the jobs do (server.py gives them)."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

WORKER_IDLE_S = 2.0


class Workers:
    """At most `most` threads running jobs in the order given; a thread starts when a
    job finds none idle, and ends after WORKER_IDLE_S without work or at `close`.

    The jobs wait in a SimpleQueue, whose put and get are C code that wakes one waiting
    thread directly: every request that may block passes through here, and a Condition
    (Python code, a new lock for every wait) cost more than the wake-up itself.
    """

    def __init__(self, most: int) -> None:
        self._most = most
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()  # guards the counts and the set below
        self._threads: set[threading.Thread] = set()
        self._idle = 0  # threads waiting for a job
        self._queued = 0  # jobs given and not yet taken
        self._closed = False

    def submit(self, job: Callable[[], None]) -> None:
        thread = None
        with self._lock:
            self._queued += 1
            # Each idle thread takes one job: start one when the jobs not yet taken
            # outnumber them (or after close, whose threads are ending).
            if (self._closed or self._queued > self._idle) and len(self._threads) < self._most:
                thread = threading.Thread(target=self._work, name="worker", daemon=True)
                self._threads.add(thread)
        self._jobs.put(job)
        if thread is not None:
            thread.start()

    def close(self) -> None:
        """Run the jobs still queued, then end every thread."""
        with self._lock:
            self._closed = True
            threads = list(self._threads)
        for _ in threads:
            self._jobs.put(None)  # behind the jobs queued: those run first
        for thread in threads:
            thread.join()

    def _work(self) -> None:
        while True:
            with self._lock:
                self._idle += 1
            try:
                job = self._jobs.get(timeout=WORKER_IDLE_S)
            except queue.Empty:
                job = None
            with self._lock:
                self._idle -= 1
                if job is not None:
                    self._queued -= 1
                elif self._closed or self._queued <= self._idle:
                    # Ending (closed, or idle long enough), unless a job came as the
                    # wait ran out and no other idle thread is there to take it.
                    self._threads.discard(threading.current_thread())
                    return
            if job is None:
                continue
            try:
                job()
            except Exception:
                log.exception("a worker's job failed")
