"""How every state file is written and read: replaced atomically (a staging file,
fsync when it must survive a power loss, rename: SPEC B2), read whole in few syscalls,
and a folder's entries forced to disk. It knows nothing of what the files hold."""

from __future__ import annotations

import errno
import os
from contextlib import suppress
from pathlib import Path


def write_atomically(path: str | Path, data: bytes, staging: str | Path, *, durable: bool) -> None:
    """Replace `path` with `data` so a crash leaves the old or the new content, never a mix.

    `staging` must be on the same filesystem and have a single writer at a time.
    With `durable`, the data and the rename are also forced to disk.
    """
    fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        _write_all(fd, data)
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.rename(staging, path)
    except OSError:
        with suppress(FileNotFoundError):
            os.unlink(staging)
        raise
    if durable:
        fsync_directory(os.path.dirname(path))


def _write_all(fd: int, data: bytes) -> None:
    """Write all of `data` to a new file, and check that the file holds that much."""
    written = 0
    while written < len(data):
        count = os.write(fd, data[written:])
        if count == 0:
            raise OSError(errno.EIO, "write made no progress")
        written += count
    if os.fstat(fd).st_size != len(data):
        raise OSError(errno.EIO, "the file does not hold what was written")


def read_file(path: str) -> bytes:
    """The whole content of a small file, in as few syscalls as Python allows."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        parts = []
        while part := os.read(fd, 65536):
            parts.append(part)
    finally:
        os.close(fd)
    return b"".join(parts)


def fsync_directory(directory: str | Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
