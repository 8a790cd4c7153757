"""Stuck volumes: each volume's records compared with the kernel's mount table and, when
dockerd answers, with the containers it says are live; with `fix`, what nothing can own
is released. A volume a live container uses is never unmounted.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from . import kernel, overlay
from .errors import InternalError, PluginError, UserError
from .releases import PendingReleases
from .store import NO_SUCH_VOLUME, VolumeStore
from .volume import Volume

# Podman sends this one mount ID for all its containers (libpod's pseudoCtrID) and
# counts its users itself.
PODMAN_MOUNT_ID = "2f73349cfc4630255319c6c8dfc1b46a8996ace9d14d8e07563b165915918ec2"


@dataclass(frozen=True)
class Finding:
    """A disagreement between a volume's records, the kernel and dockerd."""

    volume: str
    problem: str
    fixed: bool = False


def doctor(
    store: VolumeStore,
    releases: PendingReleases,
    name: str | None,
    users: Mapping[str, int] | None,
    *,
    fix: bool,
) -> list[Finding]:
    """Compare each volume (or the one named) with the mount table and, when `users` is
    known (live containers per volume, from dockerd), with the containers.

    With `fix`, releases what nothing can own: a mounted overlay without records, and
    the records of a volume no live container uses.
    """
    # Lazily: the start-up check walks every volume and need not hold them all.
    volumes: Iterable[Volume] = [store.volume(name)] if name is not None else store.volumes()
    findings: list[Finding] = []
    for volume in volumes:
        try:
            if not volume.exists():
                raise UserError(NO_SUCH_VOLUME)
            with store.locked(volume):
                findings += _examine(volume, releases, users, fix=fix)
        except PluginError as error:
            if name is not None:
                raise
            findings.append(Finding(volume.name, f"cannot be examined: {error}"))
        except OSError as error:
            if name is not None:
                raise InternalError(f"failed to examine volume {name}", error) from error
            findings.append(Finding(volume.name, f"cannot be examined: {error}"))
    return findings


def _examine(
    volume: Volume, releases: PendingReleases, users: Mapping[str, int] | None, *, fix: bool
) -> list[Finding]:
    ids = volume.records.ids()
    mounted = kernel.is_mount_point(volume.mountpoint)
    findings = []
    try:
        pending = volume.read_unreleased()
    except ValueError as error:
        pending = {}
        findings.append(Finding(volume.name, f"damaged state file, ignored: {error}"))
    if pending:
        releases.replace(volume, Counter(pending))
    if not ids:
        if mounted:
            problem = "an overlay is mounted but no record uses it"
            if fix and not overlay.unmount(volume):
                findings.append(Finding(volume.name, f"{problem}; {overlay.HELD_ON_HOST}"))
            else:
                findings.append(Finding(volume.name, problem, fix))
        elif kernel.is_mount_point(volume.limit):
            if fix:
                overlay.release_storage(volume)
            findings.append(
                Finding(volume.name, "its size-limited storage is mounted but unused", fix)
            )
        return findings
    if not mounted:
        findings.append(
            Finding(volume.name, f"{len(ids)} usage record(s) but no overlay is mounted")
        )
    # dockerd's containers can only vouch for dockerd's mount IDs.
    docker_ids = [mount_id for mount_id in ids if mount_id != PODMAN_MOUNT_ID]
    live = None if users is None else users.get(volume.name, 0)
    if live == 0 and docker_ids:
        if fix:
            for mount_id in docker_ids:
                volume.records.remove(mount_id)
                pending.pop(mount_id, None)
            releases.replace(volume, Counter(pending))
            releases.save(volume)
            if not volume.records.in_use():
                overlay.unmount(volume)
        findings.append(
            Finding(
                volume.name,
                f"{len(docker_ids)} usage record(s) but no live container uses it (its "
                "Unmount was lost, e.g. the plugin was down when a container stopped)",
                fix,
            )
        )
    elif live is not None and len(docker_ids) > live:
        findings.append(
            Finding(
                volume.name,
                f"{len(docker_ids)} usage records for {live} live container(s); "
                "some may be stale, but which cannot be told",
            )
        )
    if pending and not fix:
        findings.append(Finding(volume.name, f"releases still to apply at its next use: {pending}"))
    return findings
