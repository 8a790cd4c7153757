"""SPEC B11 through the real socket: an Unmount replies once its record is gone, and the
overlay's teardown follows, still under the volume's lock; the next Mount waits for it,
and a stop finishes it.

A teardown is held up without timing anything: the volume has a size limit, so its
changes live on an ext4 image that the daemon mounts on `limit/`, and the test freezes
that filesystem (FIFREEZE) while the volume is mounted. The record and the lock are on
the state root, so the Unmount can answer; its teardown, which must remove the kernel's
scratch folder from the frozen image, cannot end until the test thaws it. A daemon that
tore down before replying would send no reply at all while the image is frozen.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from ..mounts import lock_is_free
from .conftest import Daemon, PluginClient, Workspace, mounts_at, mounts_under, wait_until

UNMOUNT = "/VolumeDriver.Unmount"
MOUNT = "/VolumeDriver.Mount"
# linux/fs.h: _IOWR('X', 119, int) and _IOWR('X', 120, int).
FIFREEZE = 0xC0045877
FITHAW = 0xC0045878
# How long a reply may take before the test fails: a reply held back by the frozen
# teardown never comes.
REPLY_TIMEOUT_S = 5.0


class Frozen:
    """The filesystem mounted on `folder`, frozen for the `with` block unless thawed
    before its end.

    The test's descriptor is opened through a bind mount of `folder` elsewhere: one
    opened on `folder` itself would make the daemon's unmount of it fail with EBUSY if
    the teardown got there between the thaw and the close.
    """

    def __init__(self, folder: Path) -> None:
        self._folder = folder
        self._bind = ""
        self._fd = -1

    def __enter__(self) -> Frozen:
        self._bind = tempfile.mkdtemp(prefix="dot-frozen-")
        subprocess.run(["mount", "--bind", str(self._folder), self._bind], check=True)
        self._fd = os.open(self._bind, os.O_RDONLY | os.O_DIRECTORY)
        fcntl.ioctl(self._fd, FIFREEZE, 0)
        return self

    def thaw(self) -> None:
        if self._fd >= 0:
            fcntl.ioctl(self._fd, FITHAW, 0)
            os.close(self._fd)
            self._fd = -1
        if self._bind:
            subprocess.run(["umount", self._bind], check=True)
            os.rmdir(self._bind)
            self._bind = ""

    def __exit__(self, *_: object) -> None:
        self.thaw()  # a frozen filesystem would block the clean-up


@contextlib.contextmanager
def unmounted_while_frozen(ws: Workspace, client: PluginClient) -> Iterator[Frozen]:
    """Volume `v` with a size limit, mounted for c1 and holding one change, then its
    storage frozen and c1's Unmount sent: the Unmount has replied, its teardown waits for
    the thaw (the `with` block's end, unless thawed before)."""
    client.create("v", ws.base, size="32M")
    mountpoint = Path(client.mount("v", "c1"))
    (mountpoint / "change.txt").write_text("made by c1\n")
    quick = PluginClient(ws.socket, timeout=REPLY_TIMEOUT_S)
    with Frozen(ws.volume("v").folder / "limit") as ice:
        reply = quick.call(UNMOUNT, {"Name": "v", "ID": "c1"})
        assert reply.status == 200 and reply.json == {}, reply
        yield ice


def test_b11_unmount_replies_before_its_teardown_which_keeps_the_lock(
    ws: Workspace, client: PluginClient
) -> None:
    volume = ws.volume("v")
    mountpoint = volume.mountpoint
    with unmounted_while_frozen(ws, client):
        # The record went before the reply; the teardown has not ended and holds the lock.
        assert volume.records() == {}
        assert not lock_is_free(volume.activemounts)
        assert mounts_at(volume.folder / "limit") != []
    client.wait_for_teardown("v")
    assert mounts_at(mountpoint) == [] and mounts_at(volume.folder / "limit") == []
    assert "mountpoint" not in volume.entries() and "limit" not in volume.entries()


def test_b11_a_mount_during_a_teardown_waits_for_it_and_mounts_the_volume(
    ws: Workspace, daemon: Daemon, client: PluginClient
) -> None:
    volume = ws.volume("v")
    mountpoint = volume.mountpoint
    mounted: list[object] = []
    with unmounted_while_frozen(ws, client) as ice:
        waiter = threading.Thread(target=lambda: mounted.append(client.mount("v", "c2")))
        waiter.start()
        # The daemon logs each request when it begins to answer it.
        wait_until(lambda: '"ID": "c2"' in daemon.log(), "the Mount is being answered")
        assert mounted == [] and not lock_is_free(volume.activemounts)
        ice.thaw()
        waiter.join(10)
    assert mounted == [f"{mountpoint}/"]
    assert volume.records() == {"c2": {"UsageCount": 1}}
    assert [m.fstype for m in mounts_at(mountpoint)] == ["overlay"]
    assert (mountpoint / "change.txt").read_text() == "made by c1\n"
    client.unmount("v", "c2")
    assert mounts_under(volume.folder) == []


def test_b11_a_mount_right_after_an_unmount_on_one_connection_works(
    ws: Workspace, client: PluginClient
) -> None:
    client.create("v", ws.base)
    volume = ws.volume("v")
    mountpoint = Path(client.mount("v", "c1"))
    (mountpoint / "change.txt").write_text("made by c1\n")
    connection = client.connection()
    try:
        assert client.call(UNMOUNT, {"Name": "v", "ID": "c1"}, connection=connection).json == {}
        reply = client.call(MOUNT, {"Name": "v", "ID": "c2"}, connection=connection)
    finally:
        connection.close()
    assert reply.status == 200 and reply.json == {"Mountpoint": f"{mountpoint}/"}, reply
    assert volume.records() == {"c2": {"UsageCount": 1}}
    assert [m.fstype for m in mounts_at(mountpoint)] == ["overlay"]
    assert (mountpoint / "change.txt").read_text() == "made by c1\n"


def test_b11_b9_a_stop_finishes_the_teardown_under_way(
    ws: Workspace, daemon: Daemon, client: PluginClient
) -> None:
    volume = ws.volume("v")
    mountpoint = volume.mountpoint
    with unmounted_while_frozen(ws, client) as ice:
        daemon.signal(signal.SIGTERM)
        wait_until(lambda: not ws.socket.exists(), "the stop has begun (the socket is gone)")
        assert daemon.process.poll() is None, "the daemon quit with a teardown under way"
        ice.thaw()
    assert daemon.wait_exit() == 0, daemon.log()
    assert mounts_at(mountpoint) == [] and mounts_under(volume.folder) == []
    assert volume.records() == {}
    assert "mountpoint" not in volume.entries() and "limit" not in volume.entries()
