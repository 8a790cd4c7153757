"""What the command line does to one volume's changes besides serving: describe it,
diff and export its changes, reset it, commit it into a folder or onto its base.

Each works on the state root directly, with or without a daemon running, and takes the
volume's lock for as long as it changes anything: a container that starts meanwhile
waits (or is told what holds the volume).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from . import changes, kernel, overlay
from .errors import InternalError, PluginError, UserError
from .releases import PendingReleases, usage_count
from .store import VolumeStore
from .volume import Metadata, Volume

log = logging.getLogger(__name__)

# Called with the number of entries copied so far during long work.
Progress = Callable[[int], None]


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
    changes_bytes: int

    def to_json(self) -> dict[str, object]:
        return {
            "Name": self.name,
            "Base": self.base,
            "Volatile": self.volatile,
            "CreatedAt": self.created_at,
            "Mountpoint": self.mountpoint,
            "Mounted": self.mounted,
            "Mounts": dict(self.mounts),
            "ChangesBytes": self.changes_bytes,
        }


class VolumeCommands:
    def __init__(self, store: VolumeStore, releases: PendingReleases | None = None) -> None:
        self.store = store
        self.releases = releases if releases is not None else PendingReleases()

    def details(self, name: str) -> VolumeDetails:
        volume = self.store.volume(name)
        metadata, created_at = self.store.metadata_and_creation(volume)
        try:
            return VolumeDetails(
                name=name,
                base=metadata.base_dir,
                volatile=metadata.volatile,
                created_at=created_at,
                mountpoint=str(volume.mountpoint),
                mounted=kernel.is_mount_point(volume.mountpoint),
                mounts={i: usage_count(volume, i) or 0 for i in volume.records.ids()},
                changes_bytes=changes.changes_size(volume.upper),
            )
        except OSError as error:
            raise InternalError(f"failed to read volume {name}", error) from error

    def all_details(self) -> list[VolumeDetails]:
        return [self.details(volume.name) for volume in self.store.volumes()]

    def diff(self, name: str) -> list[changes.Change]:
        volume = self.store.volume(name)
        metadata = self.store.metadata(volume)
        try:
            return changes.diff(volume.upper, self.store.on_host(metadata.base_dir))
        except OSError as error:
            raise InternalError("failed to read the volume's changes", error) from error

    def export(self, name: str, out: BinaryIO) -> None:
        volume = self.store.volume(name)
        self.store.metadata(volume)
        try:
            changes.export_layer(volume.upper, out)
        except (OSError, ValueError) as error:
            raise InternalError("failed to export the volume's changes", error) from error

    def reset(self, name: str) -> None:
        volume = self.store.volume(name)
        with self._unused(volume, "a reset"):
            try:
                volume.discard_changes()
            except OSError as error:
                raise InternalError("failed to throw the changes away", error) from error
        log.info("volume %s: changes thrown away", name)

    def commit_into(self, name: str, target: Path, progress: Progress | None = None) -> None:
        """Write the volume's merged content (base and changes) into the new folder `target`."""
        volume = self.store.volume(name)
        with self._unused(volume, "a commit") as metadata:
            try:
                changes.merge_into(
                    volume.upper, self.store.on_host(metadata.base_dir), target, progress=progress
                )
            except FileExistsError:
                raise UserError(f"{target} exists already; name a new folder") from None
            except ValueError as error:
                raise UserError(str(error)) from None
            except OSError as error:
                raise InternalError(f"failed to write {target}", error) from error
        log.info("volume %s: merged content written to %s", name, target)

    def commit_into_base(self, name: str, progress: Progress | None = None) -> None:
        """Apply the changes onto the base itself, then start the volume afresh from it.

        The base changes under every volume over it, around it or inside it: none of them
        may be in use, and all of them stay locked until it is done.
        """
        volume = self.store.volume(name)
        with ExitStack() as held:
            metadata = held.enter_context(self._unused(volume, "a commit --into-base"))
            base = self.store.on_host(metadata.base_dir)
            for other in self._volumes_sharing(base, besides=name):
                try:
                    held.enter_context(
                        self._unused(other, f"a commit --into-base of volume {name}")
                    )
                except UserError as error:
                    raise UserError(
                        f"the base {metadata.base_dir} is shared with volume {other.name}, "
                        f"which must not change under it: {error}"
                    ) from None
            try:
                changes.apply_to_base(volume.upper, base, progress=progress)
                volume.discard_changes()
            except OSError as error:
                raise InternalError(
                    f"failed to apply the changes onto {metadata.base_dir} (running the "
                    "command again finishes the job)",
                    error,
                ) from error
        log.info("volume %s: changes applied onto %s", name, metadata.base_dir)

    def _volumes_sharing(self, base: Path, *, besides: str) -> list[Volume]:
        """The other volumes whose base is `base`, inside it or around it."""
        real = Path(os.path.realpath(base))
        sharing = []
        for other in self.store.volumes():
            if other.name == besides:
                continue
            try:
                theirs = self.store.on_host(self.store.metadata(other).base_dir)
            except PluginError:
                continue  # no metadata: it mounts nothing
            theirs = Path(os.path.realpath(theirs))
            if theirs == real or real in theirs.parents or theirs in real.parents:
                sharing.append(other)
        return sharing

    @contextmanager
    def _unused(self, volume: Volume, doing: str) -> Iterator[Metadata]:
        """Hold the volume's lock while nobody uses it, for `doing` (see store.locked);
        refuse when somebody does. Gives the volume's metadata, read under the lock."""
        with self.store.locked(volume, doing):
            metadata = self.store.metadata(volume)
            self.releases.retry(volume)
            try:
                users = volume.records.ids()
            except OSError as error:
                raise InternalError("failed to read the volume's usage records", error) from error
            if users:
                raise UserError(
                    f"volume {volume.name} is in use ({len(users)} mount(s)); "
                    "stop the containers that use it first"
                )
            # Its changes are about to change: no overlay of them may stay.
            if not overlay.free_mountpoint(volume):
                raise UserError(f"volume {volume.name}: {overlay.HELD_ON_HOST}; close them first")
            yield metadata
