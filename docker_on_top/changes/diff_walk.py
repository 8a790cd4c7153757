"""`diff`: the changes of a volume's merged view against its base, as `docker diff` lists
them.

`diff` walks with the file types that the directory listings give, so that it makes
syscalls per directory, not per file (but for special files, files in directories marked
"x", and names looked up in a base directory too large to list).
See docs/performance.md.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from operator import itemgetter
from pathlib import Path
from typing import Union

from ..walk import Cursor, entry_status
from .overlay_marks import (
    _BASE_FLAGS,
    _HIDES,
    _HOLDS_XATTR_WHITEOUTS,
    _is_device_whiteout,
    _is_xattr_whiteout,
    _overlay_mark,
)

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
