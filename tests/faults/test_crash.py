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

By default one case runs per distinct state a crash can leave (a kill before each call
that changes the disk or the mount table, and one after the last such call);
DOT_FAULTS_FULL=1 kills before every traced syscall, in more scenarios. The last case
of each scenario (`after-last`) injects one call past the clean run's count of every
syscall: the request must then complete, which shows that the count was complete, and
leave what a success must leave.
"""

from __future__ import annotations

import subprocess

from ..protocol.conftest import Workspace
from .conftest import CrashPoint, Tracer
from .harness import (
    CRASHED,
    SUCCEEDED,
    Expectation,
    connect_ahead,
    fresh_daemon,
    invariant_violations,
    log_on_failure,
    no_tracebacks,
    same_calls_as_clean_run,
    send,
    set_up,
    verify_after_fault,
    wait_settled,
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
        counts = trace.counts()
        injections = [f"{name}:signal=KILL:when={n + 1}" for name, n in counts.items()]
        connection = connect_ahead(scenario, client, daemon.pid)
        strace = tracer.attach(daemon.pid, injections, scenario.traced)
        reply = send(client, scenario.endpoint, scenario.body(ws), connection)
        assert reply is not None and reply.status == 200, (
            f"{scenario.name}: with a kill one call past the clean count of every syscall "
            f"the request must complete: {reply}\n{daemon.log()}"
        )
        wait_settled(daemon.pid)
        strace.stop()
        calls, killed = strace.calls()
        assert not killed
        assert len(calls) == len(trace.calls)
        same_calls_as_clean_run(calls, trace.calls, scenario.name)
        with log_on_failure(daemon, "the daemon"):
            verify_after_fault(
                ws, client, expectation, outcome=SUCCEEDED, log=daemon.log(), context=scenario.name
            )
        return

    injection = f"{call.name}:signal=KILL:when={call.occurrence}"
    connection = connect_ahead(scenario, client, daemon.pid)
    strace = tracer.attach(daemon.pid, [injection], scenario.traced)
    reply = send(client, scenario.endpoint, scenario.body(ws), connection)
    try:
        status: int | None = daemon.process.wait(1 if reply is not None else 10)
    except subprocess.TimeoutExpired:
        status = None
    strace.stop()
    assert reply is None and status == -9, (
        f"the injection at {call.label} ({call.shown}) was not reached: reply {reply}, "
        f"exit status {status}\n{daemon.log()}"
    )
    calls, killed = strace.calls()
    assert killed, strace.output.read_text()
    assert calls and calls[-1].name == call.name, "\n".join(c.shown for c in calls)
    assert calls[-1].occurrence == call.occurrence, "\n".join(c.shown for c in calls)
    same_calls_as_clean_run(calls, trace.calls, f"{scenario.name}-{call.label}")
    left_by_crash = invariant_violations(ws.root)  # recovery may repair these; shown if not

    restarted = fresh_daemon(ws)
    context = (
        f"{scenario.name}, killed before {call.label} {call.shown}; "
        f"right after the kill: {left_by_crash or 'invariant held'}"
    )
    with log_on_failure(restarted, "the restarted daemon"):
        verify_after_fault(
            ws, ws.client(), expectation, outcome=CRASHED, log=restarted.log(), context=context
        )
    no_tracebacks(restarted, context)
