"""A request that takes long holds up no other client.

The daemon's event loop hands the requests that may block to a pool of worker threads
and goes on serving. Here strace delays every mount(2) of the daemon by two seconds
(`inject=mount:delay_enter=...`), so a Mount is slow for real, in the kernel call where
a hung base filesystem would make it slow.
"""

from __future__ import annotations

import threading
import time

from ..protocol.conftest import PluginClient, Workspace, mounts_at
from .conftest import Tracer
from .harness import MOST_THREADS, fresh_daemon, threads_of, wait_idle_threads, wait_settled

MOUNT_DELAY_S = 2.0
PROMPT_S = 0.5


def test_a_slow_mount_holds_up_no_other_request(ws: Workspace, tracer: Tracer) -> None:
    daemon = fresh_daemon(ws)
    client = ws.client()
    client.create("slow", ws.base)
    client.create("other", ws.base)
    wait_settled(daemon.pid)
    strace = tracer.attach(daemon.pid, [f"mount:delay_enter={int(MOUNT_DELAY_S * 1e6)}"])

    replies: dict[str, object] = {}

    def slow_mount() -> None:
        replies["slow"] = PluginClient(ws.socket).mount("slow", "first")

    mounting = threading.Thread(target=slow_mount)
    started = time.monotonic()
    mounting.start()
    time.sleep(0.3)  # the Mount is now inside mount(2)
    others = PluginClient(ws.socket)
    timings = {}
    for endpoint, body in (
        ("/VolumeDriver.Capabilities", None),
        ("/VolumeDriver.Get", {"Name": "other"}),
        ("/VolumeDriver.Create", {"Name": "third", "Opts": {"base": str(ws.base)}}),
        ("/VolumeDriver.List", None),
        ("/VolumeDriver.Unmount", {"Name": "other", "ID": "never-mounted"}),
    ):
        began = time.monotonic()
        others.ok(endpoint, body)
        timings[endpoint] = time.monotonic() - began
    mount_outlasted_them = mounting.is_alive()
    mounting.join(30)
    elapsed = time.monotonic() - started
    strace.stop()

    assert max(timings.values()) < PROMPT_S, f"held up behind a slow Mount: {timings}"
    assert mount_outlasted_them and elapsed >= MOUNT_DELAY_S, f"the Mount took {elapsed:.2f} s"
    mountpoint = f"{ws.root}/slow/mountpoint/"
    assert replies["slow"] == mountpoint, replies
    assert len(mounts_at(mountpoint.rstrip("/"))) == 1
    assert sorted(client.names()) == ["other", "slow", "third"]
    # No more workers than requests that went to one (the Mount, Create and Unmount; a
    # List of a few volumes is the loop's), and they end once idle, leaving the loop's
    # thread alone.
    wait_settled(daemon.pid)
    assert len(threads_of(daemon.pid)) <= min(MOST_THREADS, 1 + 3)
    wait_idle_threads(daemon.pid)
    client.unmount("slow", "first")
    assert mounts_at(mountpoint.rstrip("/")) == []
