"""What the command line does to one volume's changes besides serving: describe it,
diff and export its changes, reset it, commit it into a folder or onto its base.

Each works on the state root directly, with or without a daemon running, and takes the
volume's lock for as long as it changes anything: a container that starts meanwhile
waits (or is told what holds the volume). The same reach into a volume's own changes
serves snapshots and the driver too: a volume held unused, its upper wherever it lives
(upper.py), emptied, and a snapshot or rollback cut short settled.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO

from . import changes, kernel, overlay, sizelimit
from .errors import InternalError, PluginError, UserError
from .metadata import Metadata, Snapshot
from .options import parse_size_option, within
from .releases import PendingReleases, usage_count
from .store import VolumeStore, parse_reference
from .upper import VIEW_PREFIX, empty_own_changes, own_changes, settle
from .volume import Volume

log = logging.getLogger(__name__)

# Called with the number of entries copied so far during long work.
Progress = Callable[[int], None]


@dataclass(frozen=True)
class VolumeDetails:
    """Everything known about one volume, for the command line."""

    name: str
    metadata: Metadata
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
        return cls(name, Metadata("", False), "", "", False, {}, None, None, error)

    @property
    def base(self) -> str:
        return self.metadata.base_dir

    @property
    def volatile(self) -> bool:
        return self.metadata.volatile

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
        if self.metadata.base_dir and not self.metadata.in_go_format:
            found.update(
                Bases=list(self.metadata.bases),
                Layers=list(self.metadata.layers),
                Snapshots=[
                    {"Name": s.name, "Layer": s.layer, "CreatedAt": s.created_at}
                    for s in self.metadata.snapshots
                ],
                Origin=self.metadata.origin,
            )
        return found


class VolumeCommands:
    def __init__(self, store: VolumeStore, releases: PendingReleases | None = None) -> None:
        self.store = store
        self.releases = releases if releases is not None else PendingReleases()

    def details(self, name: str) -> VolumeDetails:
        """Everything known about a volume; a walk of its changes that fails (a container
        may be changing them meanwhile) is told in `error`, the rest is still given."""
        volume = self.store.volume(name)
        self.store.recover_first(volume)
        metadata, created_at = self.store.metadata_and_creation(volume)
        try:
            mounted = kernel.is_mount_point(volume.mountpoint)
            mounts = {i: usage_count(volume, i) or 0 for i in volume.records.ids()}
        except OSError as error:
            raise InternalError(f"failed to read volume {name}", error) from error
        size: tuple[int, int] | None = None
        problem = ""
        try:
            if metadata.size_limit is None:
                size = changes.changes_size(volume.upper)
            else:
                used = overlay.storage_usage(volume, metadata)[0]
                size = (used, used)
        except OSError as error:
            problem = f"failed to read the volume's changes: {error}"
        return VolumeDetails(
            name=name,
            metadata=metadata,
            created_at=created_at,
            mountpoint=str(volume.mountpoint),
            mounted=mounted,
            mounts=mounts,
            changes_bytes=None if size is None else size[0],
            changes_apparent_bytes=None if size is None else size[1],
            error=problem,
        )

    def all_details(self) -> Iterator[VolumeDetails]:
        """The details of every volume, one at a time; one that cannot be read is told in
        its own `error`, one removed meanwhile is left out."""
        for volume in self.store.volumes():
            try:
                yield self.details(volume.name)
            except PluginError as error:
                if volume.exists():
                    yield VolumeDetails.unreadable(volume.name, str(error))

    def diff(self, name: str, since: str | None = None) -> Iterator[changes.Change]:
        """The changes since the volume's last snapshot (against all its lower layers), as
        they are found; or since its snapshot `since`: then each later layer's changes,
        and the volume's own, are taken in turn against what lay below them and added up
        path by path (and given sorted, once all are known)."""
        volume = self.store.volume(name)
        self.store.recover_first(volume)
        metadata = self.store.metadata(volume)
        try:
            with own_changes(self.store, volume, metadata) as upper:
                if since is None:
                    with _lower_view(self.store, self.store.lowers(metadata)) as below:
                        yield from changes.diff(upper, below)
                    return
                start = metadata.layers.index(_named_snapshot(metadata, name, since).layer) + 1
                summed: dict[str, str] = {}
                for index in range(start, len(metadata.layers) + 1):
                    below_it = replace(metadata, layers=metadata.layers[:index])
                    changed = (
                        upper
                        if index == len(metadata.layers)
                        else self.store.layers.tree(metadata.layers[index])
                    )
                    with _lower_view(self.store, self.store.lowers(below_it)) as below:
                        _add_up(summed, changes.diff(changed, below))
        except OSError as error:
            raise InternalError("failed to read the volume's changes", error) from error
        for path, kind in sorted(summed.items()):
            yield changes.Change(kind, path)

    def export(
        self,
        reference: str,
        out: BinaryIO,
        report: changes.Report = changes.report_nothing,
        *,
        since: str | None = None,
    ) -> None:
        """VOLUME: its changes since its last snapshot; VOLUME@NAME: the layer NAME froze,
        each as an OCI image layer over what lies below it. With `since`, an older
        snapshot: the layers above it up to there (the volume's changes included, for
        VOLUME) squashed into one layer over what lies at `since`. What a layer cannot
        carry is left out and told to `report`."""
        volume_name, snapshot = parse_reference(reference)
        volume = self.store.volume(volume_name)
        self.store.recover_first(volume)
        metadata = self.store.metadata(volume)
        start = len(metadata.layers)
        if since is not None:
            start = metadata.layers.index(_named_snapshot(metadata, volume_name, since).layer) + 1
        try:
            if snapshot is None:
                with own_changes(self.store, volume, metadata) as upper:
                    frozen = [self.store.layers.tree(layer) for layer in metadata.layers[start:]]
                    changes.export_squashed([upper, *reversed(frozen)], out, report)
                return
            end = metadata.layers.index(_named_snapshot(metadata, volume_name, snapshot).layer)
            if since is not None and end < start:
                raise UserError(f"{volume_name}@{since} is not older than {reference}")
            if since is None:
                start = end
            frozen = [self.store.layers.tree(layer) for layer in metadata.layers[start : end + 1]]
            changes.export_squashed(list(reversed(frozen)), out, report)
        except BrokenPipeError:
            raise  # the reader went away: the caller's business, not a failure here
        except OSError as error:
            raise InternalError("failed to export the volume's changes", error) from error

    def reset(self, name: str) -> None:
        volume = self.store.volume(name)
        with unused(self.store, self.releases, volume, "a reset") as metadata:
            try:
                empty_own_changes(self.store, volume, metadata)
            except (OSError, sizelimit.ImageInUse) as error:
                raise InternalError("failed to throw the changes away", error) from error
        log.info("volume %s: changes thrown away", name)

    def commit_into(self, name: str, target: Path, progress: Progress | None = None) -> None:
        """Write the volume's merged content (base and changes) into the new folder `target`."""
        volume = self.store.volume(name)
        with unused(self.store, self.releases, volume, "a commit") as metadata:
            try:
                with own_changes(self.store, volume, metadata) as upper:
                    changes.merge_into(
                        upper, self.store.lowers(metadata), target, progress=progress
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
            metadata = held.enter_context(
                unused(self.store, self.releases, volume, "a commit --into-base")
            )
            if not metadata.in_go_format:
                raise UserError(
                    f"volume {name} has layers, several bases or a size limit, which "
                    "`commit --into-base` does not handle; write the merged content with "
                    "`commit --into DIR` instead"
                )
            base = self.store.on_host(metadata.base_dir)
            for other in self._volumes_sharing(base, besides=name):
                try:
                    held.enter_context(
                        unused(
                            self.store,
                            self.releases,
                            other,
                            f"a commit --into-base of volume {name}",
                        )
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

    def resize(self, name: str, size: str) -> None:
        """Give a sized volume a new limit: an image grows also while mounted, a tmpfs is
        remounted; a shrink needs the volume unused and its changes to fit."""
        volume = self.store.volume(name)
        new_size = parse_size_option(size)
        with self.store.locked(volume, "a resize"):
            metadata = self.store.metadata(volume)
            if metadata.size_limit is None:
                raise UserError(f"volume {name} has no size limit to change")
            mounted = kernel.is_mount_point(volume.limit)
            if new_size < metadata.size_limit and volume.records.in_use():
                raise UserError(
                    f"volume {name} is in use: it can grow now, but shrink only while unused"
                )
            try:
                if metadata.volatile:
                    if mounted:
                        sizelimit.resize_tmpfs(volume.limit, new_size)
                elif new_size > metadata.size_limit:
                    sizelimit.grow_image(volume.image, volume.limit if mounted else None, new_size)
                elif new_size < metadata.size_limit:
                    if mounted:
                        overlay.release_storage(volume)  # no user: only a leftover mount
                    sizelimit.shrink_image(volume.image, new_size)
                volume.write_metadata(replace(metadata, size_limit=new_size))
            except sizelimit.ResizeRefused as error:
                raise UserError(f"volume {name}: {error}") from None
            except (OSError, sizelimit.ToolFailed, sizelimit.ImageInUse) as error:
                raise InternalError(f"failed to resize volume {name}", error) from error
        log.info("volume %s: size limit now %d bytes", name, new_size)

    def _volumes_sharing(self, base: Path, *, besides: str) -> list[Volume]:
        """The other volumes whose base is `base`, inside it or around it."""
        real = os.path.realpath(base)
        sharing = []
        for other in self.store.volumes():
            if other.name == besides:
                continue
            try:
                theirs = os.path.realpath(self.store.on_host(self.store.metadata(other).base_dir))
            except PluginError:
                continue  # no metadata: it mounts nothing
            if within(theirs, real) or within(real, theirs):
                sharing.append(other)
        return sharing


@contextmanager
def unused(
    store: VolumeStore, releases: PendingReleases, volume: Volume, doing: str
) -> Iterator[Metadata]:
    """Hold the volume's lock while nobody uses it, for `doing` (see store.locked);
    refuse when somebody does. Gives the volume's metadata, read under the lock."""
    with store.locked(volume, doing):
        metadata = store.metadata(volume)
        releases.retry(volume)
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
        metadata = settle(store, volume, metadata)
        yield metadata


@contextmanager
def _lower_view(store: VolumeStore, lowers: list[Path]) -> Iterator[Path]:
    """The lower layers as the containers see them below the changes: the base itself,
    or a read-only overlay of them all, mounted aside while needed."""
    if len(lowers) == 1:
        yield lowers[0]
        return
    view = Path(tempfile.mkdtemp(prefix=VIEW_PREFIX, dir=store.root))
    try:
        kernel.mount_read_only_overlay(lowers, view)
        try:
            yield view
        finally:
            kernel.unmount(view, flags=kernel.MNT_DETACH)
    finally:
        os.rmdir(view)


def _named_snapshot(metadata: Metadata, volume: str, name: str) -> Snapshot:
    for snapshot in metadata.snapshots:
        if snapshot.name == name:
            return snapshot
    raise UserError(f"volume {volume} has no snapshot {name}")


def _add_up(summed: dict[str, str], later: Iterable[changes.Change]) -> None:
    """Add the changes of a later layer to `summed` (path -> kind, against the view at
    the snapshot). Made and then changed is still made; deleted and made again is
    changed; made and then deleted is nothing; a deleted folder takes its content along."""
    for change in later:
        before = summed.get(change.path)
        if change.kind == "D":
            prefix = change.path + "/"
            for path in [path for path in summed if path.startswith(prefix)]:
                del summed[path]
            if before == "A":
                del summed[change.path]
            else:
                summed[change.path] = "D"
        elif before == "D" or (before is None and change.kind == "C"):
            summed[change.path] = "C"
        elif before is None:
            summed[change.path] = change.kind
