"""A volume's overlay: mounting it for its first user, unmounting it after its last, and
the stray overlays a crash or a busy unmount leaves.

Callers hold the volume's lock. The invariant (see volume.py) is theirs to keep: a
record is written only after `mount`, and removed before `unmount`.
"""

from __future__ import annotations

import errno
import logging
from pathlib import Path

from . import kernel
from .errors import InternalError, UserError
from .store import VolumeStore
from .volume import Metadata, Volume

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
    return f"{volume.mountpoint}/"


def mount(store: VolumeStore, volume: Volume, metadata: Metadata, *, discard: bool) -> None:
    """Make the mount folders and mount the overlay; `discard` empties a volatile
    volume's changes first (its first user after nobody used it)."""
    try:
        created = volume.make_mount_folders()
    except OSError as error:
        raise InternalError("failed to prepare the mount folders", error) from error
    try:
        if discard and metadata.volatile:
            volume.discard_changes()
        kernel.mount_overlay(
            source=f"docker-on-top_{volume.name}",
            lowers=store.lowers(metadata),
            upper=volume.upper,
            work=volume.workdir,
            target=volume.mountpoint,
            volatile=metadata.volatile,
        )
    except (OSError, ValueError) as error:
        _remove_quietly(volume, created)
        if isinstance(error, OSError) and error.errno in (errno.ENOENT, errno.ENOTDIR):
            raise UserError(
                "failed to mount volume: something is missing (does the base directory "
                f"{' or '.join(metadata.bases)} exist?)"
            ) from error
        raise InternalError("failed to mount overlay", error) from error


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
    except OSError as error:
        raise InternalError("failed to clean up after unmount", error) from error
    return True


def free_mountpoint(volume: Volume) -> bool:
    """Unmount stray overlays with no user (left busy by the last Unmount, or by a
    crash). False when something on the host still holds one: it then stays, since two
    overlays must never share one upper (the kernel calls that undefined)."""
    for _ in range(_MAX_STACKED_MOUNTS):
        if not kernel.is_mount_point(volume.mountpoint):
            return True
        try:
            kernel.unmount(volume.mountpoint)
        except OSError as error:
            if error.errno == errno.EBUSY:
                return False
            raise InternalError("failed to unmount a stray overlay", error) from error
        log.warning("volume %s: unmounted a stray overlay that had no user", volume.name)
    raise InternalError("failed to free the mountpoint", "it stays mounted")


def detach_everything(volume: Volume) -> None:
    """Before the volume's folder goes: force and detach whatever is mounted on it."""
    for _ in range(_MAX_STACKED_MOUNTS):
        if not kernel.is_mount_point(volume.mountpoint):
            return
        log.warning("volume %s: its mountpoint is still mounted; detaching it", volume.name)
        kernel.unmount(volume.mountpoint, flags=kernel.MNT_FORCE | kernel.MNT_DETACH)
    raise OSError(errno.EBUSY, "mountpoint stays mounted", str(volume.mountpoint))


def _remove_quietly(volume: Volume, folders: list[Path]) -> None:
    try:
        volume.remove_folders(folders)
    except OSError as error:
        log.warning("volume %s: cannot remove %s: %s", volume.name, folders, error)
