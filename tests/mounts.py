"""The mount table, read the way tests need it."""

from __future__ import annotations

import subprocess
from pathlib import Path


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
