"""Start-up: what a crash or a reboot left under the state root (SPEC A4), each volume
recovered before anything uses it, while the daemon already serves.

Before the first request only the root is looked at (made, made private) and the names
of the volume folders are taken: those are the volumes to recover. Each is recovered
once per run, under its lock, by whichever comes first: a request or command that
touches it (the store asks before it takes a volume's lock, Get, List and Create ask
before they look), or the background thread, which goes through them in name order and
yields to requests. Only once every volume is recovered, and so every volume's metadata
has been read and its cut-short snapshot or rollback settled, are the removals a crash cut short
finished, the leftover views removed and the layers no volume uses collected.

For every volume: a `mountpoint/` that is gone means a clean stop; one that could be
removed means the overlay is gone although the last run did not clean up (its records
describe nobody any more); one still mounted means containers may still use it, so it is
left alone. Snapshots and rollbacks that a crash cut short are finished or undone.
A folder without metadata.json that holds nothing is a Create cut short, and
goes (List does not show it before its recovery has decided). A volume that can be
neither recognised nor cleaned stops the daemon (A4), when the background reaches it.

The command line runs in another process: while a daemon is still recovering (it holds
a shared flock on the state root until it is done), a command recovers each volume it
touches itself first, under the volume's lock. That is safe because each step only
moves a volume towards its recovered state and looks at the state before it acts: a
volume the daemon recovered already (or mounted since) is found as such and left. A
command leaves two things to the daemon: folders without metadata.json (a Create of the
daemon may be making one) and the releases a volume still owes (they live in the
daemon's memory once it has read them).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from . import kernel, overlay
from .errors import BusyError, InternalError, PluginError, UserError
from .releases import PendingReleases
from .snapshots import VolumeSnapshots
from .store import NO_SUCH_VOLUME, VolumeStore
from .upper import VIEW_PREFIX, settle
from .volume import (
    NAME_PATTERN,
    PRIVATE_MODE,
    REMOVED_PREFIX,
    ROLLBACK,
    SNAPSHOT,
    Volume,
    make_private,
)
from .walk import remove_tree

log = logging.getLogger(__name__)


@dataclass
class RecoveryReport:
    clean: list[str] = field(default_factory=list)
    cleaned: list[str] = field(default_factory=list)
    still_mounted: list[str] = field(default_factory=list)
    half_made: list[str] = field(default_factory=list)
    tightened: int = 0  # folders that others had access to


class StartupRecovery:
    """The volumes still to recover in this run, and their recovery.

    `by_daemon`: the daemon's own recovery (else a command's, see the module's notes).
    """

    def __init__(
        self, store: VolumeStore, releases: PendingReleases, *, by_daemon: bool = True
    ) -> None:
        self.store = store
        self.releases = releases
        self.by_daemon = by_daemon
        self.report = RecoveryReport()
        self._pending: set[str] = set()
        # Recovers a folder that has no activemounts/ to lock, one at a time.
        self._unlockable = threading.Lock()
        self._root_fd = -1

    def begin(self) -> None:
        """Before serving: the root made and made private, the root's flock taken (for
        the command line: a daemon recovers), the volumes to recover found, and the
        store told to ask here before it uses one."""
        root = self.store.root
        root.mkdir(mode=PRIVATE_MODE, parents=True, exist_ok=True)
        self._tighten(str(root))
        if self.by_daemon:
            self._root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            fcntl.flock(self._root_fd, fcntl.LOCK_SH)
        with os.scandir(root) as entries:
            self._pending = {
                entry.name
                for entry in entries
                if entry.is_dir(follow_symlinks=False) and NAME_PATTERN.fullmatch(entry.name)
            }
        self.store.recovery = self

    def run(self) -> RecoveryReport:
        """Recover every volume not recovered yet, in name order, then what concerns the
        whole root; the store stops asking here. A volume whose lock stays held (by
        long work: a commit) is taken up again after the others. Between two volumes
        it gives way to any request thread waiting for the interpreter.

        Raises InternalError for a volume that can be neither recognised nor cleaned,
        since serving on top of it could mount the wrong thing.
        """
        waiting = deque(sorted(self._pending))
        while waiting:
            name = waiting.popleft()
            try:
                self.ensure(Volume(self.store.root, name))
            except BusyError:
                waiting.append(name)
            # Hand the interpreter over to any request thread waiting for it. (Not a lower
            # nice value: preempted while it holds the interpreter, the thread would make
            # the requests wait; measured, it also cost more CPU.)
            time.sleep(0)
        self._finish()
        return self.report

    def ensure(self, volume: Volume) -> None:
        """Recover the volume first if this run has not yet; for those who look at it
        without its lock. BusyError when its lock stays held too long."""
        if volume.name not in self._pending:
            return
        try:
            with self.store.locked(volume):  # which recovers it (see `under_lock`)
                pass
        except UserError as error:
            if str(error) != NO_SUCH_VOLUME:
                raise
            with self._unlockable:  # no activemounts/: nobody else can lock it either
                if volume.name in self._pending:
                    self._recover(volume)

    def under_lock(self, volume: Volume) -> None:
        """Under the volume's lock: recover it if this run has not yet. UserError when
        it was a Create cut short, removed now."""
        if volume.name in self._pending:
            self._recover(volume)
            if not volume.exists():
                raise UserError(NO_SUCH_VOLUME)

    def _recover(self, volume: Volume) -> None:
        """Bring the volume back to a state the invariant allows after an unclean stop;
        it stays to recover when that fails (InternalError), so nothing uses it."""
        self._recover_steps(volume)
        self._pending.discard(volume.name)

    def _recover_steps(self, volume: Volume) -> None:
        self._tighten(volume.location)
        if not volume.has_metadata():
            if not self.by_daemon or not volume.exists():
                return  # gone, or the daemon's to judge
            if _remove_half_made(volume):
                self.report.half_made.append(volume.name)
                return
        self._settle(volume)
        try:
            volume.mountpoint.rmdir()
        except FileNotFoundError:
            if not _reset_cut_short(volume):
                _release_storage(volume)
                self.report.clean.append(volume.name)
                return
        except OSError as error:
            if error.errno == errno.EBUSY:
                if self.by_daemon:
                    self.releases.load(volume)
                self.report.still_mounted.append(volume.name)
                log.info("volume %s is still mounted from the previous run", volume.name)
                return
            raise InternalError(
                f"cannot recover volume {volume.name} (fix or remove {volume.folder})",
                error,
            ) from error
        # The mountpoint existed but was not mounted: the last run ended without
        # clean-up (crash or reboot), so its records no longer describe any user. The
        # mountpoint goes first, as the test of that: a crash before the rest is done
        # leaves what _reset_cut_short finds.
        try:
            volume.records.clear()
            volume.write_unreleased({})
            volume.remove_mount_folders()
            overlay.release_storage(volume)
            overlay.detach_devices(volume)
        except OSError as error:
            raise InternalError(f"cannot recover volume {volume.name}", error) from error
        self.report.cleaned.append(volume.name)
        log.info("volume %s: the previous run ended uncleanly; usage records reset", volume.name)

    def _settle(self, volume: Volume) -> None:
        """Finish or undo a snapshot or rollback that a crash cut short (layers.py)."""
        try:
            if volume.in_progress(SNAPSHOT) is None and volume.in_progress(ROLLBACK) is None:
                return
            settle(self.store, volume, self.store.metadata(volume))
        except (PluginError, OSError, ValueError) as error:
            log.warning(
                "volume %s: cannot settle a snapshot or rollback cut short: %s", volume.name, error
            )

    def _tighten(self, folder: str) -> None:
        """Take group's and others' access away (an earlier version, or the Go plugin,
        made folders 0755): a container's setuid files must not be runnable by host users."""
        try:
            self.report.tightened += make_private(folder)
        except FileNotFoundError:
            pass
        except OSError as error:
            log.error("cannot take the access of other users away from %s: %s", folder, error)

    def _finish(self) -> None:
        """Once every volume is recovered: what concerns the whole root."""
        store = self.store
        _finish_removals(store)
        _remove_views(store)
        try:
            VolumeSnapshots(store, self.releases).collect_orphans()
        except (PluginError, OSError) as error:
            log.warning("cannot remove the layers no volume uses: %s", error)
        if self.report.tightened:
            log.warning(
                "took the access of other users away from %d folder(s) under %s: a "
                "container's setuid files must not be runnable by host users",
                self.report.tightened,
                store.root,
            )
        if self.report.still_mounted:
            log.warning(
                "volumes still mounted from the previous run: %s. Containers that stopped "
                "while the plugin was down never sent their Unmount, so these volumes may "
                "stay mounted (and a volatile one keeps its changes) until their last user "
                "stops or the host reboots",
                ", ".join(self.report.still_mounted),
            )
        self.end()

    def end(self) -> None:
        """The store stops asking here, and the root's flock goes."""
        if self.store.recovery is self:
            self.store.recovery = None
        if self._root_fd >= 0:
            os.close(self._root_fd)
            self._root_fd = -1


def recover(store: VolumeStore, releases: PendingReleases) -> RecoveryReport:
    """The whole recovery at once, before anything is served (tests, benchmarks)."""
    recovery = StartupRecovery(store, releases)
    recovery.begin()
    try:
        return recovery.run()
    finally:
        recovery.end()


def daemon_recovering(root: str) -> bool:
    """Whether a daemon is still recovering the state root (it holds the root's flock)."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # and with it this probe's lock, when it got it
    return False


def recover_for_command(store: VolumeStore) -> None:
    """For a command: while a daemon still recovers, each volume the command touches is
    recovered first (see the module's notes)."""
    if daemon_recovering(str(store.root)):
        StartupRecovery(store, PendingReleases(), by_daemon=False).begin()


def _reset_cut_short(volume: Volume) -> bool:
    """Whether a volume without mountpoint/ keeps records or a workdir/: its reset (or
    an unmount's teardown) was cut short after the mountpoint went. No overlay can be
    mounted without a mountpoint, so such records describe nobody either."""
    try:
        return os.path.isdir(volume.workdir) or (
            volume.records.exists() and volume.records.in_use()
        )
    except OSError as error:
        raise InternalError(f"cannot recover volume {volume.name}", error) from error


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
    """Unmount and remove the read-only views a command left (see upper.VIEW_PREFIX)."""
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
