"""`export_layer`: a volume's changes as an OCI image layer, and what a layer cannot
carry, left out and reported; `export_squashed`: several layers' changes as one. The tar
itself is written by `layer_tar.py`."""

from __future__ import annotations

import errno
import itertools
import os
import stat
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from operator import itemgetter
from pathlib import Path
from typing import Any, BinaryIO

from ..walk import DIRECTORY_FLAGS, Cursor, RegularFiles, depth_first
from .extents import _data_extents
from .layer_tar import (
    _BLKTYPE,
    _CHRTYPE,
    _DIRTYPE,
    _FIFOTYPE,
    _LNKTYPE,
    _OPAQUE_MARKER_NAME,
    _REGTYPE,
    _SYMTYPE,
    _WHITEOUT_PREFIX,
    _WHITEOUT_PREFIX_BYTES,
    _LayerWriter,
)
from .overlay_marks import (
    _HIDES,
    _HOLDS_XATTR_WHITEOUTS,
    _WHITEOUT_XATTR,
    _getxattr,
    _overlay_mark,
    _Target,
    _xattrs,
)

_WHITEOUT_NAME_REFUSED = (
    f"not exported: in an image layer a name starting with {_WHITEOUT_PREFIX} means a deletion"
)


# Told of what an export leaves out: the entry's path in the layer ("/dir/name"), and why.
Report = Callable[[str, str], None]


def report_nothing(path: str, reason: str) -> None:
    pass


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
    export_squashed([upper], out, report)


def export_squashed(uppers: Sequence[Path], out: BinaryIO, report: Report = report_nothing) -> None:
    """Several upper directories (topmost first) squashed into one layer, written as
    export_layer writes one: what they show together over what lies below the lowest,
    as overlayfs stacks them. Each path's entry is the topmost one's; a directory holds
    what the directories at its path hold, from the topmost down to the first that is
    opaque or over an entry that is no directory (it then hides all below it, and gets
    the opaque marker). Frozen layers do not change; the topmost may, as for
    export_layer."""
    layer = _LayerWriter(out)
    # The first name of each inode with several names, for the others to link to.
    first_names: dict[tuple[int, int], bytes] = {}
    with ExitStack() as held:
        cursors = [held.enter_context(Cursor.open(upper)) for upper in uppers]
        files = held.enter_context(RegularFiles())
        # Per directory entered: the layers whose cursors went into it.
        went_down: list[list[int]] = []

        def enter(subdirectory: _Subdirectory) -> list[_Subdirectory] | None:
            name, merged = subdirectory
            sources = [
                (index, cursors[index].fd, marked)
                for index, marked in merged
                if cursors[index].down(name) is not None
            ]
            if not sources:
                return None
            went_down.append([index for index, _, _ in sources])
            prefix = os.fsencode(cursors[sources[0][0]].relative()) + b"/"
            return _export_entries(layer, files, sources, prefix, first_names, report)

        def leave(_: _Subdirectory) -> None:
            for index in went_down.pop():
                cursors[index].up()

        top = [
            (index, cursor.fd, _overlay_mark(cursor.fd) == _HOLDS_XATTR_WHITEOUTS)
            for index, cursor in enumerate(cursors)
        ]
        depth_first(_export_entries(layer, files, top, b"", first_names, report), enter, leave)
    layer.finish()


# A directory to export: its name, and the layers whose directories of that name it
# merges, topmost first, each with whether it is marked for xattr whiteouts.
_Subdirectory = tuple[str, list[tuple[int, bool]]]
# One layer's directory being exported: the layer, its descriptor, and that mark.
_Source = tuple[int, int, bool]


def _export_entries(
    layer: _LayerWriter,
    files: RegularFiles,
    sources: list[_Source],
    prefix: bytes,
    first_names: dict[tuple[int, int], bytes],
    report: Report,
) -> list[_Subdirectory]:
    """Add one directory's entries, merged from its layers' (`sources`, topmost first),
    to the layer; returns its subdirectories to export next."""
    # Each name's entries, topmost first: their source and whether each is a directory.
    listed: dict[bytes, list[tuple[_Source, bool]]] = {}
    for source in sources:
        with os.scandir(source[1]) as scan:
            for entry in scan:
                found = (source, entry.is_dir(follow_symlinks=False))
                listed.setdefault(os.fsencode(entry.name), []).append(found)
    subdirectories = []
    for raw_name in sorted(listed):
        name = prefix + raw_name
        if raw_name.startswith(_WHITEOUT_PREFIX_BYTES):
            report(_shown(name), _WHITEOUT_NAME_REFUSED)
            continue
        entries = listed[raw_name]
        (_, directory_fd, holds_xattr_whiteouts), is_directory = entries[0]
        own_name = os.fsdecode(raw_name)
        try:
            if is_directory:
                chain = [source for source, _ in itertools.takewhile(itemgetter(1), entries)]
                over_other = len(chain) < len(entries)
                merged = _export_directory(layer, chain, own_name, name, over_other, report)
                if merged is not None:
                    subdirectories.append((own_name, merged))
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
    layer: _LayerWriter,
    chain: list[_Source],
    own_name: str,
    name: bytes,
    over_other: bool,
    report: Report,
) -> list[tuple[int, bool]] | None:
    """A directory's entry, described from the topmost open directory, and its opaque
    marker when it hides what lies below: when one of the directories it merges
    (`chain`, topmost first) is opaque, or the lowest lies over an entry that is no
    directory (`over_other`). Returns the layers it merges (down to the opaque one),
    each with whether it is marked for xattr whiteouts; None when it is no directory
    now."""
    merged: list[tuple[int, bool]] = []
    hides = over_other
    top: os.stat_result | None = None
    for index, parent_fd, _ in chain:
        try:
            fd = os.open(own_name, DIRECTORY_FLAGS, dir_fd=parent_fd)
        except OSError as error:
            if top is not None:
                hides = True  # a frozen layer's changed since it was listed: nothing below
                break
            if error.errno in (errno.ENOTDIR, errno.ELOOP):
                return None
            raise
        try:
            if top is None:
                top = os.fstat(fd)
                layer.add(name + b"/", _DIRTYPE, top, xattrs=_exportable_xattrs(fd, name, report))
            mark = _overlay_mark(fd)
        finally:
            os.close(fd)
        merged.append((index, mark == _HOLDS_XATTR_WHITEOUTS))
        if mark == _HIDES:
            hides = True
            break
    if hides and top is not None:
        layer.add(name + _OPAQUE_MARKER_NAME, _REGTYPE, top, mode=top.st_mode & 0o777)
    return merged


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
