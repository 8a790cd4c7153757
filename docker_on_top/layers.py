"""The layers: volumes' changes frozen by snapshots, read-only, shared by every volume
whose metadata lists them.

    <root>/.layers/<id>/layer.json   who froze it: {"Volume", "Snapshot", "CreatedAt"}
    <root>/.layers/<id>/tree/        the frozen changes: what was the volume's upper/

What uses a layer is derived from the volumes' metadata alone ("Layers"), and from the
snapshot a crash cut short (a volume's `snapshot.json`, which names the layer its
changes went to): never from a counter a crash could get wrong. A layer nothing uses is
an orphan, removed by the next collection. Freezing is one rename of a volume's upper,
so it costs the same for no change as for a million. A sized volume's upper lives in its
image, where a layer cannot (a layer is no part of the size limit): it is copied out
instead, into a staging folder that becomes the layer's tree once it is on disk. A
rollback writes its `rollback.json` before it changes anything, and the volume's next
use finishes it.

The folder's flock serialises whatever adds a use of a layer (a snapshot, a clone) with
whatever removes layers (a collection); callers take it after any volume's lock.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from pathlib import Path

from . import changes, kernel
from .metadata import Metadata
from .statefiles import fsync_directory, write_atomically
from .volume import ROLLBACK, SNAPSHOT, Volume
from .walk import remove_tree

log = logging.getLogger(__name__)

FOLDER = ".layers"
# Where a volume's new upper is made before it is renamed into place.
UPPER_STAGING = ".upper.new"
# overlayfs stacks at most this many lower layers (bases included).
MAX_LOWER_LAYERS = 500


@dataclass(frozen=True)
class LayerInfo:
    id: str
    volume: str  # the volume whose changes it froze
    snapshot: str  # the name it was frozen under
    created_at: str


class LayerStore:
    def __init__(self, root: Path) -> None:
        self.folder = root / FOLDER

    @contextmanager
    def lock(self, deadline: float | None) -> Iterator[None]:
        """Held while a use of a layer is added or layers are removed; kernel.LockTimeout
        when `deadline` (time.monotonic) passes first."""
        with suppress(FileExistsError):
            os.mkdir(self.folder, 0o700)
        with kernel.DirectoryLock(self.folder, deadline):
            yield

    def tree(self, layer: str) -> Path:
        return self.folder / layer / "tree"

    def exists(self, layer: str) -> bool:
        return self.tree(layer).is_dir()

    @staticmethod
    def new_id() -> str:
        # Not `secrets`: it loads OpenSSL's libcrypto, 3.7 MiB of the daemon's RSS.
        return os.urandom(8).hex()

    def freeze(self, layer: str, upper: Path, info: LayerInfo) -> None:
        """Under the lock: move `upper` into the new layer `layer` (one rename). The
        caller then lists the layer in the volume's metadata and makes a new upper."""
        folder = self._new_layer(layer, info)
        os.rename(upper, folder / "tree")
        fsync_directory(upper.parent)
        fsync_directory(folder)

    def copy_in(self, layer: str, upper: Path, info: LayerInfo) -> None:
        """Under the lock: copy `upper` (a sized volume's, in its image) into the new
        layer `layer`, on disk before it is named `tree`: a crash leaves a layer without
        a tree, which no volume can use. The caller then lists the layer in the
        volume's metadata and empties the upper."""
        folder = self._new_layer(layer, info)
        staging = folder / ".tree.partial"
        changes.copy_upper(upper, staging)
        kernel.sync_filesystem(staging)
        os.rename(staging, folder / "tree")
        fsync_directory(folder)

    def _new_layer(self, layer: str, info: LayerInfo) -> Path:
        folder = self.folder / layer
        os.mkdir(folder, 0o700)
        description = {
            "Volume": info.volume,
            "Snapshot": info.snapshot,
            "CreatedAt": info.created_at,
        }
        write_atomically(
            folder / "layer.json",
            json.dumps(description).encode(),
            folder / ".layer.json.tmp",
            durable=True,
        )
        return folder

    def thaw(self, layer: str, upper: Path) -> None:
        """Undo `freeze` of a snapshot that never reached the volume's metadata: the
        changes go back to being `upper`."""
        tree = self.tree(layer)
        if tree.is_dir() and not os.path.lexists(upper):
            os.rename(tree, upper)
            fsync_directory(upper.parent)
        self.remove(layer)

    def settle(
        self,
        volume: Volume,
        metadata: Metadata,
        empty_image_upper: Callable[[], None] | None = None,
    ) -> Metadata:
        """Under the volume's lock: finish or undo what a crash cut short, and return the
        volume's metadata as it is then.

        A snapshot listed in the metadata happened, so the volume gets its new empty
        upper; one not listed is undone, its changes going back from the layer to its
        upper. A rollback is finished: its intent was written before anything changed,
        so the changes it throws away may be half gone already.

        A sized volume passes `empty_image_upper`, which empties the upper in its image:
        there a snapshot's changes were copied, not moved, so finishing it is emptying
        the upper (the same changes over themselves until then: the view is the same),
        and undoing it is removing the layer."""
        layer = volume.in_progress(SNAPSHOT)
        if layer is not None:
            if layer in metadata.layers:
                if empty_image_upper is not None:
                    empty_image_upper()
                elif not volume.upper.exists():
                    make_upper_like(self.tree(layer), volume.upper)
                log.warning("volume %s: finished a snapshot that was cut short", volume.name)
            else:
                if empty_image_upper is not None:
                    self.remove(layer)
                else:
                    self.thaw(layer, volume.upper)
                log.warning("volume %s: undid a snapshot that was cut short", volume.name)
            volume.end(SNAPSHOT)
        layer = volume.in_progress(ROLLBACK)
        if layer is not None:
            metadata = finish_rollback(
                volume, metadata, layer, empty_image_upper or volume.discard_changes
            )
            log.warning("volume %s: finished a rollback that was cut short", volume.name)
        return metadata

    def info(self, layer: str) -> LayerInfo | None:
        try:
            described = json.loads((self.folder / layer / "layer.json").read_bytes())
            return LayerInfo(
                layer, described["Volume"], described["Snapshot"], described["CreatedAt"]
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def ids(self) -> list[str]:
        try:
            return sorted(
                entry.name
                for entry in os.scandir(self.folder)
                if entry.is_dir(follow_symlinks=False) and not entry.name.startswith(".")
            )
        except FileNotFoundError:
            return []

    def remove(self, layer: str) -> None:
        """Remove a layer: first out of sight (one rename), then its content."""
        folder = self.folder / layer
        doomed = self.folder / f".removed.{os.urandom(8).hex()}"
        try:
            os.rename(folder, doomed)
        except FileNotFoundError:
            return
        remove_tree(doomed)

    def collect(self, in_use: set[str], candidates: Iterable[str] | None = None) -> list[str]:
        """Under the lock: remove the layers (of `candidates`, or all) not `in_use`, and
        what removals a crash cut short left. Returns the ids removed."""
        for leftover in self.folder.glob(".removed.*"):
            with suppress(OSError):
                remove_tree(leftover)
        removed = []
        for layer in self.ids() if candidates is None else candidates:
            if layer not in in_use and (self.folder / layer).exists():
                self.remove(layer)
                removed.append(layer)
        if removed:
            log.info("removed layers no volume uses any more: %s", ", ".join(removed))
        return removed


def finish_rollback(
    volume: Volume, metadata: Metadata, layer: str, discard_changes: Callable[[], None]
) -> Metadata:
    """Roll the volume back to its layer `layer`, under its lock and with its intent
    written (Volume.begin(ROLLBACK, ...)): the later layers off its list, its changes
    thrown away (by `discard_changes`: a sized volume's are in its image), then the
    intent removed. Done again after a crash, it finishes."""
    if layer not in metadata.layers:
        raise ValueError(f"volume {volume.name}: a rollback to layer {layer}, which it lacks")
    kept = metadata.layers[: metadata.layers.index(layer) + 1]
    rolled_back = replace(
        metadata,
        layers=kept,
        snapshots=tuple(s for s in metadata.snapshots if s.layer in kept),
    )
    if rolled_back != metadata:
        volume.write_metadata(rolled_back)
    discard_changes()
    volume.end(ROLLBACK)
    return rolled_back


def make_upper_like(model: Path, upper: Path) -> None:
    """A new empty upper directory with the owner and mode of `model` (the one frozen).

    Made aside and renamed into place: an upper that a crash left with another owner or
    mode would give the volume's root those (the next use finishes the snapshot only
    where no upper exists)."""
    found = os.lstat(model)
    staging = upper.with_name(UPPER_STAGING)
    remove_tree(staging)  # left by a crash, if any
    os.mkdir(staging, 0o700)
    os.chown(staging, found.st_uid, found.st_gid)
    os.chmod(staging, found.st_mode & 0o7777)
    os.rename(staging, upper)
    fsync_directory(upper.parent)
