"""A3: concurrent Mounts and Unmounts of one volume are serialised and counted exactly."""

from __future__ import annotations

import threading
from collections.abc import Callable

from .conftest import PluginClient, Reply, Workspace, mounts_at

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
