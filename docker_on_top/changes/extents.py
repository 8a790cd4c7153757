"""A regular file's data between its holes, and the size of a read or write of content:
exports and copies keep holes and read large files in chunks."""

from __future__ import annotations

import errno
import os

# Bytes per read of a large file, and per write of an export.
_CHUNK = 1 << 20


def _data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    """The (offset, length) of each run of data of a file of `size` bytes, holes between."""
    extents = []
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as error:
            if error.errno == errno.ENXIO:
                break  # only a hole from `offset` on
            raise
        if start >= size:
            break
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        extents.append((start, end - start))
        offset = end
    return extents
