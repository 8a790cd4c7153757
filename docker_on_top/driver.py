"""What each volume plugin request means: the eight operations of Docker's volume
plugin protocol, each readable top to bottom.

The driver knows nothing about HTTP: the protocol layer (plugin_api) decodes a request,
calls one method here and encodes what it returns; a raised PluginError becomes
`{"Err": ...}`. A Mount is: validate, lock the volume, read its metadata under the
lock, apply releases still due, first user? then mount, record the use. An Unmount:
lock, release the record, last user? then unmount. The ordering follows the invariant
stated in volume.py, which also lets an Unmount reply once its record is gone, before
the teardown (SPEC B11).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass

from . import kernel, overlay
from .errors import BusyError, InternalError, PluginError, UserError
from .options import creation
from .releases import PendingReleases, release_one, usage_count
from .snapshots import VolumeSnapshots
from .store import NO_SUCH_VOLUME, VolumeStore
from .upper import settle
from .volume import NAME_MAX_BYTES, NAME_PATTERN, Volume

log = logging.getLogger(__name__)

# dockerd's mount IDs are 64 hex digits; anything that is one plain file name is accepted.
MOUNT_ID_PATTERN = NAME_PATTERN
# List looks at each volume's mountpoint up to this many volumes, and reads the mount
# table once beyond: the crossing point of the two costs.
_STAT_EACH_UP_TO = 16


@dataclass(frozen=True)
class VolumeInfo:
    name: str
    mountpoint: str  # empty while the volume is not mounted
    created_at: str  # empty when unknown
    status: Mapping[str, object]  # shown by `docker volume inspect`; empty in List


class Driver:
    def __init__(self, store: VolumeStore, releases: PendingReleases | None = None) -> None:
        self.store = store
        self.releases = releases if releases is not None else PendingReleases()

    def capabilities(self) -> str:
        return "local"

    def recovering(self) -> bool:
        """Whether start-up recovery has volumes left, which a Get may wait for."""
        return self.store.recovery is not None

    def few_volumes(self) -> bool:
        """Whether List is a stat or two per volume (see list_volumes)."""
        return self.store.holds_at_most(_STAT_EACH_UP_TO)

    def create(self, name: str, options: Mapping[str, str]) -> None:
        volume = self.store.volume(name)
        self.store.recover_first(volume)  # a Create cut short goes first
        asked = creation(self.store, options)
        if asked.origin is not None:
            if volume.exists():
                raise UserError("volume already exists")
            VolumeSnapshots(self.store, self.releases).clone(
                volume, asked.origin, volatile=asked.volatile, size_limit=asked.size_limit
            )
            return
        assert asked.metadata is not None
        self.store.create(volume, asked.metadata)
        log.info(
            "created volume %s on %s (volatile: %s)",
            name,
            ", ".join(asked.metadata.bases),
            asked.volatile,
        )

    def list_volumes(self) -> list[VolumeInfo]:
        volumes = list(self.store.volumes())
        if len(volumes) <= _STAT_EACH_UP_TO:
            # A stat or two for each (a folder not mounted has no mountpoint/): the mount
            # table costs more than that to read (over 100 µs, more with each mount).
            listed = (self._listed(volume, mounted=_mounted(volume)) for volume in volumes)
        else:
            mounted = kernel.mount_points()
            real_root = self.store.real_root
            listed = (
                self._listed(volume, mounted=f"{real_root}/{volume.name}/mountpoint" in mounted)
                for volume in volumes
            )
        return [info for info in listed if info is not None]

    def get(self, name: str) -> VolumeInfo:
        """Only what is on disk, and never a failure for an existing volume (dockerd
        forgets a volume whose Get fails). Get comes before every Mount and Unmount, so it
        costs a few small reads, never a walk of the changes."""
        volume = self.store.volume(name)
        try:
            self.store.recover_first(volume)  # no stale record may be counted
        except BusyError as error:
            # Held for long by a command (which recovers a volume itself first while a
            # daemon recovers): answer from the disk rather than fail.
            log.info("volume %s: %s", name, error)
        described = self.store.described(volume)
        if described is None:
            raise UserError(NO_SUCH_VOLUME)
        created_at, metadata = described
        status: dict[str, object] = {}
        if metadata is not None:
            status.update(Base=metadata.base_dir, Volatile=metadata.volatile)
            if not metadata.in_go_format:
                status.update(
                    Bases=list(metadata.bases),
                    Snapshots=[snapshot.name for snapshot in metadata.snapshots],
                    Layers=len(metadata.layers),
                    Origin=metadata.origin or "",
                )
            if metadata.size_limit is not None:
                used, limit = overlay.storage_usage(volume, metadata)
                status.update(Size=used, SizeLimit=limit)
        mounts = 0
        try:
            mounts = sum(usage_count(volume, i) or 0 for i in volume.records.ids())
        except OSError as error:
            log.warning("volume %s: cannot read its usage records: %s", volume.name, error)
        status.update(Mounted=mounts > 0, ActiveMounts=mounts)
        return VolumeInfo(
            name=volume.name,
            mountpoint=overlay.mountpoint_reply(volume) if mounts else "",
            created_at=created_at,
            status=status,
        )

    def path(self, name: str) -> str:
        volume = self.store.volume(name)
        if not volume.exists():
            raise UserError(NO_SUCH_VOLUME)
        return overlay.mountpoint_reply(volume)

    def remove(self, name: str) -> None:
        volume = self.store.volume(name)
        self.store.forget(volume)
        self.store.recover_first(volume)  # which may remove a Create cut short
        # A folder left by a cut-short create may have no activemounts/ to lock.
        has_records = volume.records.exists()
        if not has_records and not volume.exists():
            return
        try:
            layers: tuple[str, ...] = ()
            with self.store.locked(volume) if has_records else nullcontext():
                if self.store.layers.folder.is_dir():  # else no volume has layers
                    layers = self._layers_of(volume)
                if has_records and volume.records.in_use():
                    # Records go before the overlay, as at every unmount.
                    log.warning(
                        "removing volume %s although its records say it is in use (%s)",
                        name,
                        ", ".join(volume.records.ids()),
                    )
                    volume.records.clear()
                overlay.detach_everything(volume)
                volume.destroy()
                # Only once it is gone: a Remove that fails keeps the releases to apply.
                self.releases.take(volume)
            VolumeSnapshots(self.store, self.releases).collect_after_remove(layers)
        except UserError:
            return  # removed meanwhile by another request or process
        except FileNotFoundError:
            return
        except OSError as error:
            raise InternalError("failed to remove the volume's folder", error) from error
        log.info("removed volume %s", name)

    def mount(self, name: str, mount_id: str) -> str:
        volume = self.store.volume(name)
        _check_mount_id(mount_id)
        with self.store.locked(volume):
            # Read under the lock: the volume may have been removed and made again, with
            # another base, while this request waited.
            metadata = self.store.metadata(volume)
            self.releases.retry(volume)
            try:
                # One listing says both whether anyone uses the volume and whether this
                # ID has a record to count up (the open of a missing record is spared).
                users = volume.records.ids()
            except OSError as error:
                raise InternalError("failed to read the volume's usage records", error) from error
            first_user = not users
            mounted_here = False
            if first_user:
                metadata = settle(self.store, volume, metadata)
                if overlay.free_mountpoint(volume):
                    overlay.mount(self.store, volume, metadata, discard=True)
                    mounted_here = True
                elif metadata.volatile:
                    raise UserError(
                        f"volume {name}: {overlay.HELD_ON_HOST}, so it cannot discard its "
                        "changes (it is volatile); close them first"
                    )
                else:
                    log.warning(
                        "volume %s: reusing its overlay, which something on the host holds",
                        name,
                    )
            elif not kernel.is_mount_point(volume.mountpoint_str):
                log.warning(
                    "volume %s has usage records but no overlay mounted; mounting it again", name
                )
                overlay.mount(self.store, volume, metadata, discard=False)
                mounted_here = True
            try:
                count = (usage_count(volume, mount_id) or 0) if mount_id in users else 0
                volume.records.set(mount_id, count + 1)
            except OSError as error:
                # No record may exist without a mount, nor a mount we made without a record.
                if mounted_here:
                    try:
                        overlay.unmount(volume)
                    except InternalError as undo_error:
                        log.error("volume %s: cannot undo its mount: %s", name, undo_error)
                raise InternalError("failed to record the mount", error) from error
        log.debug("mounted volume %s for %s", name, mount_id)
        return overlay.mountpoint_reply(volume)

    def unmount(self, name: str, mount_id: str, reply: Callable[[], None] | None = None) -> None:
        """Release one use of `mount_id`; the last one unmounts the overlay.

        With `reply`, the caller answers its client when only the teardown (unmounting,
        removing the mount folders) is left: `reply` is called then, and the teardown
        follows, still under the volume's lock, so the next Mount or Remove waits for
        it (SPEC B11). Its failure is then logged, not raised: the record is gone, so
        what stays is a stray mount, which the next Mount or start-up takes off.
        """
        volume = self.store.volume(name)
        _check_mount_id(mount_id)
        locked = False
        try:
            with self.store.locked(volume):
                locked = True
                try:
                    self.releases.retry(volume)
                    now_unused = release_one(volume, mount_id)
                except (OSError, PluginError) as error:
                    self.releases.keep(volume, mount_id)
                    self.releases.save(volume)
                    if isinstance(error, PluginError):
                        raise
                    raise InternalError(
                        "failed to update the volume's usage records; it stays mounted", error
                    ) from error
                if now_unused and reply is not None:
                    # Logged before the reply: the request's last step is then its teardown.
                    log.debug("unmounted volume %s for %s; its teardown follows", name, mount_id)
                    reply()
                    _tear_down(volume)
                    return
                if now_unused:
                    overlay.unmount(volume)
        except (BusyError, InternalError):
            if not locked:
                # Not even the lock could be taken: keep the release for the next request.
                self.releases.keep(volume, mount_id)
            raise
        log.debug("unmounted volume %s for %s", name, mount_id)

    def _layers_of(self, volume: Volume) -> tuple[str, ...]:
        """The layers a volume being removed lists, for those no other volume uses to go
        too; when its metadata cannot be read, they wait for the next collection."""
        described = self.store.described(volume)
        if described is None or described[1] is None:
            log.warning("volume %s: its layers are left for the next start to collect", volume.name)
            return ()
        return described[1].layers

    def _listed(self, volume: Volume, *, mounted: bool) -> VolumeInfo | None:
        described = self.store.described(volume)
        if described is not None and described[1] is None and self.store.recovery is not None:
            # Perhaps a Create cut short, which its recovery removes: it decides first.
            try:
                self.store.recover_first(volume)
            except PluginError as error:
                log.warning("volume %s: not listed, not recovered yet: %s", volume.name, error)
                return None
            described = self.store.described(volume)
        if described is None:
            return None  # removed meanwhile
        return VolumeInfo(
            name=volume.name,
            mountpoint=overlay.mountpoint_reply(volume) if mounted else "",
            created_at=described[0],
            status={},
        )


def _tear_down(volume: Volume) -> None:
    """After the Unmount's reply: its overlay.unmount, which can no longer fail the
    request."""
    try:
        overlay.unmount(volume)
    except InternalError as error:
        log.error(
            "volume %s: its teardown after the Unmount failed (a stray mount stays until its "
            "next Mount or the next start): %s",
            volume.name,
            error,
        )


def _mounted(volume: Volume) -> bool:
    """For List, which never fails for a volume: one removed meanwhile is not mounted."""
    try:
        return kernel.is_mount_point(volume.mountpoint_str)
    except OSError:
        return False


def _check_mount_id(mount_id: object) -> None:
    if not isinstance(mount_id, str) or not mount_id:
        raise UserError("mount ID must be a non-empty string")
    if not MOUNT_ID_PATTERN.fullmatch(mount_id) or len(os.fsencode(mount_id)) > NAME_MAX_BYTES:
        raise UserError(
            "invalid mount ID: it must be one file name of letters, digits, '_', '.' and '-'"
        )
