"""The kernel interface: overlay and other mounts and unmount through the syscalls, flock
with a deadline, rename without replacing, syncing one filesystem, and path resolution
inside another root directory.

Nothing here knows about volumes; callers pass plain paths.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import functools
import os
import re
import stat
import time
from collections.abc import Callable, Sequence
from contextlib import suppress
from pathlib import Path

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_char_p,
]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_REMOUNT = 32
_AT_FDCWD = -100
_RENAME_NOREPLACE = 1

MNT_FORCE = 1
MNT_DETACH = 2

# Overlay features that forbid changing the lower directory between mounts once used
# (Documentation/filesystems/overlayfs.rst, "Changes to underlying filesystems").
# Distribution kernels may enable them by default, so they are pinned off: the base
# may then change while the volume is not mounted.
_PINNED_OFF = "index=off,metacopy=off,redirect_dir=off,xino=off"

# Characters that would split or re-interpret the legacy overlay option string.
UNSAFE_OPTION_CHARACTERS = frozenset(",:")


def _raise_errno(call: str, path: str | Path) -> None:
    code = ctypes.get_errno()
    raise OSError(code, f"{call}: {os.strerror(code)}", str(path))


def _unsafe(path: str) -> bool:
    return "," in path or ":" in path  # UNSAFE_OPTION_CHARACTERS, without making a set


def _escaped(path: str | Path) -> str:
    text = str(path)
    if _unsafe(text):
        raise ValueError(f"path {path} contains ',' or ':' and cannot be an overlay option")
    # overlayfs removes backslash escapes from the paths in its options.
    return text.replace("\\", "\\\\")


# mount(2) takes its options in one page.
_OPTIONS_MAX = 4095


def mount_overlay(
    *,
    source: str,
    lowers: Sequence[str | Path],
    upper: str | Path | None,
    work: str | Path | None,
    target: str | Path,
    volatile: bool = False,
) -> None:
    """Mount an overlay of `lowers` (topmost first) under `upper` on `target`; without
    an upper (and work) directory, a read-only view of the lower layers.

    mount(2) takes the paths in one option string, so it cannot take a path with ','
    or ':', nor more layers than fit one page. The new mount API (fsopen, fsconfig
    "lowerdir+", Linux 6.8+) takes each path on its own, and is used where it is needed
    and the kernel has it; elsewhere such a mount raises ValueError.
    """
    paths = [*lowers, *(p for p in (upper, work) if p is not None)]
    if not any(_unsafe(str(path)) for path in paths):
        options = overlay_options(lowers, upper, work, volatile)
        if len(os.fsencode(options)) <= _OPTIONS_MAX:
            _mount("overlay", source, target, MS_RDONLY if upper is None else 0, options)
            return
    if not takes_any_overlay_path():
        raise ValueError(
            "this kernel has no overlayfs `lowerdir+` (Linux 6.8+): paths with ',' or ':', "
            "or layers past one page of mount options, cannot be mounted"
        )
    _mount_overlay_by_parts(source, lowers, upper, work, target, volatile)


def mount_read_only_overlay(layers: Sequence[Path], target: Path) -> None:
    """Mount `layers`, topmost first, as one read-only view with no upper layer, with the
    features pinned off as for the volumes' own mounts: the view is what containers see."""
    mount_overlay(source="docker-on-top", lowers=layers, upper=None, work=None, target=target)


def overlay_options(
    lowers: Sequence[str | Path], upper: str | Path | None, work: str | Path | None, volatile: bool
) -> str:
    """The option string of an overlay mount(2); `volatile` skips every sync to disk."""
    options = "lowerdir=" + ":".join(_escaped(lower) for lower in lowers)
    if upper is not None and work is not None:
        options += f",upperdir={_escaped(upper)},workdir={_escaped(work)}"
    options += "," + _PINNED_OFF
    return options + ",volatile" if volatile else options


# The new mount API's syscalls: one number on every architecture (Linux 5.2+).
_SYS_MOVE_MOUNT = 429
_SYS_FSOPEN = 430
_SYS_FSCONFIG = 431
_SYS_FSMOUNT = 432
_FSOPEN_CLOEXEC = 1
_FSMOUNT_CLOEXEC = 1
_FSCONFIG_SET_FLAG = 0
_FSCONFIG_SET_STRING = 1
_FSCONFIG_CMD_CREATE = 6
_MOUNT_ATTR_RDONLY = 1
_MOVE_MOUNT_F_EMPTY_PATH = 4


def _syscall(number: int, *arguments: object) -> int:
    result = _libc.syscall(ctypes.c_long(number), *arguments)
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return int(result)


@functools.lru_cache(maxsize=1)
def takes_any_overlay_path() -> bool:
    """Whether overlayfs here takes its layers one by one (`lowerdir+`, Linux 6.8+), so
    that a path may hold ',' and ':' and the layers need not fit one page. Asked of the
    kernel once: a filesystem context is opened and a layer set, nothing is mounted."""
    try:
        context = _syscall(_SYS_FSOPEN, b"overlay", ctypes.c_uint(_FSOPEN_CLOEXEC))
    except OSError:
        return False
    try:
        _fsconfig(context, _FSCONFIG_SET_STRING, "lowerdir+", "/")
    except OSError:
        return False
    finally:
        os.close(context)
    return True


def _fsconfig(context: int, command: int, key: str | None, value: str | None) -> None:
    try:
        _syscall(
            _SYS_FSCONFIG,
            ctypes.c_int(context),
            ctypes.c_uint(command),
            None if key is None else key.encode(),
            None if value is None else os.fsencode(value),
            ctypes.c_int(0),
        )
    except OSError as error:
        said = _context_messages(context) or error.strerror
        raise OSError(error.errno, f"overlay {key or 'mount'}: {said}", value) from None


def _mount_overlay_by_parts(
    source: str,
    lowers: Sequence[str | Path],
    upper: str | Path | None,
    work: str | Path | None,
    target: str | Path,
    volatile: bool,
) -> None:
    context = _syscall(_SYS_FSOPEN, b"overlay", ctypes.c_uint(_FSOPEN_CLOEXEC))
    try:
        _fsconfig(context, _FSCONFIG_SET_STRING, "source", source)
        for lower in lowers:  # topmost first, as in lowerdir=
            _fsconfig(context, _FSCONFIG_SET_STRING, "lowerdir+", str(lower))
        if upper is not None and work is not None:
            # Unlike "lowerdir+", these two still lose their backslash escapes.
            for key, path in (("upperdir", upper), ("workdir", work)):
                _fsconfig(context, _FSCONFIG_SET_STRING, key, str(path).replace("\\", "\\\\"))
        for option in _PINNED_OFF.split(","):
            key, _, value = option.partition("=")
            _fsconfig(context, _FSCONFIG_SET_STRING, key, value)
        if volatile:
            _fsconfig(context, _FSCONFIG_SET_FLAG, "volatile", None)
        _fsconfig(context, _FSCONFIG_CMD_CREATE, None, None)
        try:
            mounted = _syscall(
                _SYS_FSMOUNT,
                ctypes.c_int(context),
                ctypes.c_uint(_FSMOUNT_CLOEXEC),
                ctypes.c_uint(_MOUNT_ATTR_RDONLY if upper is None else 0),
            )
        except OSError as error:
            raise OSError(error.errno, f"fsmount: {error.strerror}", str(target)) from None
    finally:
        os.close(context)
    try:
        _syscall(
            _SYS_MOVE_MOUNT,
            ctypes.c_int(mounted),
            b"",
            ctypes.c_int(_AT_FDCWD),
            os.fsencode(target),
            ctypes.c_uint(_MOVE_MOUNT_F_EMPTY_PATH),
        )
    except OSError as error:
        raise OSError(error.errno, f"move_mount: {error.strerror}", str(target)) from None
    finally:
        os.close(mounted)


def _context_messages(context: int) -> str:
    """What the filesystem said while it was configured ("e overlayfs: ..." lines)."""
    messages = []
    while True:
        try:
            message = os.read(context, 4096)
        except OSError:
            break
        if not message:
            break
        messages.append(message.decode(errors="replace").strip())
    return "; ".join(messages)


def mount_filesystem(fs_type: str, source: str, target: Path, flags: int, options: str) -> None:
    """mount(2) of any filesystem, `flags` from the MS_ constants here; with MS_REMOUNT,
    new options for the one mounted on `target` (the MS_ flags are set anew too)."""
    _mount(fs_type, source, target, flags, options)


def _mount(fs_type: str, source: str, target: str | Path, flags: int, options: str) -> None:
    if (
        _libc.mount(
            os.fsencode(source),
            os.fsencode(target),
            fs_type.encode(),
            flags,
            os.fsencode(options),
        )
        != 0
    ):
        _raise_errno("mount", target)


def rename_noreplace(source: Path, target: Path) -> None:
    """rename(2) that fails with EEXIST instead of replacing anything at `target`.

    renameat2 is looked up at the first call, not at import: an older libc lacks it.
    Where it is missing, or the filesystem answers EINVAL to RENAME_NOREPLACE, the name
    is claimed first (mkdir for a directory, link for anything else), which is as safe:
    rename(2) replaces a directory only while it is empty, and an unlink of `source`
    after link(2) leaves the one inode under `target`.
    """
    renameat2 = _renameat2()
    if renameat2 is not None:
        if (
            renameat2(
                _AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), _RENAME_NOREPLACE
            )
            == 0
        ):
            return
        code = ctypes.get_errno()
        if code not in (errno.EINVAL, errno.ENOSYS):
            raise OSError(code, f"renameat2: {os.strerror(code)}", str(target))
    if stat.S_ISDIR(os.lstat(source).st_mode):
        os.mkdir(target, 0o700)
        try:
            os.rename(source, target)
        except OSError:
            with suppress(OSError):
                os.rmdir(target)
            raise
    else:
        os.link(source, target, follow_symlinks=False)
        os.unlink(source)


@functools.lru_cache(maxsize=1)
def _renameat2() -> Callable[..., int] | None:
    function = getattr(_libc, "renameat2", None)
    if function is not None:
        function.argtypes = [
            ctypes.c_int,
            ctypes.c_char_p,
            ctypes.c_int,
            ctypes.c_char_p,
            ctypes.c_uint,
        ]
    return function


def sync_filesystem(path: Path) -> None:
    """syncfs(2): everything written to the filesystem that holds `path` reaches the disk
    (one call for a whole tree, rather than an fsync of each of its files)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if _libc.syncfs(fd) != 0:
            _raise_errno("syncfs", path)
    finally:
        os.close(fd)


def unmount(target: str | Path, *, flags: int = 0) -> None:
    if _libc.umount2(os.fsencode(target), flags) != 0:
        _raise_errno("umount2", target)


# The kernel's own bound on symlinks followed in one path resolution.
_MAX_SYMLINKS = 40


def resolve_in_root(root: Path, path: str) -> Path:
    """Where `path` leads for a process whose root directory is `root` (as chroot(2)
    or openat2's RESOLVE_IN_ROOT would find it): symlinks are followed, and absolute
    ones and `..` never lead out of `root`. A component that is missing or cannot be
    read is kept as it is: the caller's stat of the result reports it.
    """
    pending = list(reversed(path.split("/")))
    resolved: list[str] = []
    followed = 0
    while pending:
        part = pending.pop()
        if part in ("", "."):
            continue
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        try:
            target = os.readlink(root.joinpath(*resolved, part))
        except OSError:  # not a symlink, or missing: the caller's stat tells which
            resolved.append(part)
            continue
        followed += 1
        if followed > _MAX_SYMLINKS:
            raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), path)
        if target.startswith("/"):
            resolved = []
        pending.extend(reversed(target.split("/")))
    return root.joinpath(*resolved)


def mount_points() -> set[str]:
    """Every path something is mounted on, in this process's mount namespace."""
    with open("/proc/self/mountinfo", "rb") as table:
        return {_unescaped(line.split(b" ", 5)[4]) for line in table}


def _unescaped(field: bytes) -> str:
    # The kernel writes space, tab, newline and backslash in paths as \ooo octal.
    if b"\\" in field:
        field = re.sub(rb"\\([0-7]{3})", lambda octal: bytes([int(octal[1], 8)]), field)
    return os.fsdecode(field)


def is_mount_point(path: str | Path) -> bool:
    """Whether something is mounted on `path` (its device differs from its parent's).

    False when `path` does not exist.
    """
    try:
        own = os.stat(path).st_dev
    except FileNotFoundError:
        return False
    return own != os.stat(os.path.dirname(path)).st_dev


class LockTimeout(Exception):
    """A lock could not be taken before its deadline."""


# How long a waiter sleeps between tries of a flock another process holds: short at first
# (most holders are requests of a millisecond), longer while the holder stays.
_FIRST_RETRY_S = 0.0005
_LONGEST_RETRY_S = 0.02


class DirectoryLock:
    """An exclusive flock on a directory, held inside a `with` block.

    flock locks belong to the open file description, so this serialises threads of
    this process as well as other processes (the Go plugin, our command line).

    `deadline` (time.monotonic) bounds the wait: LockTimeout when it passes. Once
    locked, the directory opened must still be the one the path names: a folder
    removed and made again while we waited is another one, so the lock is taken again
    on the new folder. Entering raises FileNotFoundError when the path names nothing,
    OSError when it cannot be opened.
    """

    def __init__(self, directory: str | Path, deadline: float | None = None) -> None:
        self.directory = directory
        self.deadline = deadline
        self._fd = -1

    def __enter__(self) -> None:
        while True:
            fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                self._flock(fd)
                locked = os.fstat(fd)
                named = os.stat(self.directory)
            except BaseException:
                os.close(fd)
                raise
            if (locked.st_dev, locked.st_ino) == (named.st_dev, named.st_ino):
                self._fd = fd
                return
            os.close(fd)

    def _flock(self, fd: int) -> None:
        if self.deadline is None:
            fcntl.flock(fd, fcntl.LOCK_EX)
            return
        pause = _FIRST_RETRY_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                pass
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise LockTimeout(f"{self.directory} stays locked by another holder")
            time.sleep(min(pause, left))
            pause = min(pause * 2, _LONGEST_RETRY_S)

    def __exit__(self, *exc_info: object) -> None:
        os.close(self._fd)
        self._fd = -1
