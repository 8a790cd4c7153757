"""Loop devices through their ioctls (no losetup): attach a file read-write, find the
devices a file backs, tell a device its file grew, detach.

A device is attached with LO_FLAGS_AUTOCLEAR: it detaches itself when its last user
closes it. `attached()` holds it open until the caller's mount has taken it; if the
mount fails, or the process dies first, that last close detaches it, so nothing is left
attached. Nothing here knows about volumes; callers pass plain paths.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

# <linux/loop.h>
_LOOP_SET_FD = 0x4C00
_LOOP_CLR_FD = 0x4C01
_LOOP_SET_STATUS64 = 0x4C04
_LOOP_SET_CAPACITY = 0x4C07
_LOOP_SET_DIRECT_IO = 0x4C08
_LOOP_CONFIGURE = 0x4C0A  # Linux 5.8+
_LOOP_CTL_GET_FREE = 0x4C82
_LO_FLAGS_AUTOCLEAR = 4
# Direct I/O to the backing file: the data is cached once (by the filesystem on the
# device), not twice, and write + fsync ran several times faster (docs/size-limits.md).
# A kernel that cannot do it for a file keeps buffered I/O without an error.
_LO_FLAGS_DIRECT_IO = 16
_LO_NAME_SIZE = 64

# struct loop_info64: lo_device, lo_inode, lo_rdevice, lo_offset, lo_sizelimit, lo_number,
# lo_encrypt_type, lo_encrypt_key_size, lo_flags, lo_file_name, lo_crypt_name,
# lo_encrypt_key, lo_init[2]. Every field falls on its natural alignment: no padding.
_LOOP_INFO64 = "QQQQQIIII64s64s32sQQ"
# struct loop_config: fd, block_size, info, __reserved[8].
_LOOP_CONFIG = struct.Struct("=II" + _LOOP_INFO64 + "8Q")

_CONTROL = "/dev/loop-control"
_SYSFS = Path("/sys/block")
# How often a free device may be taken by another process between LOOP_CTL_GET_FREE and
# our LOOP_CONFIGURE before attaching gives up.
_ATTEMPTS = 32


def device_path(number: int) -> str:
    return f"/dev/loop{number}"


def _info64(name: bytes, flags: int) -> tuple[object, ...]:
    # The kernel keeps the name for LOOP_GET_STATUS64 only; /sys/block/loopN/loop/
    # backing_file is the file's full path whatever its length.
    return (0, 0, 0, 0, 0, 0, 0, 0, flags, name[: _LO_NAME_SIZE - 1], b"", b"", 0, 0)


def device_number(number: int) -> int:
    """The dev_t of loop device `number` (st_dev of what is mounted from it)."""
    major, minor = (_SYSFS / f"loop{number}" / "dev").read_text().split(":")
    return os.makedev(int(major), int(minor))


def _open_device(number: int, flags: int) -> int:
    """Open /dev/loopN, making the node first where no udev or devtmpfs did (a container's
    /dev, a chroot); the node opened must be that device."""
    path = device_path(number)
    wanted = device_number(number)
    try:
        fd = os.open(path, flags | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        with suppress(FileExistsError):  # devtmpfs made it meanwhile
            os.mknod(path, stat.S_IFBLK | 0o600, wanted)
        fd = os.open(path, flags | os.O_CLOEXEC | os.O_NOFOLLOW)
    found = os.fstat(fd)
    if not stat.S_ISBLK(found.st_mode) or found.st_rdev != wanted:
        os.close(fd)
        raise OSError(errno.ENODEV, f"{path} is not loop device {number}", path)
    return fd


def _bind(device_fd: int, backing_fd: int, name: bytes) -> None:
    """Bind the backing file to the device with AUTOCLEAR in one step (LOOP_CONFIGURE),
    or in two where the kernel lacks it (before 5.8): a crash between those two leaves
    the device attached without AUTOCLEAR, for start-up recovery to detach."""
    flags = _LO_FLAGS_AUTOCLEAR | _LO_FLAGS_DIRECT_IO
    config = _LOOP_CONFIG.pack(backing_fd, 0, *_info64(name, flags), *([0] * 8))
    try:
        fcntl.ioctl(device_fd, _LOOP_CONFIGURE, config)
        return
    except OSError as error:
        if error.errno not in (errno.EINVAL, errno.ENOTTY):
            raise
    _bind_in_two_steps(device_fd, backing_fd, name)


def _bind_in_two_steps(device_fd: int, backing_fd: int, name: bytes) -> None:
    fcntl.ioctl(device_fd, _LOOP_SET_FD, backing_fd)
    try:
        info = struct.pack("=" + _LOOP_INFO64, *_info64(name, _LO_FLAGS_AUTOCLEAR))
        fcntl.ioctl(device_fd, _LOOP_SET_STATUS64, info)
    except BaseException:
        with suppress(OSError):
            fcntl.ioctl(device_fd, _LOOP_CLR_FD, 0)
        raise
    with suppress(OSError):  # LOOP_SET_STATUS64 cannot set it; buffered I/O works too
        fcntl.ioctl(device_fd, _LOOP_SET_DIRECT_IO, 1)


def _attach(backing: Path) -> tuple[int, int]:
    """Bind `backing` to a free loop device; (its number, an fd that holds it)."""
    backing_fd = os.open(backing, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        if not stat.S_ISREG(os.fstat(backing_fd).st_mode):
            raise OSError(errno.EINVAL, "a loop device's backing file must be a regular file")
        name = os.fsencode(os.path.abspath(backing))
        control = os.open(_CONTROL, os.O_RDWR | os.O_CLOEXEC)
        try:
            for _ in range(_ATTEMPTS):
                number = fcntl.ioctl(control, _LOOP_CTL_GET_FREE)
                # Opened for writing, or the kernel binds the file read-only.
                device_fd = _open_device(number, os.O_RDWR)
                try:
                    _bind(device_fd, backing_fd, name)
                except OSError as error:
                    os.close(device_fd)
                    if error.errno == errno.EBUSY:  # taken since LOOP_CTL_GET_FREE
                        continue
                    raise OSError(
                        error.errno, f"loop device: {error.strerror}", str(backing)
                    ) from None
                return number, _held_read_only(number, device_fd)
        finally:
            os.close(control)
    finally:
        os.close(backing_fd)
    raise OSError(errno.EBUSY, f"no free loop device after {_ATTEMPTS} tries", str(backing))


def _held_read_only(number: int, device_fd: int) -> int:
    """Trade the writable fd for a read-only one: a kernel built without
    CONFIG_BLK_DEV_WRITE_MOUNTED refuses to mount a device someone has open for
    writing. The device stays open throughout, so AUTOCLEAR does not fire (unless this
    fails: then the close detaches it)."""
    try:
        return _open_device(number, os.O_RDONLY)
    finally:
        os.close(device_fd)


@contextmanager
def attached(backing: Path) -> Iterator[str]:
    """Attach `backing` read-write to a free loop device and yield its path, for the
    block to mount. Once the block ends, the device stays only while something (the
    mount) holds it, and detaches itself when that goes: at once if nothing does."""
    number, fd = _attach(backing)
    try:
        yield device_path(number)
    finally:
        # The last close of a device with AUTOCLEAR detaches it: here if the block did
        # not mount it, else when the mount lets go.
        os.close(fd)


@contextmanager
def holding(number: int, backing: Path) -> Iterator[str | None]:
    """Hold loop device `number` open while the block mounts it, if it is still attached
    to `backing`: its path, or None once it has detached itself or been given another
    file. Held open, it cannot detach itself meanwhile."""
    try:
        fd = _open_device(number, os.O_RDONLY)
    except OSError as error:
        if error.errno not in (errno.ENXIO, errno.ENOENT):  # detaching, or gone
            raise
        fd = -1
    try:
        yield device_path(number) if fd >= 0 and number in backed_by(backing) else None
    finally:
        if fd >= 0:
            os.close(fd)


def wait_detached(backing: Path, timeout: float) -> list[int]:
    """Wait up to `timeout` seconds until no loop device names `backing`; the ones that
    still do. A mount namespace made while the filesystem was mounted holds a copy of
    the mount, and so the device, until it ends, and lets go a moment after that."""
    deadline = time.monotonic() + timeout
    while True:
        attached = backed_by(backing)
        if not attached or time.monotonic() >= deadline:
            return attached
        time.sleep(0.01)


def detach(number: int) -> None:
    """Detach a loop device now or, while something still holds it (a mount), as soon
    as that lets go. A device that is not attached is left as it is."""
    try:
        fd = _open_device(number, os.O_RDONLY)
    except FileNotFoundError:  # the device itself is gone
        return
    try:
        _clear(fd)
    finally:
        os.close(fd)


@contextmanager
def detached_after(numbers: list[int]) -> Iterator[None]:
    """Hold the devices open while the block runs (unmounting what is mounted from
    them), then detach them. Held open, none detaches itself meanwhile nor can be given
    another file, so the devices detached are those named, whenever the kernel lets go
    of what the block unmounted (a lazy unmount lets go in the background)."""
    held: list[int] = []
    try:
        for number in numbers:
            held.append(_open_device(number, os.O_RDONLY))
        yield
        for fd in held:
            _clear(fd)
    finally:
        for fd in held:
            os.close(fd)  # the last close of a cleared device detaches it


def _clear(fd: int) -> None:
    try:
        fcntl.ioctl(fd, _LOOP_CLR_FD, 0)
    except OSError as error:
        if error.errno != errno.ENXIO:  # not attached
            raise


def backed_by(backing: Path) -> list[int]:
    """The numbers of the loop devices whose backing file is `backing` (as the kernel
    names it: the absolute path, symlinks resolved), from /sys/block/loop*/loop/."""
    wanted = os.fsencode(os.path.realpath(backing)) + b"\n"
    found = []
    with os.scandir(_SYSFS) as entries:
        for entry in entries:
            if not entry.name.startswith("loop"):
                continue
            # os.open, not open(): a file object asks the kernel whether each file is
            # a terminal, so the syscalls made would depend on how many devices other
            # processes have attached (the fault harness counts them).
            try:
                named = os.path.join(entry.path, "loop", "backing_file")
                fd = os.open(named, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:  # not attached
                continue
            try:
                # sysfs gives a whole attribute (at most a page) in one read.
                if os.read(fd, len(wanted) + 1) == wanted:
                    found.append(int(entry.name[len("loop") :]))
            finally:
                os.close(fd)
    return sorted(found)


def set_capacity(number: int) -> None:
    """Tell a loop device its backing file changed size (after a grow)."""
    fd = _open_device(number, os.O_RDONLY)
    try:
        fcntl.ioctl(fd, _LOOP_SET_CAPACITY, 0)
    finally:
        os.close(fd)


def size_bytes(number: int) -> int:
    """The size of the device as the kernel sees it now."""
    return int((_SYSFS / f"loop{number}" / "size").read_text()) * 512
