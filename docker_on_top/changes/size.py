"""`changes_size`: the disk usage and apparent size of a volume's changes."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import NamedTuple

from ..walk import Cursor, depth_first


class ChangesSize(NamedTuple):
    """The size of a volume's changes."""

    # Disk usage: the blocks of every inode below the upper root, each inode once.
    disk_bytes: int
    # The sizes of the regular files, each inode once (what a copy would read).
    apparent_bytes: int


def changes_size(upper: Path) -> ChangesSize:
    """The disk usage and the apparent size of the changes. Entries removed while they are
    read are left out."""
    disk = apparent = 0
    linked: set[tuple[int, int]] = set()
    with Cursor.open(upper) as cursor:

        def measure() -> list[str]:
            nonlocal disk, apparent
            subdirectories = []
            with os.scandir(cursor.fd) as scan:
                for entry in scan:
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    if stat.S_ISDIR(st.st_mode):
                        subdirectories.append(entry.name)
                    elif st.st_nlink > 1:
                        if (st.st_dev, st.st_ino) in linked:
                            continue
                        linked.add((st.st_dev, st.st_ino))
                    disk += st.st_blocks * 512
                    if stat.S_ISREG(st.st_mode):
                        apparent += st.st_size
            return subdirectories

        def enter(name: str) -> list[str] | None:
            return None if cursor.down(name) is None else measure()

        depth_first(measure(), enter, lambda _: cursor.up())
    return ChangesSize(disk, apparent)
