"""Where a volume's own changes live, and reaching them: its `upper/`, or a sized
volume's upper in its storage (the image mounted aside while nobody uses the volume);
emptying them; and settling a snapshot or rollback that a crash cut short, which may
have to empty them. The command line, snapshots, the driver and recovery share these.
"""

from __future__ import annotations

import functools
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from . import changes, kernel, sizelimit
from .errors import InternalError
from .metadata import Metadata
from .store import VolumeStore
from .volume import Volume

# Views mounted aside under the state root while a command needs them (a volume's lower
# layers, a sized volume's image); start-up removes those a crash left.
VIEW_PREFIX = ".view-"


def settle(store: VolumeStore, volume: Volume, metadata: Metadata) -> Metadata:
    """Under the volume's lock, nobody using it: finish or undo a snapshot or rollback of
    it that a crash cut short (see layers.py); its metadata as it is then."""
    empty = None
    if metadata.size_limit is not None:
        empty = functools.partial(empty_own_changes, store, volume, metadata)
    try:
        return store.layers.settle(volume, metadata, empty)
    except (OSError, ValueError, sizelimit.ImageInUse) as error:
        raise InternalError("failed to settle a snapshot or rollback cut short", error) from error


def empty_own_changes(store: VolumeStore, volume: Volume, metadata: Metadata) -> None:
    """Throw the volume's own changes away, keeping its upper directory. A sized volume's
    are in its storage, whose usage is then recorded for Get, as at an unmount."""
    if metadata.size_limit is None:
        volume.discard_changes()
        return
    with own_changes(store, volume, metadata) as upper:
        empty_storage_upper(volume, metadata, upper)


def empty_storage_upper(volume: Volume, metadata: Metadata, upper: Path) -> None:
    """Empty a sized volume's `upper` (on its storage, mounted) and record what its
    storage still holds, for Get."""
    changes.reset(upper)
    if not metadata.volatile:
        volume.record_usage(sizelimit.usage(upper))


@contextmanager
def own_changes(store: VolumeStore, volume: Volume, metadata: Metadata) -> Iterator[Path]:
    """The volume's upper directory. A sized volume's is in its storage: when that is
    not mounted (nobody uses the volume), its image is mounted aside meanwhile, and a
    volatile volume has no changes then."""
    if metadata.size_limit is None:
        yield volume.upper
        return
    if kernel.is_mount_point(volume.limit):
        yield volume.limit / "upper"
        return
    view = Path(tempfile.mkdtemp(prefix=VIEW_PREFIX, dir=store.root))
    try:
        if metadata.volatile:
            os.mkdir(view / "upper")
            try:
                yield view / "upper"
            finally:
                os.rmdir(view / "upper")
            return
        sizelimit.mount_image(volume.image, view)
        try:
            with suppress(FileExistsError):
                os.mkdir(view / "upper", 0o755)
            yield view / "upper"
        finally:
            kernel.unmount(view)
    finally:
        os.rmdir(view)
