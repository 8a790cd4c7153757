"""A4 start-up recovery after a crash, and drop-in use of the Go plugin's state tree."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from .conftest import Workspace, daemon_recovering, flock_held, mounts_at


def test_restart_after_crash_while_mounted_leaves_the_volume_mounted(ws: Workspace) -> None:
    daemon = ws.start()
    client = ws.client()
    client.create("v", ws.base, volatile="true")
    volume = ws.volume("v")
    mountpoint = Path(client.mount("v", "c1"))
    (mountpoint / "added.txt").write_text("added\n")
    daemon.kill()

    restarted = ws.start()  # replaces the stale socket the killed daemon left
    client = ws.client()
    # A4: left alone, with a warning that explains the risk.
    assert "volumes still mounted from the previous run: v." in restarted.log()
    (entry,) = mounts_at(volume.mountpoint)
    assert entry.fstype == "overlay"
    assert volume.records() == {"c1": {"UsageCount": 1}}
    assert volume.workdir.is_dir()
    assert (mountpoint / "added.txt").read_text() == "added\n"
    assert client.names() == ["v"]

    # It keeps working: another user comes and goes without disturbing the first.
    assert client.mount("v", "c2") == f"{volume.mountpoint}/"
    assert len(mounts_at(volume.mountpoint)) == 1
    assert (mountpoint / "added.txt").read_text() == "added\n"  # volatile, but not wiped
    client.unmount("v", "c2")
    assert len(mounts_at(volume.mountpoint)) == 1
    assert volume.records() == {"c1": {"UsageCount": 1}}
    # The original user's Unmount is the last one: now it unmounts.
    client.unmount("v", "c1")
    assert mounts_at(volume.mountpoint) == []
    assert volume.records() == {}
    assert volume.entries() == {"metadata.json", "upper", "activemounts"}


@pytest.mark.parametrize("volatile", ["false", "true"])
def test_restart_after_reboot_clears_stale_records(ws: Workspace, volatile: str) -> None:
    daemon = ws.start()
    client = ws.client()
    client.create("v", ws.base, volatile=volatile)
    volume = ws.volume("v")
    mountpoint = Path(client.mount("v", "c1"))
    client.mount("v", "c2")
    (mountpoint / "added.txt").write_text("added\n")
    daemon.kill()
    # What a reboot does: the overlay is gone, the folders and records stay.
    assert len(mounts_at(volume.mountpoint)) == 1
    subprocess.run(["umount", str(volume.mountpoint)], check=True)
    assert volume.records() == {"c1": {"UsageCount": 1}, "c2": {"UsageCount": 1}}

    ws.start()
    client = ws.client()
    assert volume.records() == {}
    assert not volume.mountpoint.exists()
    assert not volume.workdir.exists()
    assert volume.entries() == {"metadata.json", "upper", "activemounts"}

    mountpoint = Path(client.mount("v", "c3"))
    (entry,) = mounts_at(volume.mountpoint)
    assert entry.fstype == "overlay"
    assert volume.records() == {"c3": {"UsageCount": 1}}
    if volatile == "false":
        assert (mountpoint / "added.txt").read_text() == "added\n"
    else:
        assert not (mountpoint / "added.txt").exists()
    client.unmount("v", "c3")
    assert mounts_at(volume.mountpoint) == []


def test_restart_removes_a_half_made_volume_only_when_it_holds_nothing(ws: Workspace) -> None:
    """A3: no half-made volume is left, even after a crash in the middle of a Create."""
    half = ws.volume("half")
    (half.folder / "upper").mkdir(parents=True)
    (half.folder / "activemounts").mkdir()
    keep = ws.volume("keep")
    (keep.folder / "upper").mkdir(parents=True)
    (keep.folder / "activemounts").mkdir()
    (keep.folder / "upper" / "change.txt").write_text("someone's data\n")
    ws.start()
    assert not half.folder.exists()
    assert (keep.folder / "upper" / "change.txt").read_text() == "someone's data\n"


def go_volume(ws: Workspace, name: str, *, volatile: bool = False) -> Path:
    """A volume folder exactly as docker-on-top v0.1.2 writes it, not mounted."""
    folder = ws.root / name
    (folder / "activemounts").mkdir(parents=True)
    (folder / "upper").mkdir()
    (folder / "upper" / "from-upper.txt").write_text("upper file\n")
    (folder / "upper" / "changed.txt").write_text("upper version\n")
    document = {"BaseDirPath": str(ws.base), "Volatile": volatile}
    (folder / "metadata.json").write_bytes(json.dumps(document, separators=(",", ":")).encode())
    return folder


def test_drop_in_go_state_tree_is_listed_mounted_and_unmounted(ws: Workspace) -> None:
    folder = go_volume(ws, "gov")
    metadata_before = (folder / "metadata.json").read_bytes()
    assert json.loads(metadata_before) == {"BaseDirPath": str(ws.base), "Volatile": False}
    ws.start()
    client = ws.client()
    volume = ws.volume("gov")

    assert client.names() == ["gov"]
    assert client.ok("/VolumeDriver.Get", {"Name": "gov"})["Volume"]["Name"] == "gov"  # type: ignore[index]
    mountpoint = Path(client.mount("gov", "c1"))
    assert mountpoint == volume.mountpoint
    (entry,) = mounts_at(volume.mountpoint)
    assert entry.fstype == "overlay"
    assert (mountpoint / "from-upper.txt").read_text() == "upper file\n"
    assert (mountpoint / "changed.txt").read_text() == "upper version\n"
    assert (mountpoint / "kept.txt").read_text() == "base kept\n"
    assert volume.records() == {"c1": {"UsageCount": 1}}

    client.unmount("gov", "c1")
    assert mounts_at(volume.mountpoint) == []
    assert volume.entries() == {"metadata.json", "upper", "activemounts"}
    assert volume.records() == {}
    # The Go plugin can take over again: its file is as it wrote it.
    assert (folder / "metadata.json").read_bytes() == metadata_before
    assert (folder / "upper" / "from-upper.txt").read_text() == "upper file\n"


def test_drop_in_go_state_tree_with_a_go_record_still_mounted(ws: Workspace) -> None:
    """The Go plugin stopped while a container ran: its record and mount carry over."""
    folder = go_volume(ws, "gov")
    volume = ws.volume("gov")
    volume.workdir.mkdir()
    volume.mountpoint.mkdir()
    options = f"lowerdir={ws.base},upperdir={volume.upper},workdir={volume.workdir}"
    subprocess.run(["mount", "-t", "overlay", "-o", options, "docker-on-top_gov",
                    str(volume.mountpoint)], check=True)  # fmt: skip
    (folder / "activemounts" / "goid").write_bytes(b'{"UsageCount":1}')

    ws.start()
    client = ws.client()
    assert len(mounts_at(volume.mountpoint)) == 1
    client.mount("gov", "c2")
    client.unmount("gov", "c2")
    assert len(mounts_at(volume.mountpoint)) == 1
    client.unmount("gov", "goid")
    assert mounts_at(volume.mountpoint) == []
    assert volume.records() == {}


def test_recovery_error_stops_the_start_with_a_clear_message(ws: Workspace) -> None:
    """A4: a mountpoint that can be neither removed nor recognised as mounted stops the start."""
    daemon = ws.start()
    ws.client().create("v", ws.base)
    daemon.stop()
    volume = ws.volume("v")
    volume.mountpoint.mkdir()
    (volume.mountpoint / "stray.txt").write_text("written into an unmounted folder\n")
    before = ws.state()
    second = ws.spawn(ws.serve_args())
    assert second.wait_exit() != 0
    log = second.log()
    assert str(volume.folder) in log, log
    assert not ws.socket.exists()
    assert ws.state() == before


# --- recovery volume by volume, in the background (issue 16) ---------------------------


def left_by_a_reboot(ws: Workspace, *names: str) -> None:
    """Volumes in use when the host went down: records, an unmounted mountpoint/."""
    daemon = ws.start()
    client = ws.client()
    for name in names:
        client.create(name, ws.base)
        client.mount(name, "c1")
    daemon.kill()
    for name in names:
        subprocess.run(["umount", str(ws.volume(name).mountpoint)], check=True)


def wait_for_recovery(ws: Workspace) -> None:
    deadline = time.monotonic() + 60  # a bound on a hang, not a timing
    while daemon_recovering(ws.root):
        assert time.monotonic() < deadline, "the start-up recovery did not end"
        time.sleep(0.01)


def test_the_daemon_answers_while_its_start_up_recovery_waits(ws: Workspace) -> None:
    left_by_a_reboot(ws, "a", "b", "c")
    b, c = ws.volume("b"), ws.volume("c")
    with flock_held(b.activemounts):
        ws.start(recovered=False)  # answers although b cannot be recovered yet
        client = ws.client()
        assert daemon_recovering(ws.root)
        # c is recovered (by its Get or by the background) before its Get counts users.
        got = client.ok("/VolumeDriver.Get", {"Name": "c"})["Volume"]
        assert got["Status"]["ActiveMounts"] == 0, got  # type: ignore[index]
        assert c.records() == {}
        client.mount("c", "c2")
        assert c.records() == {"c2": {"UsageCount": 1}}
        client.unmount("c", "c2")
        assert b.records() == {"c1": {"UsageCount": 1}}  # not touched while held
        assert b.mountpoint.exists()
        assert daemon_recovering(ws.root)
    wait_for_recovery(ws)
    assert b.records() == {}
    assert b.entries() == {"metadata.json", "upper", "activemounts"}


def test_a_crash_during_start_up_recovery_leaves_what_the_next_start_recovers(
    ws: Workspace,
) -> None:
    left_by_a_reboot(ws, "a", "b", "c")
    with flock_held(ws.volume("b").activemounts):
        cut_short = ws.start(recovered=False)
        ws.client().mount("c", "c2")  # a volume recovered and used before the crash
        cut_short.kill()
    ws.start()
    client = ws.client()
    assert client.names() == ["a", "b", "c"]
    for name in ("a", "b"):
        volume = ws.volume(name)
        assert volume.records() == {}, name
        assert volume.entries() == {"metadata.json", "upper", "activemounts"}, name
    # c was still mounted by the crashed run: its record and overlay stay.
    assert ws.volume("c").records() == {"c2": {"UsageCount": 1}}
    assert len(mounts_at(ws.volume("c").mountpoint)) == 1
    client.unmount("c", "c2")
    assert mounts_at(ws.volume("c").mountpoint) == []
