"""A3: concurrent Mounts and Unmounts of one volume are serialised and counted exactly;
requests that wait on one volume hold up no other."""

from __future__ import annotations

import fcntl
import json
import socket
import struct
import termios
import threading
from collections.abc import Callable

import pytest

from .conftest import (
    CALL_TIMEOUT_S,
    Daemon,
    PluginClient,
    Reply,
    Workspace,
    flock_held,
    http_request,
    mounts_at,
    parse_responses,
    threads_waiting_for_a_lock,
    wait_until,
)

USERS = 40


def all_at_once(calls: list[Callable[[], Reply]]) -> list[Reply]:
    """Run every call in its own thread (each opens its own connection), released together."""
    barrier = threading.Barrier(len(calls))
    replies: list[Reply | BaseException | None] = [None] * len(calls)

    def run(index: int) -> None:
        barrier.wait()
        try:
            replies[index] = calls[index]()
        except BaseException as error:
            replies[index] = error

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert all(isinstance(r, Reply) for r in replies), replies
    return replies  # type: ignore[return-value]


def test_concurrent_mounts_then_unmounts_of_one_volume(ws: Workspace, client: PluginClient) -> None:
    client.create("v", ws.base, volatile="true")
    volume = ws.volume("v")
    ids = [f"{i:064x}" for i in range(USERS)]  # dockerd's IDs: 64 hex digits

    def mount(mount_id: str) -> Callable[[], Reply]:
        return lambda: client.call("/VolumeDriver.Mount", {"Name": "v", "ID": mount_id})

    def unmount(mount_id: str) -> Callable[[], Reply]:
        return lambda: client.call("/VolumeDriver.Unmount", {"Name": "v", "ID": mount_id})

    replies = all_at_once([mount(i) for i in ids])
    assert [r.status for r in replies] == [200] * USERS, [
        str(r) for r in replies if r.status != 200
    ]
    assert {r.json["Mountpoint"] for r in replies} == {f"{volume.mountpoint}/"}  # type: ignore[index]
    (entry,) = mounts_at(volume.mountpoint)
    assert entry.fstype == "overlay"
    assert volume.records() == {i: {"UsageCount": 1} for i in ids}

    replies = all_at_once([unmount(i) for i in ids])
    assert [r.status for r in replies] == [200] * USERS, [
        str(r) for r in replies if r.status != 200
    ]
    client.wait_for_teardown("v")
    assert mounts_at(volume.mountpoint) == []
    assert volume.records() == {}
    assert volume.entries() == {"metadata.json", "upper", "activemounts"}


def test_concurrent_mounts_and_unmounts_interleaved(ws: Workspace, client: PluginClient) -> None:
    """Half the users leave while the other half arrive: the overlay never goes away."""
    client.create("v", ws.base)
    volume = ws.volume("v")
    client.mount("v", "keeper")
    (volume.mountpoint / "mine.txt").write_text("mine\n")
    leaving = [f"old{i}" for i in range(USERS // 2)]
    arriving = [f"new{i}" for i in range(USERS // 2)]
    for mount_id in leaving:
        client.mount("v", mount_id)
    calls = [
        *(
            lambda i=i: client.call("/VolumeDriver.Unmount", {"Name": "v", "ID": i})
            for i in leaving
        ),
        *(lambda i=i: client.call("/VolumeDriver.Mount", {"Name": "v", "ID": i}) for i in arriving),
    ]
    replies = all_at_once(calls)
    assert [r.status for r in replies] == [200] * USERS
    assert len(mounts_at(volume.mountpoint)) == 1
    assert volume.records() == {i: {"UsageCount": 1} for i in ["keeper", *arriving]}
    assert (volume.mountpoint / "mine.txt").read_text() == "mine\n"


def test_concurrent_mounts_with_one_shared_id_count_every_use(
    ws: Workspace, client: PluginClient
) -> None:
    client.create("v", ws.base)
    volume = ws.volume("v")
    calls = [lambda: client.call("/VolumeDriver.Mount", {"Name": "v", "ID": "same"})] * 20
    assert [r.status for r in all_at_once(calls)] == [200] * 20
    assert volume.records() == {"same": {"UsageCount": 20}}
    calls = [lambda: client.call("/VolumeDriver.Unmount", {"Name": "v", "ID": "same"})] * 19
    assert [r.status for r in all_at_once(calls)] == [200] * 19
    assert volume.records() == {"same": {"UsageCount": 1}}
    assert len(mounts_at(volume.mountpoint)) == 1


# More than the old loop's 64 threads (at the 65th blocked request it stalled: for good
# while lock waits were unbounded, 4 s at a time since), and more than the pool's 64
# workers, so that some wait in its queue (twice as many: most of them).
BLOCKED = (70, 140)


def connected(ws: Workspace, context: str) -> socket.socket:
    """A connection to the daemon, as a blocking client (dockerd) makes it: connect(2)
    waits while the listen queue is full, here for at most CALL_TIMEOUT_S."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # A unix socket's connect waits up to its send timeout (a Python socket timeout
    # would make it non-blocking: no wait at all).
    send_timeout = struct.pack("ll", int(CALL_TIMEOUT_S), 0)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, send_timeout)
    try:
        sock.connect(str(ws.socket))
    except BlockingIOError:
        sock.close()
        raise AssertionError(
            f"{context}, the daemon accepted no connection for {CALL_TIMEOUT_S:g} s: "
            "its loop has stopped"
        ) from None
    sock.settimeout(CALL_TIMEOUT_S)
    return sock


def unread_bytes(sock: socket.socket) -> int:
    """What the daemon has not yet read of what this socket sent (SIOCOUTQ)."""
    return struct.unpack("i", fcntl.ioctl(sock, termios.TIOCOUTQ, b"\0\0\0\0"))[0]


@pytest.mark.parametrize("blocked", BLOCKED)
def test_mounts_blocked_on_one_volume_hold_up_no_other_volume(
    ws: Workspace, daemon: Daemon, client: PluginClient, blocked: int
) -> None:
    """Issue 13, item 2: many Mounts wait on one volume's lock (another process holds it
    the whole time); the daemon still reads every request and answers a Get of another
    volume (dockerd forgets a volume whose Get fails), and a List of this root of two
    volumes, which the loop answers too: with 140 Mounts waiting, every worker is taken
    for 4 s at a time."""
    client.create("busy", ws.base)
    client.create("other", ws.base)
    volume = ws.volume("busy")
    waiting: list[socket.socket] = []
    try:
        with flock_held(volume.activemounts):
            for index in range(blocked):
                sock = connected(ws, f"after {index} Mounts")
                waiting.append(sock)
                body = json.dumps({"Name": "busy", "ID": f"blocked-{index}"}).encode()
                sock.sendall(http_request("/VolumeDriver.Mount", body))
            # Every request reaches the daemon's loop, which hands it on and goes on.
            wait_until(
                lambda: all(unread_bytes(sock) == 0 for sock in waiting),
                "the daemon read every Mount",
            )
            wait_until(
                lambda: threads_waiting_for_a_lock(daemon.pid) > 0, "a Mount waits for the lock"
            )
            assert volume.records() == {}
            other = PluginClient(ws.socket, timeout=5.0)
            reply = other.ok("/VolumeDriver.Get", {"Name": "other"})
            assert reply["Volume"]["Name"] == "other", reply  # type: ignore[index]
            assert other.names() == ["busy", "other"]
        replies = [read_reply(sock) for sock in waiting]
    finally:
        for sock in waiting:
            sock.close()
    # Each Mount either waited and succeeded or gave up on the lock with a clear error.
    mounted = [f"blocked-{i}" for i, reply in enumerate(replies) if reply.status == 200]
    assert all(reply.status in (200, 500) for reply in replies), [str(r) for r in replies]
    assert sorted(volume.records()) == sorted(mounted)
    for mount_id in mounted:
        client.unmount("busy", mount_id)
    assert volume.records() == {} and mounts_at(volume.mountpoint) == []


def read_reply(sock: socket.socket) -> Reply:
    data = bytearray()
    while True:
        chunk = sock.recv(65536)
        data += chunk
        head, separator, rest = bytes(data).partition(b"\r\n\r\n")
        if separator:
            length = int(head.lower().split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
            if len(rest) >= length:
                (reply,) = parse_responses(bytes(data))
                return reply
        assert chunk, f"the daemon closed without a reply: {bytes(data)!r}"


# More than twice a pool of 16 workers (each blocked Mount holds one for up to 4 s), and
# fewer than the daemon's MAX_WORKERS.
BLOCKED_BEFORE_OTHERS = 40


def test_mounts_blocked_on_one_volume_hold_up_no_mount_of_another(
    ws: Workspace, daemon: Daemon, client: PluginClient
) -> None:
    """Requests waiting on one volume's lock each hold a worker; a Mount of another
    volume still gets one at once, not after their lock waits (Podman gives a call 5 s)."""
    client.create("busy", ws.base)
    client.create("other", ws.base)
    volume, other = ws.volume("busy"), ws.volume("other")
    waiting: list[socket.socket] = []
    try:
        with flock_held(volume.activemounts):
            for index in range(BLOCKED_BEFORE_OTHERS):
                sock = connected(ws, f"after {index} Mounts")
                waiting.append(sock)
                body = json.dumps({"Name": "busy", "ID": f"blocked-{index}"}).encode()
                sock.sendall(http_request("/VolumeDriver.Mount", body))
            wait_until(
                lambda: all(unread_bytes(sock) == 0 for sock in waiting),
                "the daemon read every Mount",
            )
            mounted = PluginClient(ws.socket, timeout=5.0).mount("other", "c1")
            assert mounted == f"{other.mountpoint}/"
        replies = [read_reply(sock) for sock in waiting]
    finally:
        for sock in waiting:
            sock.close()
    for index, reply in enumerate(replies):
        if reply.status == 200:
            client.unmount("busy", f"blocked-{index}")
    client.unmount("other", "c1")
    assert volume.records() == {} and other.records() == {}
    assert mounts_at(volume.mountpoint) == [] and mounts_at(other.mountpoint) == []
