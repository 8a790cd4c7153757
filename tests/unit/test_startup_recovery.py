"""Start-up recovery volume by volume (SPEC A4, issue 16): each volume recovered before
its first use, the others by the background in name order, what concerns the whole root
only once every volume is; on a temporary root with real overlays."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from docker_on_top import kernel
from docker_on_top.cli import main
from docker_on_top.driver import Driver
from docker_on_top.recovery import StartupRecovery
from docker_on_top.snapshots import VolumeSnapshots

from ..mounts import mounts_under
from .conftest import new_driver, recover_driver

STALE = "s" * 64
ID = "c" * 64
# Only a bound on a hang: nothing here is timed.
PATIENCE_S = 60.0


def records(folder: Path) -> dict[str, int]:
    return {
        record.name: json.loads(record.read_text())["UsageCount"]
        for record in (folder / "activemounts").iterdir()
    }


def mounted(folder: Path) -> bool:
    return [fs for _, fs in mounts_under(folder / "mountpoint")] == ["overlay"]


def left_by_a_reboot(root: Path, base: Path, *names: str) -> None:
    """Volumes that were mounted when the host went down: records, an unmounted
    mountpoint/ and workdir/."""
    first = new_driver(root)
    recover_driver(first)
    for name in names:
        first.create(name, {"base": str(base)})
        first.mount(name, STALE)
        subprocess.run(["umount", str(root / name / "mountpoint")], check=True)


def recovered(folder: Path) -> bool:
    return not (folder / "mountpoint").exists() and records(folder) == {}


def begun(root: Path, **settings: float) -> tuple[Driver, StartupRecovery]:
    """A driver over `root` whose start-up recovery has begun, as when the daemon starts
    serving; nothing is recovered yet."""
    driver = new_driver(root, **settings)
    recovery = StartupRecovery(driver.store, driver.releases)
    recovery.begin()
    return driver, recovery


def wait_until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + PATIENCE_S
    while not condition():
        assert time.monotonic() < deadline, "gave up waiting"
        time.sleep(0.01)


@contextmanager
def locked(folder: Path) -> Iterator[None]:
    """Hold the volume's lock as another process would (the command line)."""
    with kernel.DirectoryLock(folder / "activemounts"):
        yield


def test_a_volume_touched_first_is_recovered_before_its_get_or_mount(
    root: Path, base: Path
) -> None:
    left_by_a_reboot(root, base, "a", "v", "z")
    driver, recovery = begun(root)
    assert not recovered(root / "v")
    # Get: the stale record is gone before the mounts are counted.
    status = driver.get("v").status
    assert (status["Mounted"], status["ActiveMounts"]) == (False, 0)
    assert recovered(root / "v")
    assert not (root / "v" / "workdir").exists()
    # Mount: the stale record is not counted as another user.
    driver.mount("z", ID)
    assert records(root / "z") == {ID: 1}
    assert mounted(root / "z")
    assert not recovered(root / "a")  # nothing touched it; the background does
    report = recovery.run()
    assert recovered(root / "a")
    assert sorted(report.cleaned) == ["a", "v", "z"]
    assert records(root / "z") == {ID: 1}
    assert mounted(root / "z")
    assert driver.store.recovery is None


def test_a_volume_still_mounted_is_left_alone_when_touched_first(root: Path, base: Path) -> None:
    first = new_driver(root)
    recover_driver(first)
    first.create("v", {"base": str(base)})
    first.mount("v", STALE)  # the daemon dies; the overlay stays
    driver, recovery = begun(root)
    assert driver.get("v").status["ActiveMounts"] == 1
    driver.mount("v", ID)
    assert records(root / "v") == {STALE: 1, ID: 1}
    assert mounted(root / "v")
    assert recovery.run().still_mounted == ["v"]
    driver.unmount("v", STALE)
    driver.unmount("v", ID)
    assert not mounted(root / "v")


def test_list_shows_no_create_cut_short_that_recovery_removes(root: Path, base: Path) -> None:
    left_by_a_reboot(root, base, "v")
    (root / "half" / "upper").mkdir(parents=True)
    (root / "half" / "activemounts").mkdir()
    (root / "keep" / "upper").mkdir(parents=True)
    (root / "keep" / "upper" / "precious").touch()
    driver, recovery = begun(root)
    assert [info.name for info in driver.list_volumes()] == ["keep", "v"]
    assert not (root / "half").exists()
    assert (root / "keep" / "upper" / "precious").exists()
    assert recovery.run().half_made == ["half"]


def test_a_create_over_a_create_cut_short_recovers_it_first(root: Path, base: Path) -> None:
    (root / "half" / "upper").mkdir(parents=True)  # no activemounts/ to lock, even
    driver, recovery = begun(root)
    driver.create("half", {"base": str(base)})
    assert driver.get("half").status["Base"] == str(base)
    assert recovery.run().half_made == ["half"]
    assert (root / "half" / "metadata.json").exists()


def test_orphan_layers_are_collected_only_once_every_volume_is_recovered(
    root: Path, base: Path
) -> None:
    left_by_a_reboot(root, base, "a", "b", "c")
    helper = new_driver(root)
    helper.create("gone", {"base": str(base)})
    VolumeSnapshots(helper.store).snapshot("gone", "s")
    (layer,) = helper.store.metadata(helper.store.volume("gone")).layers
    orphan = helper.store.layers.folder / layer
    subprocess.run(["rm", "-r", str(root / "gone")], check=True)  # its layer is left
    assert orphan.is_dir()
    _, recovery = begun(root, lock_timeout=0.05)
    with locked(root / "b"):  # the background waits on b, goes on, comes back to it
        background = threading.Thread(target=recovery.run)
        background.start()
        wait_until(lambda: recovered(root / "c"))
        assert recovered(root / "a")
        assert not recovered(root / "b")
        assert orphan.is_dir(), "a layer was collected before every volume was recovered"
        assert background.is_alive()
    background.join(PATIENCE_S)
    assert recovered(root / "b")
    assert not orphan.exists()


def test_a_command_recovers_what_it_touches_while_a_daemon_recovers(
    root: Path, base: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    left_by_a_reboot(root, base, "v", "w")
    # No daemon: a command leaves the state as it found it (a daemon recovers it).
    assert main(["inspect", "w", "--root", str(root)]) == 0
    assert json.loads(capsys.readouterr().out)["Mounts"] == {STALE: 1}
    assert not recovered(root / "w")
    # A daemon recovering the root holds a shared flock on it.
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        assert main(["inspect", "v", "--root", str(root)]) == 0
        assert json.loads(capsys.readouterr().out)["Mounts"] == {}
        assert recovered(root / "v")
        assert not recovered(root / "w")  # not touched
    finally:
        os.close(fd)


def test_recovery_removes_an_empty_workdir_left_by_a_crash(root: Path, base: Path) -> None:
    """A4: a crash between making workdir/ and mounting leaves it without the kernel's
    work/ inside; recovery deletes it all the same."""
    left_by_a_reboot(root, base, "v")
    subprocess.run(["rm", "-r", str(root / "v" / "workdir")], check=True)
    (root / "v" / "workdir").mkdir()
    assert recover_driver(new_driver(root)).cleaned == ["v"]
    assert sorted(os.listdir(root / "v")) == ["activemounts", "metadata.json", "upper"]


def test_recovery_cut_short_after_the_mountpoint_went_is_finished_at_the_next(
    root: Path, base: Path
) -> None:
    """A crash in a recovery after its first step (the mountpoint/ removed) leaves
    records and a workdir/: the next start resets them all the same."""
    left_by_a_reboot(root, base, "v")
    (root / "v" / "mountpoint").rmdir()
    assert recover_driver(new_driver(root)).cleaned == ["v"]
    assert sorted(os.listdir(root / "v")) == ["activemounts", "metadata.json", "upper"]


def test_get_does_not_fail_while_a_command_holds_a_volume_not_recovered_yet(
    root: Path, base: Path
) -> None:
    """dockerd forgets a volume whose Get fails: a lock held for long (a command, which
    recovers the volume itself first) leaves Get answering from the disk."""
    left_by_a_reboot(root, base, "v")
    driver, _ = begun(root, lock_timeout=0.05)
    with locked(root / "v"):
        assert driver.get("v").name == "v"
        assert [info.name for info in driver.list_volumes()] == ["v"]
