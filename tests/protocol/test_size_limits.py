"""Size limits (SPEC B13, issue 18) through the real socket, on real loop devices and
tmpfs: writing past the limit fails with ENOSPC, deleting frees room, usage in Get, a
volatile volume on a tmpfs, resizing, malformed sizes, nothing left attached."""

from __future__ import annotations

import errno
import json
import os
import time
from pathlib import Path

import pytest

from ..mounts import MIB, backing_files, fill
from .conftest import Daemon, PluginClient, Workspace, mounts_at


def status(client: PluginClient, name: str) -> dict[str, object]:
    return client.ok("/VolumeDriver.Get", {"Name": name})["Volume"]["Status"]  # type: ignore[index,no-any-return]


def test_writes_past_the_limit_fail_and_deleting_frees_room(
    ws: Workspace, client: PluginClient
) -> None:
    client.create("v", ws.base, size="32M")
    volume = ws.volume("v")
    image = str(volume.folder / "size.img")
    assert os.stat(image).st_size == 32 * MIB
    mountpoint = Path(client.mount("v", "c1"))
    assert image in backing_files()
    written = fill(mountpoint, "big", 64 * MIB)
    assert 16 * MIB < written < 32 * MIB
    with pytest.raises(OSError) as full:
        (mountpoint / "more").write_bytes(b"y" * MIB)
        os.sync()
    assert full.value.errno == errno.ENOSPC
    usage = status(client, "v")
    assert usage["SizeLimit"] <= 32 * MIB and usage["Size"] >= written  # type: ignore[operator]
    (mountpoint / "big").unlink()
    (mountpoint / "more").unlink(missing_ok=True)
    assert fill(mountpoint, "again", 8 * MIB) == 8 * MIB
    assert (mountpoint / "kept.txt").read_text() == "base kept\n"
    client.unmount("v", "c1")
    assert mounts_at(volume.mountpoint) == [] and mounts_at(volume.folder / "limit") == []
    assert image not in backing_files()
    after = status(client, "v")
    assert after["Size"] >= 8 * MIB  # recorded at the unmount  # type: ignore[operator]
    mountpoint = Path(client.mount("v", "c2"))
    assert (mountpoint / "again").stat().st_size == 8 * MIB
    client.unmount("v", "c2")
    client.remove("v")
    assert image not in backing_files()
    assert not volume.folder.exists()


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def test_deleted_files_give_their_room_back_to_the_host(
    ws: Workspace, client: PluginClient
) -> None:
    """The image is sparse, and its filesystem discards what is freed: the loop device
    punches the blocks out of the image file, so the host disk gets them back."""
    client.create("v", ws.base, size="128M")
    image = ws.volume("v").folder / "size.img"
    mountpoint = Path(client.mount("v", "c1"))
    assert fill(mountpoint, "big", 64 * MIB) == 64 * MIB
    os.sync()
    assert allocated(image) >= 64 * MIB
    (mountpoint / "big").unlink()
    # ext4 hands the discards to a worker after the journal commits that sync forces.
    for _ in range(100):
        os.sync()
        if allocated(image) < 8 * MIB:
            break
        time.sleep(0.1)
    assert allocated(image) < 8 * MIB, f"{allocated(image)} bytes still allocated"
    assert fill(mountpoint, "again", 32 * MIB) == 32 * MIB
    client.unmount("v", "c1")


def test_a_volatile_volume_with_a_size_lives_on_a_tmpfs(
    ws: Workspace, client: PluginClient
) -> None:
    client.create("v", ws.base, size="16M", volatile="true")
    volume = ws.volume("v")
    assert not (volume.folder / "size.img").exists()
    mountpoint = Path(client.mount("v", "c1"))
    (storage,) = mounts_at(volume.folder / "limit")
    assert storage.fstype == "tmpfs"
    assert fill(mountpoint, "big", 32 * MIB) <= 16 * MIB
    client.unmount("v", "c1")
    assert mounts_at(volume.folder / "limit") == []
    mountpoint = Path(client.mount("v", "c2"))
    assert not (mountpoint / "big").exists()
    assert status(client, "v")["SizeLimit"] == 16 * MIB
    client.unmount("v", "c2")


@pytest.mark.parametrize("size", ["abc", "0", "-1G", "1k", "1.5", "10KiB", ""])
def test_malformed_or_too_small_sizes_are_refused(
    ws: Workspace, client: PluginClient, size: str
) -> None:
    error = client.err(
        "/VolumeDriver.Create", {"Name": "v", "Opts": {"base": str(ws.base), "size": size}}
    )
    assert "size" in error
    assert not ws.volume("v").folder.exists()


def test_a_sized_volume_is_not_in_the_go_format(ws: Workspace, client: PluginClient) -> None:
    client.create("v", ws.base, size="16M")
    metadata = json.loads(ws.volume("v").metadata.read_text())
    assert metadata["BaseDirPath"] == [str(ws.base)]
    assert metadata["SizeLimit"] == 16 * MIB
    assert not (ws.volume("v").folder / "upper").exists()


def test_resize_grows_an_unused_volume_and_refuses_to_shrink_one_in_use(
    ws: Workspace, client: PluginClient
) -> None:
    client.create("v", ws.base, size="16M")
    mountpoint = Path(client.mount("v", "c1"))
    fill(mountpoint, "data", 4 * MIB)
    refused = ws.command("resize", "v", "12M")
    assert refused.returncode == 1 and "in use" in refused.stderr
    client.unmount("v", "c1")
    grown = ws.command("resize", "v", "64M")
    assert grown.returncode == 0, grown.stderr
    mountpoint = Path(client.mount("v", "c1"))
    assert fill(mountpoint, "more", 32 * MIB) == 32 * MIB
    assert (mountpoint / "data").stat().st_size == 4 * MIB
    client.unmount("v", "c1")
    too_small = ws.command("resize", "v", "8M")
    assert too_small.returncode == 1 and "too small" in too_small.stderr


def test_a_volatile_volume_resizes_while_mounted(ws: Workspace, client: PluginClient) -> None:
    client.create("v", ws.base, size="16M", volatile="true")
    mountpoint = Path(client.mount("v", "c1"))
    grown = ws.command("resize", "v", "48M")
    assert grown.returncode == 0, grown.stderr
    assert fill(mountpoint, "big", 32 * MIB) == 32 * MIB
    client.unmount("v", "c1")


def test_two_instances_keep_their_own_storage(ws: Workspace, client: PluginClient) -> None:
    other_root, other_socket = ws.dir / "other-root", ws.dir / "other.sock"
    ws.start(
        ws.serve_args(name=f"{ws.name}-b", root=other_root, socket=other_socket),
        socket=other_socket,
    )
    other = ws.client(other_socket)
    client.create("v", ws.base, size="16M")
    other.create("v", ws.base, size="16M")
    client.mount("v", "c1")
    other.mount("v", "c1")
    images = [str(ws.root / "v" / "size.img"), str(other_root / "v" / "size.img")]
    assert all(image in backing_files() for image in images)
    other.unmount("v", "c1")
    other.remove("v")
    assert images[0] in backing_files() and images[1] not in backing_files()
    client.unmount("v", "c1")
    client.remove("v")
    assert not any(image in backing_files() for image in images)


def leave_storage_mounted(ws: Workspace) -> Path:
    """What a crash between the overlay's unmount and the storage's leaves."""
    from docker_on_top import sizelimit

    folder = ws.volume("v").folder
    (folder / "limit").mkdir()
    sizelimit.mount_image(folder / "size.img", folder / "limit")
    return folder


def test_doctor_finds_and_releases_storage_no_overlay_uses(
    ws: Workspace, client: PluginClient
) -> None:
    client.create("v", ws.base, size="16M")
    folder = leave_storage_mounted(ws)
    found = ws.command("doctor")
    assert "size-limited storage is mounted but unused" in found.stdout, found
    fixed = ws.command("doctor", "--fix")
    assert "[fixed]" in fixed.stdout, fixed
    assert mounts_at(folder / "limit") == [] and not (folder / "limit").exists()
    assert str(folder / "size.img") not in backing_files()


def test_a_restart_releases_storage_left_mounted(
    ws: Workspace, daemon: Daemon, client: PluginClient
) -> None:
    client.create("v", ws.base, size="16M")
    folder = leave_storage_mounted(ws)
    daemon.kill()
    ws.start()
    assert mounts_at(folder / "limit") == []
    assert str(folder / "size.img") not in backing_files()
    client.mount("v", "c1")
    client.unmount("v", "c1")


def test_a_restart_detaches_a_device_left_without_autoclear(
    ws: Workspace, daemon: Daemon, client: PluginClient
) -> None:
    """Where the kernel lacks LOOP_CONFIGURE a device is bound in two steps, and a crash
    between them leaves it attached without AUTOCLEAR: nothing would ever detach it."""
    import fcntl

    from docker_on_top import loopdev

    client.create("v", ws.base, size="16M")
    image = ws.volume("v").folder / "size.img"
    daemon.kill()
    control = os.open("/dev/loop-control", os.O_RDWR)
    backing = os.open(image, os.O_RDWR)
    try:
        number = fcntl.ioctl(control, loopdev._LOOP_CTL_GET_FREE)
        device = loopdev._open_device(number, os.O_RDWR)
        try:
            fcntl.ioctl(device, loopdev._LOOP_SET_FD, backing)  # the first step only
        finally:
            os.close(device)
    finally:
        os.close(backing)
        os.close(control)
    try:
        assert str(image) in backing_files()
        ws.start()
        assert str(image) not in backing_files()
        client.mount("v", "c1")
        client.unmount("v", "c1")
        assert str(image) not in backing_files()
    finally:
        if str(image) in backing_files():
            loopdev.detach(number)
