"""Start-up: what a crash or a reboot left under the state root (SPEC A4), before the
first request is served.

For every volume: a `mountpoint/` that is gone means a clean stop; one that could be
removed means the overlay is gone although the last run did not clean up (its records
describe nobody any more); one still mounted means containers may still use it, so it is
left alone. Removals, creations, snapshots and rollbacks that a crash cut short are
finished or undone, and layers no volume uses any more are removed.
"""

from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass, field

from . import kernel, overlay
from .commands import VIEW_PREFIX, settle
from .errors import InternalError, PluginError
from .releases import PendingReleases
from .snapshots import VolumeSnapshots
from .store import VolumeStore
from .volume import PRIVATE_MODE, REMOVED_PREFIX, ROLLBACK, SNAPSHOT, Volume, make_private
from .walk import remove_tree

log = logging.getLogger(__name__)


@dataclass
class RecoveryReport:
    clean: list[str] = field(default_factory=list)
    cleaned: list[str] = field(default_factory=list)
    still_mounted: list[str] = field(default_factory=list)
    half_made: list[str] = field(default_factory=list)


def recover(store: VolumeStore, releases: PendingReleases) -> RecoveryReport:
    """Bring every volume back to a state the invariant allows after an unclean stop.

    Raises InternalError for a volume that can be neither recognised nor cleaned,
    since serving on top of it could mount the wrong thing.
    """
    store.root.mkdir(mode=PRIVATE_MODE, parents=True, exist_ok=True)
    _make_folders_private(store)
    _finish_removals(store)
    report = RecoveryReport()
    _remove_views(store)
    for volume in store.volumes():
        if not volume.has_metadata() and _remove_half_made(volume):
            report.half_made.append(volume.name)
            continue
        _settle(store, volume)
        try:
            volume.mountpoint.rmdir()
        except FileNotFoundError:
            _release_storage(volume)
            report.clean.append(volume.name)
            continue
        except OSError as error:
            if error.errno == errno.EBUSY:
                releases.load(volume)
                report.still_mounted.append(volume.name)
                log.info("volume %s is still mounted from the previous run", volume.name)
                continue
            raise InternalError(
                f"cannot recover volume {volume.name} (fix or remove {volume.folder})",
                error,
            ) from error
        # The mountpoint existed but was not mounted: the last run ended without
        # clean-up (crash or reboot), so its records no longer describe any user.
        try:
            with volume.records.lock():
                volume.records.clear()
                volume.write_unreleased({})
                volume.remove_mount_folders()
                overlay.release_storage(volume)
                overlay.detach_devices(volume)
        except OSError as error:
            raise InternalError(f"cannot recover volume {volume.name}", error) from error
        report.cleaned.append(volume.name)
        log.info("volume %s: the previous run ended uncleanly; usage records reset", volume.name)
    try:
        VolumeSnapshots(store, releases).collect_orphans()
    except (PluginError, OSError) as error:
        log.warning("cannot remove the layers no volume uses: %s", error)
    if report.still_mounted:
        log.warning(
            "volumes still mounted from the previous run: %s. Containers that stopped while "
            "the plugin was down never sent their Unmount, so these volumes may stay mounted "
            "(and a volatile one keeps its changes) until their last user stops or the host "
            "reboots",
            ", ".join(report.still_mounted),
        )
    return report


def _make_folders_private(store: VolumeStore) -> None:
    """Tighten a state root and volume folders made open to others (by an earlier
    version, or by the Go plugin, which makes them 0755)."""
    tightened = 0
    for folder in [store.root, *(volume.folder for volume in store.volumes())]:
        try:
            tightened += make_private(folder)
        except OSError as error:
            log.error("cannot take the access of other users away from %s: %s", folder, error)
    if tightened:
        log.warning(
            "took the access of other users away from %d folder(s) under %s: a container's"
            " setuid files must not be runnable by host users",
            tightened,
            store.root,
        )


def _settle(store: VolumeStore, volume: Volume) -> None:
    """Finish or undo a snapshot or rollback that a crash cut short (see layers.py)."""
    try:
        if volume.in_progress(SNAPSHOT) is None and volume.in_progress(ROLLBACK) is None:
            return
        with volume.records.lock():
            settle(store, volume, store.metadata(volume))
    except (PluginError, OSError, ValueError) as error:
        log.warning(
            "volume %s: cannot settle a snapshot or rollback cut short: %s", volume.name, error
        )


def _release_storage(volume: Volume) -> None:
    """A sized volume's storage left mounted with no overlay over it (a crash between
    the two unmounts): unmounted, and its image's loop devices detached, so that nothing
    stays attached."""
    try:
        overlay.release_storage(volume)
        overlay.detach_devices(volume)
    except OSError as error:
        log.warning("volume %s: cannot unmount its storage: %s", volume.name, error)


def _remove_views(store: VolumeStore) -> None:
    """Unmount and remove the read-only views a command left (see commands.VIEW_PREFIX)."""
    for leftover in store.root.glob(f"{VIEW_PREFIX}*"):
        try:
            if kernel.is_mount_point(leftover):
                kernel.unmount(leftover, flags=kernel.MNT_DETACH)
            leftover.rmdir()
        except OSError as error:
            log.warning("cannot remove the leftover view %s: %s", leftover, error)


def _finish_removals(store: VolumeStore) -> None:
    """Delete the folders of removals that a crash cut short (see Volume.destroy)."""
    for leftover in store.root.glob(f"{REMOVED_PREFIX}*"):
        try:
            if kernel.is_mount_point(leftover / "mountpoint"):
                kernel.unmount(leftover / "mountpoint", flags=kernel.MNT_DETACH)
            remove_tree(leftover)
        except OSError as error:
            log.warning("cannot finish removing %s: %s", leftover, error)
        else:
            log.info("finished removing %s, cut short by the last run", leftover)


def _remove_half_made(volume: Volume) -> bool:
    """Remove a folder left by a Create that crashed before metadata.json was written.

    Only a folder with nothing of value in it (no changes, no users) is removed.
    """
    try:
        if volume.upper.exists():
            with os.scandir(volume.upper) as changes:
                if next(changes, None) is not None:
                    return False
        if volume.records.exists() and volume.records.in_use():
            return False
        if volume.has_metadata():
            return False
        volume.destroy()
    except OSError as error:
        log.warning("volume folder %s has no metadata.json: %s", volume.folder, error)
        return False
    log.warning("removed %s: a volume creation was interrupted before it finished", volume.folder)
    return True
