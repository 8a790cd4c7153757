"""A4 start-up recovery after a crash, and drop-in use of the Go plugin's state tree."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from .conftest import Workspace, mounts_at


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
