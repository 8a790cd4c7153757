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
instead, into a staging folder that becomes the layer's tree once it is on disk.

The folder's flock serialises whatever adds a use of a layer (a snapshot, a clone) with
whatever removes layers (a collection); callers take it after any volume's lock.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from . import changes, kernel
from .volume import Volume, fsync_directory, write_atomically
from .walk import remove_tree

log = logging.getLogger(__name__)

FOLDER = ".layers"
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
        return secrets.token_hex(8)

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

    def settle_snapshot(
        self,
        volume: Volume,
        listed: Iterable[str],
        empty_image_upper: Callable[[], None] | None = None,
    ) -> None:
        """Under the volume's lock: finish or undo a snapshot of it that a crash cut
        short. Listed in the metadata (`listed`): it happened, so the volume gets its new
        empty upper; else its changes go back from the layer to its upper.

        A sized volume passes `empty_image_upper`, which empties the upper in its image:
        there its changes were copied, not moved, so finishing is emptying the upper
        (the same changes over themselves until then: the view is the same), and undoing
        is removing the layer."""
        layer = volume.snapshot_in_progress()
        if layer is None:
            return
        if layer in listed:
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
        volume.end_snapshot()

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
        doomed = self.folder / f".removed.{secrets.token_hex(8)}"
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


def make_upper_like(model: Path, upper: Path) -> None:
    """A new empty upper directory with the owner and mode of `model` (the one frozen)."""
    found = os.lstat(model)
    os.mkdir(upper, 0o700)
    os.chown(upper, found.st_uid, found.st_gid)
    os.chmod(upper, found.st_mode & 0o7777)
    fsync_directory(upper.parent)
