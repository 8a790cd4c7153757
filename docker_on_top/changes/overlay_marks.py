"""Reading what overlayfs leaves in an upper directory: whiteouts, opaque marks, xattrs
(the overlay's own are never carried over); and a base opened as the kernel opens a layer.

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
it would make this package disagree with what the containers saw. No overlay xattr of
either namespace is ever carried into a copy or an export, though: whatever overlay later
uses the result as a layer could take them for its own.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import Union

from ..walk import Cursor

_OPAQUE_XATTR = "trusted.overlay.opaque"
_WHITEOUT_XATTR = "trusted.overlay.whiteout"
_OVERLAY_XATTR_PREFIXES = ("trusted.overlay.", "user.overlay.")
# Values of _OPAQUE_XATTR: the directory hides the base one, or may hold xattr whiteouts.
_HIDES = b"y"
_HOLDS_XATTR_WHITEOUTS = b"x"


# A base given by the user is opened as the kernel mounts it: symlinks in its path count.
_BASE_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


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
