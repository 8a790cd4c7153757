"""The layered operations under the fault harness (issue 17): clone-create and Remove of
a layered volume (daemon requests, as harness.Scenario), snapshot, rollback and destroy
(command-line processes), their set-ups, and what must hold after a kill at any step.

A command is a process of its own, against the state root: strace starts it
(`strace -f -o TRACE -e inject=... python3 -m docker_on_top COMMAND --root ROOT`), so
each syscall's count starts with the process. Its start-up only reads (no bytecode is
written: PYTHONDONTWRITEBYTECODE=1; the package's is compiled before each run, so every
run reads the same files), so the crash points start at its first change
(harness.crash_points); the trace's parsing, its canonical order and the proof that the
kill came where the test id says are harness.py's, as for the daemon's requests. The
daemon serves meanwhile, as it would on a host.

After the kill the daemon is started again (its start-up recovery runs), and then:

* every volume's merged content (mounted through the daemon, every entry read with its
  type, mode and content) is, all volumes together, the state before the operation or
  the state after it, never anything in between; which of the two is what the
  operation's own record says (`LayerCase.done`: the snapshot's name listed, the clone
  there, ...), and a volume absent in it is absent for Get and List too;
* every layer a volume's metadata lists exists, and `<root>/.layers` holds nothing else:
  the start collected every orphan and what a removal cut short left;
* nothing is mounted under the root once nobody uses it;
* the operation, retried (when it had not taken effect, or always where it is
  idempotent), succeeds and leaves the state after it.
"""

from __future__ import annotations

import compileall
import json
import os
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from ..protocol.conftest import REPO, PluginClient, Workspace, clean_environment, mounts_under
from ..protocol.conftest import snapshot as tree_snapshot
from ..trees import change_volume
from .harness import (
    CREATE,
    FULL,
    REMOVE,
    TRACED,
    Call,
    Scenario,
    assert_invariant,
    canonical_order,
    clean_trace_of,
    crash_points,
    daemon_env,
    fresh_daemon,
    killed_where_named,
    parse_trace,
    same_calls_as_clean_run,
    volume_folders,
)

# A volume's merged content: relative path -> (type, mode, content); "." is its root.
Tree = dict[str, tuple[object, ...]]
# Every volume's merged content, by name.
State = dict[str, Tree]
# Contents a set-up saw on the way (a snapshot's, by VOLUME@NAME), for what comes after.
Views = dict[str, Tree]

PROBE = "layered-probe"
WRITER = "layered-writer"
GET = "/VolumeDriver.Get"


# --- set-ups, through the daemon and the command line ----------------------------------------


def merged(client: PluginClient, name: str) -> Tree:
    mountpoint = Path(client.mount(name, PROBE))
    try:
        return {
            os.path.relpath(path, mountpoint): entry
            for path, entry in tree_snapshot(mountpoint).items()
        }
    finally:
        client.unmount(name, PROBE)


def state_of(client: PluginClient) -> State:
    return {name: merged(client, name) for name in client.names()}


def change(client: PluginClient, name: str, files: Mapping[str, str | None]) -> None:
    """Change the volume as a container does: write files, delete those given None."""
    change_volume(client, name, WRITER, files)


def command_ok(ws: Workspace, *arguments: str) -> None:
    done = ws.command(*arguments)
    assert done.returncode == 0, f"{arguments}: {done.stderr}"


def snapshot_and_view(ws: Workspace, client: PluginClient, reference: str) -> Tree:
    command_ok(ws, "snapshot", reference)
    return merged(client, reference.split("@")[0])


def origin_with_snapshot(ws: Workspace, client: PluginClient) -> Views:
    """o: changes, snapshot s, more changes."""
    client.create("o", ws.base)
    change(client, "o", {"added.txt": "at s\n", "deleted.txt": None, "sub/made.txt": "s\n"})
    at_s = snapshot_and_view(ws, client, "o@s")
    change(client, "o", {"added.txt": "after s\n", "changed.txt": "after s\n"})
    return {"o@s": at_s}


def origin_and_clone(ws: Workspace, client: PluginClient) -> Views:
    """o as in origin_with_snapshot, and c, a clone of o@s with changes of its own."""
    views = origin_with_snapshot(ws, client)
    client.ok(CREATE, {"Name": "c", "Opts": {"from": "o@s"}})
    change(client, "c", {"clone.txt": "the clone's\n", "kept.txt": None})
    return views


def origin_with_two_snapshots(ws: Workspace, client: PluginClient) -> Views:
    """o: changes, snapshot s1, changes, snapshot s2, changes; nobody else uses them."""
    client.create("o", ws.base)
    change(client, "o", {"one.txt": "1\n", "deleted.txt": None})
    command_ok(ws, "snapshot", "o@s1")
    change(client, "o", {"two.txt": "2\n", "sub/nested.txt": "2\n"})
    command_ok(ws, "snapshot", "o@s2")
    change(client, "o", {"own.txt": "own\n"})
    return {}


def volume_with_a_cloned_snapshot(ws: Workspace, client: PluginClient) -> Views:
    """v: x=1, snapshot one, cloned as c; x=2 and more, not snapshotted."""
    client.create("v", ws.base)
    change(client, "v", {"x.txt": "1\n", "deleted.txt": None})
    command_ok(ws, "snapshot", "v@one")
    client.ok(CREATE, {"Name": "c", "Opts": {"from": "v@one"}})
    change(client, "v", {"x.txt": "2\n", "sub/y.txt": "2\n"})
    return {}


def volume_with_later_snapshots(ws: Workspace, client: PluginClient) -> Views:
    """v: x=1 snapshot one; x=2 snapshot two, cloned as c; x=3 snapshot three; x=4 and
    a deletion, not snapshotted. A rollback to one drops three and keeps two (c's)."""
    client.create("v", ws.base)
    change(client, "v", {"x.txt": "1\n"})
    at_one = snapshot_and_view(ws, client, "v@one")
    change(client, "v", {"x.txt": "2\n", "deleted.txt": None})
    command_ok(ws, "snapshot", "v@two")
    client.ok(CREATE, {"Name": "c", "Opts": {"from": "v@two"}})
    change(client, "v", {"x.txt": "3\n", "sub/three.txt": "3\n"})
    command_ok(ws, "snapshot", "v@three")
    change(client, "v", {"x.txt": "4\n", "kept.txt": None})
    return {"v@one": at_one}


# --- the cases ---------------------------------------------------------------------------------


def snapshot_names(ws: Workspace, volume: str) -> list[str] | None:
    """The volume's snapshots per its metadata; None when the volume is gone."""
    try:
        document = json.loads((ws.root / volume / "metadata.json").read_bytes())
    except FileNotFoundError:
        return None
    return [snapshot["Name"] for snapshot in document.get("Snapshots", [])]


def exists(ws: Workspace, volume: str) -> bool:
    return snapshot_names(ws, volume) is not None


def has_snapshot(ws: Workspace, volume: str, name: str) -> bool:
    return name in (snapshot_names(ws, volume) or [])


@dataclass(frozen=True)
class LayerCase:
    """One layered operation on volumes in a known state.

    `after` gives the state once it took effect from the state before it; `done` says
    from the operation's own records whether it did; an idempotent one is retried
    whether or not it did (`retry_always`).
    """

    name: str
    prepare: Callable[[Workspace, PluginClient], Views]
    after: Callable[[State, Views], State]
    done: Callable[[Workspace], bool]
    request: Scenario | None = None  # a daemon request
    command: tuple[str, ...] = ()  # or a command line
    retry_always: bool = False
    in_default: bool = True


def _unchanged(before: State, _: Views) -> State:
    return before


def _clone(name: str, origin: str, after: Callable[[State, Views], State]) -> LayerCase:
    """Create c with `-o from=origin`, on origin_with_snapshot's o."""
    return LayerCase(
        name,
        origin_with_snapshot,
        after=after,
        done=lambda ws: exists(ws, "c"),
        request=Scenario(
            name, CREATE, volume="c", create_options={"from": origin}, prepare=origin_with_snapshot
        ),
        # From a volume: a snapshot's steps in the daemon, then a clone's.
        in_default="@" in origin,
    )


def _removal(name: str, prepare: Callable[[Workspace, PluginClient], Views]) -> LayerCase:
    """Remove o, prepared by `prepare`."""
    return LayerCase(
        name,
        prepare,
        after=lambda before, _: {n: tree for n, tree in before.items() if n != "o"},
        done=lambda ws: not exists(ws, "o"),
        request=Scenario(name, REMOVE, volume="o", prepare=prepare),
        retry_always=True,
    )


CASES: dict[str, LayerCase] = {
    case.name: case
    for case in (
        _clone(
            "clone-create-from-snapshot",
            "o@s",
            after=lambda before, views: {**before, "c": views["o@s"]},
        ),
        _clone(
            "clone-create-from-volume", "o", after=lambda before, _: {**before, "c": before["o"]}
        ),
        _removal("remove-shared-layers", origin_and_clone),
        _removal("remove-own-layers", origin_with_two_snapshots),
        LayerCase(
            "snapshot",
            volume_with_a_cloned_snapshot,
            after=_unchanged,
            done=lambda ws: has_snapshot(ws, "v", "s"),
            command=("snapshot", "v@s"),
        ),
        LayerCase(
            "rollback",
            volume_with_later_snapshots,
            after=lambda before, views: {**before, "v": views["v@one"]},
            done=lambda ws: snapshot_names(ws, "v") == ["one"],
            command=("rollback", "v@one"),
            retry_always=True,
        ),
        LayerCase(
            "destroy",
            volume_with_a_cloned_snapshot,
            after=_unchanged,
            done=lambda ws: exists(ws, "v") and not has_snapshot(ws, "v", "one"),
            command=("destroy", "v@one"),
        ),
    )
}


# --- a command line under strace ---------------------------------------------------------------


def traced_command(
    ws: Workspace, arguments: tuple[str, ...], injections: list[str], output: Path
) -> subprocess.CompletedProcess[str]:
    """Run the command line on the workspace's root under strace, as its tracer."""
    _compile_package()
    command = ["strace", "-f", "-q", "-o", str(output), "-e", "trace=" + ",".join(TRACED)]
    for injection in injections:
        command += ["-e", f"inject={injection}"]
    command += ["--", sys.executable, "-m", "docker_on_top", *arguments, "--root", str(ws.root)]
    return subprocess.run(
        command,
        cwd=REPO,
        env=clean_environment({"PYTHONDONTWRITEBYTECODE": "1", **daemon_env()}),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _compile_package() -> None:
    """The package's bytecode, written before every traced run: the command's start-up
    then reads the same files in the clean run and the injected ones. (It writes none
    itself; whether pytest, importing the package for other tests, had written a module's
    yet changed how many files the command opened before its first step, and so the
    counts the crash points name.)"""
    source = Path(daemon_env().get("PYTHONPATH", str(REPO)))
    if not compileall.compile_dir(str(source / "docker_on_top"), quiet=1):
        raise RuntimeError(f"cannot compile {source / 'docker_on_top'}")


_COMMAND_TRACES: dict[str, tuple[Call, ...]] = {}


def clean_command_trace(case: LayerCase) -> tuple[Call, ...]:
    """The command's calls in a clean run, traced exactly like the injected runs."""
    if case.name not in _COMMAND_TRACES:
        ws = Workspace()
        try:
            fresh_daemon(ws)
            case.prepare(ws, ws.client())
            output = ws.logs / "clean.trace"
            run = traced_command(ws, case.command, [], output)
            if run.returncode != 0:
                raise AssertionError(f"clean run of {case.command} failed: {run.stderr}")
            calls, killed = parse_trace(output, frozenset())
            if killed or not calls:
                raise AssertionError(f"clean run of {case.command} traced nothing")
            _COMMAND_TRACES[case.name] = canonical_order(calls)
        finally:
            ws.cleanup()
    return _COMMAND_TRACES[case.name]


def command_killed_at(ws: Workspace, case: LayerCase, call: Call, clean: tuple[Call, ...]) -> None:
    output = ws.logs / "killed.trace"
    run = traced_command(
        ws, case.command, [f"{call.name}:signal=KILL:when={call.occurrence}"], output
    )
    # strace ends itself with the signal that ended the command.
    assert run.returncode == -9, (
        f"the injection at {call.label} ({call.shown}) was not reached: exit status "
        f"{run.returncode}\n{run.stderr}"
    )
    calls, killed = parse_trace(output, frozenset())
    killed_where_named(calls, killed, call, clean, output, f"{case.name}-{call.label}")


def command_completes(ws: Workspace, case: LayerCase, clean: tuple[Call, ...]) -> None:
    """With a kill one call past the clean count of every syscall the command completes,
    with the clean run's calls."""
    counts: dict[str, int] = {}
    for call in clean:
        counts[call.name] = counts.get(call.name, 0) + 1
    output = ws.logs / "complete.trace"
    run = traced_command(
        ws, case.command, [f"{name}:signal=KILL:when={n + 1}" for name, n in counts.items()], output
    )
    assert run.returncode == 0, f"{case.command}: {run.stderr}"
    calls, killed = parse_trace(output, frozenset())
    assert not killed and len(calls) == len(clean)
    same_calls_as_clean_run(calls, clean, case.name)


# --- the test cases ------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerCrashPoint:
    case: LayerCase
    clean: tuple[Call, ...]
    # Killed on entering this call; None: one call past the clean count of every
    # syscall, so the operation must complete.
    call: Call | None


def crash_point_params() -> list[object]:
    params: list[object] = []
    for case in CASES.values():
        if not (FULL or case.in_default):
            continue
        if case.request is not None:
            clean = clean_trace_of(case.request).calls
            points = crash_points(clean, thin_walks=True)
        else:
            clean = clean_command_trace(case)
            points = crash_points(clean, from_first_change=True, thin_walks=True)
        for call in points:
            params.append(
                pytest.param(LayerCrashPoint(case, clean, call), id=f"{case.name}-{call.label}")
            )
        params.append(
            pytest.param(LayerCrashPoint(case, clean, None), id=f"{case.name}-after-last")
        )
    return params


# --- what must hold ------------------------------------------------------------------------------


def layer_problems(root: Path) -> list[str]:
    """Layers listed by a volume but missing, and anything in .layers no volume lists."""
    listed: set[str] = set()
    for folder in volume_folders(root):
        with_metadata = folder / "metadata.json"
        if with_metadata.exists():
            listed.update(json.loads(with_metadata.read_bytes()).get("Layers", []))
    layers = root / ".layers"
    present = set(os.listdir(layers)) if layers.is_dir() else set()
    problems = [
        f"layer {layer} is listed but missing"
        for layer in sorted(listed)
        if not (layers / layer / "tree").is_dir()
    ]
    problems += [f"{layers / name} is listed by no volume" for name in sorted(present - listed)]
    return problems


def differences(found: State, expected: State) -> str:
    lines = []
    for name in sorted(set(found) | set(expected)):
        if name not in found or name not in expected:
            lines.append(f"volume {name}: {'missing' if name in expected else 'not expected'}")
            continue
        mine, wanted = found[name], expected[name]
        for path in sorted(set(mine) | set(wanted)):
            if mine.get(path) != wanted.get(path):
                lines.append(
                    f"volume {name}, {path}: {mine.get(path)} instead of {wanted.get(path)}"
                )
    return "\n".join(lines)


def assert_sound(ws: Workspace, client: PluginClient, expected: State, context: str) -> None:
    assert_invariant(ws.root, context)
    problems = layer_problems(ws.root)
    assert not problems, f"{context}:\n" + "\n".join(problems)
    found = state_of(client)
    assert found == expected, f"{context}: the volumes' content:\n{differences(found, expected)}"
    assert mounts_under(ws.root) == [], f"{context}: {mounts_under(ws.root)}"


def verify_after_kill(
    ws: Workspace,
    case: LayerCase,
    before: State,
    views: Views,
    retry: Callable[[], None],
    context: str,
) -> None:
    """On the restarted daemon: old or new state, as the records say; then the retry."""
    client = ws.client()
    after = case.after(before, views)
    done = case.done(ws)
    assert_sound(ws, client, after if done else before, f"{context} (done: {done})")
    for absent in sorted((set(before) | set(after)) - set(after if done else before)):
        assert "no such volume" in client.err(GET, {"Name": absent}), f"{context}: {absent}"
    if done and not case.retry_always:
        return
    retry()
    assert case.done(ws), f"{context}: the retry did not take effect"
    assert_sound(ws, client, after, f"{context}, retried")
