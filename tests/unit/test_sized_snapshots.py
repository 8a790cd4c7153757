"""Snapshots, rollback and clones of sized volumes (SPEC B12 with B13, issue 18), on real
loop devices and tmpfs: the frozen layer is copied out of the image onto the host's
disk, as the upper is (whiteouts, opaque folders, modes, owners, times, hard links), and
the image's upper is emptied, so a layer never counts against the limit."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from docker_on_top.driver import Driver
from docker_on_top.layers import LayerInfo
from docker_on_top.snapshots import VolumeSnapshots
from docker_on_top.upper import own_changes
from docker_on_top.volume import SNAPSHOT

from ..mounts import MIB, backing_files, fill
from .conftest import new_driver, recover_driver

ID = "c" * 64


def snapshots_of(driver: Driver) -> VolumeSnapshots:
    return VolumeSnapshots(driver.store, driver.releases)


@contextmanager
def mounted(driver: Driver, name: str) -> Iterator[Path]:
    mountpoint = Path(driver.mount(name, ID))
    try:
        yield mountpoint
    finally:
        driver.unmount(name, ID)


def view(driver: Driver, name: str) -> dict[str, str]:
    """What a container sees: file path -> text."""
    with mounted(driver, name) as mountpoint:
        return {
            str(path.relative_to(mountpoint)): path.read_text()
            for path in sorted(mountpoint.rglob("*"))
            if path.is_file() and path.stat().st_size < MIB
        }


@contextmanager
def image_upper(driver: Driver, name: str) -> Iterator[Path]:
    """The upper in the volume's image, mounted aside."""
    volume = driver.store.volume(name)
    with own_changes(driver.store, volume, driver.store.metadata(volume)) as upper:
        yield upper


@pytest.fixture
def base(workspace: Path) -> Path:
    folder = workspace / "base"
    (folder / "dir").mkdir(parents=True)
    (folder / "dir" / "old").write_text("old")
    (folder / "kept").write_text("kept")
    (folder / "gone").write_text("gone")
    return folder


def change_everything(mountpoint: Path) -> None:
    """A new file (mode, owner, times), a deletion (a whiteout), a folder made again
    (opaque), a hard link, a symlink, a FIFO."""
    (mountpoint / "new").write_text("new")
    os.chmod(mountpoint / "new", 0o640)
    os.chown(mountpoint / "new", 1234, 5678)
    os.utime(mountpoint / "new", ns=(1_000_000_000, 2_000_000_000))
    (mountpoint / "gone").unlink()
    for entry in (mountpoint / "dir").iterdir():
        entry.unlink()
    (mountpoint / "dir").rmdir()
    (mountpoint / "dir").mkdir()
    (mountpoint / "dir" / "fresh").write_text("fresh")
    os.link(mountpoint / "new", mountpoint / "dir" / "also-new")
    os.symlink("new", mountpoint / "link")
    os.mkfifo(mountpoint / "fifo")  # copied as a FIFO, never opened


SEEN = {"dir/also-new": "new", "dir/fresh": "fresh", "kept": "kept", "link": "new", "new": "new"}


def test_a_snapshot_copies_the_changes_out_of_the_image_and_empties_its_upper(
    driver: Driver, base: Path
) -> None:
    driver.create("v", {"base": str(base), "size": "32M"})
    with mounted(driver, "v") as mountpoint:
        change_everything(mountpoint)
    assert view(driver, "v") == SEEN
    snapshots_of(driver).snapshot("v", "s")
    (layer,) = driver.store.layers.ids()
    tree = driver.store.layers.tree(layer)
    new = os.lstat(tree / "new")
    assert (new.st_mode & 0o7777, new.st_uid, new.st_gid) == (0o640, 1234, 5678)
    assert new.st_mtime_ns == 2_000_000_000 and new.st_nlink == 2
    assert os.lstat(tree / "dir" / "also-new").st_ino == new.st_ino
    assert os.getxattr(tree / "dir", "trusted.overlay.opaque") == b"y"
    whiteout = os.lstat(tree / "gone")
    assert os.major(whiteout.st_rdev) == 0 and os.minor(whiteout.st_rdev) == 0
    assert os.readlink(tree / "link") == "new"
    assert stat.S_ISFIFO(os.lstat(tree / "fifo").st_mode)
    assert not (driver.store.layers.folder / layer / ".tree.partial").exists()
    with image_upper(driver, "v") as upper:
        assert os.listdir(upper) == []
    assert view(driver, "v") == SEEN
    assert driver.store.volume("v").image.exists()
    assert not (driver.store.root / "v" / "upper").exists()


def test_a_snapshot_gives_the_images_room_back(driver: Driver, base: Path) -> None:
    """Layers frozen by snapshots do not count against the limit."""
    driver.create("v", {"base": str(base), "size": "32M"})
    with mounted(driver, "v") as mountpoint:
        first = fill(mountpoint, "first", 64 * MIB)
    assert first > 16 * MIB
    used_before = driver.get("v").status["Size"]
    snapshots_of(driver).snapshot("v", "s")
    used_after = driver.get("v").status["Size"]
    assert used_after < MIB < used_before  # type: ignore[operator]
    with mounted(driver, "v") as mountpoint:
        assert fill(mountpoint, "second", first) == first
        assert (mountpoint / "first").stat().st_size == first
    assert driver.store.volume("v").image.stat().st_size == 32 * MIB


def test_rollback_empties_the_upper_in_the_image(driver: Driver, base: Path) -> None:
    driver.create("v", {"base": str(base), "size": "32M"})
    with mounted(driver, "v") as mountpoint:
        (mountpoint / "one").write_text("1")
    snapshots_of(driver).snapshot("v", "one")
    with mounted(driver, "v") as mountpoint:
        (mountpoint / "two").write_text("2")
        (mountpoint / "kept").unlink()
        fill(mountpoint, "big", 8 * MIB)
    snapshots_of(driver).rollback("v", "one")
    assert view(driver, "v") == {"dir/old": "old", "gone": "gone", "kept": "kept", "one": "1"}
    with image_upper(driver, "v") as upper:
        assert os.listdir(upper) == []
    assert driver.get("v").status["Size"] < MIB  # type: ignore[operator]


def test_a_clone_of_a_sized_volume_starts_as_its_snapshot(driver: Driver, base: Path) -> None:
    driver.create("v", {"base": str(base), "size": "32M"})
    with mounted(driver, "v") as mountpoint:
        change_everything(mountpoint)
    driver.create("whole", {"from": "v"})  # a snapshot of v is taken first
    driver.create("sized", {"from": "v", "size": "16M"})
    assert view(driver, "whole") == SEEN and view(driver, "sized") == SEEN
    with mounted(driver, "sized") as mountpoint:
        (mountpoint / "mine").write_text("mine")
    assert "mine" not in view(driver, "v") and "mine" not in view(driver, "whole")
    for name in ("v", "whole", "sized"):
        driver.remove(name)
    assert driver.store.layers.ids() == []
    assert not any(file.startswith(str(driver.store.root)) for file in backing_files())


def test_a_volatile_sized_volume_snapshots_what_its_tmpfs_holds(driver: Driver, base: Path) -> None:
    """Unused, its tmpfs is gone with its changes: the layer is empty."""
    driver.create("v", {"base": str(base), "size": "16M", "volatile": "true"})
    with mounted(driver, "v") as mountpoint:
        (mountpoint / "lost").write_text("lost")
    snapshots_of(driver).snapshot("v", "s")
    (layer,) = driver.store.layers.ids()
    assert os.listdir(driver.store.layers.tree(layer)) == []
    assert "lost" not in view(driver, "v")


# --- crashes ------------------------------------------------------------------------------


def cut_short_after_the_copy(driver: Driver, name: str) -> str:
    """A snapshot killed once its layer is copied out, before the metadata lists it."""
    volume = driver.store.volume(name)
    layer = driver.store.layers.new_id()
    volume.begin(SNAPSHOT, layer)
    with image_upper(driver, name) as upper, driver.store.layers.lock(None):
        driver.store.layers.copy_in(layer, upper, LayerInfo(layer, name, "s", "t"))
    return layer


def test_a_snapshot_cut_short_before_its_metadata_is_undone(
    driver: Driver, base: Path, root: Path
) -> None:
    driver.create("v", {"base": str(base), "size": "32M"})
    with mounted(driver, "v") as mountpoint:
        change_everything(mountpoint)
    cut_short_after_the_copy(driver, "v")
    restarted = new_driver(root)
    recover_driver(restarted)
    assert restarted.store.layers.ids() == []
    assert view(restarted, "v") == SEEN
    assert not restarted.store.volume("v").intent(SNAPSHOT).exists()


def test_a_snapshot_cut_short_in_its_copy_leaves_no_layer(
    driver: Driver, base: Path, root: Path
) -> None:
    driver.create("v", {"base": str(base), "size": "32M"})
    with mounted(driver, "v") as mountpoint:
        change_everything(mountpoint)
    layer = cut_short_after_the_copy(driver, "v")
    folder = driver.store.layers.folder / layer
    os.rename(folder / "tree", folder / ".tree.partial")  # as if killed while copying
    assert not driver.store.layers.exists(layer)
    restarted = new_driver(root)
    recover_driver(restarted)
    assert restarted.store.layers.ids() == [] and not folder.exists()
    assert view(restarted, "v") == SEEN


def test_a_snapshot_cut_short_after_its_metadata_empties_the_upper_at_the_next_mount(
    driver: Driver, base: Path
) -> None:
    driver.create("v", {"base": str(base), "size": "32M"})
    with mounted(driver, "v") as mountpoint:
        change_everything(mountpoint)
    snapshots_of(driver).snapshot("v", "s")
    (layer,) = driver.store.layers.ids()
    volume = driver.store.volume("v")
    volume.begin(SNAPSHOT, layer)  # as if the crash came before the upper was emptied
    with image_upper(driver, "v") as upper:
        (upper / "new").write_text("new")
    assert view(driver, "v") == SEEN
    assert not volume.intent(SNAPSHOT).exists()
    with image_upper(driver, "v") as upper:
        assert os.listdir(upper) == []


def test_nothing_stays_attached_after_snapshots_and_rollbacks(driver: Driver, base: Path) -> None:
    driver.create("v", {"base": str(base), "size": "16M"})
    with mounted(driver, "v") as mountpoint:
        (mountpoint / "x").write_text("x")
    snapshots_of(driver).snapshot("v", "s")
    snapshots_of(driver).rollback("v", "s")
    image = str(driver.store.volume("v").image)
    assert image not in backing_files()
    assert [p.name for p in driver.store.root.iterdir() if p.name.startswith(".view-")] == []
