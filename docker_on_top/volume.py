"""One volume's folder under the state root: its paths, its metadata and the notes it
keeps; its usage records are records.py's, how each file is written statefiles.py's.

Layout (shared with docker-on-top v0.1.2, so either plugin can run on the same root):

    <root>/<name>/metadata.json     {"BaseDirPath": ..., "Volatile": ...}, always present
    <root>/<name>/activemounts/<ID> {"UsageCount": N}, one file per mount ID in use
    <root>/<name>/upper/            the overlay upperdir: the volume's changes
    <root>/<name>/workdir/          the overlay workdir, only while mounted
    <root>/<name>/mountpoint/       where the overlay is mounted, only while mounted
    <root>/<name>/busy.json         what holds the lock for long work (ours only), while it does
    <root>/<name>/snapshot.json     the layer a snapshot moves upper/ into (ours), while it does
    <root>/<name>/rollback.json     the layer a rollback goes back to (ours), while it does
    <root>/<name>/.upper.new/       a snapshot's new upper/ (ours), until renamed into place
    <root>/<name>/usage.json        what a sized volume's storage held at its last unmount (ours)
    <root>/<name>/size.img          a sized volume's changes (ours): an ext4 image, in place
                                    of upper/; mounted on limit/ while the volume is (a
                                    volatile one: a tmpfs there instead)
    <root>/<name>/unreleased.json   releases still to apply (ours only), when some failed

The state root and each `<root>/<name>/` are 0700 (PRIVATE_MODE): see below.

The invariant everything else follows: a record in `activemounts/` guarantees a user
and a mounted overlay; a mounted overlay on its own guarantees nothing. So a record is
written only after the overlay is mounted and removed before it is unmounted: a crash
between the two steps leaves a harmless stray mount, never a record that lies.
"""

from __future__ import annotations

import json
import logging
import os
import re
import stat
import time
from contextlib import suppress
from functools import cached_property
from pathlib import Path

from . import changes, sizelimit
from .metadata import Metadata, rfc3339
from .records import UsageRecords
from .statefiles import fsync_directory, read_file, write_atomically
from .walk import remove_tree

log = logging.getLogger(__name__)

NAME_PATTERN = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]*")
NAME_MAX_BYTES = 255  # NAME_MAX: a volume name and a mount ID each become one file name
# A volume folder being removed is renamed to this prefix: no volume name starts with ".".
REMOVED_PREFIX = ".removed."
SNAPSHOT, ROLLBACK = "snapshot", "rollback"  # the kinds of Volume.intent
# The state root and each volume folder give others no access at all: `upper/` holds
# whatever a container wrote, setuid-root files included, and any access for others
# (even the execute bit alone) would let a host user run them by their path. As for
# /var/lib/docker (CVE-2021-41091).
PRIVATE_MODE = 0o700


def make_private(folder: str | Path) -> bool:
    """Take all access away from group and others; True when they had some."""
    mode = stat.S_IMODE(os.lstat(folder).st_mode)
    if not mode & 0o077:
        return False
    os.chmod(folder, mode & PRIVATE_MODE)
    return True


class Volume:
    """One volume's folder. The paths are made when first used: a request needs only a
    few of them, and List makes a Volume for every volume."""

    def __init__(self, root: Path, name: str) -> None:
        if not NAME_PATTERN.fullmatch(name) or len(os.fsencode(name)) > NAME_MAX_BYTES:
            raise ValueError(f"invalid volume name {name!r}")
        self.name = name
        self._root = root
        # The folder and the paths a Mount touches as strings: a Mount runs a dozen
        # syscalls on them, and making each a Path would cost more than the syscalls.
        self.location = f"{root}/{name}"
        self.metadata_file = f"{self.location}/metadata.json"
        self.mountpoint_str = f"{self.location}/mountpoint"
        self.workdir_str = f"{self.location}/workdir"
        self.upper_str = f"{self.location}/upper"

    @cached_property
    def folder(self) -> Path:
        return self._root / self.name

    @cached_property
    def upper(self) -> Path:
        return Path(self.upper_str)

    @cached_property
    def workdir(self) -> Path:
        return Path(self.workdir_str)

    @cached_property
    def mountpoint(self) -> Path:
        return Path(self.mountpoint_str)

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
        self.folder.mkdir(mode=PRIVATE_MODE)
        try:
            if metadata.size_limit is None:
                self.upper.mkdir()
            elif not metadata.volatile:
                sizelimit.make_image(self.image, metadata.size_limit)
            self.records.make()
            self.write_metadata(metadata)
            fsync_directory(self.folder.parent)
        except BaseException:
            with suppress(OSError):
                remove_tree(self.folder)
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

    def intent(self, kind: str) -> Path:
        """Only while a snapshot or rollback (`kind`) runs: its layer (see layers.py)."""
        return Path(f"{self.location}/{kind}.json")

    def begin(self, kind: str, layer: str) -> None:
        write_atomically(
            self.intent(kind),
            json.dumps({"Layer": layer}).encode(),
            f"{self.location}/.{kind}.json.tmp",
            durable=True,
        )

    def in_progress(self, kind: str) -> str | None:
        """The layer of a snapshot or rollback (`kind`) cut short, if any."""
        try:
            # Asked at every first Mount, where the file is missing: one failed open(2).
            layer = json.loads(read_file(f"{self.location}/{kind}.json"))["Layer"]
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{self.intent(kind)} is damaged: {error}") from None
        if not isinstance(layer, str) or not NAME_PATTERN.fullmatch(layer):
            raise ValueError(f"{self.intent(kind)} names no layer")
        return layer

    def end(self, kind: str) -> None:
        with suppress(FileNotFoundError):
            self.intent(kind).unlink()

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
        doomed = f"{self._root}/{REMOVED_PREFIX}{os.urandom(8).hex()}"
        os.rename(self.location, doomed)
        remove_tree(doomed)

    def make_mount_folders(self, *, workdir: bool = True) -> list[str]:
        """Create `mountpoint/` and an empty `workdir/` (unless a sized volume keeps it
        in its storage); returns the folders this call made.

        A leftover mountpoint is reused. A leftover workdir is emptied: it holds only the
        kernel's scratch files, and those of a volatile overlay make the next mount fail.
        """
        created: list[str] = []
        try:
            try:
                os.mkdir(self.mountpoint_str)
                created.append(self.mountpoint_str)
            except FileExistsError:
                log.warning("volume %s: reusing the leftover %s", self.name, self.mountpoint_str)
            if workdir:
                try:
                    os.mkdir(self.workdir_str)
                except FileExistsError:
                    log.warning("volume %s: emptying the leftover %s", self.name, self.workdir_str)
                    remove_tree(self.workdir_str)
                    os.mkdir(self.workdir_str)
                created.append(self.workdir_str)
        except OSError:
            self.remove_folders(created)
            raise
        return created

    def remove_folders(self, folders: list[str]) -> None:
        for folder in folders:
            if folder == self.workdir_str:
                remove_tree(folder)
            else:
                os.rmdir(folder)

    def remove_mount_folders(self) -> None:
        # Strings, not pathlib: this is the end of every last Unmount (see UsageRecords).
        with suppress(FileNotFoundError):
            os.rmdir(f"{self.location}/mountpoint")
        workdir = f"{self.location}/workdir"
        try:
            # After a clean unmount the kernel leaves only an empty work/ behind; a crash
            # before the mount leaves none.
            with suppress(FileNotFoundError):
                os.rmdir(f"{workdir}/work")
            os.rmdir(workdir)
        except FileNotFoundError:
            pass
        except OSError:
            remove_tree(workdir)

    def discard_changes(self) -> None:
        changes.reset(self.upper)
