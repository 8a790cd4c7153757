"""A bounded pool of threads for work that may block: at most `most` threads run the
jobs in the order given; one starts when a job finds none idle, and each ends after
WORKER_IDLE_S without work, so an idle daemon holds no thread but its loop's. It
knows nothing of what the jobs do (server.py gives them)."""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable

log = logging.getLogger(__name__)

WORKER_IDLE_S = 2.0

Job = Callable[[], None]


class _Waiting:
    """An idle thread's place: `ready` is held until a job (None: end) is put in `job`."""

    __slots__ = ("job", "ready")

    def __init__(self) -> None:
        self.job: Job | None = None
        self.ready = threading.Lock()
        self.ready.acquire()


class Workers:
    """At most `most` threads running jobs in the order given; a thread starts when a
    job finds none idle, and ends after WORKER_IDLE_S without work or at `close`.

    A job goes straight to one idle thread, the one idle since the shortest time (its
    memory is the likeliest still in the CPU's caches), and wakes that thread alone.
    A queue that idle threads all wait on wakes one more of them at each job
    (CPython's SimpleQueue hands its lock on after taking an item): a wake-up and a
    contest for the interpreter lock inside every Mount's time.
    """

    def __init__(self, most: int) -> None:
        self._most = most
        self._lock = threading.Lock()  # guards everything below
        self._threads: set[threading.Thread] = set()
        self._idle: list[_Waiting] = []  # the last one idle since the shortest time
        # Jobs given while every thread was busy and no more could start; never
        # non-empty while a thread is idle.
        self._backlog: deque[Job] = deque()
        self._closed = False

    def submit(self, job: Job) -> None:
        with self._lock:
            if self._idle:
                waiting = self._idle.pop()
                waiting.job = job
                waiting.ready.release()
                return
            if len(self._threads) >= self._most:
                self._backlog.append(job)
                return
            thread = threading.Thread(target=self._work, args=(job,), name="worker", daemon=True)
            self._threads.add(thread)
        thread.start()

    def close(self) -> None:
        """Run the jobs still queued, then end every thread."""
        with self._lock:
            self._closed = True
            threads = list(self._threads)
            for waiting in self._idle:
                waiting.ready.release()  # with no job: end
            self._idle.clear()
        for thread in threads:
            thread.join()

    def _work(self, job: Job) -> None:
        while True:
            try:
                job()
            except Exception:
                log.exception("a worker's job failed")
            next_job = self._next_job()
            if next_job is None:
                return
            job = next_job

    def _next_job(self) -> Job | None:
        """The next job for this thread, after waiting idle if none is due; None when
        the thread ends (closed, or idle for WORKER_IDLE_S), having left the pool."""
        with self._lock:
            if self._backlog:
                return self._backlog.popleft()
            if self._closed:
                self._threads.discard(threading.current_thread())
                return None
            waiting = _Waiting()
            self._idle.append(waiting)
        if not waiting.ready.acquire(timeout=WORKER_IDLE_S):
            with self._lock:
                if waiting in self._idle:
                    self._idle.remove(waiting)
                    self._threads.discard(threading.current_thread())
                    return None
            # A job came just as the wait ended: it is being handed over.
            waiting.ready.acquire()
        if waiting.job is None:
            with self._lock:
                self._threads.discard(threading.current_thread())
        return waiting.job
