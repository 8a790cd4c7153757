"""The state root as a whole: volume names checked and turned into Volume folders, the
volumes listed, their metadata read (cached), a volume's lock taken with a bounded wait
(and its start-up recovery run first, while some are pending), the layer store, and a
volume's lower layers looked up (bases on the host).

Everything above (the driver, recovery, doctor, the commands) reaches volumes through
here; nothing here mounts or decides what a request means.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

from . import kernel
from .errors import BusyError, InternalError, UserError
from .layers import LayerStore
from .metadata import Metadata, rfc3339
from .volume import NAME_MAX_BYTES, NAME_PATTERN, Volume

log = logging.getLogger(__name__)

NO_SUCH_VOLUME = "no such volume"
# How long a request waits for a volume's lock: below Podman's 5 s for a whole call, so
# that a Mount refused as busy is refused before its client gives up on it.
REQUEST_LOCK_TIMEOUT_S = 4.0


class PendingRecovery(Protocol):
    """Start-up recovery while some volumes are still to recover (recovery.py)."""

    def ensure(self, volume: Volume) -> None: ...
    def under_lock(self, volume: Volume) -> None: ...


class MetadataCache:
    """Each volume's parsed metadata.json, read again only when a stat of the file says
    it changed (another inode, size, or time).

    Get comes before every Mount and Unmount and List reads every volume: one stat costs
    a fraction of opening, reading and parsing the file. The stat also catches a volume
    removed and made again by another process (the Go plugin on the same root).
    """

    def __init__(self) -> None:
        self._entries: dict[str, tuple[tuple[int, ...], Metadata, str]] = {}

    def read(self, volume: Volume) -> tuple[Metadata, str]:
        """The volume's metadata and when it was made (RFC 3339); raises OSError (as
        FileNotFoundError when the volume has no metadata.json) or ValueError."""
        status = os.stat(volume.metadata_file)
        stamp = _stamp(status)
        entry = self._entries.get(volume.name)
        if entry is None or entry[0] != stamp:
            metadata = volume.read_metadata()
            entry = self._entries[volume.name] = (stamp, metadata, _created_at(metadata, status))
        return entry[1], entry[2]

    def remember(self, volume: Volume, metadata: Metadata) -> None:
        """Keep `metadata`, just written: dockerd asks for the volume (Get) right after
        creating it, and a stat is then all that asks."""
        status = os.stat(volume.metadata_file)
        self._entries[volume.name] = (_stamp(status), metadata, _created_at(metadata, status))

    def forget(self, name: str) -> None:
        self._entries.pop(name, None)


def _stamp(status: os.stat_result) -> tuple[int, ...]:
    return (
        status.st_ino,
        status.st_dev,
        status.st_size,
        status.st_mtime_ns,
        status.st_ctime_ns,
    )


def _created_at(metadata: Metadata, status: os.stat_result) -> str:
    # For Go-made volumes: when metadata.json was written.
    return metadata.created_at or rfc3339(status.st_mtime)


class VolumeStore:
    def __init__(
        self,
        root: Path,
        host_root: Path | None = None,
        *,
        lock_timeout: float = REQUEST_LOCK_TIMEOUT_S,
    ) -> None:
        self.root = root
        # Set when the daemon runs in a container (a managed plugin) with the host's root
        # mounted there: bases are the host's paths, kept as the user gave them in
        # metadata.json and looked up under `host_root`.
        self.host_root = host_root
        self.lock_timeout = lock_timeout
        self.layers = LayerStore(root)
        self._metadata_cache = MetadataCache()
        # Set while start-up recovery has volumes left: each volume is recovered before
        # its first use (see recovery.py); None once all are.
        self.recovery: PendingRecovery | None = None
        self._real_root: str | None = None

    @property
    def real_root(self) -> str:
        """The root with its symlinks resolved, looked up once: a daemon holds its root
        (a private mount, flocked) while it runs, and a command runs for moments."""
        if self._real_root is None:
            self._real_root = os.path.realpath(self.root)
        return self._real_root

    def holds_at_most(self, folders: int) -> bool:
        """Whether the root holds at most `folders` folders (volumes and hidden ones), by
        its link count: one stat, no listing. False when it cannot be looked at."""
        try:
            return os.stat(self.root).st_nlink - 2 <= folders
        except OSError:
            return False

    def volume(self, name: object) -> Volume:
        """The volume called `name`, which need not exist; UserError for a bad name."""
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

    def volumes(self) -> Iterator[Volume]:
        """Every volume folder under the root, by name."""
        try:
            entries = sorted(os.scandir(self.root), key=lambda entry: entry.name)
        except OSError as error:
            raise InternalError("failed to list the state root", error) from error
        for entry in entries:
            if entry.is_dir(follow_symlinks=False) and NAME_PATTERN.fullmatch(entry.name):
                yield Volume(self.root, entry.name)

    def metadata(self, volume: Volume) -> Metadata:
        return self.metadata_and_creation(volume)[0]

    def metadata_and_creation(self, volume: Volume) -> tuple[Metadata, str]:
        """The volume's metadata and when it was made; "no such volume" when it has none."""
        try:
            return self._metadata_cache.read(volume)
        except FileNotFoundError:
            raise UserError(NO_SUCH_VOLUME) from None
        except (OSError, ValueError) as error:
            raise InternalError("failed to read the volume's metadata", error) from error

    def described(self, volume: Volume) -> tuple[str, Metadata | None] | None:
        """When the volume was made and its metadata, for Get and List, which never fail
        for an existing volume: dockerd forgets a volume whose Get fails, so a passing
        problem only leaves fields empty. None when the volume does not exist."""
        try:
            metadata, created_at = self._metadata_cache.read(volume)
        except (OSError, ValueError) as error:
            if isinstance(error, (FileNotFoundError, NotADirectoryError)) and not volume.exists():
                return None
            log.warning("volume %s: cannot read its metadata: %s", volume.name, error)
            return "", None
        return created_at, metadata

    def recover_first(self, volume: Volume) -> None:
        """Recover the volume first if start-up recovery has not yet, for those who look
        at it without its lock (Get, List, Create, the commands that only read)."""
        recovery = self.recovery
        if recovery is not None:
            recovery.ensure(volume)

    def create(self, volume: Volume, metadata: Metadata) -> None:
        """Make the volume's folder with `metadata`; nothing is left when it fails."""
        try:
            volume.create(metadata)
        except FileExistsError:
            raise UserError("volume already exists") from None
        except OSError as error:
            raise InternalError("failed to create the volume's folder", error) from error
        try:
            self._metadata_cache.remember(volume, metadata)
        except OSError as error:  # the next read stats it again anyway
            log.warning("volume %s: cannot stat its new metadata.json: %s", volume.name, error)

    def forget(self, volume: Volume) -> None:
        self._metadata_cache.forget(volume.name)

    @contextmanager
    def locked(self, volume: Volume, doing: str | None = None) -> Iterator[None]:
        """Hold the volume's lock, waiting at most `lock_timeout` for it.

        A waiter that gives up says what holds the volume: whoever holds it for long
        work (`doing`, e.g. "a commit") says so in the volume's busy note. A volume that
        start-up recovery has not reached yet is recovered first, under the lock.
        """
        lock = volume.records.lock(time.monotonic() + self.lock_timeout)
        try:
            lock.__enter__()
        except FileNotFoundError:
            raise UserError(NO_SUCH_VOLUME) from None
        except kernel.LockTimeout:
            holder = volume.what_holds_it() or "another request on it (a mount or an unmount)"
            raise BusyError(
                f"volume {volume.name} is busy: {holder} has held it for over "
                f"{self.lock_timeout:g} s; try again when it is done"
            ) from None
        except OSError as error:
            raise InternalError("failed to lock the volume's activemounts/", error) from error
        try:
            recovery = self.recovery
            if recovery is not None:
                recovery.under_lock(volume)
            if doing is not None:
                try:
                    volume.note_busy(doing)
                except OSError as error:
                    log.warning("volume %s: cannot write its busy note: %s", volume.name, error)
            yield
        finally:
            if doing is not None:
                volume.clear_busy_note()
            lock.__exit__(None, None, None)

    def lowers(self, metadata: Metadata) -> list[Path]:
        """The volume's lower layers for overlayfs, topmost first: its frozen layers,
        then its bases from `base.N` down to `base`."""
        return [self.layers.tree(layer) for layer in reversed(metadata.layers)] + [
            self.on_host(base) for base in reversed(metadata.bases)
        ]

    def on_host(self, base: str) -> Path:
        """Where the host's path `base` is found from this process."""
        if self.host_root is None:
            return Path(base)
        return kernel.resolve_in_root(self.host_root, base)


def parse_reference(text: str) -> tuple[str, str | None]:
    """`VOLUME` or `VOLUME@NAME`; NAME follows the volume-name rules."""
    volume, at, name = text.partition("@")
    if at and not valid_snapshot_name(name):
        raise UserError(
            f'invalid snapshot name {name!r}: it should comply to "[a-zA-Z0-9][a-zA-Z0-9_.-]*"'
        )
    return volume, name if at else None


def valid_snapshot_name(name: str) -> bool:
    return bool(NAME_PATTERN.fullmatch(name)) and len(os.fsencode(name)) <= NAME_MAX_BYTES
