"""The mount table and the loop devices, read the way tests need them, and a filesystem
filled up to its limit."""

from __future__ import annotations

import errno
import fcntl
import os
import subprocess
from pathlib import Path

MIB = 1 << 20


def mounts_under(folder: Path) -> list[tuple[str, str]]:
    """(mount point, fs type) of every mount at or below `folder`, from the mount table."""
    found = []
    prefix = str(folder)
    with open("/proc/self/mountinfo") as table:
        for line in table:
            fields = line.split()
            mount_point = fields[4].encode().decode("unicode_escape")
            fs_type = fields[fields.index("-") + 1]
            if mount_point == prefix or mount_point.startswith(prefix + "/"):
                found.append((mount_point, fs_type))
    return found


def unmount_all_under(folder: Path) -> None:
    for mount_point, _ in reversed(mounts_under(folder)):
        subprocess.run(["umount", "-l", mount_point], check=False)


def backing_files() -> list[str]:
    """The backing file of every attached loop device."""
    found = []
    for device in Path("/sys/block").glob("loop*"):
        try:
            found.append((device / "loop" / "backing_file").read_text().strip())
        except OSError:
            continue
    return found


def fill(folder: Path, name: str, size: int) -> int:
    """Write up to `size` bytes into `folder/name`; how many went in before ENOSPC."""
    written = 0
    chunk = b"x" * MIB
    with open(folder / name, "wb") as out:
        try:
            while written < size:
                written += out.write(chunk[: min(MIB, size - written)])
                out.flush()
            os.fsync(out.fileno())
        except OSError as error:
            assert error.errno == errno.ENOSPC, error
    return written


def lock_is_free(directory: Path) -> bool:
    """Whether nobody holds the flock on `directory` (a volume's activemounts/, which the
    daemon locks), probed without waiting."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
