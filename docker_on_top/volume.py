"""One volume's folder under the state root: its paths, metadata and usage records.

Layout (shared with docker-on-top v0.1.2, so either plugin can run on the same root):

    <root>/<name>/metadata.json     {"BaseDirPath": ..., "Volatile": ...}, always present
    <root>/<name>/activemounts/<ID> {"UsageCount": N}, one file per mount ID in use
    <root>/<name>/upper/            the overlay upperdir: the volume's changes
    <root>/<name>/workdir/          the overlay workdir, only while mounted
    <root>/<name>/mountpoint/       where the overlay is mounted, only while mounted
    <root>/<name>/busy.json         what holds the lock for long work (ours only), while it does
    <root>/<name>/snapshot.json     the layer a snapshot moves upper/ into (ours), while it does
    <root>/<name>/usage.json        what a sized volume's storage held at its last unmount (ours)
    <root>/<name>/size.img          a sized volume's changes (ours): an ext4 image, in place
                                    of upper/; mounted on limit/ while the volume is (a
                                    volatile one: a tmpfs there instead)
    <root>/<name>/unreleased.json   releases still to apply (ours only), when some failed

The invariant everything else follows: a record in `activemounts/` guarantees a user
and a mounted overlay; a mounted overlay on its own guarantees nothing. So a record is
written only after the overlay is mounted and removed before it is unmounted: a crash
between the two steps leaves a harmless stray mount, never a record that lies.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path

from . import changes, kernel, sizelimit

log = logging.getLogger(__name__)

NAME_PATTERN = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]*")
NAME_MAX_BYTES = 255  # NAME_MAX: a volume name and a mount ID each become one file name
# A volume folder being removed is renamed to this prefix: no volume name starts with ".".
REMOVED_PREFIX = ".removed."


@dataclass(frozen=True)
class Snapshot:
    """A name a volume gave one of its layers (`snapshot VOLUME@NAME`)."""

    name: str
    layer: str
    created_at: str


@dataclass(frozen=True)
class Metadata:
    """metadata.json. A volume over one base, with no layers and nothing else of ours,
    is written exactly as the Go plugin writes it. Any other is written with
    BaseDirPath as a list (bottom base first), which the Go plugin cannot read: it then
    refuses to mount the volume rather than mount a base without its layers."""

    base_dir: str  # the bottom base, `-o base=`
    volatile: bool
    # Absent in volumes created by the Go plugin.
    created_at: str | None = None
    upper_bases: tuple[str, ...] = ()  # `-o base.1=`, `base.2=`, ..., bottom first
    layers: tuple[str, ...] = ()  # frozen layers over the bases, bottom first (ids)
    snapshots: tuple[Snapshot, ...] = ()  # oldest first
    origin: str | None = None  # VOLUME@NAME a clone was made from
    # Bytes the volume's own changes may hold (`-o size=`): they live in an ext4 image
    # of that size (`size.img`), or for a volatile volume a tmpfs, mounted on `limit/`.
    size_limit: int | None = None

    @property
    def bases(self) -> tuple[str, ...]:
        return (self.base_dir, *self.upper_bases)

    @property
    def in_go_format(self) -> bool:
        return not (
            self.upper_bases
            or self.layers
            or self.snapshots
            or self.origin
            or self.size_limit is not None
        )

    def to_json(self) -> bytes:
        document: dict[str, object] = {
            "BaseDirPath": self.base_dir if self.in_go_format else list(self.bases),
            "Volatile": self.volatile,
        }
        if self.created_at is not None:
            document["CreatedAt"] = self.created_at
        if self.layers:
            document["Layers"] = list(self.layers)
        if self.snapshots:
            document["Snapshots"] = [
                {"Name": s.name, "Layer": s.layer, "CreatedAt": s.created_at}
                for s in self.snapshots
            ]
        if self.origin is not None:
            document["Origin"] = self.origin
        if self.size_limit is not None:
            document["SizeLimit"] = self.size_limit
        return json.dumps(document, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Metadata:
        """Parse metadata.json; unknown keys are ignored so newer fields stay compatible."""
        document = json.loads(raw)
        if not isinstance(document, dict):
            raise ValueError("metadata.json is not a JSON object")
        bases = document.get("BaseDirPath")
        if isinstance(bases, str):
            bases = [bases]
        if not isinstance(bases, list) or not bases or not all(_is_text(b) for b in bases):
            raise ValueError("metadata.json has no BaseDirPath string or list of strings")
        volatile = document.get("Volatile", False)
        if not isinstance(volatile, bool):
            raise ValueError("metadata.json has a Volatile that is not a boolean")
        created_at = document.get("CreatedAt")
        if created_at is not None and not isinstance(created_at, str):
            raise ValueError("metadata.json has a CreatedAt that is not a string")
        layers = document.get("Layers", [])
        if not isinstance(layers, list) or not all(_is_text(layer) for layer in layers):
            raise ValueError("metadata.json has Layers that are not a list of layer ids")
        snapshots = document.get("Snapshots", [])
        if not isinstance(snapshots, list) or not all(
            isinstance(s, dict) and all(_is_text(s.get(k)) for k in ("Name", "Layer", "CreatedAt"))
            for s in snapshots
        ):
            raise ValueError("metadata.json has Snapshots that are not a list of snapshots")
        origin = document.get("Origin")
        if origin is not None and not _is_text(origin):
            raise ValueError("metadata.json has an Origin that is not a string")
        size_limit = document.get("SizeLimit")
        if size_limit is not None and (
            not isinstance(size_limit, int) or isinstance(size_limit, bool) or size_limit < 1
        ):
            raise ValueError("metadata.json has a SizeLimit that is not a number of bytes")
        return cls(
            base_dir=bases[0],
            volatile=volatile,
            created_at=created_at,
            upper_bases=tuple(bases[1:]),
            layers=tuple(layers),
            snapshots=tuple(Snapshot(s["Name"], s["Layer"], s["CreatedAt"]) for s in snapshots),
            origin=origin,
            size_limit=size_limit,
        )


def _is_text(value: object) -> bool:
    return isinstance(value, str) and bool(value)


def write_atomically(path: str | Path, data: bytes, staging: str | Path, *, durable: bool) -> None:
    """Replace `path` with `data` so a crash leaves the old or the new content, never a mix.

    `staging` must be on the same filesystem and have a single writer at a time.
    With `durable`, the data and the rename are also forced to disk.
    """
    fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        _write_all(fd, data)
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.rename(staging, path)
    except OSError:
        with suppress(FileNotFoundError):
            os.unlink(staging)
        raise
    if durable:
        fsync_directory(os.path.dirname(path))


def _write_all(fd: int, data: bytes) -> None:
    """Write all of `data` to a new file, and check that the file holds that much."""
    written = 0
    while written < len(data):
        count = os.write(fd, data[written:])
        if count == 0:
            raise OSError(errno.EIO, "write made no progress")
        written += count
    if os.fstat(fd).st_size != len(data):
        raise OSError(errno.EIO, "the file does not hold what was written")


def read_file(path: str) -> bytes:
    """The whole content of a small file, in as few syscalls as Python allows."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        parts = []
        while part := os.read(fd, 65536):
            parts.append(part)
    finally:
        os.close(fd)
    return b"".join(parts)


def fsync_directory(directory: str | Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rfc3339(timestamp: float) -> str:
    return (
        datetime.fromtimestamp(timestamp, timezone.utc)
        .isoformat(timespec="seconds")
        .replace("+00:00", "Z")
    )


_PROCESS_LOCKS: weakref.WeakValueDictionary[str, threading.Lock] = weakref.WeakValueDictionary()
_PROCESS_LOCKS_GUARD = threading.Lock()


def _process_lock(folder: str) -> threading.Lock:
    """This process's lock for `folder`, alive while some thread holds or awaits it."""
    with _PROCESS_LOCKS_GUARD:
        found = _PROCESS_LOCKS.get(folder)
        if found is None:
            found = _PROCESS_LOCKS[folder] = threading.Lock()
        return found


class UsageRecords:
    """The `activemounts/` folder: which mount IDs use the volume, and how often.

    Every method but `lock` must be called while holding `lock()`. Paths are strings:
    these run on every Mount and Unmount, where pathlib would cost more than the syscalls.
    """

    def __init__(self, folder: str, staging: str) -> None:
        self.folder = folder
        self._staging = staging

    @contextmanager
    def lock(self, deadline: float | None = None) -> Iterator[None]:
        """Hold the volume's lock: the flock on `activemounts/` (shared with the Go plugin
        and our command line), taken after a lock of this process for the same folder,
        so that this process's waiters sleep until woken rather than poll the flock.

        `deadline` (time.monotonic) bounds the wait; kernel.LockTimeout when it passes.
        FileNotFoundError when the folder is gone (the volume was removed meanwhile).
        """
        waiters = _process_lock(self.folder)
        timeout = -1.0 if deadline is None else max(0.0, deadline - time.monotonic())
        if not waiters.acquire(timeout=timeout):
            raise kernel.LockTimeout(f"{self.folder} stays locked by another request")
        try:
            with kernel.DirectoryLock(self.folder, deadline):
                yield
        finally:
            waiters.release()

    def exists(self) -> bool:
        return os.path.isdir(self.folder)

    def make(self) -> None:
        os.mkdir(self.folder)

    def in_use(self) -> bool:
        with os.scandir(self.folder) as entries:
            return next(entries, None) is not None

    def ids(self) -> list[str]:
        return sorted(os.listdir(self.folder))

    def count(self, mount_id: str) -> int | None:
        """The usage count of `mount_id`; None when it has no record.

        Raises ValueError for a record whose content is not `{"UsageCount": N}`, N >= 1.
        """
        try:
            raw = read_file(f"{self.folder}/{mount_id}")
        except FileNotFoundError:
            return None
        document = json.loads(raw)
        count = document.get("UsageCount") if isinstance(document, dict) else None
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise ValueError(f"record {mount_id} holds {raw[:100]!r}, not a usage count")
        return count

    def set(self, mount_id: str, count: int) -> None:
        # No fsync: after a crash or reboot, start-up recovery throws the records away
        # unless the overlay is still mounted, so only the atomic rename matters.
        write_atomically(
            f"{self.folder}/{mount_id}",
            b'{"UsageCount":%d}' % count,
            self._staging,
            durable=False,
        )

    def remove(self, mount_id: str) -> None:
        with suppress(FileNotFoundError):
            os.unlink(f"{self.folder}/{mount_id}")

    def clear(self) -> None:
        for entry in os.scandir(self.folder):
            os.unlink(entry.path)


class Volume:
    """One volume's folder. The paths are made when first used: a request needs only a
    few of them, and List makes a Volume for every volume."""

    def __init__(self, root: Path, name: str) -> None:
        if not NAME_PATTERN.fullmatch(name) or len(os.fsencode(name)) > NAME_MAX_BYTES:
            raise ValueError(f"invalid volume name {name!r}")
        self.name = name
        self._root = root
        # The folder as a string, for the paths of the requests' hot path.
        self.location = f"{root}/{name}"
        self.metadata_file = f"{self.location}/metadata.json"

    @cached_property
    def folder(self) -> Path:
        return self._root / self.name

    @cached_property
    def upper(self) -> Path:
        return Path(f"{self.location}/upper")

    @cached_property
    def workdir(self) -> Path:
        return Path(f"{self.location}/workdir")

    @cached_property
    def mountpoint(self) -> Path:
        return Path(f"{self.location}/mountpoint")

    @cached_property
    def records(self) -> UsageRecords:
        return UsageRecords(f"{self.location}/activemounts", f"{self.location}/.activemount.tmp")

    @cached_property
    def unreleased_path(self) -> Path:
        return Path(f"{self.location}/unreleased.json")

    def exists(self) -> bool:
        return os.path.isdir(self.location)

    def has_metadata(self) -> bool:
        return os.path.exists(self.metadata_file)

    def read_metadata(self) -> Metadata:
        return Metadata.from_json(read_file(self.metadata_file))

    def create(self, metadata: Metadata) -> None:
        """Make the folder tree, then metadata.json; on failure remove what was made.

        Raises FileExistsError, untouched, when the volume exists already.
        """
        self.folder.mkdir()
        try:
            if metadata.size_limit is None:
                self.upper.mkdir()
            elif not metadata.volatile:
                sizelimit.make_image(self.image, metadata.size_limit)
            self.records.make()
            self.write_metadata(metadata)
            fsync_directory(self.folder.parent)
        except BaseException:
            shutil.rmtree(self.folder, ignore_errors=True)
            raise

    @cached_property
    def limit(self) -> Path:
        """Where a sized volume's storage is mounted while the volume is."""
        return Path(f"{self.location}/limit")

    @cached_property
    def image(self) -> Path:
        return Path(f"{self.location}/size.img")

    def record_usage(self, usage: tuple[int, int]) -> None:
        """What a sized volume's storage held when it was last unmounted (for Get)."""
        write_atomically(
            f"{self.location}/usage.json",
            json.dumps({"Used": usage[0], "Limit": usage[1]}).encode(),
            f"{self.location}/.usage.json.tmp",
            durable=False,
        )

    def recorded_usage(self) -> tuple[int, int] | None:
        try:
            recorded = json.loads(read_file(f"{self.location}/usage.json"))
            return int(recorded["Used"]), int(recorded["Limit"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    @cached_property
    def snapshot_intent(self) -> Path:
        """Present only while a snapshot moves the changes into a layer (see layers.py)."""
        return Path(f"{self.location}/snapshot.json")

    def begin_snapshot(self, layer: str) -> None:
        write_atomically(
            self.snapshot_intent,
            json.dumps({"Layer": layer}).encode(),
            f"{self.location}/.snapshot.json.tmp",
            durable=True,
        )

    def snapshot_in_progress(self) -> str | None:
        """The layer a snapshot cut short was moving the changes to, if any."""
        try:
            layer = json.loads(self.snapshot_intent.read_bytes())["Layer"]
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{self.snapshot_intent} is damaged: {error}") from None
        if not isinstance(layer, str) or not NAME_PATTERN.fullmatch(layer):
            raise ValueError(f"{self.snapshot_intent} names no layer")
        return layer

    def end_snapshot(self) -> None:
        with suppress(FileNotFoundError):
            self.snapshot_intent.unlink()

    @cached_property
    def busy_note(self) -> Path:
        return Path(f"{self.location}/busy.json")

    def note_busy(self, what: str) -> None:
        """Say, while holding the lock for long work, what holds it, for waiters that
        give up to tell their users."""
        note = {"What": what, "Pid": os.getpid(), "Since": rfc3339(time.time())}
        write_atomically(
            self.busy_note,
            json.dumps(note).encode(),
            f"{self.location}/.busy.json.tmp",
            durable=False,
        )

    def clear_busy_note(self) -> None:
        with suppress(FileNotFoundError):
            self.busy_note.unlink()

    def what_holds_it(self) -> str | None:
        """What the busy note says holds the lock, if its writer still runs."""
        try:
            note = json.loads(self.busy_note.read_bytes())
            what, pid, since = note["What"], note["Pid"], note["Since"]
            os.kill(pid, 0)
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return f"{what} (pid {pid}, since {since})"

    def write_metadata(self, metadata: Metadata) -> None:
        write_atomically(
            self.metadata_file,
            metadata.to_json(),
            f"{self.location}/.metadata.json.tmp",
            durable=True,
        )

    def read_unreleased(self) -> dict[str, int]:
        """Releases that failed earlier, by mount ID (see Driver.unmount); {} when none."""
        try:
            document = json.loads(self.unreleased_path.read_bytes())
        except FileNotFoundError:
            return {}
        if not isinstance(document, dict) or not all(
            isinstance(n, int) and n > 0 for n in document.values()
        ):
            raise ValueError(f"{self.unreleased_path} is not a map of mount IDs to counts")
        return document

    def write_unreleased(self, pending: dict[str, int]) -> None:
        if not pending:
            self.unreleased_path.unlink(missing_ok=True)
            return
        write_atomically(
            self.unreleased_path,
            json.dumps(pending).encode(),
            self.folder / ".unreleased.json.tmp",
            durable=True,
        )

    def destroy(self) -> None:
        """Remove the folder: first out of sight (one rename), then its content, so a
        crash never leaves a half-removed volume that looks like a volume."""
        # Not named after the volume: a name of NAME_MAX bytes leaves no room for a prefix.
        doomed = self.folder.with_name(f"{REMOVED_PREFIX}{os.urandom(8).hex()}")
        os.rename(self.folder, doomed)
        shutil.rmtree(doomed)

    def make_mount_folders(self, *, workdir: bool = True) -> list[Path]:
        """Create `mountpoint/` and an empty `workdir/` (unless a sized volume keeps it
        in its storage); returns the folders this call made.

        A leftover mountpoint is reused. A leftover workdir is emptied: it holds only the
        kernel's scratch files, and those of a volatile overlay make the next mount fail.
        """
        created: list[Path] = []
        try:
            try:
                self.mountpoint.mkdir()
                created.append(self.mountpoint)
            except FileExistsError:
                log.warning("volume %s: reusing the leftover %s", self.name, self.mountpoint)
            if workdir:
                try:
                    self.workdir.mkdir()
                except FileExistsError:
                    log.warning("volume %s: emptying the leftover %s", self.name, self.workdir)
                    shutil.rmtree(self.workdir)
                    self.workdir.mkdir()
                created.append(self.workdir)
        except OSError:
            self.remove_folders(created)
            raise
        return created

    def remove_folders(self, folders: list[Path]) -> None:
        for folder in folders:
            if folder == self.workdir:
                shutil.rmtree(folder)
            else:
                folder.rmdir()

    def remove_mount_folders(self) -> None:
        with suppress(FileNotFoundError):
            self.mountpoint.rmdir()
        try:
            # After a clean unmount the kernel leaves only an empty work/ behind.
            (self.workdir / "work").rmdir()
            self.workdir.rmdir()
        except FileNotFoundError:
            pass
        except OSError:
            shutil.rmtree(self.workdir)

    def discard_changes(self) -> None:
        changes.reset(self.upper)


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
        stamp = (
            status.st_ino,
            status.st_dev,
            status.st_size,
            status.st_mtime_ns,
            status.st_ctime_ns,
        )
        entry = self._entries.get(volume.name)
        if entry is None or entry[0] != stamp:
            metadata = volume.read_metadata()
            # For Go-made volumes: when metadata.json was written.
            created_at = metadata.created_at or rfc3339(status.st_mtime)
            entry = (stamp, metadata, created_at)
            self._entries[volume.name] = entry
        return entry[1], entry[2]

    def forget(self, name: str) -> None:
        self._entries.pop(name, None)
