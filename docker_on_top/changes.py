"""A volume's changes: its overlay upper directory, read against its base.

What the kernel leaves in an upper directory (volumes mount with index, metacopy,
redirect_dir and xino off, and without `userxattr`):

- a file or directory made or changed through the overlay, copied up whole;
- a deletion as a *whiteout*: a character device 0:0 (often one inode shared by all the
  whiteouts of the mount), or, written by other tools, a zero-size regular file with the
  xattr `trusted.overlay.whiteout` in a directory marked `trusted.overlay.opaque` = "x",
  as the overlayfs documentation requires. The kernel (6.18) hides such a file from
  lookups anywhere, but from listings only in a marked directory of a lower layer (as the
  upper is in `merge_into`, and an export wherever it is used). An unmarked one is taken
  here for the empty file it is: that spares a stat of every file, ten times the walk;
- a directory deleted and made again as an *opaque* directory (`trusted.overlay.opaque`
  = "y"): nothing of the base directory at that path shows through it. The value "x"
  only marks a directory that may hold xattr whiteouts; it hides nothing;
- a renamed base directory as a copy plus a whiteout: without redirect_dir, rename(2)
  of a base directory fails with EXDEV and tools fall back to copy and delete.

Only the `trusted.overlay.` namespace has a meaning here: without `userxattr` the kernel
treats `user.overlay.*` as plain data that a container may set on any file, and honouring
it would make these functions disagree with what the containers saw. No overlay xattr of
either namespace is ever carried into a copy or an export, though: whatever overlay later
uses the result as a layer could take them for its own.

The upper root is made by the plugin, not copied up from the base, so its own metadata is
never reported or applied as a change; the kernel ignores an opaque mark on it, and so do
these functions (its "x" mark counts). Reading `trusted.*` xattrs needs root.

`diff` and `export_layer` walk with the file types that the directory listings give, so
that `diff` makes syscalls per directory, not per file (but for special files, files in
directories marked "x", and names looked up in a base directory too large to list);
`export_layer` writes its tar headers itself, as tarfile costs more per entry than the
syscalls that read the entry. See docs/performance.md.
"""

from __future__ import annotations

import errno
import gc
import os
import shutil
import stat
import tempfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from operator import attrgetter
from pathlib import Path
from typing import BinaryIO, NamedTuple, Union

from . import kernel

_OPAQUE_XATTR = "trusted.overlay.opaque"
_WHITEOUT_XATTR = "trusted.overlay.whiteout"
_OVERLAY_XATTR_PREFIXES = ("trusted.overlay.", "user.overlay.")
# Values of _OPAQUE_XATTR: the directory hides the base one, or may hold xattr whiteouts.
_HIDES = b"y"
_HOLDS_XATTR_WHITEOUTS = b"x"

# OCI image-layer markers (image-spec layer.md, "Whiteouts").
_WHITEOUT_PREFIX = ".wh."
_OPAQUE_MARKER = ".wh..wh..opq"

_PROGRESS_EVERY = 1000
# Bytes per read of a large file, and per write of an export.
_CHUNK = 1 << 20
# How export_layer opens a regular file to read it.
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC

# Listing a base directory costs about a tenth of an lstat per name, and its st_size is
# about 20 bytes a name (tmpfs exactly; ext4, xfs and btrfs are of that order). So `diff`
# lists a base directory unless its st_size is over this many bytes per entry of the upper
# directory, and then looks each upper name up instead.
_BASE_LISTING_BYTES_PER_UPPER_ENTRY = 200


@dataclass
class Change:
    """One line of `docker diff`: kind "A" (added), "C" (changed) or "D" (deleted)."""

    # Not frozen: a frozen dataclass takes twice as long to make, and `diff` makes one per
    # upper entry.
    kind: str
    path: str


class _DiffFolder(NamedTuple):
    """An upper directory waiting to be read by `diff`."""

    upper: str
    # Its path in the view, with a trailing "/".
    view: str
    # The base directory at the same path, when there is one to merge with or hide.
    base: str | None
    # Whether that base directory's entries are hidden (opaque here or above).
    hides: bool
    holds_xattr_whiteouts: bool


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
    found: list[Change] = []
    root_mark = _overlay_mark(str(upper))
    pending = [_DiffFolder(str(upper), "/", str(base), False, root_mark == _HOLDS_XATTR_WHITEOUTS)]
    with _cyclic_gc_paused():
        while pending:
            _diff_folder(pending.pop(), found, pending)
    found.sort(key=attrgetter("path"))
    return found


@contextmanager
def _cyclic_gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector, process-wide. `diff` makes a Change per upper
    entry and none refers to another, yet each of the collector's passes goes over all
    of them: it took a tenth of diff's time. (The command line calls `diff`, not the
    daemon's request threads.)"""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _diff_folder(folder: _DiffFolder, found: list[Change], pending: list[_DiffFolder]) -> None:
    """Add the changes of one upper directory's entries to `found`, its subdirectories to
    `pending`. The loop runs once per upper entry, with no syscall for a plain file unless
    its directory is marked "x" or the base directory is too large to list."""
    upper, view, base, hides, holds_xattr_whiteouts = folder
    with os.scandir(upper) as scan:
        entries = list(scan)
    # Base names, True for a directory; None when an lstat per name is cheaper.
    base_names: dict[str, bool] | None = {}
    if base is not None:
        base_names = _base_names(base, len(entries), listing_needed=hides)
    unmatched = set(base_names) if hides and base_names else set()
    for entry in entries:
        name = entry.name
        in_base = base_names.get(name) if base_names is not None else _base_kind(f"{base}/{name}")
        if entry.is_file(follow_symlinks=False):
            whiteout = holds_xattr_whiteouts and _is_xattr_whiteout(entry)
        elif entry.is_dir(follow_symlinks=False):
            whiteout = False
            mark = _overlay_mark(entry.path)
            merges = in_base is True
            pending.append(
                _DiffFolder(
                    entry.path,
                    f"{view}{name}/",
                    f"{base}/{name}" if merges else None,
                    merges and (hides or mark == _HIDES),
                    mark == _HOLDS_XATTR_WHITEOUTS,
                )
            )
        else:
            whiteout = _is_device_whiteout(entry)
        if whiteout:
            # Under a hiding directory the name is left unmatched and reported below.
            if in_base is not None and not hides:
                found.append(Change("D", view + name))
            continue
        if hides:
            unmatched.discard(name)
        found.append(Change("A" if in_base is None else "C", view + name))
    found.extend(Change("D", view + name) for name in unmatched)


def _base_names(
    directory: str, upper_entries: int, *, listing_needed: bool
) -> dict[str, bool] | None:
    """The names in a base directory, True for a subdirectory; None when looking each upper
    name up is cheaper than listing it (a huge base directory, few upper entries)."""
    if (
        not listing_needed
        and os.lstat(directory).st_size > upper_entries * _BASE_LISTING_BYTES_PER_UPPER_ENTRY
    ):
        return None
    with os.scandir(directory) as scan:
        return {entry.name: entry.is_dir(follow_symlinks=False) for entry in scan}


def _base_kind(path: str) -> bool | None:
    """True for a directory at `path`, False for anything else, None when absent."""
    found = _lstat(path)
    return None if found is None else stat.S_ISDIR(found.st_mode)


def _is_xattr_whiteout(entry: os.DirEntry[str]) -> bool:
    """For a regular file in a directory marked as holding xattr whiteouts."""
    return (
        entry.stat(follow_symlinks=False).st_size == 0
        and _getxattr(entry.path, _WHITEOUT_XATTR) is not None
    )


def _is_device_whiteout(entry: os.DirEntry[str]) -> bool:
    """For an entry that is neither a regular file nor a directory."""
    if entry.is_symlink():
        return False
    st = entry.stat(follow_symlinks=False)
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def export_layer(upper: Path, out: BinaryIO) -> None:
    """Write the changes to `out` as an uncompressed OCI image layer (PAX tar), streaming.

    Whiteouts become empty files `.wh.NAME` and an opaque directory gets an empty
    `DIR/.wh..wh..opq` after its own entry. Entries keep mode, owner, symlink target,
    device numbers and xattrs (`SCHILY.xattr.*`, overlay ones left out); the second and
    later names of one inode are hard-link entries. As docker does, mtimes are whole
    seconds (a fractional one costs a PAX record per entry) and owner names are left out
    (the ids are those of the containers, not of this host). Sockets have no tar form and
    are left out. Each directory's entries come in name order, its subdirectories' content
    after them. Raises ValueError for a name starting with `.wh.`, which a layer cannot
    hold as content; what was written by then is not a valid layer.
    """
    layer = _LayerWriter(out)
    # The first name of each inode with several names, for the others to link to.
    first_names: dict[tuple[int, int], bytes] = {}
    top = os.fsencode(upper)
    # (upper directory, its name in the layer with a trailing "/", marked for xattr whiteouts)
    pending = [(top, b"", _overlay_mark(top) == _HOLDS_XATTR_WHITEOUTS)]
    while pending:
        directory, prefix, holds_xattr_whiteouts = pending.pop()
        with os.scandir(directory) as scan:
            entries = sorted(scan, key=attrgetter("name"))
        # Files are opened relative to their directory: a shorter path lookup per file.
        directory_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            subdirectories = _export_entries(
                layer, entries, directory_fd, prefix, holds_xattr_whiteouts, first_names
            )
        finally:
            os.close(directory_fd)
        # Popped last first: the subdirectories' content comes in name order.
        pending.extend(reversed(subdirectories))
    layer.finish()


def _export_entries(
    layer: _LayerWriter,
    entries: list[os.DirEntry[bytes]],
    directory_fd: int,
    prefix: bytes,
    holds_xattr_whiteouts: bool,
    first_names: dict[tuple[int, int], bytes],
) -> list[tuple[bytes, bytes, bool]]:
    """Add one directory's entries to the layer; returns its subdirectories to export
    next, as (upper directory, name in the layer, marked for xattr whiteouts)."""
    subdirectories = []
    for entry in entries:
        if entry.name.startswith(_WHITEOUT_PREFIX_BYTES):
            raise ValueError(
                f"cannot export /{os.fsdecode(prefix + entry.name)}: in an image layer a"
                f" name starting with {_WHITEOUT_PREFIX} means a deletion"
            )
        name = prefix + entry.name
        if entry.is_file(follow_symlinks=False):
            fd = os.open(entry.name, _READ_FLAGS, dir_fd=directory_fd)
            try:
                _export_file(layer, fd, name, holds_xattr_whiteouts, first_names)
            finally:
                os.close(fd)
            continue
        st = entry.stat(follow_symlinks=False)
        mode = st.st_mode
        if stat.S_ISDIR(mode):
            layer.add(name + b"/", _DIRTYPE, st, xattrs=_xattrs(entry.path))
            mark = _overlay_mark(entry.path)
            if mark == _HIDES:
                layer.add(name + _OPAQUE_MARKER_NAME, _REGTYPE, st, mode=mode & 0o777)
            subdirectories.append((entry.path, name + b"/", mark == _HOLDS_XATTR_WHITEOUTS))
        elif stat.S_ISCHR(mode) and st.st_rdev == 0:
            layer.add_whiteout(prefix, entry.name, st)
        elif stat.S_ISSOCK(mode):
            continue
        elif not _links_to_earlier_name(layer, name, st, first_names):
            _export_special(layer, entry.path, name, st)
    return subdirectories


def _export_file(
    layer: _LayerWriter,
    fd: int,
    name: bytes,
    holds_xattr_whiteouts: bool,
    first_names: dict[tuple[int, int], bytes],
) -> None:
    """A regular file's entry, described and sized from the open file so they agree."""
    st = os.fstat(fd)
    size = st.st_size
    if size == 0 and holds_xattr_whiteouts and _getxattr(fd, _WHITEOUT_XATTR) is not None:
        parent, slash, own_name = name.rpartition(b"/")
        layer.add_whiteout(parent + slash, own_name, st)
        return
    if _links_to_earlier_name(layer, name, st, first_names):
        return
    layer.add(name, _REGTYPE, st, size=size, xattrs=_xattrs(fd))
    layer.copy_content(fd, size, name)


def _links_to_earlier_name(
    layer: _LayerWriter, name: bytes, st: os.stat_result, first_names: dict[tuple[int, int], bytes]
) -> bool:
    """Add a hard-link entry when `name` is not the first name of its inode met so far."""
    if st.st_nlink < 2:
        return False
    first = first_names.setdefault((st.st_dev, st.st_ino), name)
    if first == name:
        return False
    layer.add(name, _LNKTYPE, st, linkname=first)
    return True


def _export_special(layer: _LayerWriter, path: bytes, name: bytes, st: os.stat_result) -> None:
    """The entry of a symlink, device node or fifo."""
    mode = st.st_mode
    xattrs = _xattrs(path)
    if stat.S_ISLNK(mode):
        layer.add(name, _SYMTYPE, st, linkname=os.readlink(path), xattrs=xattrs)
    elif stat.S_ISFIFO(mode):
        layer.add(name, _FIFOTYPE, st, xattrs=xattrs)
    else:
        kind = _CHRTYPE if stat.S_ISCHR(mode) else _BLKTYPE
        layer.add(name, kind, st, device=st.st_rdev, xattrs=xattrs)


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
    lowers: list[Path],
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
    # The upper directories marked as holding xattr whiteouts ("" for the root).
    marked = {""} if _overlay_mark(upper) == _HOLDS_XATTR_WHITEOUTS else set()
    for entry in _walk(upper):
        source = upper / entry.relative
        destination = base / entry.relative
        mark = None
        if stat.S_ISDIR(entry.stat.st_mode) and not entry.leaving:
            mark = _overlay_mark(source)
            if mark == _HOLDS_XATTR_WHITEOUTS:
                marked.add(entry.relative)
        if entry.leaving:
            copier.finish_directory(source, entry.stat, destination)
        elif _is_whiteout(source, entry.stat, entry.relative.rpartition("/")[0] in marked):
            _remove(destination)
        elif stat.S_ISDIR(entry.stat.st_mode) and _is_real_directory(destination):
            if mark == _HIDES:
                _empty(destination)
        else:
            _remove(destination)
            copier.copy(source, entry.stat, destination)
    copier.done()


def reset(upper: Path) -> None:
    """Throw every change away: empty `upper`, keeping the directory, its mode and owner."""
    _empty(upper)


@dataclass(frozen=True)
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


def _require_directory(path: Path) -> None:
    if not stat.S_ISDIR(os.stat(path).st_mode):
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(path))


def _lstat(path: str | Path) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None


def _is_real_directory(path: Path) -> bool:
    found = _lstat(path)
    return found is not None and stat.S_ISDIR(found.st_mode)


# A path, whose symlink is never followed, or the descriptor of an open file (with which
# the xattr calls refuse follow_symlinks=False: a descriptor has no symlink to follow).
_Target = Union[int, str, bytes, Path]


def _getxattr(target: _Target, name: str) -> bytes | None:
    try:
        return os.getxattr(target, name, follow_symlinks=isinstance(target, int))
    except OSError as error:
        if error.errno in (errno.ENODATA, errno.ENOTSUP):
            return None
        raise


def _overlay_mark(directory: str | bytes | Path) -> bytes | None:
    """A directory's `trusted.overlay.opaque` value: _HIDES, _HOLDS_XATTR_WHITEOUTS or None."""
    return _getxattr(directory, _OPAQUE_XATTR)


def _is_whiteout(path: Path, st: os.stat_result, holds_xattr_whiteouts: bool) -> bool:
    if stat.S_ISCHR(st.st_mode):
        return st.st_rdev == 0
    return (
        holds_xattr_whiteouts
        and stat.S_ISREG(st.st_mode)
        and st.st_size == 0
        and _getxattr(path, _WHITEOUT_XATTR) is not None
    )


def _xattr_names(target: _Target) -> list[str]:
    """The names of the xattrs of `target` that are not the overlay's own."""
    try:
        names = os.listxattr(target, follow_symlinks=isinstance(target, int))
    except OSError as error:
        if error.errno == errno.ENOTSUP:
            return []
        raise
    # Most entries have none: the comprehension would cost as much as the syscall.
    if not names:
        return names
    return [name for name in names if not name.startswith(_OVERLAY_XATTR_PREFIXES)]


def _xattrs(target: _Target) -> dict[str, bytes]:
    names = _xattr_names(target)
    if not names:
        return {}
    follows = isinstance(target, int)
    return {name: os.getxattr(target, name, follow_symlinks=follows) for name in names}


# Tar entry types (POSIX ustar typeflag values, and pax's extended header).
_REGTYPE = b"0"
_LNKTYPE = b"1"
_SYMTYPE = b"2"
_CHRTYPE = b"3"
_BLKTYPE = b"4"
_DIRTYPE = b"5"
_FIFOTYPE = b"6"
_PAX_HEADER_TYPE = b"x"

_BLOCK = 512
_ZEROS = bytes(_BLOCK)
# ustar fields: names of up to 100 bytes, octal numbers of up to 7 digits (ids) and 11
# digits (size, mtime). Whatever does not fit goes into a pax record.
_NAME_BYTES = 100
_ID_LIMIT = 8**7
_SIZE_LIMIT = 8**11
_PAX_HEADER_NAME = b"././@PaxHeader"

_WHITEOUT_PREFIX_BYTES = _WHITEOUT_PREFIX.encode()
_OPAQUE_MARKER_NAME = b"/" + _OPAQUE_MARKER.encode()


class _LayerWriter:
    """Writes tar entries in the pax format to a binary stream, gathered into large writes.

    A ustar header describes most entries; a pax extended header comes before one with
    xattrs, a name or link name over 100 bytes, or a number too large for its field.
    """

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self._pending = bytearray()

    def add(
        self,
        name: bytes,
        kind: bytes,
        st: os.stat_result,
        *,
        mode: int | None = None,
        size: int = 0,
        linkname: bytes = b"",
        device: int = 0,
        xattrs: dict[str, bytes] | None = None,
    ) -> None:
        """The header of one entry (the caller writes a regular file's content after it)."""
        uid, gid, mtime = st.st_uid, st.st_gid, int(st.st_mtime)
        if (
            xattrs
            or len(name) > _NAME_BYTES
            or len(linkname) > _NAME_BYTES
            or not (0 <= uid < _ID_LIMIT and 0 <= gid < _ID_LIMIT and 0 <= mtime < _SIZE_LIMIT)
            or size >= _SIZE_LIMIT
        ):
            uid, gid, size, mtime = self._add_pax_header(
                name, linkname, uid, gid, size, mtime, xattrs or {}
            )
        self._pending += _ustar_header(
            name[:_NAME_BYTES],
            kind,
            st.st_mode if mode is None else mode,
            uid,
            gid,
            size,
            mtime,
            linkname[:_NAME_BYTES],
            device,
        )
        if len(self._pending) >= _CHUNK:
            self._write_pending()

    def _add_pax_header(
        self,
        name: bytes,
        linkname: bytes,
        uid: int,
        gid: int,
        size: int,
        mtime: int,
        xattrs: dict[str, bytes],
    ) -> tuple[int, int, int, int]:
        """The pax header for what the ustar header cannot hold; returns the uid, gid, size
        and mtime for the ustar header, 0 for those that moved to the pax header."""
        records = [(b"SCHILY.xattr." + os.fsencode(key), value) for key, value in xattrs.items()]
        if len(name) > _NAME_BYTES:
            records.append((b"path", name))
        if len(linkname) > _NAME_BYTES:
            records.append((b"linkpath", linkname))
        fields = []
        for key, value, limit in (
            (b"uid", uid, _ID_LIMIT),
            (b"gid", gid, _ID_LIMIT),
            (b"size", size, _SIZE_LIMIT),
            (b"mtime", mtime, _SIZE_LIMIT),
        ):
            if 0 <= value < limit:
                fields.append(value)
            else:
                records.append((key, b"%d" % value))
                fields.append(0)
        # Values go raw, as GNU tar writes binary xattrs; it would warn about a
        # "hdrcharset=BINARY" record, and neither it nor Go's archive/tar needs one.
        payload = b"".join(_pax_record(key, value) for key, value in records)
        self._pending += _ustar_header(
            _PAX_HEADER_NAME, _PAX_HEADER_TYPE, 0, 0, 0, len(payload), 0, b"", 0
        )
        self._pending += payload
        self._pad(len(payload))
        uid, gid, size, mtime = fields
        return uid, gid, size, mtime

    def add_whiteout(self, prefix: bytes, name: bytes, st: os.stat_result) -> None:
        """The OCI whiteout of `name` in the directory `prefix` (empty, or ending in "/")."""
        self.add(prefix + _WHITEOUT_PREFIX_BYTES + name, _REGTYPE, st, mode=0o600)

    def copy_content(self, fd: int, size: int, name: bytes) -> None:
        """The content of the entry just added: `size` bytes read from `fd`, padded."""
        remaining = size
        while remaining:
            chunk = os.read(fd, min(remaining, _CHUNK))
            if not chunk:
                raise OSError(errno.EIO, f"/{os.fsdecode(name)} shrank while it was exported")
            if len(chunk) == _CHUNK:
                self._write_pending()
                self._out.write(chunk)
            else:
                self._pending += chunk
            remaining -= len(chunk)
        self._pad(size)

    def _pad(self, size: int) -> None:
        """Fill the last block of `size` bytes of content, and write out a large batch."""
        self._pending += _ZEROS[: -size % _BLOCK]
        if len(self._pending) >= _CHUNK:
            self._write_pending()

    def finish(self) -> None:
        """The end-of-archive marker (two zero blocks), and everything out to `out`."""
        self._pending += _ZEROS + _ZEROS
        self._write_pending()
        self._out.flush()

    def _write_pending(self) -> None:
        self._out.write(self._pending)
        self._pending.clear()


def _ustar_header(
    name: bytes,
    kind: bytes,
    mode: int,
    uid: int,
    gid: int,
    size: int,
    mtime: int,
    linkname: bytes,
    device: int,
) -> bytes:
    before_checksum = b"%s%07o\0%07o\0%07o\0%011o\0%011o\0" % (
        name.ljust(_NAME_BYTES, b"\0"),
        mode & 0o7777,
        uid,
        gid,
        size,
        mtime,
    )
    if linkname or device:
        after_checksum = _after_checksum(kind, linkname, device)
        after_sum = _byte_sum(after_checksum)
    else:
        after_checksum, after_sum = _PLAIN_AFTER_CHECKSUM[kind]
    # The checksum sums the header's bytes, its own field counted as 8 spaces.
    checksum = _byte_sum(before_checksum) + after_sum + 8 * ord(" ")
    return before_checksum + b"%06o\0 " % checksum + after_checksum


def _after_checksum(kind: bytes, linkname: bytes, device: int) -> bytes:
    """The header fields after the checksum: type, link name, magic and version, empty
    owner names, device numbers; then an empty name prefix (long names go to pax)."""
    return b"%s%sustar\x0000%s%07o\0%07o\0%s" % (
        kind,
        linkname.ljust(_NAME_BYTES, b"\0"),
        bytes(64),
        os.major(device),
        os.minor(device),
        bytes(167),
    )


def _byte_sum(data: bytes) -> int:
    """The sum of the bytes of one side of a header, from zlib in C (sum() in Python costs
    a tenth of the time spent per entry). Adler-32's low half is 1 + that sum modulo 65521,
    which is exact here: the 148 bytes before the checksum field, or the at most 125
    non-zero bytes after it, sum to less than 65521."""
    return (zlib.adler32(data) & 0xFFFF) - 1


# Those fields, and their byte sum, for each kind of entry without link name or device.
_PLAIN_AFTER_CHECKSUM = {
    kind: (fields, _byte_sum(fields))
    for kind in (
        _REGTYPE,
        _LNKTYPE,
        _SYMTYPE,
        _CHRTYPE,
        _BLKTYPE,
        _DIRTYPE,
        _FIFOTYPE,
        _PAX_HEADER_TYPE,
    )
    for fields in [_after_checksum(kind, b"", 0)]
}


def _pax_record(key: bytes, value: bytes) -> bytes:
    """A pax record: its length, a space, KEY=VALUE and a newline; the length counts its
    own digits."""
    rest = len(key) + len(value) + 3
    length = rest + 1
    while length != rest + len(str(length)):
        length = rest + len(str(length))
    return b"%d %s=%s\n" % (length, key, value)


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
