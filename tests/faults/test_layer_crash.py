"""Crash safety of layers (issue 17): SIGKILL at each state-changing syscall of
snapshot, rollback and destroy (the command line's process), clone-create and Remove of
a layered volume (the daemon's request), then a restart of the daemon.

layered.py has the cases, how a command is traced and what must hold afterwards: every
volume's content wholly as before or wholly as after, every layer in use there and no
orphan left after the start, nothing mounted for nobody, and the operation retried
succeeds. The last case of each (`after-last`) kills one call past the clean run's
count of every syscall: the operation must then complete, which shows that the count
was complete.
"""

from __future__ import annotations

from ..protocol.conftest import Workspace
from .conftest import Tracer
from .harness import (
    CleanTrace,
    fresh_daemon,
    log_on_failure,
    no_tracebacks,
    request_completes,
    request_killed_at,
)
from .layered import (
    LayerCrashPoint,
    command_completes,
    command_killed_at,
    command_ok,
    state_of,
    verify_after_kill,
)


def test_layer_crash_at_step(
    ws: Workspace, tracer: Tracer, layer_crash_point: LayerCrashPoint | str
) -> None:
    assert isinstance(layer_crash_point, LayerCrashPoint), layer_crash_point
    case, call, clean = layer_crash_point.case, layer_crash_point.call, layer_crash_point.clean
    daemon = fresh_daemon(ws)
    client = ws.client()
    views = case.prepare(ws, client)
    before = state_of(client)
    request = case.request

    def retry() -> None:
        if request is not None:
            client.ok(request.endpoint, request.body(ws))
        else:
            command_ok(ws, *case.command)

    if request is not None:
        trace = CleanTrace(request, clean)
        if call is None:
            request_completes(daemon, tracer.attach, trace, ws)
        else:
            request_killed_at(daemon, tracer.attach, trace, call, ws)
    elif call is None:
        command_completes(ws, case, clean)
    else:
        command_killed_at(ws, case, call, clean)
    context = f"{case.name}, " + (
        f"killed before {call.label} {call.shown}" if call else "completed"
    )
    assert call is not None or case.done(ws), f"{context}: it did not take effect"
    daemon.close()  # stopped, as a host's reboot or restart stops it, when the command was killed

    restarted = fresh_daemon(ws)
    with log_on_failure(restarted, "the restarted daemon"):
        verify_after_kill(ws, case, before, views, retry, context)
    no_tracebacks(restarted, context)
