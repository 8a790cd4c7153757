"""Crash safety: SIGKILL at each step of Create, Mount, Unmount and Remove, then a restart.

Each case is one (scenario, syscall occurrence) of a clean traced run: strace, attached
to the serving daemon just before the request, kills it on entering that syscall
(harness.py explains why the count starts exactly at the request). The daemon is then
started again, without strace, on the same state root, and:

* the invariant holds (a record in activemounts/ means the overlay is mounted, per
  /proc/self/mountinfo), and every state file is whole;
* the records are the old or the new ones, never anything else;
* no half-made volume is visible: a Create leaves no folder without metadata.json, a
  Remove leaves a whole volume, nothing, or a folder the restart warned about;
* the volume mounts and unmounts normally, a regular volume keeps every change made
  through its mount before the crash, a volatile one discards them at its next mount;
* once every running container has stopped, the volume is unmounted and clean (only
  the crashed request's own count may be left, as dockerd never gets its answer): for
  a sized volume, its storage is unmounted too and no loop device is left attached to
  its image; a Create's image is either a whole filesystem or gone with its volume.

A kill after the reply (an Unmount's teardown, SPEC B11) comes after a reply of
success: the state must then be that of a success, with no count left over.

By default one case runs per distinct state a crash can leave (a kill before each call
that changes the disk or the mount table, and one after the last such call);
DOT_FAULTS_FULL=1 kills before every traced syscall, in more scenarios. The last case
of each scenario (`after-last`) injects one call past the clean run's count of every
syscall: the request must then complete, which shows that the count was complete, and
leave what a success must leave.
"""

from __future__ import annotations

from ..protocol.conftest import Workspace
from .conftest import CrashPoint, Tracer
from .harness import (
    CRASHED,
    SUCCEEDED,
    Expectation,
    fresh_daemon,
    invariant_violations,
    log_on_failure,
    no_tracebacks,
    request_completes,
    request_killed_at,
    set_up,
    verify_after_fault,
)


def test_crash_at_step(ws: Workspace, tracer: Tracer, crash_point: CrashPoint | str) -> None:
    assert isinstance(crash_point, CrashPoint), crash_point
    trace, call = crash_point.trace, crash_point.call
    scenario = trace.scenario
    daemon = fresh_daemon(ws)
    client = ws.client()
    set_up(scenario, ws, client)
    expectation = Expectation.take(scenario, ws)

    if call is None:
        request_completes(daemon, tracer.attach, trace, ws)
        with log_on_failure(daemon, "the daemon"):
            verify_after_fault(
                ws, client, expectation, outcome=SUCCEEDED, log=daemon.log(), context=scenario.name
            )
        return

    request_killed_at(daemon, tracer.attach, trace, call, ws)
    left_by_crash = invariant_violations(ws.root)  # recovery may repair these; shown if not

    restarted = fresh_daemon(ws)
    context = (
        f"{scenario.name}, killed before {call.label} {call.shown}; "
        f"right after the kill: {left_by_crash or 'invariant held'}"
    )
    outcome = SUCCEEDED if call.after_reply else CRASHED
    with log_on_failure(restarted, "the restarted daemon"):
        verify_after_fault(
            ws, ws.client(), expectation, outcome=outcome, log=restarted.log(), context=context
        )
    no_tracebacks(restarted, context)
