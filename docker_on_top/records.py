"""A volume's usage records, `activemounts/<ID>` (`{"UsageCount": N}`): which mount IDs
use it and how often, and the volume's lock, the flock on that folder (shared with the
Go plugin and our command line). The invariant they keep is stated in volume.py."""

from __future__ import annotations

import json
import os
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager, suppress

from . import kernel
from .statefiles import read_file, write_atomically

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
