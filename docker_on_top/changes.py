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

Everything in the upper was written by a container, which may still be writing while
`diff`, `export_layer` and `changes_size` run: every walk goes through `walk` (directory
descriptors, O_NOFOLLOW, one descriptor per tree, nothing per entry kept), and a file is
read only once fstat has shown it to be regular. Setuid bits and file capabilities are
kept by exports and copies, as an image layer must keep them.

`diff` walks with the file types that the directory listings give, so that it makes
syscalls per directory, not per file (but for special files, files in directories marked
"x", and names looked up in a base directory too large to list); `export_layer` writes its
tar headers itself, as tarfile costs more per entry than the syscalls that read the entry.
See docs/performance.md.
"""

from __future__ import annotations

import errno
import os
import stat
import tempfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from operator import itemgetter
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple, Union

from . import kernel
from .walk import (
    DIRECTORY_FLAGS,
    Cursor,
    RegularFiles,
    depth_first,
    empty_directory,
    entry_status,
    remove_at,
    remove_children,
    remove_tree,
)

_OPAQUE_XATTR = "trusted.overlay.opaque"
_WHITEOUT_XATTR = "trusted.overlay.whiteout"
_OVERLAY_XATTR_PREFIXES = ("trusted.overlay.", "user.overlay.")
# Values of _OPAQUE_XATTR: the directory hides the base one, or may hold xattr whiteouts.
_HIDES = b"y"
_HOLDS_XATTR_WHITEOUTS = b"x"

# OCI image-layer markers (image-spec layer.md, "Whiteouts").
_WHITEOUT_PREFIX = ".wh."
_OPAQUE_MARKER = ".wh..wh..opq"

_WHITEOUT_NAME_REFUSED = (
    f"not exported: in an image layer a name starting with {_WHITEOUT_PREFIX} means a deletion"
)

_PROGRESS_EVERY = 1000
# Bytes per read of a large file, and per write of an export.
_CHUNK = 1 << 20
# A base given by the user is opened as the kernel mounts it: symlinks in its path count.
_BASE_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC

# Listing a base directory costs about a tenth of an lstat per name, and its st_size is
# about 20 bytes a name (tmpfs exactly; ext4, xfs and btrfs are of that order). So `diff`
# lists a base directory unless its st_size is over this many bytes per entry of the upper
# directory, and then looks each upper name up instead.
_BASE_LISTING_BYTES_PER_UPPER_ENTRY = 200

# Told of what an export leaves out: the entry's path in the layer ("/dir/name"), and why.
Report = Callable[[str, str], None]


def report_nothing(path: str, reason: str) -> None:
    pass


@dataclass
class Change:
    """One line of `docker diff`: kind "A" (added), "C" (changed) or "D" (deleted)."""

    # Not frozen: a frozen dataclass takes twice as long to make, and `diff` makes one per
    # upper entry.
    kind: str
    path: str


# An entry of an upper directory, or a hidden base name, as `diff` reports it: its name;
# "A", "C" or "D" (None for a directory that is no change of its own); and for a
# directory, whether it lies over a base directory (the two are then read together),
# None for anything else. Plain tuples: `diff` makes one per upper entry.
_DiffEntry = tuple[str, Union[str, None], Union[bool, None]]


def diff(upper: Path, base: Path) -> Iterator[Change]:
    """The changes of the merged view against the base, as they are found: each
    directory's entries in name order, a directory's content right after it (paths sorted
    name by name, so "/a/b" comes before "/a-b").

    The rule compares paths: "A" for a path of the merged view that the base lacks; "D"
    for a base path that the merged view lacks, only the topmost one of a deleted tree (as
    docker diff lists a deleted directory); "C" for a path in both whose entry comes from
    the upper directory, that is, which was written, copied up or made again.
    So a directory copied up only because something inside it changed is "C", and an
    entry of an opaque directory is "C" when the hidden base directory had that name too:
    the path existed before, whether or not the new entry descends from the old one.
    A whiteout with nothing below it (the base changed since) is no change. An entry
    removed or replaced while it is read is reported as it was listed, or not at all.
    """
    with Cursor.open(upper) as upper_cursor, Cursor(os.open(base, _BASE_FLAGS)) as base_cursor:
        root_marked = _overlay_mark(upper_cursor.fd) == _HOLDS_XATTR_WHITEOUTS
        pending = [_diff_directory(upper_cursor.fd, base_cursor.fd, False, root_marked)]
        # Per directory entered: whether the base cursor went in with it, and whether its
        # base entries are hidden.
        entered: list[tuple[bool, bool]] = []
        hides = False
        view = "/"
        while pending:
            if not pending[-1]:
                pending.pop()
                if entered:
                    merged, _ = entered.pop()
                    upper_cursor.up()
                    if merged:
                        base_cursor.up()
                    hides = entered[-1][1] if entered else False
                    view = _view_of(upper_cursor)
                continue
            name, kind, over_base = pending[-1].pop()
            if kind is not None:
                yield Change(kind, view + name)
            if over_base is None or upper_cursor.down(name) is None:
                continue
            mark = _overlay_mark(upper_cursor.fd)
            merges = over_base and base_cursor.down(name) is not None
            hides = merges and (hides or mark == _HIDES)
            entered.append((merges, hides))
            view = _view_of(upper_cursor)
            pending.append(
                _diff_directory(
                    upper_cursor.fd,
                    base_cursor.fd if merges else None,
                    hides,
                    mark == _HOLDS_XATTR_WHITEOUTS,
                )
            )


def _view_of(cursor: Cursor) -> str:
    """The path in the view of the cursor's directory, with a trailing "/"."""
    return f"/{cursor.relative()}/" if cursor.names else "/"


def _diff_directory(
    upper_fd: int, base_fd: int | None, hides: bool, holds_xattr_whiteouts: bool
) -> list[_DiffEntry]:
    """The entries of one upper directory as `diff` reports them, last name first (to be
    popped in order). No syscall for a plain file unless the directory is marked "x" or
    the base directory is too large to list."""
    with os.scandir(upper_fd) as scan:
        entries = list(scan)
    # Base names, True for a directory; None when an lstat per name is cheaper.
    base_names: dict[str, bool] | None = {}
    if base_fd is not None:
        base_names = _base_names(base_fd, len(entries), listing_needed=hides)
    unmatched = set(base_names) if hides and base_names else set()
    found: list[_DiffEntry] = []
    for entry in entries:
        name = entry.name
        if base_names is not None:
            in_base = base_names.get(name)
        else:
            assert base_fd is not None
            in_base = _base_kind(base_fd, name)
        over_base = None
        try:
            if entry.is_file(follow_symlinks=False):
                whiteout = holds_xattr_whiteouts and _is_xattr_whiteout(upper_fd, entry)
            elif entry.is_dir(follow_symlinks=False):
                whiteout = False
                over_base = in_base is True
            else:
                whiteout = _is_device_whiteout(entry)
        except FileNotFoundError:
            continue  # removed since it was listed
        if whiteout:
            # Under a hiding directory the name is left unmatched and reported below.
            if in_base is not None and not hides:
                found.append((name, "D", None))
            continue
        if hides:
            unmatched.discard(name)
        found.append((name, "A" if in_base is None else "C", over_base))
    found.extend((name, "D", None) for name in unmatched)
    found.sort(key=itemgetter(0), reverse=True)
    return found


def _base_names(
    directory_fd: int, upper_entries: int, *, listing_needed: bool
) -> dict[str, bool] | None:
    """The names in a base directory, True for a subdirectory; None when looking each upper
    name up is cheaper than listing it (a huge base directory, few upper entries)."""
    if (
        not listing_needed
        and os.fstat(directory_fd).st_size > upper_entries * _BASE_LISTING_BYTES_PER_UPPER_ENTRY
    ):
        return None
    with os.scandir(directory_fd) as scan:
        return {entry.name: entry.is_dir(follow_symlinks=False) for entry in scan}


def _base_kind(directory_fd: int, name: str) -> bool | None:
    """True for a subdirectory `name`, False for anything else, None when absent."""
    found = entry_status(directory_fd, name)
    return None if found is None else stat.S_ISDIR(found.st_mode)


def _is_xattr_whiteout(directory_fd: int, entry: os.DirEntry[str]) -> bool:
    """For a regular file in a directory marked as holding xattr whiteouts."""
    return (
        entry.stat(follow_symlinks=False).st_size == 0
        and _getxattr(f"/proc/self/fd/{directory_fd}/{entry.name}", _WHITEOUT_XATTR) is not None
    )


def _is_device_whiteout(entry: os.DirEntry[str]) -> bool:
    """For an entry that is neither a regular file nor a directory."""
    if entry.is_symlink():
        return False
    st = entry.stat(follow_symlinks=False)
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def export_layer(upper: Path, out: BinaryIO, report: Report = report_nothing) -> None:
    """Write the changes to `out` as an uncompressed OCI image layer (PAX tar), streaming.

    Whiteouts become empty files `.wh.NAME` and an opaque directory gets an empty
    `DIR/.wh..wh..opq` after its own entry. Entries keep mode (setuid bits too), owner,
    symlink target, device numbers and xattrs (`SCHILY.xattr.*`, file capabilities too;
    overlay ones left out); the second and later names of one inode are hard-link
    entries; a file with holes is a sparse entry (PAX format 1.0, as GNU tar writes it)
    holding only its data. As docker does, mtimes are whole seconds (a fractional one
    costs a PAX record per entry) and owner names are left out (the ids are those of the
    containers, not of this host). Each directory's entries come in name order, its
    subdirectories' content after them.

    What a layer cannot carry is left out and told to `report`: a name starting with
    `.wh.` (a layer reads it as a deletion), a socket (no tar form), an xattr whose name
    holds "=" (a PAX record would split it there).
    """
    layer = _LayerWriter(out)
    # The first name of each inode with several names, for the others to link to.
    first_names: dict[tuple[int, int], bytes] = {}
    with Cursor.open(upper) as cursor, RegularFiles() as files:

        def enter(subdirectory: tuple[str, bool]) -> list[tuple[str, bool]] | None:
            name, holds_xattr_whiteouts = subdirectory
            if cursor.down(name) is None:
                return None
            prefix = os.fsencode(cursor.relative()) + b"/"
            return _export_entries(
                layer, files, cursor.fd, prefix, holds_xattr_whiteouts, first_names, report
            )

        root_marked = _overlay_mark(cursor.fd) == _HOLDS_XATTR_WHITEOUTS
        top = _export_entries(layer, files, cursor.fd, b"", root_marked, first_names, report)
        depth_first(top, enter, lambda _: cursor.up())
    layer.finish()


def _export_entries(
    layer: _LayerWriter,
    files: RegularFiles,
    directory_fd: int,
    prefix: bytes,
    holds_xattr_whiteouts: bool,
    first_names: dict[tuple[int, int], bytes],
    report: Report,
) -> list[tuple[str, bool]]:
    """Add one directory's entries to the layer; returns its subdirectories to export
    next, as (name, marked for xattr whiteouts)."""
    with os.scandir(directory_fd) as scan:
        listed = sorted(
            (os.fsencode(entry.name), entry.is_dir(follow_symlinks=False)) for entry in scan
        )
    subdirectories = []
    for raw_name, is_directory in listed:
        name = prefix + raw_name
        if raw_name.startswith(_WHITEOUT_PREFIX_BYTES):
            report(_shown(name), _WHITEOUT_NAME_REFUSED)
            continue
        own_name = os.fsdecode(raw_name)
        try:
            if is_directory:
                marked = _export_directory(layer, directory_fd, own_name, name, report)
                if marked is not None:
                    subdirectories.append((own_name, marked))
                continue
            fd, st = files.open(directory_fd, own_name)
        except FileNotFoundError:
            continue  # removed since it was listed
        if fd is not None:
            try:
                _export_file(layer, fd, st, name, holds_xattr_whiteouts, first_names, report)
            finally:
                os.close(fd)
            continue
        mode = st.st_mode
        if stat.S_ISDIR(mode):
            continue  # made since it was listed as something else: gone from the listing
        if stat.S_ISCHR(mode) and st.st_rdev == 0:
            layer.add_whiteout(prefix, raw_name, st)
        elif stat.S_ISSOCK(mode):
            report(_shown(name), "not exported: a socket has no tar form")
        else:
            try:
                kind, details = _special_entry(directory_fd, own_name, name, st, report)
            except FileNotFoundError:
                continue  # removed since it was listed
            if not _links_to_earlier_name(layer, name, st, first_names):
                layer.add(name, kind, st, **details)
    return subdirectories


def _shown(name: bytes) -> str:
    return "/" + os.fsdecode(name)


def _export_directory(
    layer: _LayerWriter, parent_fd: int, own_name: str, name: bytes, report: Report
) -> bool | None:
    """A directory's entry (and its opaque marker), described from the open directory;
    returns whether it is marked for xattr whiteouts, None when it is no directory now."""
    try:
        fd = os.open(own_name, DIRECTORY_FLAGS, dir_fd=parent_fd)
    except OSError as error:
        if error.errno in (errno.ENOTDIR, errno.ELOOP):
            return None
        raise
    try:
        st = os.fstat(fd)
        layer.add(name + b"/", _DIRTYPE, st, xattrs=_exportable_xattrs(fd, name, report))
        mark = _overlay_mark(fd)
    finally:
        os.close(fd)
    if mark == _HIDES:
        layer.add(name + _OPAQUE_MARKER_NAME, _REGTYPE, st, mode=st.st_mode & 0o777)
    return mark == _HOLDS_XATTR_WHITEOUTS


def _export_file(
    layer: _LayerWriter,
    fd: int,
    st: os.stat_result,
    name: bytes,
    holds_xattr_whiteouts: bool,
    first_names: dict[tuple[int, int], bytes],
    report: Report,
) -> None:
    """A regular file's entry, from the open file `fd` and its status; a file with holes
    becomes a sparse entry. Content is read up to that size."""
    size = st.st_size
    if size == 0 and holds_xattr_whiteouts and _getxattr(fd, _WHITEOUT_XATTR) is not None:
        parent, slash, own_name = name.rpartition(b"/")
        layer.add_whiteout(parent + slash, own_name, st)
        return
    if _links_to_earlier_name(layer, name, st, first_names):
        return
    xattrs = _exportable_xattrs(fd, name, report)
    extents = _data_extents(fd, size) if st.st_blocks * 512 < size else None
    if extents is None or extents == [(0, size)]:
        layer.add(name, _REGTYPE, st, size=size, xattrs=xattrs)
        layer.copy_content(fd, [(0, size)], name)
    else:
        layer.add_sparse(name, st, size, extents, xattrs)
        layer.copy_content(fd, extents, name)


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


def _special_entry(
    directory_fd: int, own_name: str, name: bytes, st: os.stat_result, report: Report
) -> tuple[bytes, dict[str, Any]]:
    """The tar type and header details of a symlink, device node or fifo, none of them
    opened (read before anything is written: the entry may be gone meanwhile)."""
    mode = st.st_mode
    xattrs = _exportable_xattrs(f"/proc/self/fd/{directory_fd}/{own_name}", name, report)
    if stat.S_ISLNK(mode):
        target = os.readlink(os.fsencode(own_name), dir_fd=directory_fd)
        return _SYMTYPE, {"linkname": target, "xattrs": xattrs}
    if stat.S_ISFIFO(mode):
        return _FIFOTYPE, {"xattrs": xattrs}
    kind = _CHRTYPE if stat.S_ISCHR(mode) else _BLKTYPE
    return kind, {"device": st.st_rdev, "xattrs": xattrs}


def _exportable_xattrs(target: _Target, name: bytes, report: Report) -> dict[str, bytes]:
    """The xattrs of an entry that a PAX record can carry; the others are reported."""
    xattrs = _xattrs(target)
    for key in [key for key in xattrs if "=" in key]:
        report(_shown(name), f"xattr {key} not exported: a PAX record cannot hold a name with '='")
        del xattrs[key]
    return xattrs


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


def _copy_tree(source: Path, target: Path, progress: Callable[[int], None] | None) -> None:
    os.mkdir(target, 0o700)
    with Cursor.open(source) as origin, Cursor.open(target) as copy, RegularFiles() as files:
        copier = _Copier(progress, target, files)

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
        _copy_metadata(origin.fd, None, os.fstat(origin.fd), copy.fd)
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
    the merged view too. The base root keeps its own metadata (see the module docstring).
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


def _is_whiteout(
    directory: Cursor, name: str, st: os.stat_result, holds_xattr_whiteouts: bool
) -> bool:
    if stat.S_ISCHR(st.st_mode):
        return st.st_rdev == 0
    return (
        holds_xattr_whiteouts
        and stat.S_ISREG(st.st_mode)
        and st.st_size == 0
        and _getxattr(directory.entry_path(name), _WHITEOUT_XATTR) is not None
    )


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


def _overlay_mark(directory: _Target) -> bytes | None:
    """A directory's `trusted.overlay.opaque` value: _HIDES, _HOLDS_XATTR_WHITEOUTS or None."""
    return _getxattr(directory, _OPAQUE_XATTR)


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
        # Bytes of the current entry's content written by its header (a sparse map).
        self._stored = 0

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
        records: tuple[tuple[bytes, bytes], ...] = (),
    ) -> None:
        """The header of one entry (the caller writes a regular file's content after it);
        `records` go into its pax header after the others."""
        uid, gid, mtime = st.st_uid, st.st_gid, int(st.st_mtime)
        if (
            xattrs
            or records
            or len(name) > _NAME_BYTES
            or len(linkname) > _NAME_BYTES
            or not (0 <= uid < _ID_LIMIT and 0 <= gid < _ID_LIMIT and 0 <= mtime < _SIZE_LIMIT)
            or size >= _SIZE_LIMIT
        ):
            uid, gid, size, mtime = self._add_pax_header(
                name, linkname, uid, gid, size, mtime, xattrs or {}, records
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
        extra: tuple[tuple[bytes, bytes], ...],
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
        records.extend(extra)
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

    def add_sparse(
        self,
        name: bytes,
        st: os.stat_result,
        size: int,
        extents: list[tuple[int, int]],
        xattrs: dict[str, bytes],
    ) -> None:
        """The header of a file of `size` bytes holding data only in `extents`, as GNU tar
        writes PAX sparse format 1.0: the real name and size in pax records, and the
        content starting with the map of the extents, in decimal lines. The caller writes
        the extents' data after it with `copy_content`."""
        map_entries = [*extents]
        if not extents or sum(extents[-1]) < size:
            # Readers make the file as long as the last extent's end.
            map_entries.append((size, 0))
        sparse_map = b"%d\n" % len(map_entries) + b"".join(
            b"%d\n%d\n" % extent for extent in map_entries
        )
        sparse_map += _ZEROS[: -len(sparse_map) % _BLOCK]
        parent, slash, own_name = name.rpartition(b"/")
        self.add(
            parent + slash + b"GNUSparseFile.0/" + own_name,
            _REGTYPE,
            st,
            size=len(sparse_map) + sum(length for _, length in extents),
            xattrs=xattrs,
            records=(
                (b"GNU.sparse.major", b"1"),
                (b"GNU.sparse.minor", b"0"),
                (b"GNU.sparse.name", name),
                (b"GNU.sparse.realsize", b"%d" % size),
            ),
        )
        self._pending += sparse_map
        # The map and the data count as one content for the padding at the end.
        self._stored = len(sparse_map)

    def copy_content(self, fd: int, extents: list[tuple[int, int]], name: bytes) -> None:
        """The content of the entry just added: the bytes of `extents` of `fd`, padded."""
        stored, self._stored = self._stored, 0
        for offset, length in extents:
            end = offset + length
            while offset < end:
                chunk = os.pread(fd, min(end - offset, _CHUNK), offset)
                if not chunk:
                    raise OSError(errno.EIO, f"/{os.fsdecode(name)} shrank while it was exported")
                if len(chunk) == _CHUNK:
                    self._write_pending()
                    self._out.write(chunk)
                else:
                    self._pending += chunk
                offset += len(chunk)
            stored += length
        self._pad(stored)

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
    """Copies entries with owner, mode, times, xattrs, hard links and holes, counting them."""

    def __init__(
        self, progress: Callable[[int], None] | None, target_top: Path, files: RegularFiles
    ) -> None:
        self._progress = progress
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
        _copy_metadata(source.fd, name, st, target.fd)
        self._counted()

    def finish_directory(
        self, source_fd: int, name: str, st: os.stat_result, target_fd: int
    ) -> None:
        _copy_metadata(source_fd, name, st, target_fd)
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


def _copy_metadata(source_fd: int, name: str | None, st: os.stat_result, target_fd: int) -> None:
    """Give the entry `name` of the target directory the metadata of the source's; with
    no name, the target directory itself that of the source directory."""
    source: _Target = source_fd if name is None else f"/proc/self/fd/{source_fd}/{name}"
    target: _Target = target_fd if name is None else f"/proc/self/fd/{target_fd}/{name}"
    follows = name is None
    # chown drops set-id bits and security.capability, so it comes before both.
    if name is None:
        os.chown(target_fd, st.st_uid, st.st_gid)
    else:
        os.chown(name, st.st_uid, st.st_gid, dir_fd=target_fd, follow_symlinks=False)
    wanted = _xattrs(source)
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
