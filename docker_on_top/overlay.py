"""A volume's overlay: mounting it for its first user, unmounting it after its last, and
the stray overlays a crash or a busy unmount leaves. A sized volume's storage (its
image or tmpfs, on `limit/`) is mounted before its overlay and unmounted after it: a
side effect, like the overlay, that records never vouch for.

Callers hold the volume's lock. The invariant (see volume.py) is theirs to keep: a
record is written only after `mount`, and removed before `unmount`.
"""

from __future__ import annotations

import errno
import logging
import os
from contextlib import suppress
from pathlib import Path

from . import kernel, loopdev, sizelimit
from .errors import InternalError, UserError
from .metadata import Metadata
from .store import VolumeStore
from .volume import Volume
from .walk import remove_tree

log = logging.getLogger(__name__)

HELD_ON_HOST = (
    "something on the host (not a container) holds files open under its mountpoint "
    "(`fuser -vm MOUNTPOINT` names it)"
)
# Mounts stacked on a mountpoint by earlier failures are taken off one by one; a bound
# keeps a mountpoint that refuses to become free from looping forever.
_MAX_STACKED_MOUNTS = 16


def mountpoint_reply(volume: Volume) -> str:
    # The Go plugin answers with a trailing slash; kept for byte-identical replies.
    return f"{volume.mountpoint_str}/"


def mount(store: VolumeStore, volume: Volume, metadata: Metadata, *, discard: bool) -> None:
    """Make the mount folders and mount the overlay; `discard` empties a volatile
    volume's changes first (its first user after nobody used it). A sized volume's
    storage is mounted first, on `limit/`, and holds its upper and work directories."""
    sized = metadata.size_limit is not None
    try:
        created = volume.make_mount_folders(workdir=not sized)
    except OSError as error:
        raise InternalError("failed to prepare the mount folders", error) from error
    storage_mounted = False
    upper: str | Path
    work: str | Path
    try:
        if sized:
            upper, work, storage_mounted = _mount_storage(volume, metadata, fresh=discard)
        else:
            upper, work = volume.upper_str, volume.workdir_str
            if discard and metadata.volatile:
                volume.discard_changes()
        kernel.mount_overlay(
            source=f"docker-on-top_{volume.name}",
            lowers=store.lowers(metadata),
            upper=upper,
            work=work,
            target=volume.mountpoint_str,
            volatile=metadata.volatile,
        )
    except (OSError, ValueError, sizelimit.ImageInUse, sizelimit.ToolFailed) as error:
        if storage_mounted:
            _release_storage_quietly(volume)
        _remove_quietly(volume, created)
        if isinstance(error, OSError) and error.errno in (errno.ENOENT, errno.ENOTDIR):
            missing = [layer for layer in metadata.layers if not store.layers.exists(layer)]
            if missing:
                raise InternalError(
                    "failed to mount volume: its layers are gone from "
                    f"{store.layers.folder} (was the folder removed?)",
                    ", ".join(missing),
                ) from error
            raise UserError(
                "failed to mount volume: something is missing (does the base directory "
                f"{' or '.join(metadata.bases)} exist?)"
            ) from error
        raise InternalError("failed to mount overlay", error) from error


def _mount_storage(volume: Volume, metadata: Metadata, *, fresh: bool) -> tuple[Path, Path, bool]:
    """Mount a sized volume's storage on `limit/` (its image, or a tmpfs for a volatile
    volume) unless it is still mounted there; its upper and work directories, and
    whether this call mounted it. A volatile volume's stray tmpfs goes when `fresh`."""
    assert metadata.size_limit is not None
    with suppress(FileExistsError):
        os.mkdir(volume.limit, 0o700)
    mounted_here = False
    if kernel.is_mount_point(volume.limit) and fresh and metadata.volatile:
        kernel.unmount(volume.limit)
    if not kernel.is_mount_point(volume.limit):
        if metadata.volatile:
            sizelimit.mount_tmpfs(volume.limit, metadata.size_limit)
        else:
            sizelimit.mount_image(volume.image, volume.limit)
        mounted_here = True
    upper, work = volume.limit / "upper", volume.limit / "work"
    with suppress(FileExistsError):
        os.mkdir(upper, 0o755)
    remove_tree(work)  # only the kernel's scratch files of an earlier mount
    os.mkdir(work, 0o700)
    return upper, work, mounted_here


def storage_usage(volume: Volume, metadata: Metadata) -> tuple[int, int]:
    """Bytes a sized volume's changes use, and may use, from one statvfs of its storage
    while it is mounted; else what its last unmount recorded (nothing used before the
    first mount, and for a volatile volume, whose changes went with its tmpfs)."""
    assert metadata.size_limit is not None
    if kernel.is_mount_point(volume.limit):
        return sizelimit.usage(volume.limit)
    recorded = volume.recorded_usage() if not metadata.volatile else None
    return recorded or (0, metadata.size_limit)


def release_storage(volume: Volume) -> None:
    """After the overlay went: unmount a sized volume's storage and remove `limit/`.
    Nothing to do for a volume without a size (it has no `limit/`)."""
    if not os.path.isdir(f"{volume.location}/limit"):  # a string: after every last Unmount
        return
    if kernel.is_mount_point(volume.limit):
        remove_tree(volume.limit / "work")
        try:
            volume.record_usage(sizelimit.usage(volume.limit))
        except OSError as error:
            log.warning("volume %s: cannot record its usage: %s", volume.name, error)
        kernel.unmount(volume.limit)
    os.rmdir(volume.limit)


def _release_storage_quietly(volume: Volume) -> None:
    try:
        release_storage(volume)
    except OSError as error:
        log.warning("volume %s: cannot unmount its storage: %s", volume.name, error)


def unmount(volume: Volume) -> bool:
    """Unmount the overlay of a volume nobody uses any more and remove its folders.

    False when something on the host holds it: it then stays mounted, with its
    workdir, as a stray mount that the next Mount reuses (see free_mountpoint).
    """
    try:
        kernel.unmount(volume.mountpoint)
    except OSError as error:
        if error.errno == errno.EBUSY:
            log.warning(
                "volume %s: %s; its overlay stays mounted until then", volume.name, HELD_ON_HOST
            )
            return False
        if error.errno not in (errno.EINVAL, errno.ENOENT):
            raise InternalError("failed to unmount the overlay", error) from error
        log.warning("volume %s: its overlay was not mounted at unmount", volume.name)
    try:
        volume.remove_mount_folders()
        release_storage(volume)
    except OSError as error:
        raise InternalError("failed to clean up after unmount", error) from error
    return True


def free_mountpoint(volume: Volume) -> bool:
    """Unmount stray overlays with no user (left busy by the last Unmount, or by a
    crash). False when something on the host still holds one: it then stays, since two
    overlays must never share one upper (the kernel calls that undefined)."""
    for _ in range(_MAX_STACKED_MOUNTS):
        if not kernel.is_mount_point(volume.mountpoint_str):
            return True
        try:
            kernel.unmount(volume.mountpoint_str)
        except OSError as error:
            if error.errno == errno.EBUSY:
                return False
            raise InternalError("failed to unmount a stray overlay", error) from error
        log.warning("volume %s: unmounted a stray overlay that had no user", volume.name)
    raise InternalError("failed to free the mountpoint", "it stays mounted")


def detach_everything(volume: Volume) -> None:
    """Before the volume's folder goes: force and detach whatever is mounted on it (the
    overlay, then a sized volume's storage), and the loop devices of its image."""
    devices = loopdev.backed_by(volume.image) if os.path.exists(volume.image) else []
    with loopdev.detached_after(devices):
        for mounted in (volume.mountpoint, volume.limit):
            for _ in range(_MAX_STACKED_MOUNTS):
                if not kernel.is_mount_point(mounted):
                    break
                log.warning("volume %s: %s is still mounted; detaching it", volume.name, mounted)
                kernel.unmount(mounted, flags=kernel.MNT_FORCE | kernel.MNT_DETACH)
            else:
                raise OSError(errno.EBUSY, "stays mounted", str(mounted))


def detach_devices(volume: Volume) -> None:
    """Detach the loop devices of a sized volume's image, for a volume nobody uses: one
    a crash left attached without AUTOCLEAR (between the two steps of a bind on a kernel
    without LOOP_CONFIGURE) goes at once, one still mounted somewhere (another mount
    namespace) as soon as that lets go of it."""
    if os.path.exists(volume.image):
        for number in loopdev.backed_by(volume.image):
            log.warning("volume %s: detaching loop device %d of its image", volume.name, number)
            loopdev.detach(number)


def _remove_quietly(volume: Volume, folders: list[str]) -> None:
    try:
        volume.remove_folders(folders)
    except OSError as error:
        log.warning("volume %s: cannot remove %s: %s", volume.name, folders, error)
