"""A volume's changes: its overlay upper directory, read against its base.

What the kernel leaves in an upper directory (volumes mount with index, metacopy,
redirect_dir and xino off, and without `userxattr`):

- a file or directory made or changed through the overlay, copied up whole;
- a deletion as a *whiteout*: a character device 0:0 (often one inode shared by all the
  whiteouts of the mount), or, written by other tools, a zero-size regular file with the
  xattr `trusted.overlay.whiteout`;
- a directory deleted and made again as an *opaque* directory (`trusted.overlay.opaque`
  = "y"): nothing of the base directory at that path shows through it. The value "x"
  only says that the directory may hold xattr whiteouts; it hides nothing;
- a renamed base directory as a copy plus a whiteout: without redirect_dir, rename(2)
  of a base directory fails with EXDEV and tools fall back to copy and delete.

Only the `trusted.overlay.` namespace has a meaning here: without `userxattr` the kernel
treats `user.overlay.*` as plain data that a container may set on any file, and honouring
it would make these functions disagree with what the containers saw. No overlay xattr of
either namespace is ever carried into a copy or an export, though: whatever overlay later
uses the result as a layer could take them for its own.

The upper root is made by the plugin, not copied up from the base, so its own metadata is
never reported or applied as a change; the kernel ignores an opaque mark on it, and so do
these functions. Reading `trusted.*` xattrs needs root.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from . import kernel

_OPAQUE_XATTR = "trusted.overlay.opaque"
_WHITEOUT_XATTR = "trusted.overlay.whiteout"
_OVERLAY_XATTR_PREFIXES = ("trusted.overlay.", "user.overlay.")

# OCI image-layer markers (image-spec layer.md, "Whiteouts").
_WHITEOUT_PREFIX = ".wh."
_OPAQUE_MARKER = ".wh..wh..opq"

_PROGRESS_EVERY = 1000
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Change:
    """One line of `docker diff`: kind "A" (added), "C" (changed) or "D" (deleted)."""

    kind: str
    path: str


def diff(upper: Path, base: Path) -> list[Change]:
    """The changes of the merged view against the base, sorted by path ("/dir/file").

    The rule compares paths: "A" for a path of the merged view that the base lacks; "D"
    for a base path that the merged view lacks, only the topmost one of a deleted tree (as
    docker diff lists a deleted directory); "C" for a path in both whose entry comes from
    the upper directory, that is, which was written, copied up or made again.
    So a directory copied up only because something inside it changed is "C", and an
    entry of an opaque directory is "C" when the hidden base directory had that name too:
    the path existed before, whether or not the new entry descends from the old one.
    A whiteout with nothing below it (the base changed since) is no change.
    """
    _require_directory(base)
    changes: list[Change] = []
    shadows = {"": _Shadow.of(base, hides=False)}
    for entry in _walk(upper):
        if entry.leaving:
            changes.extend(shadows.pop(entry.relative).deletions(entry.relative))
            continue
        parent, _, name = entry.relative.rpartition("/")
        shadow = shadows[parent]
        base_path = None if shadow.base is None else shadow.base / name
        in_base = None if base_path is None else _lstat(base_path)
        path = "/" + entry.relative
        if _is_whiteout(upper / entry.relative, entry.stat):
            # Under a hiding directory the name is left unmatched and reported on leaving.
            if in_base is not None and not shadow.hides:
                changes.append(Change("D", path))
            continue
        shadow.unmatched.discard(name)
        changes.append(Change("A" if in_base is None else "C", path))
        if stat.S_ISDIR(entry.stat.st_mode):
            merges = in_base is not None and stat.S_ISDIR(in_base.st_mode)
            shadows[entry.relative] = _Shadow.of(
                base_path if merges else None,
                hides=shadow.hides or _is_opaque(upper / entry.relative),
            )
    changes.extend(shadows.pop("").deletions(""))
    return sorted(changes, key=lambda change: change.path)


def export_layer(upper: Path, out: BinaryIO) -> None:
    """Write the changes to `out` as an uncompressed OCI image layer (PAX tar), streaming.

    Whiteouts become empty files `.wh.NAME` and an opaque directory gets an empty
    `DIR/.wh..wh..opq` after its own entry. Entries keep mode, owner, symlink target,
    device numbers and xattrs (`SCHILY.xattr.*`, overlay ones left out); the second and
    later names of one inode are hard-link entries. As docker does, mtimes are whole
    seconds (a fractional one costs a PAX record per entry) and owner names are left out
    (the ids are those of the containers, not of this host). Sockets have no tar form and
    are left out. Raises ValueError for a name starting with `.wh.`, which a layer cannot
    hold as content; what was written by then is not a valid layer.
    """
    first_names: dict[tuple[int, int], str] = {}
    for entry in _walk(upper):
        if entry.leaving:
            continue
        path = upper / entry.relative
        st = entry.stat
        parent, _, name = entry.relative.rpartition("/")
        if name.startswith(_WHITEOUT_PREFIX):
            raise ValueError(
                f"cannot export /{entry.relative}: in an image layer a name starting with"
                f" {_WHITEOUT_PREFIX} means a deletion"
            )
        if _is_whiteout(path, st):
            info = _tar_info(_join(parent, _WHITEOUT_PREFIX + name), st, tarfile.REGTYPE)
            info.mode = 0o600
            _write_header(out, info)
            continue
        if stat.S_ISSOCK(st.st_mode):
            continue
        if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1:
            first = first_names.setdefault((st.st_dev, st.st_ino), entry.relative)
            if first != entry.relative:
                info = _tar_info(entry.relative, st, tarfile.LNKTYPE)
                info.linkname = first
                _write_header(out, info)
                continue
        if stat.S_ISREG(st.st_mode):
            _write_file(out, path, entry.relative)
        elif stat.S_ISDIR(st.st_mode):
            _write_header(out, _with_xattrs(_tar_info(entry.relative, st, tarfile.DIRTYPE), path))
            if _is_opaque(path):
                marker = _tar_info(_join(entry.relative, _OPAQUE_MARKER), st, tarfile.REGTYPE)
                marker.mode &= 0o777
                _write_header(out, marker)
        else:
            _write_header(out, _with_xattrs(_special_tar_info(entry.relative, st, path), path))
    out.write(bytes(2 * tarfile.BLOCKSIZE))
    out.flush()


def changes_size(upper: Path) -> int:
    """Bytes held by the changes: the sizes of the regular files, each inode once."""
    total = 0
    linked: set[tuple[int, int]] = set()
    for entry in _walk(upper):
        st = entry.stat
        if not stat.S_ISREG(st.st_mode):
            continue
        if st.st_nlink > 1:
            if (st.st_dev, st.st_ino) in linked:
                continue
            linked.add((st.st_dev, st.st_ino))
        total += st.st_size
    return total


def merge_into(
    upper: Path,
    base: Path,
    target: Path,
    *,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Copy the merged view (base plus changes) into the new directory `target`.

    The view is a read-only overlay of both layers, so it is exactly what the kernel shows
    the containers; the volume should not be in use, or the copy is of a moving target.
    The copy is built in a hidden sibling of `target` and renamed into place without
    replacing anything, so a failure leaves nothing at `target`. Raises FileExistsError
    when `target` exists, and ValueError when it would lie inside either layer (the copy
    would then show up in its own source). `progress` gets the count of entries copied,
    every 1000 entries and at the end.
    """
    if os.path.lexists(target):
        raise FileExistsError(errno.EEXIST, "the target exists already", str(target))
    destination = target.parent.resolve()
    for layer in (upper, base):
        if destination.is_relative_to(layer.resolve()):
            raise ValueError(f"the target {target} lies inside {layer}")
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    view = scratch / "view"
    try:
        view.mkdir()
        kernel.mount_read_only_overlay([upper, base], view)
        try:
            _copy_tree(view, scratch / "tree", progress)
        finally:
            kernel.unmount(view, flags=kernel.MNT_DETACH)
        kernel.rename_noreplace(scratch / "tree", target)
    finally:
        # Never delete through a view that is somehow still mounted.
        if not kernel.is_mount_point(view):
            shutil.rmtree(scratch)


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
    the merged view too. The base root keeps its own metadata (see the module docstring).
    Not atomic: after a failure the base is partly updated, and running this again with
    the same upper finishes the job. `progress` gets the count of upper entries applied,
    every 1000 entries and at the end.
    """
    _require_directory(base)
    copier = _Copier(progress)
    for entry in _walk(upper):
        source = upper / entry.relative
        destination = base / entry.relative
        if entry.leaving:
            copier.finish_directory(source, entry.stat, destination)
        elif _is_whiteout(source, entry.stat):
            _remove(destination)
        elif stat.S_ISDIR(entry.stat.st_mode) and _is_real_directory(destination):
            if _is_opaque(source):
                _empty(destination)
        else:
            _remove(destination)
            copier.copy(source, entry.stat, destination)
    copier.done()


def reset(upper: Path) -> None:
    """Throw every change away: empty `upper`, keeping the directory, its mode and owner."""
    _empty(upper)


@dataclass(frozen=True, slots=True)
class _Entry:
    relative: str
    stat: os.stat_result
    # The second visit of a directory, after its content.
    leaving: bool


def _walk(top: Path) -> Iterator[_Entry]:
    """Every entry below `top`, parents first, names in order, symlinks never followed.

    Each directory comes again (leaving=True) after its content, for metadata that writing
    the content would change (mtime, a read-only mode). Iterative rather than recursive:
    a tree may be deeper than Python's recursion limit.
    """
    pending = _children(top, "")
    while pending:
        entry = pending.pop()
        yield entry
        if not entry.leaving and stat.S_ISDIR(entry.stat.st_mode):
            pending.append(_Entry(entry.relative, entry.stat, leaving=True))
            pending.extend(_children(top, entry.relative))


def _children(top: Path, relative: str) -> list[_Entry]:
    """The entries of one directory, last name first, ready to be popped in order."""
    with os.scandir(top / relative) as scan:
        found = [
            _Entry(_join(relative, item.name), item.stat(follow_symlinks=False), leaving=False)
            for item in scan
        ]
    found.sort(key=lambda entry: entry.relative, reverse=True)
    return found


def _join(relative: str, name: str) -> str:
    return f"{relative}/{name}" if relative else name


@dataclass(slots=True)
class _Shadow:
    """What an upper directory covers in the base, for `diff`."""

    # The base directory at the same path, when there is one to merge with or hide.
    base: Path | None
    # Whether that base directory's entries are hidden (opaque here or above).
    hides: bool
    # Names in a hidden `base` that no upper entry has matched yet.
    unmatched: set[str]

    @classmethod
    def of(cls, base: Path | None, *, hides: bool) -> _Shadow:
        return cls(base, hides, set(os.listdir(base)) if hides and base is not None else set())

    def deletions(self, relative: str) -> Iterator[Change]:
        for name in self.unmatched:
            yield Change("D", "/" + _join(relative, name))


def _require_directory(path: Path) -> None:
    if not stat.S_ISDIR(os.stat(path).st_mode):
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(path))


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None


def _is_real_directory(path: Path) -> bool:
    found = _lstat(path)
    return found is not None and stat.S_ISDIR(found.st_mode)


def _getxattr(path: Path, name: str) -> bytes | None:
    try:
        return os.getxattr(path, name, follow_symlinks=False)
    except OSError as error:
        if error.errno in (errno.ENODATA, errno.ENOTSUP):
            return None
        raise


def _is_opaque(directory: Path) -> bool:
    return _getxattr(directory, _OPAQUE_XATTR) == b"y"


def _is_whiteout(path: Path, st: os.stat_result) -> bool:
    if stat.S_ISCHR(st.st_mode):
        return st.st_rdev == 0
    return (
        stat.S_ISREG(st.st_mode)
        and st.st_size == 0
        and _getxattr(path, _WHITEOUT_XATTR) is not None
    )


def _xattr_names(path: Path) -> list[str]:
    """The names of the xattrs of `path` that are not the overlay's own."""
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as error:
        if error.errno == errno.ENOTSUP:
            return []
        raise
    return [name for name in names if not name.startswith(_OVERLAY_XATTR_PREFIXES)]


def _xattrs(path: Path) -> dict[str, bytes]:
    return {name: os.getxattr(path, name, follow_symlinks=False) for name in _xattr_names(path)}


def _tar_info(name: str, st: os.stat_result, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = stat.S_IMODE(st.st_mode)
    info.uid = st.st_uid
    info.gid = st.st_gid
    info.mtime = int(st.st_mtime)
    return info


def _special_tar_info(name: str, st: os.stat_result, path: Path) -> tarfile.TarInfo:
    """The entry of a symlink, device node or fifo."""
    if stat.S_ISLNK(st.st_mode):
        info = _tar_info(name, st, tarfile.SYMTYPE)
        info.linkname = os.readlink(path)
    elif stat.S_ISFIFO(st.st_mode):
        info = _tar_info(name, st, tarfile.FIFOTYPE)
    else:
        info = _tar_info(name, st, tarfile.CHRTYPE if stat.S_ISCHR(st.st_mode) else tarfile.BLKTYPE)
        info.devmajor = os.major(st.st_rdev)
        info.devminor = os.minor(st.st_rdev)
    return info


def _with_xattrs(info: tarfile.TarInfo, path: Path) -> tarfile.TarInfo:
    # Values are bytes; surrogateescape lets tarfile write them back unchanged.
    info.pax_headers = {
        f"SCHILY.xattr.{name}": value.decode("utf-8", "surrogateescape")
        for name, value in _xattrs(path).items()
    }
    return info


def _write_header(out: BinaryIO, info: tarfile.TarInfo) -> None:
    out.write(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))


def _write_file(out: BinaryIO, path: Path, name: str) -> None:
    """A regular file's header and content, sized from the open file so they agree."""
    with open(os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC), "rb") as file:
        st = os.fstat(file.fileno())
        info = _with_xattrs(_tar_info(name, st, tarfile.REGTYPE), path)
        info.size = st.st_size
        _write_header(out, info)
        remaining = st.st_size
        while remaining:
            chunk = file.read(min(remaining, _CHUNK))
            if not chunk:
                raise OSError(errno.EIO, "the file shrank while it was exported", str(path))
            out.write(chunk)
            remaining -= len(chunk)
    out.write(bytes(-st.st_size % tarfile.BLOCKSIZE))


class _Copier:
    """Copies entries with owner, mode, times, xattrs and hard links, counting them."""

    def __init__(self, progress: Callable[[int], None] | None) -> None:
        self._progress = progress
        self._count = 0
        self._reported = -1
        # The first copy of each inode with several names, to link the others to.
        self._first_copies: dict[tuple[int, int], Path] = {}

    def copy(self, source: Path, st: os.stat_result, target: Path) -> None:
        """Make the absent `target` a copy of `source`; a directory is made empty and gets
        its metadata from `finish_directory`, once its content is in place."""
        if stat.S_ISDIR(st.st_mode):
            os.mkdir(target, 0o700)
            return
        if st.st_nlink > 1:
            first = self._first_copies.setdefault((st.st_dev, st.st_ino), target)
            if first != target:
                os.link(first, target, follow_symlinks=False)
                self._counted()
                return
        if stat.S_ISREG(st.st_mode):
            _copy_content(source, target)
        elif stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(source), target)
        elif stat.S_ISFIFO(st.st_mode):
            os.mkfifo(target, 0o600)
        else:
            os.mknod(target, stat.S_IFMT(st.st_mode) | 0o600, st.st_rdev)
        _copy_metadata(source, st, target)
        self._counted()

    def finish_directory(self, source: Path, st: os.stat_result, target: Path) -> None:
        _copy_metadata(source, st, target)
        self._counted()

    def done(self) -> None:
        if self._progress is not None and self._reported != self._count:
            self._progress(self._count)

    def _counted(self) -> None:
        self._count += 1
        if self._progress is not None and self._count % _PROGRESS_EVERY == 0:
            self._progress(self._count)
            self._reported = self._count


def _copy_content(source: Path, target: Path) -> None:
    source_fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        target_fd = os.open(target, flags, 0o600)
        try:
            while os.sendfile(target_fd, source_fd, None, _CHUNK):
                pass
        finally:
            os.close(target_fd)
    finally:
        os.close(source_fd)


def _copy_metadata(source: Path, st: os.stat_result, target: Path) -> None:
    # chown drops set-id bits and security.capability, so it comes before both.
    os.chown(target, st.st_uid, st.st_gid, follow_symlinks=False)
    wanted = _xattrs(source)
    for name in _xattr_names(target):
        if name not in wanted:
            os.removexattr(target, name, follow_symlinks=False)
    for name, value in wanted.items():
        os.setxattr(target, name, value, follow_symlinks=False)
    # Linux has no mode for a symlink itself.
    if not stat.S_ISLNK(st.st_mode):
        os.chmod(target, stat.S_IMODE(st.st_mode))
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def _copy_tree(source: Path, target: Path, progress: Callable[[int], None] | None) -> None:
    copier = _Copier(progress)
    os.mkdir(target, 0o700)
    for entry in _walk(source):
        if entry.leaving:
            copier.finish_directory(source / entry.relative, entry.stat, target / entry.relative)
        else:
            copier.copy(source / entry.relative, entry.stat, target / entry.relative)
    _copy_metadata(source, os.lstat(source), target)
    copier.done()


def _remove(path: Path) -> None:
    """Delete whatever is at `path`, a whole tree for a directory; nothing when absent."""
    found = _lstat(path)
    if found is None:
        return
    if stat.S_ISDIR(found.st_mode):
        shutil.rmtree(path)
    else:
        path.unlink()


def _empty(directory: Path) -> None:
    for name in os.listdir(directory):
        _remove(directory / name)
