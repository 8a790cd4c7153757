"""Fault tests: the real daemon killed or failed at each step of its requests (run as root).

The workspace, daemon process and HTTP client of the protocol tests are reused (a
workspace under /tmp, a private driver name and state root, teardown by PID that
unmounts and deletes everything, also when a test fails). harness.py explains how a
fault reaches exactly one step of one request.

Test cases are generated at collection from a clean traced run of each scenario, so
collecting this folder starts daemons (a few seconds) and needs root and strace.

Runtime: by default about 330 cases, 4-7 minutes on 2 cores: the crash tests kill
once per distinct state a crash can leave (before each call that changes the disk or
the mount table, and after the last one), the failing-syscall tests fail each step with
one of the five errors in turn (each error meets each kind of syscall across the
scenarios). About 90 of the cases, 2 minutes, are the kills of sized volumes. The full
matrix is some 900 cases without sized volumes (`-k "not sized"`, about 7 minutes),
230 more for the kills of sized volumes (8 minutes), and 770 more for their failing
syscalls (every error at every step: about 30 minutes). The layer tests
(test_layer_crash.py, layered.py) add 77 cases by default, about 4.5 minutes, and 266 in
the full matrix, about 17 minutes.

Environment knobs:

* ``DOT_FAULTS_FULL=1``: the full matrix: a kill before every traced syscall of every
  request, every error at every failing-syscall step, in more scenarios (those of sized
  volumes among them: by default they are only killed, not failed).
* ``DOT_DAEMON_SOURCE``: run the daemon from another copy of the package (a folder
  holding ``docker_on_top/``), for instance a deliberately broken one in /tmp, to see
  the tests fail.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from ..protocol.conftest import Workspace
from .harness import (
    ERRNOS,
    FAILING,
    FULL,
    SCENARIOS,
    TRACED,
    Call,
    CleanTrace,
    Scenario,
    Strace,
    clean_trace,
)
from .layered import crash_point_params


@dataclass(frozen=True)
class CrashPoint:
    trace: CleanTrace
    # The daemon is killed on entering this call; None: one call past the clean run's
    # count of every syscall, so the request must complete.
    call: Call | None


@dataclass(frozen=True)
class ErrorPoint:
    trace: CleanTrace
    call: Call  # this call fails
    errno_name: str


def _unavailable() -> str | None:
    if os.geteuid() != 0:
        return "the fault tests mount overlays and trace the daemon: run them as root"
    if shutil.which("strace") is None:
        return "the fault tests need strace (apt-get install strace)"
    return None


def _scenarios() -> list[Scenario]:
    return [s for s in SCENARIOS.values() if FULL or s.in_default]


def _crash_points() -> list[object]:
    params: list[object] = []
    for scenario in _scenarios():
        trace = clean_trace(scenario.name)
        for call in trace.crash_points():
            params.append(pytest.param(CrashPoint(trace, call), id=f"{scenario.name}-{call.label}"))
        params.append(pytest.param(CrashPoint(trace, None), id=f"{scenario.name}-after-last"))
    return params


def _error_points() -> list[object]:
    params: list[object] = []
    turn = 0
    for scenario in _scenarios():
        if scenario.size is not None and not FULL:
            continue  # their kills run by default, their failing syscalls in the full run
        trace = clean_trace(scenario.name)
        for call in trace.calls:
            if call.name not in FAILING or call.wake_up:
                continue
            names = ERRNOS if FULL else (ERRNOS[turn % len(ERRNOS)],)
            turn += 1
            for name in names:
                params.append(
                    pytest.param(
                        ErrorPoint(trace, call, name),
                        id=f"{scenario.name}-{call.label}-{name}",
                    )
                )
    return params


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    for fixture, generate in (
        ("crash_point", _crash_points),
        ("error_point", _error_points),
        ("layer_crash_point", crash_point_params),
    ):
        if fixture not in metafunc.fixturenames:
            continue
        problem = _unavailable()
        if problem is None:
            try:
                params = generate()
            except Exception as error:  # a collection error would hide which step failed
                problem = f"the clean traced run failed: {error}"
        if problem is not None:
            params = [pytest.param(problem, id="unavailable")]
        metafunc.parametrize(fixture, params)


@pytest.fixture
def ws() -> Iterator[Workspace]:
    problem = _unavailable()
    if problem is not None:
        pytest.fail(problem)
    workspace = Workspace()
    try:
        yield workspace
    finally:
        workspace.cleanup()


class Tracer:
    """Starts strace on a daemon; whatever it started is detached at teardown."""

    def __init__(self, ws: Workspace) -> None:
        self.ws = ws
        self.started: list[Strace] = []

    def attach(self, pid: int, injections: list[str], traced: tuple[str, ...] = TRACED) -> Strace:
        output = self.ws.logs / f"strace-{len(self.started)}.trace"
        strace = Strace(pid, injections, output, traced)
        self.started.append(strace)
        return strace

    def stop_all(self) -> None:
        for strace in self.started:
            strace.stop()


@pytest.fixture
def tracer(ws: Workspace) -> Iterator[Tracer]:
    tracer = Tracer(ws)
    try:
        yield tracer
    finally:
        tracer.stop_all()  # before the workspace stops the daemons
