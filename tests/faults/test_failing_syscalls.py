"""Failing syscalls: EIO, ENOSPC, EBUSY, EPERM or EACCES at one step of a request.

Each case makes one occurrence of mkdir, mount, umount2, rename, openat or write fail
during Create, Mount, Unmount or Remove, with strace attached to the serving daemon just
before the request (`inject=SYSCALL:error=E:when=N`; harness.py explains the counting).
Then, with strace gone and the same daemon still serving:

* the daemon is alive, and the client got either success or a clear error: HTTP 500,
  `{"Err": ...}`, starting with "docker-on-top internal error:" and naming the cause
  (a failed write to the log only may leave the request successful);
* the state is safe: the invariant holds, state files are whole, a failed Create left
  no volume, a failed Mount changed no record;
* the next request works: a failed Create or Mount succeeds when retried, a failed
  Remove too; after a failed Unmount, the release is not lost: once the running
  containers stop, the volume is unmounted and clean (dockerd never retries an Unmount);
  a regular volume keeps its changes.

A failure after the reply (an Unmount's teardown, SPEC B11) cannot fail the request,
which has succeeded: the daemon must log it with its cause, and the state must be that
of a success (the stray mount it leaves goes at the next Mount).

By default each step is failed with one of the five errors in turn (every error is
used for every kind of syscall across the scenarios); DOT_FAULTS_FULL=1 runs every
error at every step, in more scenarios.
"""

from __future__ import annotations

import pytest

from ..protocol.conftest import CONTENT_TYPE, Workspace
from .conftest import ErrorPoint, Tracer
from .harness import (
    FAILED,
    INTERNAL_PREFIX,
    SUCCEEDED,
    Expectation,
    clean_trace,
    connect_ahead,
    fresh_daemon,
    log_on_failure,
    same_calls_as_clean_run,
    send,
    set_up,
    strerror_of,
    verify_after_fault,
    wait_settled,
)


def handled_failure(call_text: str, error: str, *, after_reply: bool = False) -> str | None:
    """What the log says when the daemon gets over this failure by design; None if it
    must not."""
    if call_text.startswith("write(2,"):
        return "--- Logging error ---"  # a failed log line; the request goes on
    if call_text.startswith("umount2(") and call_text.endswith(", 0) = 0") and error == "EBUSY":
        return "its overlay stays mounted until then"  # README: busy outside any container
    usage_record = call_text.startswith("write(") and '"{\\"Used\\"' in call_text
    if usage_record or ".usage.json.tmp" in call_text:
        return "cannot record its usage"  # a sized volume's usage for Get: only shown
    if after_reply:
        return "its teardown after the Unmount failed"  # SPEC B11: a stray mount stays
    return None


def test_failing_syscall(ws: Workspace, tracer: Tracer, error_point: ErrorPoint | str) -> None:
    assert isinstance(error_point, ErrorPoint), error_point
    trace, call, error = error_point.trace, error_point.call, error_point.errno_name
    scenario = trace.scenario
    context = f"{scenario.name}, {call.label} {call.shown} failing with {error}"
    daemon = fresh_daemon(ws)
    client = ws.client()
    set_up(scenario, ws, client)
    expectation = Expectation.take(scenario, ws)

    injection = f"{call.name}:error={error}:when={call.occurrence}"
    connection = connect_ahead(scenario, client, daemon.pid)
    strace = tracer.attach(daemon.pid, [injection], scenario.traced)
    reply = send(client, scenario.endpoint, scenario.body(ws), connection)
    assert reply is not None, f"{context}: no answer\n{daemon.log()}"
    wait_settled(daemon.pid)
    strace.stop()
    assert daemon.process.poll() is None, f"{context}: the daemon died\n{daemon.log()}"
    calls, _ = strace.calls()
    injected = [c for c in calls if "(INJECTED)" in c.text]
    assert len(injected) == 1 and injected[0].name == call.name, (
        f"{context}: the error was not injected where intended:\n"
        + "\n".join(c.shown for c in calls)
    )
    same_calls_as_clean_run(calls[: injected[0].position], trace.calls, context)

    assert reply.content_type == CONTENT_TYPE, f"{context}: {reply}"
    document = reply.json
    assert isinstance(document, dict), f"{context}: {reply}"
    if reply.status == 200:
        assert not document.get("Err"), f"{context}: {reply}"
        # Only a failure the daemon handles by design may go unnoticed by the client.
        handled = handled_failure(call.text, error, after_reply=call.after_reply)
        assert handled is not None, (
            f"{context}: the request succeeded although {call.shown} failed\n{daemon.log()}"
        )
        assert handled in daemon.log(), f"{context}: expected {handled!r} in\n{daemon.log()}"
        if call.after_reply and error != "EBUSY":
            assert strerror_of(error) in daemon.log(), f"{context}: the cause is not logged"
        outcome = SUCCEEDED
    elif call.after_reply:
        raise AssertionError(f"{context}: a failure after the reply changed it: {reply}")
    else:
        assert reply.status == 500, f"{context}: {reply}"
        assert set(document) == {"Err"}, f"{context}: {reply}"
        message = document["Err"]
        assert isinstance(message, str) and message.startswith(INTERNAL_PREFIX), (
            f"{context}: a failure inside the plugin must say so: {message!r}"
        )
        assert strerror_of(error) in message, f"{context}: the cause is not named: {message!r}"
        outcome = FAILED
    with log_on_failure(daemon, "the daemon"):
        verify_after_fault(
            ws, client, expectation, outcome=outcome, log=daemon.log(), context=context
        )
    assert "failed unexpectedly" not in daemon.log(), f"{context}:\n{daemon.log()}"


@pytest.mark.parametrize("scenario_name", ["create", "mount-first", "unmount-count"])
def test_short_write_of_a_state_file_leaves_no_truncated_file(
    ws: Workspace, tracer: Tracer, scenario_name: str
) -> None:
    """B2: a state file is the old or the new content, never a truncated one, also when
    write(2) writes less than asked (a full disk can do that): here the write of the
    state file returns 1 without writing anything (`inject=write:retval=1`)."""
    trace = clean_trace(scenario_name)
    scenario = trace.scenario
    (call,) = [
        c
        for c in trace.calls
        if c.name == "write" and not c.text.startswith("write(2,") and not c.wake_up
    ]
    context = f"{scenario.name}, {call.label} {call.shown} writing 1 byte"
    daemon = fresh_daemon(ws)
    client = ws.client()
    set_up(scenario, ws, client)
    expectation = Expectation.take(scenario, ws)

    connection = connect_ahead(scenario, client, daemon.pid)
    strace = tracer.attach(daemon.pid, [f"write:retval=1:when={call.occurrence}"], scenario.traced)
    reply = send(client, scenario.endpoint, scenario.body(ws), connection)
    wait_settled(daemon.pid)
    strace.stop()
    assert reply is not None and reply.status in (200, 500), f"{context}: {reply}"
    if reply.status == 500:
        message = reply.json["Err"]  # type: ignore[index]
        assert message.startswith(INTERNAL_PREFIX), f"{context}: {message!r}"
    outcome = SUCCEEDED if reply.status == 200 else FAILED
    with log_on_failure(daemon, "the daemon"):
        verify_after_fault(
            ws, client, expectation, outcome=outcome, log=daemon.log(), context=context
        )
