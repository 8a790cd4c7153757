"""Reboot: volumes in every state, the daemon gone, every overlay unmounted, a restart.

A reboot leaves the state root as it was on disk, minus every mount (and the socket,
which lives on a tmpfs). After the restart each volume must come back usable: its
records are reset (nobody can use it after a reboot), it mounts and unmounts, a regular
volume keeps its changes, a volatile one discards them at its next mount.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ..protocol.conftest import PluginClient, Workspace, mounts_at, mounts_under, snapshot
from .harness import (
    CLEAN_ENTRIES,
    assert_invariant,
    fresh_daemon,
    log_on_failure,
    no_tracebacks,
    read_records,
    unmounted_like_a_reboot,
    write_changes,
)


@dataclass(frozen=True)
class State:
    name: str
    volatile: bool = False
    changed: bool = True  # changes were made through its mount
    users: dict[str, int] = field(default_factory=dict)  # mounted at the reboot by these


STATES = (
    State("never-mounted", changed=False),
    State("unmounted-with-changes"),
    State("mounted-once", users={"c1": 1}),
    State("mounted-by-several", users={"c1": 1, "c2": 1, "c3": 1}),
    State("one-id-mounted-twice", users={"c1": 2}),
    State("volatile-mounted", volatile=True, users={"c1": 1}),
    State("volatile-unmounted", volatile=True),
)


def bring_into(state: State, ws: Workspace, client: PluginClient) -> None:
    client.create(state.name, ws.base, **({"volatile": "true"} if state.volatile else {}))
    if state.changed:
        write_changes(Path(client.mount(state.name, "setup")))
    for mount_id, count in state.users.items():
        for _ in range(count):
            client.mount(state.name, mount_id)
    if state.changed:
        client.unmount(state.name, "setup")


@pytest.mark.parametrize("stop", ["SIGKILL", "SIGTERM"])
def test_every_volume_comes_back_after_a_reboot(ws: Workspace, stop: str) -> None:
    daemon = fresh_daemon(ws)
    client = ws.client()
    for state in STATES:
        bring_into(state, ws, client)
    uppers = {state.name: snapshot(ws.root / state.name / "upper") for state in STATES}
    base = snapshot(ws.base)
    for state in STATES:
        records = read_records(ws.root / state.name)
        assert records == state.users, (state, records)
        assert bool(mounts_at(ws.root / state.name / "mountpoint")) == bool(state.users)

    # The host goes down: the daemon dies (or is stopped), the kernel forgets every
    # mount, and /run (the socket) is a fresh tmpfs.
    daemon.signal(getattr(signal, stop))
    daemon.wait_exit()
    unmounted_like_a_reboot(ws.root)
    ws.socket.unlink(missing_ok=True)

    restarted = fresh_daemon(ws)
    with log_on_failure(restarted, "the restarted daemon"):
        client = ws.client()
        assert client.names() == sorted(state.name for state in STATES)
        assert_invariant(ws.root, "after the reboot")
        for state in STATES:
            folder = ws.root / state.name
            assert read_records(folder) == {}, f"{state.name}: records not reset"
            assert set(os.listdir(folder)) == CLEAN_ENTRIES, (state.name, os.listdir(folder))
            assert snapshot(folder / "upper") == uppers[state.name], f"{state.name}: upper changed"
            volume = client.ok("/VolumeDriver.Get", {"Name": state.name})["Volume"]
            assert volume["Status"]["Mounted"] is False, volume  # type: ignore[index]
            if state.users:
                assert f"volume {state.name}: the previous run ended uncleanly" in restarted.log()

        for state in STATES:
            folder = ws.root / state.name
            mountpoint = Path(client.mount(state.name, "after-reboot"))
            assert read_records(folder) == {"after-reboot": 1}
            assert_invariant(ws.root, f"{state.name} mounted after the reboot")
            assert (mountpoint / "kept.txt").read_text() == "base kept\n"
            if state.changed and not state.volatile:
                assert (mountpoint / "added.txt").read_text() == "added through the mount\n"
                assert (mountpoint / "changed.txt").read_text() == "changed through the mount\n"
                assert not (mountpoint / "deleted.txt").exists()
                assert (mountpoint / "newdir" / "inner.txt").read_text() == "inner\n"
            else:
                assert sorted(os.listdir(mountpoint)) == sorted(os.listdir(ws.base)), state
                assert (mountpoint / "changed.txt").read_text() == "base original\n"
            client.unmount(state.name, "after-reboot")
            assert mounts_at(folder / "mountpoint") == []
            assert read_records(folder) == {}
            assert set(os.listdir(folder)) == CLEAN_ENTRIES, (state.name, os.listdir(folder))
            if state.volatile:
                assert os.listdir(folder / "upper") == [], f"{state.name}: changes not discarded"
            else:
                assert snapshot(folder / "upper") == uppers[state.name], f"{state.name}: lost"
        assert mounts_under(ws.root) == []
        assert snapshot(ws.base) == base
        no_tracebacks(restarted, "after the reboot")
