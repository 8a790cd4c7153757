"""Storage with a size limit, for a volume's changes on any host filesystem: an ext4
image in a sparse file, loop-mounted, or a tmpfs of that size; their usage from one
statvfs; growing and shrinking them; and sizes as users write them ("10G").

Nothing here knows about volumes' metadata or locks; callers pass plain paths and hold
whatever lock makes a step theirs alone. e2fsprogs (mkfs.ext4, e2fsck, resize2fs) does
the offline filesystem work; a mounted filesystem is grown through the kernel.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import struct
import subprocess
from pathlib import Path
from typing import NamedTuple

from . import kernel, loopdev

_KIB = 1 << 10
_UNITS = {"": 1, "k": _KIB, "m": _KIB**2, "g": _KIB**3, "t": _KIB**4}
_SIZE = re.compile(r"([0-9]+)(?:\.([0-9]+))?([kmgt]?)b?", re.ASCII | re.IGNORECASE)
_OFF_T_MAX = (1 << 63) - 1

# One block size everywhere: a loop device doing direct I/O may take the backing disk's
# logical block size (4096 on 4Kn disks), and ext4 cannot mount on a device whose block
# is larger than its own; mke2fs would pick 1 KiB for images below 512 MiB.
BLOCK_SIZE = 4096
# mke2fs gives a filesystem a journal from 2048 blocks on; below, a crash of the host
# could cost the changes a full fsck. The same floor holds for a tmpfs: one rule.
MINIMUM_SIZE = 2048 * BLOCK_SIZE

_MKFS_OPTIONS = [
    "-q",
    "-F",  # a regular file, not a block device
    "-b", str(BLOCK_SIZE),
    "-m", "0",  # no blocks reserved for root: the limit is all the changes'
    # The file is sparse: it reads as zeros already, so nothing is written to zero it.
    "-E", "lazy_itable_init=1,lazy_journal_init=1,nodiscard,root_owner=0:0",
]  # fmt: skip
_MOUNT_FLAGS = kernel.MS_NOSUID | kernel.MS_NODEV
# Without noinit_itable, ext4lazyinit writes the never-zeroed inode tables in the
# background after the first mount, a sixty-fourth of the image (16 GiB for 1 TiB) taken
# from the host disk; the sparse file reads as zeros already. noinit_itable needs no new
# e2fsprogs, unlike mke2fs's assume_storage_prezeroed (1.47). discard: blocks freed in
# the image are discarded to the loop device, which punches them out of the sparse
# file, so what a container deletes goes back to the host disk.
_EXT4_OPTIONS = "noinit_itable,discard"
# A tmpfs inode costs kernel memory (about 1 KiB with its dentry) that the size does
# not count, so their number is bounded too: one per page, so that only empty files,
# folders and symlinks can run out of inodes before the size runs out.
_TMPFS_BYTES_PER_INODE = 4096
_TMPFS_MODE = "0700"

# <linux/ext4.h>: _IOW('f', 16, __u64), the online resize resize2fs uses on a mounted
# filesystem (Linux 3.3+).
_EXT4_IOC_RESIZE_FS = 0x40086610


class ResizeRefused(ValueError):
    """A resize not done: the changes do not fit the new size, or it is the other way."""


class ImageInUse(Exception):
    """The image is attached to a loop device: mounted (here, or still in another mount
    namespace), or left so by a crash."""

    def __init__(self, image: Path, devices: list[int]) -> None:
        named = ", ".join(loopdev.device_path(number) for number in devices)
        super().__init__(f"{image} is attached to {named}")
        self.devices = devices


class ToolFailed(RuntimeError):
    """An e2fsprogs command failed, or is not installed."""


class Usage(NamedTuple):
    """Bytes the changes use, and bytes they may use in all (used + what is free)."""

    used: int
    limit: int


def parse_size(text: str) -> int:
    """Bytes in a size as a user writes it: a whole number, or a decimal fraction with a
    unit, then `k`, `M`, `G` or `T` (powers of 1024, any case) and an optional `B`:
    "4096", "4096B", "512M", "10g", "10GB", "1.5G" (rounded down to a whole byte).

    ValueError for anything else, and for a size of zero or past 2**63 - 1 bytes.
    """
    match = _SIZE.fullmatch(text)
    if match is None:
        if text.strip().startswith("-"):
            raise ValueError(f"size {text!r} is negative")
        raise ValueError(
            f"size {text!r} is not a number of bytes with an optional unit k, M, G or T "
            "(powers of 1024) and B, such as 512M, 10G or 1.5T"
        )
    whole: str = match[1]
    fraction: str = match[2] or ""
    unit: str = match[3].lower()
    if fraction and not unit:
        raise ValueError(f"size {text!r}: a byte cannot be divided; a fraction needs a unit")
    if len(whole) + len(fraction) > 40:  # far past any size, before int() parses it
        raise ValueError(f"size {text!r} is too large")
    multiplier = _UNITS[unit]
    decimals: int = 10 ** len(fraction)
    size = int(whole) * multiplier + int(fraction or "0") * multiplier // decimals
    if size == 0:
        raise ValueError(f"size {text!r} is zero")
    if size > _OFF_T_MAX:
        raise ValueError(f"size {text!r} is too large")
    return size


def check_size(size_bytes: int) -> None:
    """ValueError for a size too small to hold a filesystem."""
    if size_bytes < MINIMUM_SIZE:
        raise ValueError(
            f"a size of {size_bytes} bytes is too small to hold a filesystem; "
            f"the smallest is {MINIMUM_SIZE // _KIB**2}M"
        )


def _run(tool: str, *arguments: str, pass_fds: tuple[int, ...] = ()) -> str:
    """Run an e2fsprogs command (with the descriptors `pass_fds`); its standard output.
    ToolFailed with what it said."""
    try:
        completed = subprocess.run(
            [tool, *arguments],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=False,
            pass_fds=pass_fds,
        )
    except FileNotFoundError:
        raise ToolFailed(f"{tool} is not installed (it comes with e2fsprogs)") from None
    if completed.returncode != 0:
        said = (completed.stderr.strip() or completed.stdout.strip()).splitlines()
        raise ToolFailed(
            f"{tool} {' '.join(arguments)} failed with exit status {completed.returncode}: "
            + " / ".join(line for line in said if line.strip())
        )
    return completed.stdout


def make_image(path: Path, size_bytes: int) -> None:
    """Make a sparse file of `size_bytes` at `path` (which must not exist) holding an
    empty ext4 filesystem whose root directory is root's, mode 0755. ValueError for a
    size too small, or one the host filesystem takes in no file (EFBIG)."""
    check_size(size_bytes)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        try:
            os.ftruncate(fd, size_bytes)
        except OSError as error:
            if error.errno != errno.EFBIG:
                raise
            raise ValueError(
                f"a size of {size_bytes} bytes is larger than the host filesystem takes "
                f"in one file ({path.parent})"
            ) from None
        # By its descriptor, not its path: mkfs.ext4 outlives a daemon killed meanwhile,
        # and by the time it opens the path, a restart may have removed the half-made
        # volume and a retried Create put a new image there, which it must not write.
        _run("mkfs.ext4", *_MKFS_OPTIONS, f"/proc/self/fd/{fd}", pass_fds=(fd,))
        os.fsync(fd)  # the new filesystem is on the disk before a caller records it
    except BaseException:
        os.unlink(path)
        raise
    finally:
        os.close(fd)


def mount_image(image: Path, target: Path) -> str:
    """Attach `image` to a loop device and mount its ext4 on `target`; the device path.

    nosuid and nodev hold for this mount only: an overlay whose upper directory is on it
    still runs set-user-ID files and opens device nodes, because the kernel checks those
    on the overlay's own mount. If the mount fails the device is detached again, and
    after an unmount the device detaches itself.

    An image still attached to one device (its filesystem held by another mount
    namespace a moment after an unmount, or left so by a crash) is mounted from that
    device: the kernel then shares the one filesystem. A second device would make a
    second filesystem over the same blocks and destroy them; with more than one
    attached already, ImageInUse.
    """
    attached = loopdev.backed_by(image)
    if len(attached) > 1:
        raise ImageInUse(image, attached)
    if attached:
        with loopdev.holding(attached[0], image) as device:
            if device is not None:
                kernel.mount_filesystem("ext4", device, target, _MOUNT_FLAGS, _EXT4_OPTIONS)
                return device
    with loopdev.attached(image) as device:
        kernel.mount_filesystem("ext4", device, target, _MOUNT_FLAGS, _EXT4_OPTIONS)
    return device


def mount_tmpfs(target: Path, size_bytes: int) -> None:
    """Mount a tmpfs of `size_bytes` on `target`, its root directory mode 0700, nosuid
    and nodev as for an image (an overlay on it is not affected)."""
    check_size(size_bytes)
    kernel.mount_filesystem(
        "tmpfs",
        "docker-on-top",
        target,
        _MOUNT_FLAGS,
        _tmpfs_options(size_bytes) + f",mode={_TMPFS_MODE}",
    )


def _tmpfs_options(size_bytes: int) -> str:
    return f"size={size_bytes},nr_inodes={max(size_bytes // _TMPFS_BYTES_PER_INODE, 1)}"


def resize_tmpfs(target: Path, size_bytes: int) -> None:
    """Give the tmpfs on `target` a new size (and inode count), also while it is in use.
    ResizeRefused when its contents, or their number, do not fit the new size."""
    check_size(size_bytes)
    figures = os.statvfs(target)
    used = (figures.f_blocks - figures.f_bfree) * figures.f_frsize
    if used > size_bytes:
        raise ResizeRefused(
            f"the changes use {used} bytes, more than the new size of {size_bytes} bytes"
        )
    files = figures.f_files - figures.f_ffree
    if files > size_bytes // _TMPFS_BYTES_PER_INODE:
        raise ResizeRefused(
            f"the changes hold {files} files and folders, more than "
            f"{size_bytes // _TMPFS_BYTES_PER_INODE} (one per {_TMPFS_BYTES_PER_INODE} bytes)"
        )
    # MS_REMOUNT sets the mount's flags anew: they are given again.
    kernel.mount_filesystem(
        "tmpfs",
        "docker-on-top",
        target,
        kernel.MS_REMOUNT | _MOUNT_FLAGS,
        _tmpfs_options(size_bytes),
    )


def usage(path: Path) -> Usage:
    """What the changes on the filesystem at `path` use and may use, from one statvfs.

    `used` counts the blocks files, folders and their metadata hold: 24 KiB on a fresh
    ext4 (its root and lost+found folders), 0 on a fresh tmpfs. ext4's own
    structures (journal, inode tables) are counted in neither. `limit` is `used` plus
    what is still free to write: ext4 keeps a reserve for delayed allocation (2 % of
    the blocks, at most 16 MiB) that no writer gets, and it is not in the limit.
    """
    figures = os.statvfs(path)
    used = figures.f_blocks - figures.f_bfree
    return Usage(used * figures.f_frsize, (used + figures.f_bavail) * figures.f_frsize)


def grow_image(image: Path, mounted_at: Path | None, new_size: int) -> None:
    """Grow `image` to `new_size` bytes and its filesystem to fill it: online when it is
    mounted at `mounted_at` (the ioctl resize2fs uses, which needs CAP_SYS_RESOURCE),
    else offline (e2fsck, then resize2fs). The file grows first: done again after a
    failure or a crash, it completes the step cut short. ResizeRefused for a smaller
    size; ImageInUse if it is attached but not mounted at `mounted_at`."""
    mounted = None if mounted_at is None else (mounted_at, _device_mounted_at(image, mounted_at))
    if mounted is None:
        _check_detached(image)
    current = os.stat(image).st_size
    if new_size < current:
        raise ResizeRefused(
            f"{new_size} bytes is smaller than the image's {current} bytes: that is a shrink"
        )
    with open(image, "r+b") as backing:
        backing.truncate(new_size)
        os.fsync(backing.fileno())
    if mounted is None:
        _check_offline(image)
        _run("resize2fs", os.path.abspath(image))
        return
    folder, device = mounted
    loopdev.set_capacity(device)
    _resize_mounted(folder, loopdev.size_bytes(device))


def _device_mounted_at(image: Path, mounted_at: Path) -> int:
    """The one loop device `image` backs, if it is what is mounted at `mounted_at`."""
    attached = loopdev.backed_by(image)
    if len(attached) > 1:
        raise ImageInUse(image, attached)
    if not attached or os.stat(mounted_at).st_dev != loopdev.device_number(attached[0]):
        raise OSError(errno.EINVAL, f"{image} is not what is mounted at {mounted_at}")
    return attached[0]


def _resize_mounted(mounted_at: Path, size_bytes: int) -> None:
    fd = os.open(mounted_at, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        blocks = size_bytes // os.fstatvfs(fd).f_bsize
        fcntl.ioctl(fd, _EXT4_IOC_RESIZE_FS, struct.pack("=Q", blocks))
    except OSError as error:
        said = error.strerror
        if error.errno == errno.EPERM:  # resize2fs says "Permission denied to resize"
            said = "the kernel resizes a mounted ext4 only for CAP_SYS_RESOURCE; grow it unmounted"
        raise OSError(error.errno, f"online resize: {said}", str(mounted_at)) from None
    finally:
        os.close(fd)


# How long an offline resize waits for the image's loop device to detach itself after
# an unmount (see loopdev.wait_detached).
_DETACH_WAIT_S = 1.0


def _check_detached(image: Path) -> None:
    attached = loopdev.wait_detached(image, _DETACH_WAIT_S)
    if attached:
        raise ImageInUse(image, attached)


def _check_offline(image: Path) -> None:
    """e2fsck -f -p: resize2fs works only on a filesystem checked since it was mounted."""
    try:
        _run("e2fsck", "-f", "-p", os.path.abspath(image))
    except ToolFailed as error:
        if "exit status 1:" not in str(error):  # 1: errors were corrected
            raise


def shrink_image(image: Path, new_size: int) -> None:
    """Shrink the filesystem in `image`, then the file, to `new_size` bytes. Only while
    no loop device holds the image (ImageInUse), and only when the changes fit the new
    size as resize2fs estimates it (ResizeRefused, saying how much they need)."""
    check_size(new_size)
    _check_detached(image)
    current = os.stat(image).st_size
    if new_size >= current:
        raise ResizeRefused(
            f"{new_size} bytes is not smaller than the image's {current} bytes: that is a grow"
        )
    _check_offline(image)
    estimate = _run("resize2fs", "-P", os.path.abspath(image))
    needed = int(estimate.rsplit(":", 1)[1]) * BLOCK_SIZE
    if new_size < needed:
        raise ResizeRefused(
            f"the changes need at least {needed} bytes (resize2fs's estimate of the smallest "
            f"filesystem that holds them); {new_size} bytes is too small"
        )
    _run("resize2fs", os.path.abspath(image), str(new_size // BLOCK_SIZE))
    # The filesystem fits the new size already: a crash before this truncate leaves
    # only a file larger than its filesystem, which a grow or a shrink then fixes.
    with open(image, "r+b") as backing:
        backing.truncate(new_size)
        os.fsync(backing.fileno())
