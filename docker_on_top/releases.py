"""Counting a mount ID's use down, and the releases that could not be applied when their
Unmount came (an immutable record, a lock that could not be taken): kept in memory and
in the volume's `unreleased.json`, and applied under the volume's lock before its next
Mount, Unmount, reset or commit.

Until they are applied the records claim users that are gone: mounting then would hand
out a volume a volatile volume never discarded, so a volume with releases that still
fail is refused.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter

from .errors import InternalError
from .volume import Volume

log = logging.getLogger(__name__)


def usage_count(volume: Volume, mount_id: str) -> int | None:
    """The record's usage count; None without a record. A damaged record counts as one
    use: counting too high only leaves a mount behind, counting too low would unmount
    under a running container."""
    try:
        return volume.records.count(mount_id)
    except ValueError as error:
        log.warning("volume %s: %s; counting it as one use", volume.name, error)
        return 1


def release_one(volume: Volume, mount_id: str) -> bool:
    """Under the volume's lock: count one use of `mount_id` less; True when the volume
    has no user left."""
    count = usage_count(volume, mount_id)
    if count is None:
        log.warning(
            "volume %s has no record for mount ID %s; treating it as used once",
            volume.name,
            mount_id,
        )
        count = 1
    if count > 1:
        volume.records.set(mount_id, count - 1)
        return False
    # The record goes first: if unmounting fails, a stray mount remains, never a
    # record without a user.
    volume.records.remove(mount_id)
    return not volume.records.in_use()


class PendingReleases:
    """The releases still to apply, by volume name.

    Only the thread holding a volume's lock applies or drops its entry; an Unmount that
    could not take the lock adds to it, under the guard.
    """

    def __init__(self) -> None:
        self._pending: dict[str, Counter[str]] = {}
        self._guard = threading.Lock()

    def keep(self, volume: Volume, mount_id: str) -> None:
        with self._guard:
            self._pending.setdefault(volume.name, Counter())[mount_id] += 1

    def take(self, volume: Volume) -> Counter[str]:
        """Under the volume's lock: its releases, dropped from here."""
        with self._guard:
            return self._pending.pop(volume.name, Counter())

    def replace(self, volume: Volume, pending: Counter[str]) -> None:
        with self._guard:
            if pending:
                self._pending[volume.name] = pending
            else:
                self._pending.pop(volume.name, None)

    def retry(self, volume: Volume) -> None:
        """Under the volume's lock: apply them; InternalError when one still fails."""
        if volume.name not in self._pending:
            # Every Mount and Unmount asks, and there are almost never any. Without the
            # guard: an Unmount that adds some just after this look would have added
            # them just after a take() too, and they wait for the next request.
            return
        pending = self.take(volume)
        if not pending:
            return
        for mount_id in list(pending):
            while pending[mount_id] > 0:
                try:
                    release_one(volume, mount_id)
                except OSError as error:
                    with self._guard:
                        self._pending.setdefault(volume.name, Counter()).update(pending)
                    self.save(volume)
                    raise InternalError(
                        f"the usage record of mount ID {mount_id} could not be released when "
                        "its container stopped and still cannot be",
                        error,
                    ) from error
                pending[mount_id] -= 1
            del pending[mount_id]
        self.save(volume)

    def save(self, volume: Volume) -> None:
        """Under the volume's lock: write them to its unreleased.json."""
        with self._guard:
            pending = {i: n for i, n in self._pending.get(volume.name, {}).items() if n > 0}
        try:
            volume.write_unreleased(pending)
        except OSError as error:
            log.error("volume %s: cannot save the releases still to apply: %s", volume.name, error)

    def load(self, volume: Volume) -> None:
        """At start-up: take up those a previous run saved."""
        try:
            pending = volume.read_unreleased()
        except (OSError, ValueError) as error:
            log.error("volume %s: cannot read the releases still to apply: %s", volume.name, error)
            return
        if pending:
            log.warning(
                "volume %s: %d release(s) failed before the restart; retrying them at its next use",
                volume.name,
                sum(pending.values()),
            )
            self.replace(volume, Counter(pending))
