"""Size-limited storage on real loop devices and tmpfs (SPEC B13, the layer under it)."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import shutil
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from docker_on_top import kernel, loopdev, sizelimit

from ..mounts import mounts_under, unmount_all_under

MIB = 1 << 20
REPO = Path(__file__).resolve().parents[2]


def loop_devices_under(folder: Path) -> list[int]:
    """Loop devices whose backing file is inside `folder`, from sysfs."""
    prefix = os.fsencode(os.path.realpath(folder)) + b"/"
    found = []
    for entry in os.scandir("/sys/block"):
        try:
            with open(os.path.join(entry.path, "loop", "backing_file"), "rb") as named:
                if named.read().startswith(prefix):
                    found.append(int(entry.name[len("loop") :]))
        except FileNotFoundError:
            continue
    return found


@pytest.fixture
def scratch(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.fail("these tests attach loop devices and mount filesystems: run them as root")
    try:
        yield tmp_path
    finally:
        unmount_all_under(tmp_path)
        for number in loop_devices_under(tmp_path):
            loopdev.detach(number)


@pytest.fixture
def image(scratch: Path) -> Path:
    path = scratch / "changes.img"
    sizelimit.make_image(path, 16 * MIB)
    return path


@pytest.fixture
def mounted(scratch: Path, image: Path) -> Path:
    target = scratch / "mounted"
    target.mkdir()
    sizelimit.mount_image(image, target)
    return target


def fill(folder: Path, name: str = "filler", limit: int = 1 << 40) -> int:
    """Write to `folder/name` until ENOSPC (or `limit` bytes); how many bytes went in."""
    chunk = b"\xa5" * (64 << 10)
    written = 0
    with open(folder / name, "wb", buffering=0) as file:
        try:
            while written < limit:
                written += file.write(chunk[: limit - written])
        except OSError as error:
            assert error.errno == errno.ENOSPC
    return written


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- sizes ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("4096", 4096),
        ("4096B", 4096),
        ("4096b", 4096),
        ("1k", 1024),
        ("1K", 1024),
        ("1kB", 1024),
        ("512M", 512 * MIB),
        ("10G", 10 << 30),
        ("10g", 10 << 30),
        ("10GB", 10 << 30),
        ("10gb", 10 << 30),
        ("1t", 1 << 40),
        ("1.5G", 3 << 29),
        ("0.5k", 512),
        ("1.0001k", 1024),  # rounded down to a whole byte
        ("010M", 10 * MIB),
    ],
)
def test_sizes_take_k_m_g_t_in_powers_of_1024_with_an_optional_b(text: str, size: int) -> None:
    assert sizelimit.parse_size(text) == size


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ("", "not a number"),
        ("G", "not a number"),
        ("-1G", "negative"),
        ("0", "zero"),
        ("0G", "zero"),
        ("0.0001k", "zero"),
        ("1.5", "fraction needs a unit"),
        ("1.5B", "fraction needs a unit"),
        ("10X", "not a number"),
        ("10KiB", "not a number"),
        ("10 G", "not a number"),
        (" 10G", "not a number"),
        ("1.G", "not a number"),
        (".5G", "not a number"),
        ("1e3", "not a number"),
        ("+5G", "not a number"),
        ("١٠G", "not a number"),  # Arabic-Indic digits  # noqa: RUF001
        ("8388608T", "too large"),
        ("9" * 60, "too large"),
    ],
)
def test_malformed_sizes_are_refused_saying_why(text: str, said: str) -> None:
    with pytest.raises(ValueError, match=said):
        sizelimit.parse_size(text)


# --- images --------------------------------------------------------------------------


def test_an_image_too_small_for_a_filesystem_is_refused_and_nothing_is_left(
    scratch: Path,
) -> None:
    path = scratch / "small.img"
    with pytest.raises(ValueError, match="too small to hold a filesystem; the smallest is 8M"):
        sizelimit.make_image(path, sizelimit.MINIMUM_SIZE - 1)
    assert not path.exists()


def test_the_smallest_image_has_a_journal(scratch: Path) -> None:
    path = scratch / "smallest.img"
    sizelimit.make_image(path, sizelimit.MINIMUM_SIZE)
    header = subprocess.run(
        ["dumpe2fs", "-h", str(path)], capture_output=True, text=True, check=True
    ).stdout
    assert "has_journal" in header
    assert "Reserved block count:     0" in header


def test_mkfs_makes_its_filesystem_in_the_file_made_for_it_whatever_the_path_names_later(
    scratch: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A daemon killed while mkfs.ext4 runs leaves it running, orphaned; the restart
    removes the half-made volume and the retried Create makes a new image at the same
    path. mkfs.ext4, held here until then, must make its filesystem in the file it was
    started for, never in the new one."""
    started, go = scratch / "started", scratch / "go"
    tools = scratch / "bin"
    tools.mkdir()
    (tools / "mkfs.ext4").write_text(
        f"#!/bin/sh\ntouch {started}\nwhile [ ! -e {go} ]; do sleep 0.01; done\n"
        f'exec {shutil.which("mkfs.ext4")} "$@"\n'
    )
    (tools / "mkfs.ext4").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tools}:{os.environ['PATH']}")
    path = scratch / "size.img"
    failed: list[BaseException] = []

    def make() -> None:
        try:
            sizelimit.make_image(path, 16 * MIB)
        except BaseException as error:
            failed.append(error)

    maker = threading.Thread(target=make)
    maker.start()
    try:
        for _ in range(3000):
            if started.exists() or not maker.is_alive():
                break
            time.sleep(0.01)
        assert started.exists(), failed
        os.rename(path, scratch / "removed.img")  # what the restart's recovery does
        with open(path, "xb") as retried:  # the retried Create's new image
            retried.truncate(16 * MIB)
    finally:
        go.touch()
        maker.join(60)
    assert not failed, failed
    assert path.stat().st_blocks == 0, "mkfs.ext4 wrote the new file at the path"
    checked = subprocess.run(
        ["e2fsck", "-f", "-n", str(scratch / "removed.img")], capture_output=True, check=False
    )
    assert checked.returncode == 0, checked


def test_an_image_is_sparse_and_its_root_is_roots_with_mode_0755(
    scratch: Path, image: Path, mounted: Path
) -> None:
    assert image.stat().st_size == 16 * MIB
    assert image.stat().st_blocks * 512 < 16 * MIB // 2
    root = mounted.stat()
    assert (root.st_uid, root.st_gid, root.st_mode & 0o7777) == (0, 0, 0o755)


def test_a_fresh_image_uses_almost_nothing(mounted: Path) -> None:
    used, limit = sizelimit.usage(mounted)
    # 24 KiB with Debian 12's e2fsprogs, 152 KiB with Debian 13's (1.47.2).
    assert used <= 256 << 10
    assert 10 * MIB < limit <= 16 * MIB  # a 4 MiB journal, 1 MiB of inodes


def test_mounting_names_the_image_as_the_loop_devices_backing_file(
    image: Path, scratch: Path
) -> None:
    target = scratch / "t"
    target.mkdir()
    device = sizelimit.mount_image(image, target)
    (number,) = loopdev.backed_by(image)
    assert device == loopdev.device_path(number)
    sysfs = Path(f"/sys/block/loop{number}/loop")
    assert (sysfs / "backing_file").read_text() == f"{os.path.realpath(image)}\n"
    assert (sysfs / "autoclear").read_text() == "1\n"
    assert (sysfs / "dio").read_text() == "1\n"
    assert mounts_under(target) == [(str(target), "ext4")]
    assert lo_file_name(number) == os.fsencode(image)[:63]


def lo_file_name(number: int) -> bytes:
    """The name LOOP_GET_STATUS64 reports (what losetup shows without sysfs)."""
    fd = os.open(loopdev.device_path(number), os.O_RDONLY)
    try:
        status = fcntl.ioctl(fd, 0x4C05, bytes(struct.calcsize("=" + loopdev._LOOP_INFO64)))
    finally:
        os.close(fd)
    name = struct.unpack("=" + loopdev._LOOP_INFO64, status)[9]
    return bytes(name).rstrip(b"\0")


def test_writing_past_the_limit_fails_with_enospc(mounted: Path) -> None:
    with pytest.raises(OSError) as raised, open(mounted / "big", "wb") as file:
        file.write(b"\0" * (20 * MIB))  # buffered: written in full or an error
    assert raised.value.errno == errno.ENOSPC


def test_the_changes_fill_the_limit_usage_shows(mounted: Path) -> None:
    _, limit = sizelimit.usage(mounted)
    written = fill(mounted)
    used, limit_after = sizelimit.usage(mounted)
    assert limit_after == limit
    # Up to the limit, short of it only by the file's own metadata (its extent blocks).
    assert limit - (256 << 10) <= written <= used <= limit
    # Once written back, what delayed allocation held for metadata is free again: a
    # few blocks, no more.
    os.sync()
    assert fill(mounted, "one-more") <= 256 << 10


def test_deleting_a_file_gives_the_room_back(mounted: Path) -> None:
    first = fill(mounted, "first")
    (mounted / "first").unlink()
    assert fill(mounted, "second") >= first - (256 << 10)


def may_resize_mounted_ext4() -> bool:
    """CAP_SYS_RESOURCE, which ext4's online resize asks for (some sandboxes drop it)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> 24 & 1)
    return False


online_resize = pytest.mark.skipif(
    not may_resize_mounted_ext4(), reason="no CAP_SYS_RESOURCE: ext4 refuses online resize"
)


@online_resize
def test_growing_while_mounted_gives_more_room(image: Path, mounted: Path) -> None:
    fill(mounted, "before")
    kept = digest(mounted / "before")
    _, limit = sizelimit.usage(mounted)
    sizelimit.grow_image(image, mounted, 48 * MIB)
    assert image.stat().st_size == 48 * MIB
    _, grown = sizelimit.usage(mounted)
    assert grown >= limit + 30 * MIB
    assert fill(mounted, "after", 16 * MIB) == 16 * MIB
    assert digest(mounted / "before") == kept


def test_growing_an_image_that_is_not_mounted(scratch: Path, image: Path) -> None:
    sizelimit.grow_image(image, None, 64 * MIB)
    target = scratch / "t"
    target.mkdir()
    sizelimit.mount_image(image, target)
    assert sizelimit.usage(target).limit > 56 * MIB


@online_resize
def test_growing_again_completes_a_grow_cut_short_after_the_file_grew(
    image: Path, mounted: Path
) -> None:
    with open(image, "r+b") as backing:
        backing.truncate(48 * MIB)
    sizelimit.grow_image(image, mounted, 48 * MIB)
    assert sizelimit.usage(mounted).limit > 40 * MIB


@pytest.mark.skipif(may_resize_mounted_ext4(), reason="CAP_SYS_RESOURCE is there")
def test_without_cap_sys_resource_a_mounted_grow_says_so_and_completes_unmounted(
    scratch: Path, image: Path, mounted: Path
) -> None:
    with pytest.raises(PermissionError, match="CAP_SYS_RESOURCE; grow it unmounted"):
        sizelimit.grow_image(image, mounted, 48 * MIB)
    (number,) = loopdev.backed_by(image)
    assert loopdev.size_bytes(number) == 48 * MIB  # LOOP_SET_CAPACITY came first
    assert sizelimit.usage(mounted).limit < 16 * MIB
    kernel.unmount(mounted)
    sizelimit.grow_image(image, None, 48 * MIB)
    sizelimit.mount_image(image, mounted)
    assert sizelimit.usage(mounted).limit > 40 * MIB


def test_shrinking_is_refused_while_the_image_is_mounted(image: Path, mounted: Path) -> None:
    with pytest.raises(sizelimit.ImageInUse, match="is attached to /dev/loop"):
        sizelimit.shrink_image(image, 8 * MIB)
    assert image.stat().st_size == 16 * MIB


def test_a_grow_is_refused_for_a_mount_of_something_else(image: Path, scratch: Path) -> None:
    with pytest.raises(OSError, match="is not what is mounted at"):
        sizelimit.grow_image(image, scratch, 32 * MIB)
    assert image.stat().st_size == 16 * MIB


def test_shrinking_is_refused_when_the_changes_do_not_fit(scratch: Path) -> None:
    image = scratch / "big.img"
    sizelimit.make_image(image, 64 * MIB)
    target = scratch / "t"
    target.mkdir()
    sizelimit.mount_image(image, target)
    fill(target, "data", 40 * MIB)
    kept = digest(target / "data")
    kernel.unmount(target)
    with pytest.raises(sizelimit.ResizeRefused, match="the changes need at least"):
        sizelimit.shrink_image(image, 16 * MIB)
    assert image.stat().st_size == 64 * MIB
    sizelimit.mount_image(image, target)
    assert digest(target / "data") == kept


def test_shrinking_an_unused_image_whose_changes_fit(scratch: Path) -> None:
    image = scratch / "big.img"
    sizelimit.make_image(image, 64 * MIB)
    target = scratch / "t"
    target.mkdir()
    sizelimit.mount_image(image, target)
    fill(target, "data", 2 * MIB)
    kept = digest(target / "data")
    kernel.unmount(target)
    sizelimit.shrink_image(image, 24 * MIB)
    assert image.stat().st_size == 24 * MIB
    sizelimit.mount_image(image, target)
    assert digest(target / "data") == kept
    assert sizelimit.usage(target).limit <= 24 * MIB


def test_a_shrink_below_the_smallest_size_is_refused(image: Path) -> None:
    with pytest.raises(ValueError, match="too small"):
        sizelimit.shrink_image(image, 4 * MIB)


def test_unmounting_leaves_no_loop_device_naming_the_image(image: Path, mounted: Path) -> None:
    assert len(loopdev.backed_by(image)) == 1
    kernel.unmount(mounted)
    assert loopdev.backed_by(image) == []
    assert mounts_under(mounted) == []


def test_a_failed_mount_leaves_no_loop_device(scratch: Path, image: Path) -> None:
    with pytest.raises(OSError) as raised:
        sizelimit.mount_image(image, scratch / "missing")
    assert raised.value.errno == errno.ENOENT
    assert loopdev.backed_by(image) == []


def test_a_file_that_is_no_filesystem_fails_to_mount_and_leaves_no_loop_device(
    scratch: Path,
) -> None:
    junk = scratch / "junk.img"
    junk.write_bytes(b"\x01" * (8 * MIB))
    target = scratch / "t"
    target.mkdir()
    with pytest.raises(OSError):
        sizelimit.mount_image(junk, target)
    assert loopdev.backed_by(junk) == []


def test_an_image_mounted_twice_is_one_filesystem_on_one_device(
    scratch: Path, image: Path, mounted: Path
) -> None:
    second = scratch / "second"
    second.mkdir()
    sizelimit.mount_image(image, second)
    assert len(loopdev.backed_by(image)) == 1
    (mounted / "seen").write_text("from the first")
    assert (second / "seen").read_text() == "from the first"


def test_an_image_on_two_loop_devices_is_not_mounted(
    scratch: Path, image: Path, mounted: Path
) -> None:
    second = scratch / "second"
    second.mkdir()
    refused = pytest.raises(sizelimit.ImageInUse, match=r"is attached to /dev/loop\d+, /dev/loop")
    with loopdev.attached(image), refused:
        sizelimit.mount_image(image, second)
    assert mounts_under(second) == []


@pytest.fixture
def copy_of_the_mounts() -> Iterator[subprocess.Popen[bytes]]:
    """A process in a mount namespace of its own, made now, with private propagation:
    it holds a copy of every mount until it ends, as a container being set up does for
    a moment. It is ended by its PID."""
    process = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", "echo ready; exec sleep 60"],
        stdout=subprocess.PIPE,
    )
    assert process.stdout is not None
    process.stdout.readline()
    try:
        yield process
    finally:
        process.kill()
        process.wait()


def test_an_image_still_held_by_another_namespace_is_mounted_from_the_same_device(
    image: Path, mounted: Path, copy_of_the_mounts: subprocess.Popen[bytes]
) -> None:
    (mounted / "kept").write_text("changes")
    kernel.unmount(mounted)
    (number,) = loopdev.backed_by(image)  # the copy holds the filesystem
    assert sizelimit.mount_image(image, mounted) == loopdev.device_path(number)
    assert (mounted / "kept").read_text() == "changes"
    copy_of_the_mounts.kill()
    copy_of_the_mounts.wait()
    assert loopdev.backed_by(image) == [number]
    kernel.unmount(mounted)
    assert loopdev.backed_by(image) == []


def test_an_image_held_by_another_namespace_is_not_resized_offline(
    image: Path, mounted: Path, copy_of_the_mounts: subprocess.Popen[bytes]
) -> None:
    kernel.unmount(mounted)
    with pytest.raises(sizelimit.ImageInUse):
        sizelimit.grow_image(image, None, 32 * MIB)
    assert image.stat().st_size == 16 * MIB
    copy_of_the_mounts.kill()
    copy_of_the_mounts.wait()
    sizelimit.grow_image(image, None, 32 * MIB)
    assert image.stat().st_size == 32 * MIB


def test_setuid_files_and_device_nodes_work_through_an_overlay_on_the_image(
    scratch: Path, mounted: Path
) -> None:
    """nosuid and nodev on the image's mount do not reach the containers."""
    upper, work, lower, view = mounted / "upper", mounted / "work", scratch / "l", scratch / "v"
    for folder in (upper, work, lower, view):
        folder.mkdir()
    shutil.copy("/usr/bin/id", upper / "id")
    os.chmod(upper / "id", 0o4755)
    os.mknod(upper / "null", 0o20666, os.makedev(1, 3))
    kernel.mount_overlay(source="test", lowers=[lower], upper=upper, work=work, target=view)

    def euid_of(program: Path) -> str:
        nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        return subprocess.run([*nobody, str(program), "-u"], capture_output=True, text=True).stdout

    assert euid_of(view / "id").strip() == "0"
    assert euid_of(upper / "id").strip() == "65534"
    with open(view / "null", "wb") as device:
        device.write(b"x")
    with pytest.raises(PermissionError), open(upper / "null", "wb"):
        pass


# --- loop devices --------------------------------------------------------------------


def test_the_two_step_attach_of_older_kernels(image: Path) -> None:
    control = os.open("/dev/loop-control", os.O_RDWR)
    try:
        number = fcntl.ioctl(control, loopdev._LOOP_CTL_GET_FREE)
    finally:
        os.close(control)
    device = loopdev._open_device(number, os.O_RDWR)
    backing = os.open(image, os.O_RDWR)
    try:
        loopdev._bind_in_two_steps(device, backing, os.fsencode(image))
        assert loopdev.backed_by(image) == [number]
        assert Path(f"/sys/block/loop{number}/loop/autoclear").read_text() == "1\n"
        assert Path(f"/sys/block/loop{number}/loop/dio").read_text() == "1\n"
        assert lo_file_name(number) == os.fsencode(image)[:63]
    finally:
        os.close(backing)
        os.close(device)
    assert loopdev.backed_by(image) == []  # AUTOCLEAR: the last close detached it


def test_attaches_at_the_same_time_each_get_a_device_of_their_own(scratch: Path) -> None:
    images = [scratch / f"{index}.img" for index in range(6)]
    for path in images:
        with open(path, "wb") as file:
            file.truncate(MIB)
    devices: dict[Path, str] = {}
    barrier = threading.Barrier(len(images))
    release = threading.Event()

    def attach(path: Path) -> None:
        barrier.wait()
        with loopdev.attached(path) as device:
            devices[path] = device
            release.wait(10)

    threads = [threading.Thread(target=attach, args=(path,)) for path in images]
    for thread in threads:
        thread.start()
    while len(devices) < len(images) and any(thread.is_alive() for thread in threads):
        threading.Event().wait(0.01)
    try:
        assert len(set(devices.values())) == len(images)
        for path, device in devices.items():
            assert loopdev.backed_by(path) == [int(device[len("/dev/loop") :])]
    finally:
        release.set()
        for thread in threads:
            thread.join()
    assert loop_devices_under(scratch) == []


def test_detach_waits_for_the_mount_to_go(image: Path, mounted: Path) -> None:
    (number,) = loopdev.backed_by(image)
    loopdev.detach(number)
    assert (mounted / "lost+found").is_dir()
    kernel.unmount(mounted)
    assert loopdev.backed_by(image) == []
    loopdev.detach(number)  # not attached: nothing to do


def test_attaching_where_dev_has_no_loop_nodes_makes_them(scratch: Path) -> None:
    """A container's /dev: no udev, no devtmpfs, only /dev/loop-control."""
    path = scratch / "in-container.img"
    sizelimit.make_image(path, sizelimit.MINIMUM_SIZE)
    target = scratch / "t"
    target.mkdir()
    script = (
        "import os, sys; from pathlib import Path; from docker_on_top import sizelimit; "
        "assert not any(n.startswith('loop') and n != 'loop-control' for n in os.listdir('/dev')); "
        f"device = sizelimit.mount_image(Path({str(path)!r}), Path({str(target)!r})); "
        "assert os.path.exists(device); print(device)"
    )
    inside = (
        f'mount -t tmpfs none /dev && mknod /dev/loop-control c 10 237 && {sys.executable} -c "$0"'
    )
    completed = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", inside, script],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert completed.returncode == 0, completed.stderr
    # The mount ended with the namespace, and the loop device with it.
    assert loopdev.backed_by(path) == []


# --- tmpfs ---------------------------------------------------------------------------


@pytest.fixture
def tmpfs(scratch: Path) -> Path:
    target = scratch / "volatile"
    target.mkdir()
    sizelimit.mount_tmpfs(target, 8 * MIB)
    return target


def test_a_tmpfs_holds_its_size_and_no_more(tmpfs: Path) -> None:
    assert sizelimit.usage(tmpfs) == (0, 8 * MIB)
    assert (tmpfs.stat().st_mode & 0o7777) == 0o700
    assert fill(tmpfs) == 8 * MIB
    assert sizelimit.usage(tmpfs) == (8 * MIB, 8 * MIB)


def test_a_tmpfs_holds_one_inode_per_page(tmpfs: Path) -> None:
    made = 0
    with pytest.raises(OSError) as raised:
        for index in range(10_000):
            (tmpfs / str(index)).touch()
            made += 1
    assert raised.value.errno == errno.ENOSPC
    assert made == 8 * MIB // 4096 - 1  # the root folder is one


def test_a_tmpfs_grows_while_in_use(tmpfs: Path) -> None:
    fill(tmpfs, "before")
    with open(tmpfs / "open", "wb") as held:
        sizelimit.resize_tmpfs(tmpfs, 16 * MIB)
        held.write(b"y" * MIB)
    assert sizelimit.usage(tmpfs).limit == 16 * MIB
    assert fill(tmpfs, "after") == 7 * MIB
    flags = os.statvfs(tmpfs).f_flag
    assert flags & (os.ST_NOSUID | os.ST_NODEV) == os.ST_NOSUID | os.ST_NODEV


def test_a_tmpfs_shrinks_when_its_contents_fit(tmpfs: Path) -> None:
    sizelimit.resize_tmpfs(tmpfs, 32 * MIB)
    fill(tmpfs, "data", 9 * MIB)
    sizelimit.resize_tmpfs(tmpfs, 10 * MIB)
    assert sizelimit.usage(tmpfs) == (9 * MIB, 10 * MIB)


def test_a_tmpfs_shrink_below_its_contents_is_refused(tmpfs: Path) -> None:
    sizelimit.resize_tmpfs(tmpfs, 32 * MIB)
    fill(tmpfs, "data", 20 * MIB)
    with pytest.raises(sizelimit.ResizeRefused, match="more than the new size"):
        sizelimit.resize_tmpfs(tmpfs, 16 * MIB)
    assert sizelimit.usage(tmpfs).limit == 32 * MIB


def test_a_tmpfs_shrink_below_its_number_of_files_is_refused(tmpfs: Path) -> None:
    sizelimit.resize_tmpfs(tmpfs, 32 * MIB)
    for index in range(3000):
        (tmpfs / str(index)).touch()
    with pytest.raises(sizelimit.ResizeRefused, match="3001 files and folders, more than 2048"):
        sizelimit.resize_tmpfs(tmpfs, 8 * MIB)
    assert sizelimit.usage(tmpfs).limit == 32 * MIB
