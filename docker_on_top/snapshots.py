"""Snapshots, rollback, destroy and clones, with ZFS's vocabulary (SPEC B12).

`snapshot VOLUME@NAME` freezes the volume's changes as a read-only layer (one rename,
see layers.py; a copy out of a sized volume's image, which holds only the volume's own
changes); the volume goes on over it with no changes of its own. A clone
(`create -o from=VOLUME@NAME`) is a new volume over the same bases and layers, so
nothing is copied. `rollback` throws away what the volume changed since NAME, later
snapshots of it included; `destroy` removes the name. A layer goes when no volume lists
it any more. Each of these holds the volume's lock while nobody uses it, then the layer
store's lock.

The order of the steps keeps every change a volume had through a crash: the snapshot
intent (`snapshot.json`) before the rename (or the copy), the metadata (the commit)
before the new upper (or the emptied one), so that the next use of the volume finishes
or undoes what was cut short.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime, timezone

from . import changes, sizelimit
from .commands import unused
from .errors import BusyError, InternalError, UserError
from .kernel import LockTimeout
from .layers import MAX_LOWER_LAYERS, LayerInfo, finish_rollback, make_upper_like
from .metadata import Metadata, Snapshot, rfc3339
from .releases import PendingReleases
from .store import VolumeStore, parse_reference
from .upper import empty_own_changes, empty_storage_upper, own_changes
from .volume import ROLLBACK, SNAPSHOT, Volume

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SnapshotDetails:
    name: str
    volume: str
    created_at: str
    layer: str
    size_bytes: int | None  # what the layer holds on disk; None when it cannot be read
    used_by: tuple[str, ...]  # the volumes over this layer

    def to_json(self) -> dict[str, object]:
        return {
            "Name": self.name,
            "Volume": self.volume,
            "CreatedAt": self.created_at,
            "Layer": self.layer,
            "SizeBytes": self.size_bytes,
            "UsedBy": list(self.used_by),
        }


class VolumeSnapshots:
    def __init__(self, store: VolumeStore, releases: PendingReleases | None = None) -> None:
        self.store = store
        self.layers = store.layers
        self.releases = releases if releases is not None else PendingReleases()

    def snapshot(self, volume_name: str, name: str | None = None) -> str:
        """Freeze the volume's changes as a layer named `name` (default: the time, UTC);
        returns the name. Refused while the volume is in use."""
        volume = self.store.volume(volume_name)
        held = unused(self.store, self.releases, volume, "a snapshot")
        with held as metadata, self._layers_locked():
            return self._snapshot(volume, metadata, name)

    def _snapshot(self, volume: Volume, metadata: Metadata, name: str | None) -> str:
        """Under the volume's lock (nobody using it) and the layer store's."""
        taken = {snapshot.name for snapshot in metadata.snapshots}
        if name is None:
            name = _free_name(_timestamp_name(), taken)
        elif name in taken:
            raise UserError(f"volume {volume.name} has a snapshot {name} already")
        if len(metadata.bases) + len(metadata.layers) + 1 > MAX_LOWER_LAYERS:
            raise UserError(
                f"volume {volume.name} has {len(metadata.bases) + len(metadata.layers)} "
                f"layers; overlayfs stacks at most {MAX_LOWER_LAYERS}"
            )
        layer = self.layers.new_id()
        created_at = rfc3339(time.time())
        info = LayerInfo(layer, volume.name, name, created_at)
        taken_metadata = replace(
            metadata,
            layers=(*metadata.layers, layer),
            snapshots=(*metadata.snapshots, Snapshot(name, layer, created_at)),
        )
        try:
            volume.begin(SNAPSHOT, layer)
            if metadata.size_limit is None:
                self.layers.freeze(layer, volume.upper, info)
                volume.write_metadata(taken_metadata)
                make_upper_like(self.layers.tree(layer), volume.upper)
            else:
                # The layer is on the host's disk, outside the limit: the changes are
                # copied out of the storage, and only once they are listed as a layer
                # does the upper there become empty.
                with own_changes(self.store, volume, metadata) as upper:
                    self.layers.copy_in(layer, upper, info)
                    volume.write_metadata(taken_metadata)
                    empty_storage_upper(volume, metadata, upper)
            volume.end(SNAPSHOT)
        except sizelimit.ImageInUse as error:
            raise InternalError("failed to take the snapshot", error) from error
        except OSError as error:
            raise InternalError(
                "failed to take the snapshot (the volume's next use finishes or undoes it)",
                error,
            ) from error
        log.info("volume %s: snapshot %s (layer %s)", volume.name, name, layer)
        return name

    def list(self, volume_name: str | None = None) -> list[SnapshotDetails]:
        """Every snapshot (or those of one volume), with what uses its layer."""
        users: dict[str, list[str]] = {}
        named: list[tuple[str, Snapshot]] = []
        for volume in self.store.volumes():
            try:
                metadata = self.store.metadata(volume)
            except (UserError, InternalError):
                continue
            for layer in metadata.layers:
                users.setdefault(layer, []).append(volume.name)
            if volume_name is None or volume.name == volume_name:
                named += [(volume.name, snapshot) for snapshot in metadata.snapshots]
        if volume_name is not None and not self.store.volume(volume_name).exists():
            raise UserError("no such volume")
        found = []
        for owner, snapshot in named:
            try:
                size: int | None = changes.changes_size(self.layers.tree(snapshot.layer)).disk_bytes
            except OSError:
                size = None
            found.append(
                SnapshotDetails(
                    snapshot.name,
                    owner,
                    snapshot.created_at,
                    snapshot.layer,
                    size,
                    tuple(users.get(snapshot.layer, ())),
                )
            )
        return found

    def rollback(self, volume_name: str, name: str) -> None:
        """Throw away what the volume changed since its snapshot `name`: its own changes
        and the layers of later snapshots (removed when no other volume uses them)."""
        volume = self.store.volume(volume_name)
        with unused(self.store, self.releases, volume, "a rollback") as metadata:
            snapshot = _snapshot_named(volume, metadata, name)
            with self._layers_locked():
                try:
                    # The intent first: a crash at any later step leaves a rollback that
                    # the volume's next use finishes, never its changes half thrown away.
                    volume.begin(ROLLBACK, snapshot.layer)
                    discard = functools.partial(empty_own_changes, self.store, volume, metadata)
                    kept = finish_rollback(volume, metadata, snapshot.layer, discard).layers
                    self._collect(metadata.layers[len(kept) :])
                except (OSError, sizelimit.ImageInUse) as error:
                    raise InternalError("failed to roll back (run it again)", error) from error
        log.info("volume %s: rolled back to %s", volume_name, name)

    def destroy(self, volume_name: str, name: str) -> None:
        """Remove the snapshot's name; its layer stays while a volume is over it."""
        volume = self.store.volume(volume_name)
        with self.store.locked(volume, "a destroy"):
            metadata = self.store.metadata(volume)
            snapshot = _snapshot_named(volume, metadata, name)
            kept = tuple(s for s in metadata.snapshots if s != snapshot)
            try:
                volume.write_metadata(replace(metadata, snapshots=kept))
            except OSError as error:
                raise InternalError("failed to destroy the snapshot", error) from error
        log.info("volume %s: snapshot %s destroyed", volume_name, name)

    def clone(
        self, volume: Volume, reference: str, *, volatile: bool, size_limit: int | None = None
    ) -> None:
        """Make `volume` a new volume whose content starts as `reference`'s (VOLUME@NAME,
        or VOLUME: a snapshot of it is taken first, refused while it is in use)."""
        origin_name, name = parse_reference(reference)
        origin = self.store.volume(origin_name)
        if name is None:
            held = unused(self.store, self.releases, origin, "a clone's snapshot")
            with held as metadata, self._layers_locked():
                name = self._snapshot(origin, metadata, None)
                self._make_clone(volume, origin, name, volatile, size_limit)
            return
        with self._layers_locked():
            self._make_clone(volume, origin, name, volatile, size_limit)

    def _make_clone(
        self, volume: Volume, origin: Volume, name: str, volatile: bool, size_limit: int | None
    ) -> None:
        """Under the layer store's lock, so that no layer the clone lists goes meanwhile."""
        metadata = self.store.metadata(origin)
        snapshot = _snapshot_named(origin, metadata, name)
        layers = metadata.layers[: metadata.layers.index(snapshot.layer) + 1]
        missing = [layer for layer in layers if not self.layers.exists(layer)]
        if missing:
            raise InternalError(
                f"the layers of {origin.name}@{name} are missing", ", ".join(missing)
            )
        self.store.create(
            volume,
            Metadata(
                base_dir=metadata.base_dir,
                volatile=volatile,
                created_at=rfc3339(time.time()),
                upper_bases=metadata.upper_bases,
                layers=layers,
                origin=f"{origin.name}@{name}",
                size_limit=size_limit,
            ),
        )
        log.info("volume %s: a clone of %s@%s", volume.name, origin.name, name)

    def collect_after_remove(self, layers: tuple[str, ...]) -> None:
        """After a volume went: remove those of its layers no other volume uses."""
        if not layers:
            return
        with self._layers_locked():
            self._collect(layers)

    def collect_orphans(self) -> None:
        """At start-up: remove the layers no volume uses (left by a crash)."""
        if not self.layers.folder.is_dir():
            return  # no volume ever had a snapshot
        with self._layers_locked():
            self._collect(None)

    def _collect(self, candidates: Iterable[str] | None) -> None:
        """Remove the layers (of `candidates`, or all) that no volume uses. While one
        volume's metadata or snapshot intent cannot be read, which layers it uses cannot
        be told: then none is removed (the next collection tries again)."""
        in_use: set[str] = set()
        for volume in self.store.volumes():
            try:
                in_use.update(self.store.metadata(volume).layers)
                pending = volume.in_progress(SNAPSHOT)
            except UserError:
                continue  # no metadata.json: it mounts nothing
            except (InternalError, ValueError) as error:
                log.warning(
                    "volume %s: cannot tell which layers it uses, so none is removed: %s",
                    volume.name,
                    error,
                )
                return
            if pending is not None:
                in_use.add(pending)
        self.layers.collect(in_use, candidates)

    @contextmanager
    def _layers_locked(self) -> Iterator[None]:
        lock = self.layers.lock(time.monotonic() + self.store.lock_timeout)
        try:
            lock.__enter__()
        except LockTimeout:
            raise BusyError(
                "the layers are busy: another snapshot, clone or removal is under way; try again"
            ) from None
        try:
            yield
        finally:
            lock.__exit__(None, None, None)


def _snapshot_named(volume: Volume, metadata: Metadata, name: str) -> Snapshot:
    for snapshot in metadata.snapshots:
        if snapshot.name == name:
            return snapshot
    raise UserError(f"volume {volume.name} has no snapshot {name}")


def _timestamp_name() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def _free_name(wanted: str, taken: set[str]) -> str:
    name, number = wanted, 1
    while name in taken:
        number += 1
        name = f"{wanted}-{number}"
    return name
