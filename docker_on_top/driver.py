"""What each volume plugin request means.

The driver knows nothing about HTTP: the protocol layer decodes a request, calls one
method here and encodes what it returns; a raised PluginError becomes `{"Err": ...}`.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from . import changes, kernel
from .errors import InternalError, PluginError, UserError
from .volume import (
    NAME_MAX_BYTES,
    NAME_PATTERN,
    PRIVATE_MODE,
    REMOVED_PREFIX,
    Metadata,
    MetadataCache,
    Volume,
    make_private,
    rfc3339,
)
from .walk import remove_tree

log = logging.getLogger(__name__)

# Called with the number of entries copied so far during long work.
Progress = Callable[[int], None]

NO_SUCH_VOLUME = "no such volume"
OPTIONS = ("base", "volatile")
_TRUE_WORDS = frozenset({"true", "yes"})
_FALSE_WORDS = frozenset({"false", "no"})
# dockerd's mount IDs are 64 hex digits; anything that is one plain file name is accepted.
MOUNT_ID_PATTERN = NAME_PATTERN
# Podman sends this one mount ID for all its containers (libpod's pseudoCtrID) and
# counts its users itself.
PODMAN_MOUNT_ID = "2f73349cfc4630255319c6c8dfc1b46a8996ace9d14d8e07563b165915918ec2"
# Removing a volume detaches mounts stacked on its mountpoint by earlier failures; a
# bound keeps a mountpoint that refuses to become free from looping forever.
_MAX_STACKED_MOUNTS = 16


@dataclass(frozen=True)
class VolumeInfo:
    name: str
    mountpoint: str  # empty while the volume is not mounted
    created_at: str  # empty when unknown
    status: Mapping[str, object]  # shown by `docker volume inspect`; empty in List


@dataclass(frozen=True)
class VolumeDetails:
    """Everything known about one volume, for the command line."""

    name: str
    base: str
    volatile: bool
    created_at: str
    mountpoint: str
    mounted: bool  # what the kernel's mount table says
    mounts: Mapping[str, int]  # usage count by mount ID: the records
    # Disk usage of the changes, and the sizes of their files; None when unreadable.
    changes_bytes: int | None
    changes_apparent_bytes: int | None
    # Why some of the above could not be read; empty when all could.
    error: str = ""

    @classmethod
    def unreadable(cls, name: str, error: str) -> VolumeDetails:
        return cls(name, "", False, "", "", False, {}, None, None, error)

    def to_json(self) -> dict[str, object]:
        found: dict[str, object] = {
            "Name": self.name,
            "Base": self.base,
            "Volatile": self.volatile,
            "CreatedAt": self.created_at,
            "Mountpoint": self.mountpoint,
            "Mounted": self.mounted,
            "Mounts": dict(self.mounts),
            "ChangesBytes": self.changes_bytes,
            "ChangesApparentBytes": self.changes_apparent_bytes,
        }
        if self.error:
            found["Error"] = self.error
        return found


@dataclass(frozen=True)
class Finding:
    """A disagreement between a volume's records, the kernel and dockerd."""

    volume: str
    problem: str
    fixed: bool = False


@dataclass(frozen=True)
class RecoveryReport:
    clean: list[str]
    cleaned: list[str]
    still_mounted: list[str]
    half_made: list[str]


class Driver:
    def __init__(self, root: Path, host_root: Path | None = None) -> None:
        self.root = root
        # Set when the daemon runs in a container (a managed plugin) with the host's root
        # mounted there: bases are the host's paths, kept as the user gave them in
        # metadata.json and looked up under `host_root`.
        self.host_root = host_root
        # Releases (Unmounts) whose record could not be updated, by volume name: they
        # are retried under the volume's lock before its next Mount or Unmount. Only
        # the thread holding that volume's lock touches its entry. Also kept on disk
        # (unreleased.json) so that a restart does not forget them.
        self._unreleased: dict[str, Counter[str]] = {}
        self._metadata_cache = MetadataCache()

    # --- start-up -----------------------------------------------------------------

    def recover(self) -> RecoveryReport:
        """Bring every volume back to a state the invariant allows after an unclean stop.

        Raises InternalError for a volume that can be neither recognised nor cleaned,
        since serving on top of it could mount the wrong thing.
        """
        self.root.mkdir(mode=PRIVATE_MODE, parents=True, exist_ok=True)
        self._make_folders_private()
        self._finish_removals()
        report = RecoveryReport([], [], [], [])
        for volume in self._volumes():
            if not volume.has_metadata() and self._remove_half_made(volume):
                report.half_made.append(volume.name)
                continue
            try:
                volume.mountpoint.rmdir()
            except FileNotFoundError:
                report.clean.append(volume.name)
                continue
            except OSError as error:
                if error.errno == errno.EBUSY:
                    self._load_unreleased(volume)
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
            except OSError as error:
                raise InternalError(f"cannot recover volume {volume.name}", error) from error
            report.cleaned.append(volume.name)
            log.info(
                "volume %s: the previous run ended uncleanly; usage records reset", volume.name
            )
        if report.still_mounted:
            log.warning(
                "volumes still mounted from the previous run: %s. Containers that stopped while "
                "the plugin was down never sent their Unmount, so these volumes may stay mounted "
                "(and a volatile one keeps its changes) until their last user stops or the host "
                "reboots",
                ", ".join(report.still_mounted),
            )
        return report

    def _make_folders_private(self) -> None:
        """Tighten a state root and volume folders made open to others (by an earlier
        version, or by the Go plugin, which makes them 0755)."""
        tightened = 0
        for folder in [self.root, *(volume.folder for volume in self._volumes())]:
            try:
                tightened += make_private(folder)
            except OSError as error:
                log.error("cannot take the access of other users away from %s: %s", folder, error)
        if tightened:
            log.warning(
                "took the access of other users away from %d folder(s) under %s: a container's"
                " setuid files must not be runnable by host users",
                tightened,
                self.root,
            )

    def _finish_removals(self) -> None:
        """Delete the folders of removals that a crash cut short (see Volume.destroy)."""
        for leftover in self.root.glob(f"{REMOVED_PREFIX}*"):
            try:
                if kernel.is_mount_point(leftover / "mountpoint"):
                    kernel.unmount(leftover / "mountpoint", flags=kernel.MNT_DETACH)
                remove_tree(leftover)
            except OSError as error:
                log.warning("cannot finish removing %s: %s", leftover, error)
            else:
                log.info("finished removing %s, cut short by the last run", leftover)

    def _remove_half_made(self, volume: Volume) -> bool:
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
        log.warning(
            "removed %s: a volume creation was interrupted before it finished", volume.folder
        )
        return True

    # --- requests -------------------------------------------------------------------

    def capabilities(self) -> str:
        return "local"

    def create(self, name: str, options: Mapping[str, str]) -> None:
        volume = self._volume(name)
        for option in options:
            if option not in OPTIONS:
                raise UserError(
                    f"invalid option {option!r}: the options are 'base' (required) and 'volatile'"
                )
        metadata = Metadata(
            base_dir=self._checked_base(options.get("base")),
            volatile=_parse_volatile(options.get("volatile", "false")),
            created_at=rfc3339(time.time()),
        )
        try:
            volume.create(metadata)
        except FileExistsError:
            raise UserError("volume already exists") from None
        except OSError as error:
            raise InternalError("failed to create the volume's folder", error) from error
        log.info(
            "created volume %s on %s (volatile: %s)", name, metadata.base_dir, metadata.volatile
        )

    def list_volumes(self) -> list[VolumeInfo]:
        # One read of the mount table rather than a look into each volume's records.
        mounted = kernel.mount_points()
        real_root = os.path.realpath(self.root)
        listed = (
            self._listed(volume, mounted=f"{real_root}/{volume.name}/mountpoint" in mounted)
            for volume in self._volumes()
        )
        return [info for info in listed if info is not None]

    def get(self, name: str) -> VolumeInfo:
        return self._info(self._volume(name))

    def path(self, name: str) -> str:
        volume = self._volume(name)
        if not volume.exists():
            raise UserError(NO_SUCH_VOLUME)
        return _mountpoint_reply(volume)

    def remove(self, name: str) -> None:
        volume = self._volume(name)
        self._unreleased.pop(name, None)
        self._metadata_cache.forget(name)
        if not volume.exists():
            return
        try:
            # A folder left by a cut-short create may have no activemounts/ to lock.
            has_records = volume.records.exists()
            with volume.records.lock() if has_records else nullcontext():
                if has_records and volume.records.in_use():
                    # Records go before the overlay, as at every unmount.
                    log.warning(
                        "removing volume %s although its records say it is in use (%s)",
                        name,
                        ", ".join(volume.records.ids()),
                    )
                    volume.records.clear()
                self._detach_everything(volume)
                volume.destroy()
        except FileNotFoundError:
            return  # removed meanwhile by another process
        except OSError as error:
            raise InternalError("failed to remove the volume's folder", error) from error
        log.info("removed volume %s", name)

    def mount(self, name: str, mount_id: str) -> str:
        volume = self._volume(name)
        _check_mount_id(mount_id)
        metadata = self._metadata(volume)
        with self._locked(volume):
            self._retry_unreleased(volume)
            mounted_here = False
            try:
                first_user = not volume.records.in_use()
            except OSError as error:
                raise InternalError("failed to read the volume's usage records", error) from error
            if first_user or not kernel.is_mount_point(volume.mountpoint):
                if not first_user:
                    log.warning(
                        "volume %s has usage records but no overlay mounted; mounting it again",
                        name,
                    )
                self._mount_overlay(volume, metadata, discard_changes=first_user)
                mounted_here = True
            try:
                count = 0 if first_user else self._usage_count(volume, mount_id) or 0
                volume.records.set(mount_id, count + 1)
            except OSError as error:
                # No record may exist without a mount, nor a mount we made without a record.
                if mounted_here:
                    try:
                        self._unmount_overlay(volume)
                    except InternalError as undo_error:
                        log.error("volume %s: cannot undo its mount: %s", name, undo_error)
                raise InternalError("failed to record the mount", error) from error
        log.debug("mounted volume %s for %s", name, mount_id)
        return _mountpoint_reply(volume)

    def unmount(self, name: str, mount_id: str) -> None:
        volume = self._volume(name)
        _check_mount_id(mount_id)
        locked = False
        try:
            with self._locked(volume):
                locked = True
                try:
                    self._retry_unreleased(volume)
                    now_unused = self._release(volume, mount_id)
                except (OSError, PluginError) as error:
                    self._keep_unreleased(volume, mount_id, persist=True)
                    if isinstance(error, PluginError):
                        raise
                    raise InternalError(
                        "failed to update the volume's usage records; it stays mounted", error
                    ) from error
                if now_unused:
                    self._unmount_overlay(volume)
        except InternalError:
            if not locked:
                # Not even the lock could be taken: keep the release for the next request.
                self._keep_unreleased(volume, mount_id, persist=False)
            raise
        log.debug("unmounted volume %s for %s", name, mount_id)

    def _keep_unreleased(self, volume: Volume, mount_id: str, *, persist: bool) -> None:
        """Remember a release that could not be applied, to retry it under the lock
        before the volume's next Mount or Unmount; also on disk when `persist` (which
        needs the lock)."""
        pending = self._unreleased.setdefault(volume.name, Counter())
        pending[mount_id] += 1
        if persist:
            self._save_unreleased(volume, pending)

    def _release(self, volume: Volume, mount_id: str) -> bool:
        """Count one use of `mount_id` less; True when the volume has no user left."""
        count = self._usage_count(volume, mount_id)
        if count is None:
            log.warning(
                "volume %s has no record for mount ID %s; treating it as used once",
                volume.name,
                mount_id,
            )
            count = 1
        if count > 1:
            volume.records.set(mount_id, count - 1)
            return False
        # The record goes first: if unmounting fails, a stray mount remains, never a
        # record without a user.
        volume.records.remove(mount_id)
        return not volume.records.in_use()

    def _retry_unreleased(self, volume: Volume) -> None:
        """Apply releases that failed earlier (for example on an immutable record).

        Until they are applied the records claim users that are gone: mounting then
        would hand out a volume a volatile volume never discarded, so it is refused.
        """
        pending = self._unreleased.get(volume.name)
        if not pending:
            return
        for mount_id in list(pending):
            while pending[mount_id] > 0:
                try:
                    self._release(volume, mount_id)
                except OSError as error:
                    self._save_unreleased(volume, pending)
                    raise InternalError(
                        f"the usage record of mount ID {mount_id} could not be released when "
                        "its container stopped and still cannot be",
                        error,
                    ) from error
                pending[mount_id] -= 1
            del pending[mount_id]
        del self._unreleased[volume.name]
        self._save_unreleased(volume, pending)

    @staticmethod
    def _save_unreleased(volume: Volume, pending: Counter[str]) -> None:
        try:
            volume.write_unreleased({i: n for i, n in pending.items() if n > 0})
        except OSError as error:
            log.error("volume %s: cannot save the releases still to apply: %s", volume.name, error)

    def _load_unreleased(self, volume: Volume) -> None:
        try:
            pending = volume.read_unreleased()
        except (OSError, ValueError) as error:
            log.error("volume %s: cannot read the releases still to apply: %s", volume.name, error)
            return
        if pending:
            log.warning(
                "volume %s: %d release(s) failed before the restart; retrying them at its next use",
                volume.name,
                sum(pending.values()),
            )
            self._unreleased[volume.name] = Counter(pending)

    # --- the volume's changes (command line) -------------------------------------------

    def details(self, name: str) -> VolumeDetails:
        """Everything known about a volume; a walk of its changes that fails (a container
        may be changing them meanwhile) is told in `error`, the rest is still given."""
        volume = self._volume(name)
        metadata, created_at = self._metadata_and_creation(volume)
        try:
            mounted = kernel.is_mount_point(volume.mountpoint)
            mounts = {i: self._usage_count(volume, i) or 0 for i in volume.records.ids()}
        except OSError as error:
            raise InternalError(f"failed to read volume {name}", error) from error
        size: changes.ChangesSize | None = None
        problem = ""
        try:
            size = changes.changes_size(volume.upper)
        except OSError as error:
            problem = f"failed to read the volume's changes: {error}"
        return VolumeDetails(
            name=name,
            base=metadata.base_dir,
            volatile=metadata.volatile,
            created_at=created_at,
            mountpoint=str(volume.mountpoint),
            mounted=mounted,
            mounts=mounts,
            changes_bytes=None if size is None else size.disk_bytes,
            changes_apparent_bytes=None if size is None else size.apparent_bytes,
            error=problem,
        )

    def all_details(self) -> Iterator[VolumeDetails]:
        """The details of every volume, one at a time; one that cannot be read is told in
        its own `error`, one removed meanwhile is left out."""
        for volume in self._volumes():
            try:
                yield self.details(volume.name)
            except PluginError as error:
                if volume.exists():
                    yield VolumeDetails.unreadable(volume.name, str(error))

    def diff(self, name: str) -> Iterator[changes.Change]:
        """The volume's changes as they are found (see changes.diff)."""
        volume = self._volume(name)
        metadata = self._metadata(volume)
        return _changes_read(changes.diff(volume.upper, self._on_host(metadata.base_dir)))

    def export(self, name: str, out: BinaryIO, report: changes.Report) -> None:
        """Write the volume's changes to `out` as an image layer; what a layer cannot
        carry is left out and told to `report`."""
        volume = self._volume(name)
        self._metadata(volume)
        try:
            changes.export_layer(volume.upper, out, report)
        except BrokenPipeError:
            raise  # the reader went away: the caller's business, not a failure here
        except OSError as error:
            raise InternalError("failed to export the volume's changes", error) from error

    def reset(self, name: str) -> None:
        volume = self._volume(name)
        with self._unused(volume):
            try:
                volume.discard_changes()
            except OSError as error:
                raise InternalError("failed to throw the changes away", error) from error
        log.info("volume %s: changes thrown away", name)

    def commit_into(self, name: str, target: Path, progress: Progress | None = None) -> None:
        """Write the volume's merged content (base and changes) into the new folder `target`."""
        volume = self._volume(name)
        metadata = self._metadata(volume)
        with self._unused(volume):
            try:
                changes.merge_into(
                    volume.upper, self._on_host(metadata.base_dir), target, progress=progress
                )
            except FileExistsError:
                raise UserError(f"{target} exists already; name a new folder") from None
            except ValueError as error:
                raise UserError(str(error)) from None
            except OSError as error:
                raise InternalError(f"failed to write {target}", error) from error
        log.info("volume %s: merged content written to %s", name, target)

    def commit_into_base(self, name: str, progress: Progress | None = None) -> None:
        """Apply the changes onto the base itself, then start the volume afresh from it."""
        volume = self._volume(name)
        metadata = self._metadata(volume)
        with self._unused(volume):
            try:
                changes.apply_to_base(
                    volume.upper, self._on_host(metadata.base_dir), progress=progress
                )
                volume.discard_changes()
            except OSError as error:
                raise InternalError(
                    f"failed to apply the changes onto {metadata.base_dir} (running the "
                    "command again finishes the job)",
                    error,
                ) from error
        log.info("volume %s: changes applied onto %s", name, metadata.base_dir)

    # --- stuck volumes ------------------------------------------------------------------

    def doctor(
        self, name: str | None, users: Mapping[str, int] | None, *, fix: bool
    ) -> list[Finding]:
        """Compare each volume's records with the mount table and, when `users` is known
        (live containers per volume, from dockerd), with the containers.

        With `fix`, releases what nothing can own: a mounted overlay without records,
        and the records of a volume no live container uses. A volume a live container
        uses is never unmounted.
        """
        # Lazily: the start-up check walks every volume and need not hold them all.
        volumes = [self._volume(name)] if name is not None else self._volumes()
        findings: list[Finding] = []
        for volume in volumes:
            try:
                if not volume.exists():
                    raise UserError(NO_SUCH_VOLUME)
                with self._locked(volume):
                    findings += self._examine(volume, users, fix=fix)
            except PluginError as error:
                if name is not None:
                    raise
                findings.append(Finding(volume.name, f"cannot be examined: {error}"))
            except OSError as error:
                if name is not None:
                    raise InternalError(f"failed to examine volume {name}", error) from error
                findings.append(Finding(volume.name, f"cannot be examined: {error}"))
        return findings

    def _examine(
        self, volume: Volume, users: Mapping[str, int] | None, *, fix: bool
    ) -> list[Finding]:
        ids = volume.records.ids()
        mounted = kernel.is_mount_point(volume.mountpoint)
        pending = volume.read_unreleased()
        if pending:
            self._unreleased[volume.name] = Counter(pending)
        if not ids:
            if not mounted:
                return []
            if fix:
                self._unmount_overlay(volume)
            return [Finding(volume.name, "an overlay is mounted but no record uses it", fix)]
        findings = []
        if not mounted:
            findings.append(
                Finding(volume.name, f"{len(ids)} usage record(s) but no overlay is mounted")
            )
        # dockerd's containers can only vouch for dockerd's mount IDs.
        docker_ids = [mount_id for mount_id in ids if mount_id != PODMAN_MOUNT_ID]
        live = None if users is None else users.get(volume.name, 0)
        if live == 0 and docker_ids:
            if fix:
                for mount_id in docker_ids:
                    volume.records.remove(mount_id)
                    self._unreleased.get(volume.name, Counter()).pop(mount_id, None)
                    pending.pop(mount_id, None)
                volume.write_unreleased(pending)
                if not volume.records.in_use():
                    self._unmount_overlay(volume)
            findings.append(
                Finding(
                    volume.name,
                    f"{len(docker_ids)} usage record(s) but no live container uses it (its "
                    "Unmount was lost, e.g. the plugin was down when a container stopped)",
                    fix,
                )
            )
        elif live is not None and len(docker_ids) > live:
            findings.append(
                Finding(
                    volume.name,
                    f"{len(docker_ids)} usage records for {live} live container(s); "
                    "some may be stale, but which cannot be told",
                )
            )
        if pending and not fix:
            findings.append(
                Finding(volume.name, f"releases still to apply at its next use: {pending}")
            )
        return findings

    @contextmanager
    def _unused(self, volume: Volume) -> Iterator[None]:
        """Hold the volume's lock while nobody uses it; refuse when somebody does."""
        with self._locked(volume):
            self._retry_unreleased(volume)
            try:
                users = volume.records.ids()
            except OSError as error:
                raise InternalError("failed to read the volume's usage records", error) from error
            if users:
                raise UserError(
                    f"volume {volume.name} is in use ({len(users)} mount(s)); "
                    "stop the containers that use it first"
                )
            try:
                self._detach_everything(volume)
            except OSError as error:
                raise InternalError("failed to detach a stray overlay", error) from error
            yield

    # --- helpers ----------------------------------------------------------------------

    def _volume(self, name: object) -> Volume:
        if not isinstance(name, str) or not name:
            raise UserError("volume name must be a non-empty string")
        if not NAME_PATTERN.fullmatch(name):
            if "/" in name:
                raise UserError(
                    "volume name cannot contain slashes "
                    "(for specifying host path use `-o base=/path/to/base/directory`)"
                )
            raise UserError(
                "volume name contains illegal characters: "
                'it should comply to "[a-zA-Z0-9][a-zA-Z0-9_.-]*"'
            )
        if len(os.fsencode(name)) > NAME_MAX_BYTES:
            raise UserError(f"volume name is too long (at most {NAME_MAX_BYTES} bytes)")
        return Volume(self.root, name)

    def _volumes(self) -> Iterator[Volume]:
        try:
            entries = sorted(os.scandir(self.root), key=lambda entry: entry.name)
        except OSError as error:
            raise InternalError("failed to list the state root", error) from error
        for entry in entries:
            if entry.is_dir(follow_symlinks=False) and NAME_PATTERN.fullmatch(entry.name):
                yield Volume(self.root, entry.name)

    # What Get and List say of a volume is only what is on disk, and never a failure:
    # dockerd forgets a volume whose Get fails, so a passing problem only leaves fields
    # empty. Get comes before every Mount and Unmount, so it costs a few small reads,
    # never a walk of the changes.

    def _info(self, volume: Volume) -> VolumeInfo:
        described = self._described(volume)
        if described is None:
            raise UserError(NO_SUCH_VOLUME)
        created_at, status = described
        mounts = 0
        try:
            mounts = self._total_uses(volume)
        except OSError as error:
            log.warning("volume %s: cannot read its usage records: %s", volume.name, error)
        status.update(Mounted=mounts > 0, ActiveMounts=mounts)
        return VolumeInfo(
            name=volume.name,
            mountpoint=_mountpoint_reply(volume) if mounts else "",
            created_at=created_at,
            status=status,
        )

    def _listed(self, volume: Volume, *, mounted: bool) -> VolumeInfo | None:
        described = self._described(volume)
        if described is None:
            return None  # removed meanwhile
        created_at, _ = described
        return VolumeInfo(
            name=volume.name,
            mountpoint=_mountpoint_reply(volume) if mounted else "",
            created_at=created_at,
            status={},
        )

    def _described(self, volume: Volume) -> tuple[str, dict[str, object]] | None:
        """When the volume was made, and the status fields its metadata gives; None when
        the volume does not exist."""
        try:
            metadata, created_at = self._metadata_cache.read(volume)
        except (OSError, ValueError) as error:
            if isinstance(error, (FileNotFoundError, NotADirectoryError)) and not volume.exists():
                return None
            log.warning("volume %s: cannot read its metadata: %s", volume.name, error)
            return "", {}
        return created_at, {"Base": metadata.base_dir, "Volatile": metadata.volatile}

    def _total_uses(self, volume: Volume) -> int:
        return sum(self._usage_count(volume, mount_id) or 0 for mount_id in volume.records.ids())

    def _metadata(self, volume: Volume) -> Metadata:
        return self._metadata_and_creation(volume)[0]

    def _metadata_and_creation(self, volume: Volume) -> tuple[Metadata, str]:
        try:
            return self._metadata_cache.read(volume)
        except FileNotFoundError:
            raise UserError(NO_SUCH_VOLUME) from None
        except (OSError, ValueError) as error:
            raise InternalError("failed to read the volume's metadata", error) from error

    @contextmanager
    def _locked(self, volume: Volume) -> Iterator[None]:
        # Each lock opens its own descriptor, so the flock serialises this process's
        # threads as well as other processes.
        lock = volume.records.lock()
        try:
            lock.__enter__()
        except FileNotFoundError:
            raise UserError(NO_SUCH_VOLUME) from None
        except OSError as error:
            raise InternalError("failed to lock the volume's activemounts/", error) from error
        try:
            yield
        finally:
            lock.__exit__()

    @staticmethod
    def _usage_count(volume: Volume, mount_id: str) -> int | None:
        try:
            return volume.records.count(mount_id)
        except ValueError as error:
            # Counting too high only leaves a mount behind; counting too low would
            # unmount under a running container.
            log.warning("volume %s: %s; counting it as one use", volume.name, error)
            return 1

    def _checked_base(self, base: str | None) -> str:
        if base is None:
            raise UserError(
                "`base` option must be provided and set to an absolute path to the base "
                "directory on host"
            )
        if not base.startswith("/"):
            raise UserError("`base` must be an absolute path")
        try:
            os.fsencode(base)
        except UnicodeEncodeError:
            raise UserError("`base` is not a valid path (it cannot be encoded)") from None
        if "\0" in base:
            raise UserError("`base` must not contain a NUL character")
        if kernel.UNSAFE_OPTION_CHARACTERS & set(base):
            raise UserError("directories with commas and/or colons in the path are not supported")
        try:
            is_directory = stat.S_ISDIR(os.stat(self._on_host(base)).st_mode)
        except (FileNotFoundError, NotADirectoryError):
            raise UserError("the base directory does not exist") from None
        except OSError as error:
            raise UserError(f"the specified base directory is inaccessible: {error}") from None
        if not is_directory:
            raise UserError(f"the base {base} is not a directory")
        real_base = Path(os.path.realpath(self._on_host(base)))
        real_root = Path(os.path.realpath(self.root))
        if real_base == real_root or real_root in real_base.parents:
            raise UserError("the base directory must not be inside the plugin's state root")
        if real_base in real_root.parents:
            raise UserError(
                f"the base directory contains the plugin's state root {self.root}, "
                "and overlayfs refuses layers inside one another"
            )
        return base

    def _on_host(self, base: str) -> Path:
        """Where the host's path `base` is found from this process."""
        if self.host_root is None:
            return Path(base)
        return kernel.resolve_in_root(self.host_root, base)

    def _mount_overlay(self, volume: Volume, metadata: Metadata, *, discard_changes: bool) -> None:
        if kernel.is_mount_point(volume.mountpoint):
            log.warning(
                "volume %s: a stray overlay with no user is mounted; detaching it", volume.name
            )
            try:
                kernel.unmount(volume.mountpoint, flags=kernel.MNT_DETACH)
            except OSError as error:
                raise InternalError("failed to detach a stray overlay", error) from error
        try:
            created = volume.make_mount_folders()
        except OSError as error:
            raise InternalError("failed to prepare the mount folders", error) from error
        try:
            if discard_changes and metadata.volatile:
                volume.discard_changes()
            kernel.mount_overlay(
                source=f"docker-on-top_{volume.name}",
                lower=self._on_host(metadata.base_dir),
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
                    f"{metadata.base_dir} exist?)"
                ) from error
            raise InternalError("failed to mount overlay", error) from error

    def _unmount_overlay(self, volume: Volume) -> None:
        try:
            kernel.unmount(volume.mountpoint)
        except OSError as error:
            if error.errno in (errno.EINVAL, errno.ENOENT):
                log.warning("volume %s: its overlay was not mounted at unmount", volume.name)
            elif error.errno != errno.EBUSY:
                raise InternalError("failed to unmount the overlay", error) from error
            else:
                # Something outside the containers holds a file open on it. No user is
                # left, so detach it: the next mount must not find it in the way.
                log.warning(
                    "volume %s is busy outside any container; detaching its overlay lazily",
                    volume.name,
                )
                try:
                    kernel.unmount(volume.mountpoint, flags=kernel.MNT_DETACH)
                except OSError as detach_error:
                    raise InternalError("failed to unmount the overlay", detach_error) from error
        try:
            volume.remove_mount_folders()
        except OSError as error:
            raise InternalError("failed to clean up after unmount", error) from error

    @staticmethod
    def _detach_everything(volume: Volume) -> None:
        for _ in range(_MAX_STACKED_MOUNTS):
            if not kernel.is_mount_point(volume.mountpoint):
                return
            log.warning("volume %s: its mountpoint is still mounted; detaching it", volume.name)
            kernel.unmount(volume.mountpoint, flags=kernel.MNT_FORCE | kernel.MNT_DETACH)
        raise OSError(errno.EBUSY, "mountpoint stays mounted", str(volume.mountpoint))


def _changes_read(found: Iterator[changes.Change]) -> Iterator[changes.Change]:
    try:
        yield from found
    except OSError as error:
        raise InternalError("failed to read the volume's changes", error) from error


def _remove_quietly(volume: Volume, folders: list[Path]) -> None:
    try:
        volume.remove_folders(folders)
    except OSError as error:
        log.warning("volume %s: cannot remove %s: %s", volume.name, folders, error)


def _mountpoint_reply(volume: Volume) -> str:
    # The Go plugin answers with a trailing slash; kept for byte-identical replies.
    return f"{volume.mountpoint}/"


def _check_mount_id(mount_id: object) -> None:
    if not isinstance(mount_id, str) or not mount_id:
        raise UserError("mount ID must be a non-empty string")
    if not MOUNT_ID_PATTERN.fullmatch(mount_id) or len(os.fsencode(mount_id)) > NAME_MAX_BYTES:
        raise UserError(
            "invalid mount ID: it must be one file name of letters, digits, '_', '.' and '-'"
        )


def _parse_volatile(value: str) -> bool:
    word = value.lower()
    if word in _TRUE_WORDS:
        return True
    if word in _FALSE_WORDS:
        return False
    raise UserError("option `volatile` must be either 'true', 'false', 'yes', or 'no'")
