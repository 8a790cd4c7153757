"""Issue 13: the daemon under contention, through the real socket on real mounts: a
bounded wait for a volume's lock, a lock taken on a replaced volume, a base shared by
volumes, releases kept across a failed Remove, damaged state files."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from pathlib import Path

from .conftest import Daemon, PluginClient, Workspace, flock_held, mounts_at


def in_background(call: object) -> tuple[threading.Thread, list[object]]:
    results: list[object] = []

    def run() -> None:
        try:
            results.append(call())  # type: ignore[operator]
        except BaseException as error:
            results.append(error)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, results


def test_a_mount_that_cannot_take_the_lock_in_time_is_refused_and_leaves_nothing(
    ws: Workspace, client: PluginClient
) -> None:
    """13.1: the wait is bounded below Podman's 5 s, and the refusal leaves no record."""
    client.create("v", ws.base)
    volume = ws.volume("v")
    with flock_held(volume.activemounts):
        reply = client.call("/VolumeDriver.Mount", {"Name": "v", "ID": "gaveup"})
        assert reply.status == 500, reply
        assert "busy" in reply.json["Err"], reply  # type: ignore[index]
    assert volume.records() == {}
    assert mounts_at(volume.mountpoint) == []
    client.mount("v", "next")
    assert volume.records() == {"next": {"UsageCount": 1}}


def test_a_refused_mount_names_a_long_holder(ws: Workspace, client: PluginClient) -> None:
    """13.1: the holder of long work says what it is in the volume's busy note."""
    client.create("v", ws.base)
    volume = ws.volume("v")
    note = {"What": "a commit", "Pid": os.getpid(), "Since": "2026-12-01T20:00:00Z"}
    with flock_held(volume.activemounts):
        (volume.folder / "busy.json").write_text(json.dumps(note))
        error = client.err("/VolumeDriver.Mount", {"Name": "v", "ID": "c1"})
        (volume.folder / "busy.json").unlink()
    assert "busy: a commit (pid" in error, error


def test_a_mount_that_waited_while_the_volume_was_replaced_mounts_the_new_one(
    ws: Workspace, client: PluginClient
) -> None:
    """13.3: metadata is read under the lock, and a lock on a folder that no longer is
    the volume is taken again on the new one."""
    client.create("v", ws.base)
    volume = ws.volume("v")
    other_base = ws.dir / "other-base"
    other_base.mkdir()
    (other_base / "other.txt").write_text("the new volume's base\n")
    moved = ws.dir / "moved-away"
    with flock_held(volume.activemounts):
        thread, results = in_background(lambda: client.mount("v", "c1"))
        time.sleep(0.5)
        assert results == []
        os.rename(volume.folder, moved)  # as a Remove by another process would
        client.create("v", other_base)
    thread.join(10)
    assert results == [f"{volume.mountpoint}/"], results
    assert sorted(os.listdir(volume.mountpoint)) == ["other.txt"]
    assert volume.records() == {"c1": {"UsageCount": 1}}
    assert os.listdir(moved / "activemounts") == []
    client.unmount("v", "c1")
    assert mounts_at(volume.mountpoint) == []


def test_commit_into_base_refuses_while_a_volume_over_that_base_is_mounted(
    ws: Workspace, client: PluginClient
) -> None:
    """13.4: the same base, or one inside or around it, must not change under a mount."""
    outer = ws.dir / "outer"
    base = outer / "base"
    (base / "sub").mkdir(parents=True)
    (base / "kept.txt").write_text("kept\n")
    client.create("a", base)
    mountpoint = Path(client.mount("a", "ca"))
    (mountpoint / "new.txt").write_text("from a\n")
    client.unmount("a", "ca")
    for shared in (base, base / "sub", outer):
        client.create("b", shared)
        client.mount("b", "cb")
        refused = ws.command("commit", "a", "--into-base", "--yes")
        assert refused.returncode == 1, refused
        assert "shared with volume b" in refused.stderr and "in use" in refused.stderr
        assert not (base / "new.txt").exists()
        client.unmount("b", "cb")
        client.remove("b")
    client.create("c", ws.base)
    client.mount("c", "cc")
    done = ws.command("commit", "a", "--into-base", "--yes")
    assert done.returncode == 0, done.stderr
    assert (base / "new.txt").read_text() == "from a\n"
    client.unmount("c", "cc")


def test_a_remove_that_fails_keeps_the_releases_still_to_apply(
    ws: Workspace, client: PluginClient
) -> None:
    """13.6: per-volume state changes only under the volume's lock, and only when the
    change happened: a failed Remove must not drop a release."""
    client.create("v", ws.base, volatile="true")
    volume = ws.volume("v")
    mountpoint = Path(client.mount("v", "c1"))
    (mountpoint / "added.txt").write_text("to be discarded\n")
    record = volume.activemounts / "c1"
    subprocess.run(["chattr", "+i", str(record)], check=True)
    try:
        assert client.call("/VolumeDriver.Unmount", {"Name": "v", "ID": "c1"}).status == 500
        assert client.call("/VolumeDriver.Remove", {"Name": "v"}).status == 500
    finally:
        subprocess.run(["chattr", "-i", str(record)], check=True)
    mountpoint = Path(client.mount("v", "c2"))
    assert volume.records() == {"c2": {"UsageCount": 1}}
    assert not (mountpoint / "added.txt").exists()
    client.unmount("v", "c2")
    client.remove("v")


def test_a_damaged_unreleased_file_is_named_never_a_traceback(
    ws: Workspace, daemon: Daemon, client: PluginClient
) -> None:
    """13.8: doctor and the start-up check warn, name the file and go on."""
    client.create("v", ws.base)
    client.create("w", ws.base)
    volume = ws.volume("v")
    client.mount("v", "c1")
    (volume.folder / "unreleased.json").write_text('{"x": 0}')
    found = ws.command("doctor")
    assert "Traceback" not in found.stderr, found.stderr
    assert "unreleased.json" in found.stdout, found.stdout
    assert found.returncode == 1
    assert daemon.stop() == 0
    restarted = ws.start()
    deadline = time.monotonic() + 10
    while "damaged state file" not in restarted.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    log = restarted.log()
    assert "Traceback" not in log, log
    assert "damaged state file" in log and "unreleased.json" in log, log
    client.unmount("v", "c1")
