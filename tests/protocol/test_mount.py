"""A3 Mount, Unmount and Remove with real overlay mounts; B8 volatile mount option."""

from __future__ import annotations

import json
import os
import socket
import stat
import threading
import time
from pathlib import Path

import pytest

from .conftest import (
    Daemon,
    PluginClient,
    VolumePaths,
    Workspace,
    flock_held,
    http_request,
    is_volatile_mount,
    mounts_at,
    snapshot,
    threads_waiting_for_a_lock,
    wait_until,
)


def assert_mounted(ws: Workspace, volume: VolumePaths, *, volatile: bool = False) -> None:
    (entry,) = mounts_at(volume.mountpoint)
    assert entry.fstype == "overlay"
    assert f"lowerdir={ws.base}" in entry.super_options
    assert f"upperdir={volume.upper}" in entry.super_options
    assert f"workdir={volume.workdir}" in entry.super_options
    assert is_volatile_mount(entry) is volatile, entry.super_options


def assert_unmounted(volume: VolumePaths) -> None:
    assert mounts_at(volume.mountpoint) == []
    assert not volume.mountpoint.exists()
    assert not volume.workdir.exists()
    assert volume.records() == {}
    assert volume.entries() == {"metadata.json", "upper", "activemounts"}


def test_mount_mounts_overlay_and_records_the_id(ws: Workspace, client: PluginClient) -> None:
    client.create("v", ws.base)
    volume = ws.volume("v")
    assert client.mount("v", "c1") == f"{volume.mountpoint}/"
    assert_mounted(ws, volume, volatile=False)
    assert volume.records() == {"c1": {"UsageCount": 1}}
    assert (volume.mountpoint / "kept.txt").read_text() == "base kept\n"
    assert (volume.mountpoint / "sub" / "nested.txt").read_text() == "base nested\n"


def test_b8_volatile_volume_mounts_with_volatile_option(
    ws: Workspace, client: PluginClient
) -> None:
    client.create("v", ws.base, volatile="true")
    client.mount("v", "c1")
    assert_mounted(ws, ws.volume("v"), volatile=True)


def test_same_id_twice_counts_two_and_needs_two_unmounts(
    ws: Workspace, client: PluginClient
) -> None:
    client.create("v", ws.base)
    volume = ws.volume("v")
    client.mount("v", "c1")
    client.mount("v", "c1")
    assert volume.records() == {"c1": {"UsageCount": 2}}
    assert len(mounts_at(volume.mountpoint)) == 1
    client.unmount("v", "c1")
    assert volume.records() == {"c1": {"UsageCount": 1}}
    assert_mounted(ws, volume)
    client.unmount("v", "c1")
    assert_unmounted(volume)


def test_two_ids_share_one_overlay_until_the_last_unmount(
    ws: Workspace, client: PluginClient
) -> None:
    client.create("v", ws.base)
    volume = ws.volume("v")
    client.mount("v", "c1")
    client.mount("v", "c2")
    assert volume.records() == {"c1": {"UsageCount": 1}, "c2": {"UsageCount": 1}}
    assert len(mounts_at(volume.mountpoint)) == 1
    client.unmount("v", "c1")
    assert volume.records() == {"c2": {"UsageCount": 1}}
    assert_mounted(ws, volume)
    client.unmount("v", "c2")
    assert_unmounted(volume)


def test_last_unmount_removes_mount_mountpoint_and_workdir(
    ws: Workspace, client: PluginClient
) -> None:
    client.create("v", ws.base)
    volume = ws.volume("v")
    client.mount("v", "c1")
    (volume.mountpoint / "new.txt").write_text("x")
    client.unmount("v", "c1")
    assert_unmounted(volume)


def test_unmount_of_an_unknown_id_does_not_unmount_under_a_user(
    ws: Workspace, daemon: Daemon, client: PluginClient
) -> None:
    client.create("v", ws.base)
    volume = ws.volume("v")
    client.mount("v", "c1")
    client.unmount("v", "stranger")  # treated as a use of its own (A3: warning)
    assert volume.records() == {"c1": {"UsageCount": 1}}
    assert_mounted(ws, volume)
    assert "WARNING" in daemon.log() and "no record for mount ID stranger" in daemon.log()


def test_the_base_may_change_while_the_volume_is_not_mounted(
    ws: Workspace, client: PluginClient
) -> None:
    """B7: with the overlay features that pin a lower layer switched off, changes made to
    the base between two mounts show at the next one, beside the volume's own changes.
    (Not for paths the volume changed: see the README's limitations.)"""
    (ws.base / "dir").mkdir()
    (ws.base / "dir" / "inner.txt").write_text("inner\n")
    (ws.base / "kept.txt").write_text("base\n")
    (ws.base / "gone.txt").write_text("base\n")
    client.create("v", ws.base)
    mountpoint = Path(client.mount("v", "c1"))
    (mountpoint / "kept.txt").write_text("changed\n")
    (mountpoint / "own.txt").write_text("own\n")
    assert (mountpoint / "dir" / "inner.txt").read_text() == "inner\n"
    client.unmount("v", "c1")

    (ws.base / "dir").rename(ws.base / "moved")
    (ws.base / "gone.txt").unlink()
    (ws.base / "new.txt").write_text("new\n")
    mountpoint = Path(client.mount("v", "c2"))
    assert (mountpoint / "new.txt").read_text() == "new\n"
    assert (mountpoint / "moved" / "inner.txt").read_text() == "inner\n"
    assert not (mountpoint / "dir").exists() and not (mountpoint / "gone.txt").exists()
    assert (mountpoint / "kept.txt").read_text() == "changed\n"
    assert (mountpoint / "own.txt").read_text() == "own\n"
    client.unmount("v", "c2")


def test_writes_land_in_upper_and_base_is_untouched(ws: Workspace, client: PluginClient) -> None:
    client.create("v", ws.base)
    volume = ws.volume("v")
    base_before = snapshot(ws.base)
    mountpoint = Path(client.mount("v", "c1"))
    (mountpoint / "added.txt").write_text("added\n")
    (mountpoint / "changed.txt").write_text("changed\n")
    (mountpoint / "deleted.txt").unlink()
    (mountpoint / "sub" / "more.txt").write_text("more\n")
    os.sync()
    assert (volume.upper / "added.txt").read_text() == "added\n"
    assert (volume.upper / "changed.txt").read_text() == "changed\n"
    whiteout = os.lstat(volume.upper / "deleted.txt")
    assert stat.S_ISCHR(whiteout.st_mode) and whiteout.st_rdev == 0
    assert (volume.upper / "sub" / "more.txt").read_text() == "more\n"
    assert not (volume.upper / "kept.txt").exists()
    assert snapshot(ws.base) == base_before
    client.unmount("v", "c1")
    assert snapshot(ws.base) == base_before


def test_regular_volume_keeps_changes_across_mounts(ws: Workspace, client: PluginClient) -> None:
    client.create("v", ws.base)
    mountpoint = Path(client.mount("v", "c1"))
    (mountpoint / "added.txt").write_text("added\n")
    (mountpoint / "deleted.txt").unlink()
    client.unmount("v", "c1")
    mountpoint = Path(client.mount("v", "c2"))
    assert (mountpoint / "added.txt").read_text() == "added\n"
    assert not (mountpoint / "deleted.txt").exists()


def test_volatile_volume_discards_changes_at_the_next_first_mount(
    ws: Workspace, client: PluginClient
) -> None:
    client.create("v", ws.base, volatile="yes")
    volume = ws.volume("v")
    mountpoint = Path(client.mount("v", "c1"))
    (mountpoint / "added.txt").write_text("added\n")
    (mountpoint / "deleted.txt").unlink()
    client.unmount("v", "c1")
    mountpoint = Path(client.mount("v", "c2"))
    assert not (mountpoint / "added.txt").exists()
    assert (mountpoint / "deleted.txt").read_text() == "base deleted\n"
    assert list(volume.upper.iterdir()) == []


def test_volatile_volume_keeps_changes_while_another_user_mounts_it(
    ws: Workspace, client: PluginClient
) -> None:
    """A6: `docker cp` (same or other ID) must not wipe a volatile volume under a user."""
    client.create("v", ws.base, volatile="true")
    volume = ws.volume("v")
    mountpoint = Path(client.mount("v", "c1"))
    (mountpoint / "added.txt").write_text("added\n")
    client.mount("v", "c1")  # docker cp reuses the container's ID
    client.mount("v", "c2")
    assert (mountpoint / "added.txt").read_text() == "added\n"
    client.unmount("v", "c1")
    client.unmount("v", "c2")
    assert (mountpoint / "added.txt").read_text() == "added\n"
    assert_mounted(ws, volume, volatile=True)
    assert volume.records() == {"c1": {"UsageCount": 1}}


def test_mount_of_a_missing_volume_is_no_such_volume(ws: Workspace, client: PluginClient) -> None:
    before = ws.state()
    assert "no such volume" in client.err("/VolumeDriver.Mount", {"Name": "nope", "ID": "c1"})
    assert ws.state() == before


def test_mount_with_the_base_gone_fails_clearly_and_leaves_no_mount(
    ws: Workspace, client: PluginClient
) -> None:
    base = ws.dir / "short-lived"
    base.mkdir()
    client.create("v", base)
    base.rmdir()
    message = client.err("/VolumeDriver.Mount", {"Name": "v", "ID": "c1"})
    assert "base" in message
    assert_unmounted(ws.volume("v"))


def test_remove_of_a_missing_volume_succeeds(ws: Workspace, client: PluginClient) -> None:
    before = ws.state()
    assert client.ok("/VolumeDriver.Remove", {"Name": "nope"}) == {}
    assert ws.state() == before


def test_remove_removes_everything(ws: Workspace, client: PluginClient) -> None:
    client.create("v", ws.base)
    client.create("other", ws.base)
    mountpoint = Path(client.mount("v", "c1"))
    (mountpoint / "added.txt").write_text("added\n")
    client.unmount("v", "c1")
    base_before = snapshot(ws.base)
    client.remove("v")
    assert not ws.volume("v").folder.exists()
    assert client.names() == ["other"]
    assert "no such volume" in client.err("/VolumeDriver.Get", {"Name": "v"})
    assert snapshot(ws.base) == base_before
    # The name is free again, with no trace of the old changes.
    client.create("v", ws.base)
    assert not (Path(client.mount("v", "c2")) / "added.txt").exists()


def test_remove_unmounts_a_stray_mount_first(ws: Workspace, client: PluginClient) -> None:
    client.create("v", ws.base)
    volume = ws.volume("v")
    mountpoint = Path(client.mount("v", "c1"))
    (mountpoint / "added.txt").write_text("added\n")
    (volume.activemounts / "c1").unlink()  # nobody uses it any more: a stray mount
    base_before = snapshot(ws.base)
    client.remove("v")
    assert mounts_at(volume.mountpoint) == []
    assert not volume.folder.exists()
    assert snapshot(ws.base) == base_before
    assert client.names() == []


def test_mount_after_a_stray_mount_replaces_it(ws: Workspace, client: PluginClient) -> None:
    client.create("v", ws.base)
    volume = ws.volume("v")
    client.mount("v", "c1")
    (volume.activemounts / "c1").unlink()
    client.mount("v", "c2")
    assert_mounted(ws, volume)  # exactly one overlay, not two stacked
    assert volume.records() == {"c2": {"UsageCount": 1}}
    client.unmount("v", "c2")
    assert_unmounted(volume)


def test_last_unmount_with_the_mountpoint_busy_keeps_one_overlay_for_the_next_user(
    ws: Workspace, client: PluginClient
) -> None:
    """A6: a file held open on the mountpoint while the container stops. Issue 13.5: the
    busy overlay stays and is reused, so no second overlay ever shares its upper."""
    client.create("v", ws.base)
    volume = ws.volume("v")
    mountpoint = Path(client.mount("v", "c1"))
    (mountpoint / "added.txt").write_text("added\n")
    with open(mountpoint / "kept.txt") as held:
        client.unmount("v", "c1")
        assert volume.records() == {}
        assert [entry.fstype for entry in mounts_at(volume.mountpoint)] == ["overlay"]
        mountpoint = Path(client.mount("v", "c2"))
        assert_mounted(ws, volume)
        assert (mountpoint / "added.txt").read_text() == "added\n"
        assert held.read() == "base kept\n"
    client.unmount("v", "c2")
    assert_unmounted(volume)


def test_a_volatile_volume_held_on_the_host_is_refused_until_released(
    ws: Workspace, client: PluginClient
) -> None:
    client.create("v", ws.base, volatile="true")
    volume = ws.volume("v")
    mountpoint = Path(client.mount("v", "c1"))
    (mountpoint / "added.txt").write_text("added\n")
    with open(mountpoint / "kept.txt"):
        client.unmount("v", "c1")
        error = client.err("/VolumeDriver.Mount", {"Name": "v", "ID": "c2"})
        assert "holds files open" in error and "volatile" in error
        assert volume.records() == {}
        assert [entry.fstype for entry in mounts_at(volume.mountpoint)] == ["overlay"]
    mountpoint = Path(client.mount("v", "c2"))
    assert_mounted(ws, volume, volatile=True)
    assert not (mountpoint / "added.txt").exists()
    client.unmount("v", "c2")
    assert_unmounted(volume)


def test_mount_and_unmount_wait_for_the_activemounts_lock(
    ws: Workspace, client: PluginClient
) -> None:
    """A3 step 2: the flock on activemounts/ serialises with other processes."""
    client.create("v", ws.base)
    volume = ws.volume("v")
    replies: list[object] = []
    with flock_held(volume.activemounts):
        thread = threading.Thread(target=lambda: replies.append(client.mount("v", "c1")))
        thread.start()
        time.sleep(0.5)
        assert replies == [] and mounts_at(volume.mountpoint) == []
        assert volume.records() == {}
        # Get and List do not wait for the lock (dockerd calls Get before everything).
        started = time.monotonic()
        client.ok("/VolumeDriver.Get", {"Name": "v"})
        assert client.names() == ["v"]
        assert time.monotonic() - started < 1.0
    thread.join(5)
    assert replies == [f"{volume.mountpoint}/"]
    assert volume.records() == {"c1": {"UsageCount": 1}}

    # A3: Unmount waits under the same lock.
    unmounted: list[bool] = []
    with flock_held(volume.activemounts):
        thread = threading.Thread(
            target=lambda: unmounted.append(client.unmount("v", "c1") is None)
        )
        thread.start()
        time.sleep(0.5)
        assert unmounted == [] and volume.records() == {"c1": {"UsageCount": 1}}
        assert_mounted(ws, volume)
    thread.join(5)
    assert unmounted == [True]
    assert_unmounted(volume)


def test_records_are_json_usage_counts(ws: Workspace, client: PluginClient) -> None:
    client.create("v", ws.base)
    client.mount("v", "c1")
    client.mount("v", "c1")
    client.mount("v", "c1")
    raw = (ws.volume("v").activemounts / "c1").read_bytes()
    assert json.loads(raw) == {"UsageCount": 3}
    assert os.listdir(ws.volume("v").activemounts) == ["c1"]


@pytest.mark.parametrize("folder", ["back\\slash", "with space", "with=equals", "tab\there"])
def test_base_with_special_characters_mounts_that_very_directory(
    ws: Workspace, client: PluginClient, folder: str
) -> None:
    """The overlay option string must not re-interpret the base path.

    The kernel unescapes backslashes in overlay's legacy option string, so an unescaped
    `lowerdir=/x/back\\slash` names /x/backslash. Refusing such a base at Create is fine
    too; mounting a different directory is not.
    """
    base = ws.dir / folder
    base.mkdir()
    (base / "which.txt").write_text("the right base\n")
    decoy = ws.dir / folder.replace("\\", "")
    decoy.mkdir(exist_ok=True)
    if decoy != base:
        (decoy / "which.txt").write_text("a different directory\n")
    reply = client.call("/VolumeDriver.Create", {"Name": "v", "Opts": {"base": str(base)}})
    if reply.status != 200:
        assert reply.status == 500 and "base" in reply.json["Err"], str(reply)  # type: ignore[index]
        return
    mountpoint = Path(client.mount("v", "c1"))
    assert (mountpoint / "which.txt").read_text() == "the right base\n"
    assert len(mounts_at(ws.volume("v").mountpoint)) == 1


@pytest.mark.parametrize("volatile", [False, True], ids=["regular", "volatile"])
def test_a_mount_whose_client_has_gone_is_undone(
    ws: Workspace, daemon: Daemon, client: PluginClient, volatile: bool
) -> None:
    """Issue 13, item 1: the client gives up while its Mount waits for the volume's lock
    (Podman after 5 s; moby then never sends an Unmount). Once the lock is free, the
    Mount runs, its reply cannot be delivered, and it is undone, as its Unmount would:
    its record goes, and the user that stays keeps the overlay."""
    client.create("v", ws.base, **({"volatile": "true"} if volatile else {}))
    volume = ws.volume("v")
    client.mount("v", "kept")
    (volume.mountpoint / "left.txt").write_text("by the user that stays\n")
    with flock_held(volume.activemounts):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(ws.socket))
        sock.sendall(http_request("/VolumeDriver.Mount", b'{"Name": "v", "ID": "gaveup"}'))
        wait_until(
            lambda: threads_waiting_for_a_lock(daemon.pid) > 0, "the Mount waits for the lock"
        )
        sock.close()
    wait_until(lambda: "unmounted volume v for gaveup" in daemon.log(), "the Mount is undone")
    # The user that stays keeps its mount, the one that gave up has no record.
    assert volume.records() == {"kept": {"UsageCount": 1}}
    assert_mounted(ws, volume, volatile=volatile)
    assert daemon.log().count("did not reach its client") == 1
    client.unmount("v", "kept")
    assert volume.records() == {} and mounts_at(volume.mountpoint) == []


def test_a_mount_whose_client_has_gone_is_undone_alone(
    ws: Workspace, daemon: Daemon, client: PluginClient
) -> None:
    """The same for the volume's first user: the undo unmounts the overlay it made."""
    client.create("v", ws.base)
    volume = ws.volume("v")
    with flock_held(volume.activemounts):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(ws.socket))
        sock.sendall(http_request("/VolumeDriver.Mount", b'{"Name": "v", "ID": "gaveup"}'))
        wait_until(
            lambda: threads_waiting_for_a_lock(daemon.pid) > 0, "the Mount waits for the lock"
        )
        sock.close()
    wait_until(lambda: "unmounted volume v for gaveup" in daemon.log(), "the Mount is undone")
    assert volume.records() == {} and mounts_at(volume.mountpoint) == []
    # A Mount whose reply was delivered stays, however soon its client closes.
    assert client.mount("v", "stays") == f"{volume.mountpoint}/"
    assert volume.records() == {"stays": {"UsageCount": 1}}
    assert_mounted(ws, volume)
    assert daemon.log().count("did not reach its client") == 1
