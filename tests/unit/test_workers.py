"""The worker pool (workers.py): order, bound, which thread takes a job, idle threads
ending, and a close that finishes what was given. No test times anything: the waits are
for events, each with a bound on a hang."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from docker_on_top import workers
from docker_on_top.workers import Workers

HANG_S = 10.0  # a bound on a hang, not a timing


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + HANG_S
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.001)


def worker_threads() -> set[threading.Thread]:
    return {thread for thread in threading.enumerate() if thread.name == "worker"}


@pytest.fixture
def others() -> set[threading.Thread]:
    """Worker threads of other tests' pools, still alive: not this test's."""
    return worker_threads()


@pytest.fixture
def long_idle(monkeypatch: pytest.MonkeyPatch) -> None:
    """Idle threads stay for the whole test, however slow the machine."""
    monkeypatch.setattr(workers, "WORKER_IDLE_S", 600.0)


def voluntary_switches(native_id: int) -> int:
    """How often the thread has blocked (and so been woken) since it started."""
    with open(f"/proc/self/task/{native_id}/status") as status:
        for line in status:
            if line.startswith("voluntary_ctxt_switches:"):
                return int(line.split()[1])
    raise AssertionError("no voluntary_ctxt_switches")


@pytest.fixture
def pool(long_idle: None) -> Workers:
    made = Workers(4)
    yield made
    made.close()


def test_jobs_beyond_the_bound_wait_and_run_in_the_order_given() -> None:
    pool = Workers(1)
    gate = threading.Event()
    ran: list[int] = []
    pool.submit(gate.wait)
    for index in range(5):
        pool.submit(lambda index=index: ran.append(index))
    gate.set()
    pool.close()
    assert ran == [0, 1, 2, 3, 4]


def test_at_most_the_bound_run_at_once(others: set[threading.Thread]) -> None:
    pool = Workers(3)
    gate = threading.Event()
    lock = threading.Lock()
    running = [0, 0]  # now, most

    def job() -> None:
        with lock:
            running[0] += 1
            running[1] = max(running[1], running[0])
        gate.wait()
        with lock:
            running[0] -= 1

    for _ in range(10):
        pool.submit(job)
    wait_until(lambda: running[0] == 3, "three jobs running")
    assert len(worker_threads() - others) == 3
    gate.set()
    pool.close()
    assert running == [0, 3]


def test_a_job_goes_to_the_thread_idle_since_the_shortest_time(pool: Workers) -> None:
    first_done, second_done = threading.Event(), threading.Event()
    release_first, release_second = threading.Event(), threading.Event()
    idents: list[int] = []

    def job(release: threading.Event, done: threading.Event) -> None:
        idents.append(threading.get_ident())
        release.wait()
        done.set()

    pool.submit(lambda: job(release_first, first_done))
    pool.submit(lambda: job(release_second, second_done))
    wait_until(lambda: len(idents) == 2, "both jobs started")
    release_first.set()
    first_done.wait(HANG_S)
    release_second.set()
    second_done.wait(HANG_S)
    wait_until(lambda: len(pool._idle) == 2, "both threads idle")
    ran_on: list[int] = []
    finished = threading.Event()
    pool.submit(lambda: (ran_on.append(threading.get_ident()), finished.set()))
    finished.wait(HANG_S)
    assert ran_on == [idents[1]]


def test_a_job_wakes_no_other_idle_thread(pool: Workers) -> None:
    gate = threading.Event()
    native_ids: list[int] = []
    for _ in range(3):
        pool.submit(lambda: (native_ids.append(threading.get_native_id()), gate.wait()))
    wait_until(lambda: len(native_ids) == 3, "three jobs started")
    gate.set()
    wait_until(lambda: len(pool._idle) == 3, "three threads idle")
    # The thread idle since the shortest time takes the next jobs; the two others sleep.
    before = {native_id: voluntary_switches(native_id) for native_id in native_ids}
    for _ in range(20):
        done = threading.Event()
        pool.submit(done.set)
        done.wait(HANG_S)
        wait_until(lambda: len(pool._idle) == 3, "the thread idle again")
    after = {native_id: voluntary_switches(native_id) for native_id in native_ids}
    woken = sorted(after[native_id] - before[native_id] for native_id in native_ids)
    assert woken[:2] == [0, 0], woken
    assert woken[2] >= 20


def test_an_idle_thread_ends(
    monkeypatch: pytest.MonkeyPatch, others: set[threading.Thread]
) -> None:
    monkeypatch.setattr(workers, "WORKER_IDLE_S", 0.01)
    pool = Workers(2)
    done = threading.Event()
    pool.submit(done.set)
    done.wait(HANG_S)
    wait_until(lambda: not worker_threads() - others, "the idle thread ended")
    # And a new job starts a thread again.
    again = threading.Event()
    pool.submit(again.set)
    assert again.wait(HANG_S)
    pool.close()
    assert not worker_threads() - others


def test_close_runs_the_jobs_given_then_ends_every_thread(
    others: set[threading.Thread],
) -> None:
    pool = Workers(2)
    gate = threading.Event()
    ran: list[int] = []
    pool.submit(gate.wait)
    pool.submit(gate.wait)
    for index in range(4):
        pool.submit(lambda index=index: ran.append(index))
    closing = threading.Thread(target=pool.close)
    closing.start()
    gate.set()
    closing.join(HANG_S)
    assert not closing.is_alive()
    assert sorted(ran) == [0, 1, 2, 3]
    assert not worker_threads() - others


def test_a_failing_job_leaves_its_thread_working(caplog: pytest.LogCaptureFixture) -> None:
    pool = Workers(1)
    done = threading.Event()

    def fails() -> None:
        raise RuntimeError("boom")

    pool.submit(fails)
    pool.submit(done.set)
    assert done.wait(HANG_S)
    pool.close()
    assert "a worker's job failed" in caplog.text
