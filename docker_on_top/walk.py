"""Walking and removing trees that someone else may be changing meanwhile: a volume's
`upper/` (written by untrusted containers), its base, and folders under the state root.

A walk never looks a path up twice: it holds one directory descriptor, opens each child
relative to it with O_NOFOLLOW (a symlink swapped in for a directory is never followed),
lists with scandir on the descriptor, and acts on entries by name relative to it. It
holds one descriptor per tree whatever the depth (a tree may be deeper than the limit of
open files, and than PATH_MAX): it goes back up through "..", which is never a symlink,
and checks with fstat that it came back to the directory it left, or fails. Nothing is
recursive, and what a walk keeps is, per level of depth, the names still to visit there.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Sequence
from contextlib import suppress
from pathlib import Path
from typing import TypeVar

DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_PATH_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
# What an entry may have become since it was listed: gone, or no longer a directory.
_GONE_OR_CHANGED = (errno.ENOENT, errno.ENOTDIR, errno.ELOOP)


class MovedWhileWalked(OSError):
    """A directory being walked was moved elsewhere in its tree meanwhile."""


class Cursor:
    """One open directory descriptor that moves down and back up a tree."""

    def __init__(self, fd: int, *, same_device: bool = False) -> None:
        self.fd = fd
        # When set, going down onto another filesystem (a mount point) is refused.
        self._same_device = same_device
        st = os.fstat(fd)
        self._identity = (st.st_dev, st.st_ino)
        # From the top: the names gone down through, and the identity of each directory
        # left on the way.
        self.names: list[str] = []
        self._above: list[tuple[int, int]] = []

    @classmethod
    def open(cls, path: str | Path, *, same_device: bool = False) -> Cursor:
        """At the directory `path` itself (never a symlink); the path above it is trusted."""
        return cls(os.open(path, DIRECTORY_FLAGS), same_device=same_device)

    @classmethod
    def open_at(cls, dir_fd: int, name: str, *, same_device: bool = False) -> Cursor:
        return cls(os.open(name, DIRECTORY_FLAGS, dir_fd=dir_fd), same_device=same_device)

    def __enter__(self) -> Cursor:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    @property
    def device(self) -> int:
        """The filesystem of the directory where the cursor is."""
        return self._identity[0]

    @property
    def depth(self) -> int:
        return len(self.names)

    def relative(self) -> str:
        """Where the cursor is, from the top ("" at the top)."""
        return "/".join(self.names)

    def down(self, name: str) -> os.stat_result | None:
        """Go into the subdirectory `name`; None (staying here) when it is gone or is no
        longer a directory."""
        try:
            child = os.open(name, DIRECTORY_FLAGS, dir_fd=self.fd)
        except OSError as error:
            if error.errno in _GONE_OR_CHANGED:
                return None
            raise
        st = os.fstat(child)
        if self._same_device and st.st_dev != self._identity[0]:
            os.close(child)
            raise OSError(errno.EXDEV, "a mount point; not going into it", self._shown(name))
        os.close(self.fd)
        self.fd = child
        self._above.append(self._identity)
        self._identity = (st.st_dev, st.st_ino)
        self.names.append(name)
        return st

    def up(self) -> None:
        """Back to the directory above, which must be the one left on the way down."""
        parent = os.open("..", DIRECTORY_FLAGS, dir_fd=self.fd)
        st = os.fstat(parent)
        expected = self._above.pop()
        if (st.st_dev, st.st_ino) != expected:
            os.close(parent)
            raise MovedWhileWalked(
                errno.ESTALE,
                f"{self._shown('')} was moved while it was being read; run the command again",
            )
        os.close(self.fd)
        self.fd = parent
        self._identity = expected
        self.names.pop()

    def entry_path(self, name: str) -> str:
        """A path to the entry `name` of the current directory that is looked up from the
        descriptor, for the calls that take no dir_fd (the xattr ones); with
        follow_symlinks=False, a symlink there is never followed."""
        return f"/proc/self/fd/{self.fd}/{name}"

    def _shown(self, name: str) -> str:
        # Only the last levels: a message about a tree 5,000 deep stays readable.
        names = [*self.names, name] if name else self.names
        shown = "/".join(names[-8:])
        return shown if len(names) <= 8 else f".../{shown}"


class RegularFiles:
    """Opens an entry for reading only once fstat has shown it to be a regular file: never
    a FIFO (which could block forever) nor a device (which opening alone can act on). An
    O_PATH descriptor names the inode without opening it; the file is then opened again
    through /proc/self/fd, which cannot land on another inode."""

    def __init__(self) -> None:
        # Open once: looking /proc/self/fd up again for each file costs as much as the rest.
        self._descriptors = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def __enter__(self) -> RegularFiles:
        return self

    def __exit__(self, *_: object) -> None:
        os.close(self._descriptors)

    def open(self, dir_fd: int, name: str) -> tuple[int | None, os.stat_result]:
        """The entry `name` opened for reading if it is a regular file, else None; and its
        status, for the caller to handle what it really is."""
        path_fd = os.open(name, _PATH_FLAGS, dir_fd=dir_fd)
        try:
            st = os.fstat(path_fd)
            if not stat.S_ISREG(st.st_mode):
                return None, st
            return os.open(str(path_fd), _READ_FLAGS, dir_fd=self._descriptors), st
        finally:
            os.close(path_fd)


def entry_status(dir_fd: int, name: str) -> os.stat_result | None:
    """The status of the entry `name` (never followed); None when it is gone."""
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


Item = TypeVar("Item")


def depth_first(
    top: Sequence[Item],
    enter: Callable[[Item], Sequence[Item] | None],
    leave: Callable[[Item], None],
) -> None:
    """Visit a tree of items depth first without recursion: `enter(item)` goes into an
    item and returns its children in order (None when it cannot be entered), `leave` comes
    back out of one that was entered. What is kept is, per level, the children not yet
    visited."""
    pending = [list(reversed(top))]
    entered: list[Item] = []
    while pending:
        if pending[-1]:
            item = pending[-1].pop()
            children = enter(item)
            if children is not None:
                entered.append(item)
                pending.append(list(reversed(children)))
        else:
            pending.pop()
            if entered:
                leave(entered.pop())


def remove_children(cursor: Cursor) -> None:
    """Remove everything in the cursor's directory, which stays; the cursor ends there.
    Each directory is listed once: its other entries are unlinked at once, its
    subdirectories emptied one by one, then removed."""

    def enter(name: str) -> list[str] | None:
        if _removed_if_empty(cursor.fd, name):
            return None
        if cursor.down(name) is None:
            # Gone, or no longer a directory (a container's doing meanwhile).
            with suppress(FileNotFoundError):
                os.unlink(name, dir_fd=cursor.fd)
            return None
        return _unlink_all_but_subdirectories(cursor.fd)

    def leave(name: str) -> None:
        cursor.up()
        os.rmdir(name, dir_fd=cursor.fd)

    depth_first(_unlink_all_but_subdirectories(cursor.fd), enter, leave)


def _removed_if_empty(dir_fd: int, name: str) -> bool:
    """rmdir first: an empty directory goes in one call instead of a visit. rmdir never
    follows a symlink and refuses a mount point, so whatever it does not remove is left
    to the walk, which handles it as before."""
    try:
        os.rmdir(name, dir_fd=dir_fd)
    except OSError:
        return False
    return True


def _unlink_all_but_subdirectories(dir_fd: int) -> list[str]:
    """Unlink the entries of a directory but its subdirectories, whose names are returned."""
    subdirectories = []
    with os.scandir(dir_fd) as scan:
        for entry in scan:
            if entry.is_dir(follow_symlinks=False):
                subdirectories.append(entry.name)
                continue
            try:
                os.unlink(entry.name, dir_fd=dir_fd)
            except FileNotFoundError:
                pass
            except IsADirectoryError:
                subdirectories.append(entry.name)
    return subdirectories


def remove_at(dir_fd: int, name: str) -> None:
    """Remove the entry `name` of a directory, a whole tree for a directory (never going
    onto another filesystem); nothing when it is absent."""
    try:
        os.unlink(name, dir_fd=dir_fd)
        return
    except FileNotFoundError:
        return
    except IsADirectoryError:
        pass
    if _removed_if_empty(dir_fd, name):
        return
    try:
        cursor = Cursor.open_at(dir_fd, name, same_device=True)
    except OSError as error:
        if error.errno == errno.ENOENT:
            return
        if error.errno in _GONE_OR_CHANGED:
            # No longer a directory (a container's doing while it was removed).
            os.unlink(name, dir_fd=dir_fd)
            return
        raise
    with cursor:
        if cursor.device != os.fstat(dir_fd).st_dev:
            raise OSError(errno.EXDEV, "a mount point; not removing it", name)
        remove_children(cursor)
    os.rmdir(name, dir_fd=dir_fd)


def remove_tree(path: str | Path) -> None:
    """Remove whatever is at `path`, a whole tree for a directory; nothing when absent.
    The path above the last name is trusted (a folder of ours)."""
    above, name = os.path.split(os.fspath(path))
    parent = os.open(above, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        remove_at(parent, name)
    finally:
        os.close(parent)


def empty_directory(path: str | Path) -> None:
    """Remove everything in the directory `path`, keeping it (and its mode and owner)."""
    with Cursor.open(path, same_device=True) as cursor:
        remove_children(cursor)
