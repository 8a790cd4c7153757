"""Changes written elsewhere: the merged view copied into a new directory (`merge_into`),
the changes applied to the base itself (`apply_to_base`), an upper directory copied as
it is (`copy_upper`), thrown away (`reset`); and the copier they use, which keeps
owners, modes, times, xattrs, hard links and holes."""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path

from .. import kernel
from ..walk import (
    Cursor,
    RegularFiles,
    depth_first,
    empty_directory,
    entry_status,
    remove_at,
    remove_children,
    remove_tree,
)
from .extents import _CHUNK, _data_extents
from .overlay_marks import (
    _BASE_FLAGS,
    _HIDES,
    _HOLDS_XATTR_WHITEOUTS,
    _is_whiteout,
    _overlay_mark,
    _Target,
    _xattr_names,
    _xattrs,
)

_PROGRESS_EVERY = 1000


_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def merge_into(
    upper: Path,
    lowers: list[Path],
    target: Path,
    *,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Copy the merged view (base plus changes) into the new directory `target`.

    The view is a read-only overlay of both layers, so it is exactly what the kernel shows
    the containers; the volume should not be in use, or the copy is of a moving target.
    The copy is built in a hidden sibling of `target` and renamed into place without
    replacing anything, so a failure leaves nothing at `target`. Files keep their holes.
    Raises FileExistsError when `target` exists, and ValueError when it would lie inside
    either layer (the copy would then show up in its own source). `progress` gets the
    count of entries copied, every 1000 entries and at the end.
    """
    if os.path.lexists(target):
        raise FileExistsError(errno.EEXIST, "the target exists already", str(target))
    destination = target.parent.resolve()
    for layer in (upper, *lowers):
        if destination.is_relative_to(layer.resolve()):
            raise ValueError(f"the target {target} lies inside {layer}")
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    view = scratch / "view"
    try:
        view.mkdir()
        kernel.mount_read_only_overlay([upper, *lowers], view)
        try:
            _copy_tree(view, scratch / "tree", progress)
        finally:
            kernel.unmount(view, flags=kernel.MNT_DETACH)
        kernel.rename_noreplace(scratch / "tree", target)
    finally:
        # Never delete through a view that is somehow still mounted.
        if not kernel.is_mount_point(view):
            remove_tree(scratch)


def copy_upper(upper: Path, target: Path) -> None:
    """Copy the upper directory `upper` as it is into the new directory `target`, to be
    a lower layer as the upper itself would be: whiteouts, opaque marks and every other
    overlay xattr are kept, with owners, modes, times, xattrs, hard links and holes. A
    failure leaves a partial copy at `target`, for the caller to remove."""
    _copy_tree(upper, target, None, overlay_xattrs=True)


def _copy_tree(
    source: Path,
    target: Path,
    progress: Callable[[int], None] | None,
    *,
    overlay_xattrs: bool = False,
) -> None:
    os.mkdir(target, 0o700)
    with Cursor.open(source) as origin, Cursor.open(target) as copy, RegularFiles() as files:
        copier = _Copier(progress, target, files, overlay_xattrs=overlay_xattrs)

        def copy_entries() -> list[tuple[str, os.stat_result]]:
            subdirectories = []
            for name in _names(origin.fd):
                st = entry_status(origin.fd, name)
                if st is None:
                    continue
                if stat.S_ISDIR(st.st_mode):
                    os.mkdir(name, 0o700, dir_fd=copy.fd)
                    subdirectories.append((name, st))
                else:
                    copier.copy(origin, name, st, copy)
            return subdirectories

        def enter(
            subdirectory: tuple[str, os.stat_result],
        ) -> list[tuple[str, os.stat_result]] | None:
            name, _ = subdirectory
            if origin.down(name) is None:
                return None
            copy.down(name)
            return copy_entries()

        def leave(subdirectory: tuple[str, os.stat_result]) -> None:
            name, st = subdirectory
            origin.up()
            copy.up()
            copier.finish_directory(origin.fd, name, st, copy.fd)

        depth_first(copy_entries(), enter, leave)
        _copy_metadata(origin.fd, None, os.fstat(origin.fd), copy.fd, overlay_xattrs)
        copier.done()


def _names(directory_fd: int) -> list[str]:
    """A directory's names in order: copies then make the same choices every time."""
    with os.scandir(directory_fd) as scan:
        return sorted(entry.name for entry in scan)


def apply_to_base(
    upper: Path,
    base: Path,
    *,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Write the changes into the base itself, so that it becomes the merged view.

    The volume must not be mounted; afterwards the caller resets the upper directory.
    Deletions remove the base entry (a tree for a directory); an opaque directory first
    loses all its base entries; then each upper entry replaces its base path, except that
    a directory merges into a base directory, whose metadata it takes. A replaced file is
    unlinked, never overwritten: its other hard links in the base kept the old content in
    the merged view too. The base root keeps its own metadata (see `changes/__init__.py`).
    Not atomic: after a failure the base is partly updated, and running this again with
    the same upper finishes the job. `progress` gets the count of upper entries applied,
    every 1000 entries and at the end. A base directory on another filesystem (a mount
    point) is never gone into.
    """
    with (
        Cursor(os.open(base, _BASE_FLAGS), same_device=True) as target,
        Cursor.open(upper) as changes,
        RegularFiles() as files,
    ):
        copier = _Copier(progress, base, files)

        # Each upper subdirectory as (name, status, whether the base had no directory there).
        def apply_entries(holds_xattr_whiteouts: bool) -> list[tuple[str, os.stat_result, bool]]:
            subdirectories = []
            for name in _names(changes.fd):
                st = entry_status(changes.fd, name)
                if st is None:
                    continue
                if _is_whiteout(changes, name, st, holds_xattr_whiteouts):
                    remove_at(target.fd, name)
                elif stat.S_ISDIR(st.st_mode):
                    existing = entry_status(target.fd, name)
                    made = existing is None or not stat.S_ISDIR(existing.st_mode)
                    if made:
                        remove_at(target.fd, name)
                        os.mkdir(name, 0o700, dir_fd=target.fd)
                    subdirectories.append((name, st, made))
                else:
                    remove_at(target.fd, name)
                    copier.copy(changes, name, st, target)
            return subdirectories

        def enter(
            subdirectory: tuple[str, os.stat_result, bool],
        ) -> list[tuple[str, os.stat_result, bool]] | None:
            name, _, made = subdirectory
            if changes.down(name) is None:
                return None
            if target.down(name) is None:
                changes.up()
                raise FileNotFoundError(errno.ENOENT, "removed from the base meanwhile", name)
            mark = _overlay_mark(changes.fd)
            if mark == _HIDES and not made:
                remove_children(target)
            return apply_entries(mark == _HOLDS_XATTR_WHITEOUTS)

        def leave(subdirectory: tuple[str, os.stat_result, bool]) -> None:
            name, st, _ = subdirectory
            changes.up()
            target.up()
            copier.finish_directory(changes.fd, name, st, target.fd)

        root_marked = _overlay_mark(changes.fd) == _HOLDS_XATTR_WHITEOUTS
        depth_first(apply_entries(root_marked), enter, leave)
        copier.done()


def reset(upper: Path) -> None:
    """Throw every change away: empty `upper`, keeping the directory, its mode and owner."""
    empty_directory(upper)


class _Copier:
    """Copies entries with owner, mode, times, xattrs, hard links and holes, counting them."""

    def __init__(
        self,
        progress: Callable[[int], None] | None,
        target_top: Path,
        files: RegularFiles,
        *,
        overlay_xattrs: bool = False,
    ) -> None:
        self._progress = progress
        self._overlay_xattrs = overlay_xattrs
        self._files = files
        self._count = 0
        self._reported = -1
        self._target_top = target_top
        # The first copy of each inode with several names, to link the others to: the
        # names of its directory below the target top, and its own name.
        self._first_copies: dict[tuple[int, int], tuple[tuple[str, ...], str]] = {}

    def copy(self, source: Cursor, name: str, st: os.stat_result, target: Cursor) -> None:
        """Make the absent entry `name` of the target directory a copy of the source's;
        not for a directory (made empty by the caller, and given its metadata by
        `finish_directory` once its content is in place)."""
        if st.st_nlink > 1:
            key = (st.st_dev, st.st_ino)
            first = self._first_copies.get(key)
            if first is not None:
                self._link(first, target.fd, name)
                self._counted()
                return
            self._first_copies[key] = (tuple(target.names), name)
        if stat.S_ISREG(st.st_mode):
            fd, st = self._files.open(source.fd, name)
            if fd is not None:
                try:
                    _copy_content(fd, st, name, target.fd)
                finally:
                    os.close(fd)
        if stat.S_ISDIR(st.st_mode):
            return  # made since it was listed as something else: gone from the listing
        if stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(name, dir_fd=source.fd), name, dir_fd=target.fd)
        elif stat.S_ISFIFO(st.st_mode):
            os.mkfifo(name, 0o600, dir_fd=target.fd)
        elif not stat.S_ISREG(st.st_mode):
            os.mknod(name, stat.S_IFMT(st.st_mode) | 0o600, st.st_rdev, dir_fd=target.fd)
        _copy_metadata(source.fd, name, st, target.fd, self._overlay_xattrs)
        self._counted()

    def finish_directory(
        self, source_fd: int, name: str, st: os.stat_result, target_fd: int
    ) -> None:
        _copy_metadata(source_fd, name, st, target_fd, self._overlay_xattrs)
        self._counted()

    def done(self) -> None:
        if self._progress is not None and self._reported != self._count:
            self._progress(self._count)

    def _link(self, first: tuple[tuple[str, ...], str], target_fd: int, name: str) -> None:
        """Link `name` to the first copy, reached from the target top one directory at a
        time (its path may be longer than PATH_MAX)."""
        directories, first_name = first
        with Cursor.open(self._target_top) as cursor:
            for directory in directories:
                if cursor.down(directory) is None:
                    raise FileNotFoundError(errno.ENOENT, "gone from the copy", directory)
            os.link(
                first_name, name, src_dir_fd=cursor.fd, dst_dir_fd=target_fd, follow_symlinks=False
            )

    def _counted(self) -> None:
        self._count += 1
        if self._progress is not None and self._count % _PROGRESS_EVERY == 0:
            self._progress(self._count)
            self._reported = self._count


def _copy_content(source_fd: int, st: os.stat_result, name: str, target_fd: int) -> None:
    """A copy of the open regular file as the new file `name`, holes kept."""
    size = st.st_size
    extents = _data_extents(source_fd, size) if st.st_blocks * 512 < size else [(0, size)]
    copy_fd = os.open(name, _CREATE_FLAGS, 0o600, dir_fd=target_fd)
    try:
        for offset, length in extents:
            os.lseek(copy_fd, offset, os.SEEK_SET)
            end = offset + length
            while offset < end:
                sent = os.sendfile(copy_fd, source_fd, offset, min(end - offset, _CHUNK))
                if not sent:
                    break  # shrank meanwhile: the copy is of what was there
                offset += sent
        os.ftruncate(copy_fd, size)
    finally:
        os.close(copy_fd)


def _copy_metadata(
    source_fd: int,
    name: str | None,
    st: os.stat_result,
    target_fd: int,
    overlay_xattrs: bool = False,
) -> None:
    """Give the entry `name` of the target directory the metadata of the source's; with
    no name, the target directory itself that of the source directory. The overlay's
    own xattrs are carried over only with `overlay_xattrs`."""
    source: _Target = source_fd if name is None else f"/proc/self/fd/{source_fd}/{name}"
    target: _Target = target_fd if name is None else f"/proc/self/fd/{target_fd}/{name}"
    follows = name is None
    # chown drops set-id bits and security.capability, so it comes before both.
    if name is None:
        os.chown(target_fd, st.st_uid, st.st_gid)
    else:
        os.chown(name, st.st_uid, st.st_gid, dir_fd=target_fd, follow_symlinks=False)
    wanted = _all_xattrs(source) if overlay_xattrs else _xattrs(source)
    for key in _xattr_names(target):
        if key not in wanted:
            os.removexattr(target, key, follow_symlinks=follows)
    for key, value in wanted.items():
        os.setxattr(target, key, value, follow_symlinks=follows)
    # Linux has no mode for a symlink itself.
    if name is None:
        os.chmod(target_fd, stat.S_IMODE(st.st_mode))
        os.utime(target_fd, ns=(st.st_atime_ns, st.st_mtime_ns))
        return
    if not stat.S_ISLNK(st.st_mode):
        os.chmod(name, stat.S_IMODE(st.st_mode), dir_fd=target_fd)
    os.utime(name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=target_fd, follow_symlinks=False)


def _all_xattrs(target: _Target) -> dict[str, bytes]:
    """Every xattr of `target`, the overlay's own too."""
    follows = isinstance(target, int)
    try:
        names = os.listxattr(target, follow_symlinks=follows)
    except OSError as error:
        if error.errno == errno.ENOTSUP:
            return {}
        raise
    return {name: os.getxattr(target, name, follow_symlinks=follows) for name in names}
