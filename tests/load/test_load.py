"""Many clients at once: the usage records stay exact and each overlay is mounted exactly
while its volume is in use (SPEC A2, A3); thousands of requests leave the memory flat.

The load test is random but replayable: its seed is printed at the start and read from
DOT_LOAD_SEED. Each client thread draws its calls from its own generator seeded from it,
so a seed replays every client's sequence of calls (the threads' interleaving is the
scheduler's).
"""

from __future__ import annotations

import os
import random
import statistics
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..protocol.conftest import (
    Daemon,
    PluginClient,
    UnixHTTPConnection,
    Workspace,
    mounts_at,
    mounts_under,
)
from .conftest import proc_status

VOLUMES = 20
CLIENTS = 16
# Quiescent checks: after each phase every client stops and the state is compared with
# the model; the last one is followed by every client unmounting what it still holds.
PHASES = 4
DEFAULT_CALLS = 20_000
# Podman's default timeout for every call; SPEC A3: "no call may be slow".
SLOW_CALL_S = 5.0
# docker cp reuses the container's mount ID (moby issue 47964): IDs shared by clients.
SHARED_IDS = [f"{0xC0FFEE00 + i:064x}" for i in range(4)]

IDLE_ENTRIES = {"metadata.json", "upper", "activemounts"}
MOUNTED_ENTRIES = IDLE_ENTRIES | {"workdir", "mountpoint"}


def volume_names() -> list[str]:
    return [f"load{i:02d}" for i in range(VOLUMES)]


def is_volatile(name: str) -> bool:
    return int(name[-2:]) % 3 == 0  # 7 volatile, 13 regular


class CallFailed(AssertionError):
    pass


@dataclass(repr=False)
class LoadClient:
    """One client: its own keep-alive connection, its own random choices, and what it
    holds (a usage count per (volume, mount ID)), which only it may release."""

    index: int
    ws: Workspace
    rng: random.Random
    plugin: PluginClient
    connection: UnixHTTPConnection
    held: Counter[tuple[str, str]] = field(default_factory=Counter)
    calls: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    done: int = 0

    def __repr__(self) -> str:
        return f"LoadClient({self.index})"

    def held_on(self, volume: str) -> int:
        return sum(n for (v, _), n in self.held.items() if v == volume)

    def call(self, endpoint: str, body: object | None = None) -> dict[str, object]:
        started = time.monotonic()
        if body is None:
            reply = self.plugin.call(endpoint, connection=self.connection)
        else:
            reply = self.plugin.call(endpoint, body, connection=self.connection)
        elapsed = time.monotonic() - started
        self.latencies.append(elapsed)
        self.calls[endpoint] += 1
        where = f"client {self.index}, call {self.done}: {endpoint} {body!r}"
        if reply.status != 200:
            raise CallFailed(f"{where} -> {reply}")
        if reply.headers.get("connection", "").lower() == "close":
            raise CallFailed(f"{where}: the daemon closed a keep-alive connection: {reply}")
        if elapsed > SLOW_CALL_S:
            raise CallFailed(f"{where} took {elapsed:.1f} s")
        document = reply.json
        if not isinstance(document, dict) or document.get("Err"):
            raise CallFailed(f"{where} -> {reply}")
        return document

    def mountpoint(self, volume: str) -> str:
        return f"{self.ws.volume(volume).mountpoint}/"

    # --- the calls -----------------------------------------------------------------

    def mount(self) -> None:
        volume = self.rng.choice(volume_names())
        mine = [i for (v, i) in self.held if v == volume]
        roll = self.rng.random()
        if mine and roll < 0.15:
            mount_id = self.rng.choice(mine)  # the same container mounting again
        elif roll < 0.25:
            mount_id = self.rng.choice(SHARED_IDS)
        else:
            mount_id = f"{self.rng.getrandbits(256):064x}"  # dockerd's IDs
        document = self.call("/VolumeDriver.Mount", {"Name": volume, "ID": mount_id})
        self.held[volume, mount_id] += 1
        assert document == {"Mountpoint": self.mountpoint(volume)}, document
        # We hold it, so it is mounted, and it is the overlay, not an empty folder.
        mountpoint = self.ws.volume(volume).mountpoint
        assert os.path.ismount(mountpoint), f"client {self.index}: {volume} not mounted"
        assert (mountpoint / "kept.txt").is_file(), f"client {self.index}: {volume} empty"

    def unmount(self, key: tuple[str, str] | None = None) -> None:
        volume, mount_id = key or self.rng.choice(sorted(self.held))
        self.call("/VolumeDriver.Unmount", {"Name": volume, "ID": mount_id})
        self.held[volume, mount_id] -= 1
        if not self.held[volume, mount_id]:
            del self.held[volume, mount_id]

    def get(self) -> None:
        volume = self.rng.choice(volume_names())
        held = self.held_on(volume)
        document = self.call("/VolumeDriver.Get", {"Name": volume})
        info = document["Volume"]
        assert isinstance(info, dict), document
        assert info["Name"] == volume, document
        status = info["Status"]
        assert status["Base"] == str(self.ws.base), document
        assert status["Volatile"] is is_volatile(volume), document
        if held:
            assert status["Mounted"] is True, f"client {self.index} holds {held}: {document}"
            assert status["ActiveMounts"] >= held, f"client {self.index} holds {held}: {document}"
            assert info.get("Mountpoint") == self.mountpoint(volume), document

    def list(self) -> None:
        document = self.call("/VolumeDriver.List")
        volumes = {v["Name"]: v for v in document["Volumes"]}  # type: ignore[attr-defined]
        assert sorted(volumes) == volume_names(), document
        for volume, _ in self.held:
            assert volumes[volume].get("Mountpoint") == self.mountpoint(volume), volumes[volume]

    def path(self) -> None:
        volume = self.rng.choice(volume_names())
        document = self.call("/VolumeDriver.Path", {"Name": volume})
        assert document == {"Mountpoint": self.mountpoint(volume)}, document

    def step(self) -> None:
        # Unmounts grow with what is held, so a client holds about one mount on average
        # and volumes keep going in and out of use.
        holding = sum(self.held.values())
        weights = {
            self.mount: 30,
            self.unmount: 30 * holding,
            self.get: 25,
            self.list: 8,
            self.path: 7,
        }
        (action,) = self.rng.choices(list(weights), list(weights.values()))
        try:
            action()
        except CallFailed:
            raise
        except AssertionError as error:
            raise AssertionError(f"client {self.index}, call {self.done}: {error}") from error
        self.done += 1


def run_clients(clients: list[LoadClient], work: object, stop: threading.Event) -> None:
    """Run `work(client)` in one thread per client; the first failure stops them all."""
    failures: list[BaseException] = []

    def run(client: LoadClient) -> None:
        try:
            work(client)  # type: ignore[operator]
        except BaseException as error:
            failures.append(error)
            stop.set()

    threads = [threading.Thread(target=run, args=(c,), name=f"load-{c.index}") for c in clients]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert not any(t.is_alive() for t in threads), "a client is stuck"
    if failures:
        raise failures[0]


def expected_records(clients: list[LoadClient]) -> dict[str, dict[str, int]]:
    expected: dict[str, Counter[str]] = {name: Counter() for name in volume_names()}
    for client in clients:
        for (volume, mount_id), count in client.held.items():
            expected[volume][mount_id] += count
    return {name: dict(counts) for name, counts in expected.items()}


def check_state(ws: Workspace, plugin: PluginClient, clients: list[LoadClient], when: str) -> int:
    """Quiescent check: every record exact; each volume mounted exactly when in use.

    Returns how many volumes are in use."""
    expected = expected_records(clients)
    assert sorted(os.listdir(ws.root)) == volume_names(), when
    in_use = 0
    for name, counts in expected.items():
        plugin.wait_for_teardown(name)
        volume = ws.volume(name)
        records = volume.records()
        assert records == {i: {"UsageCount": n} for i, n in counts.items()}, (
            f"{when}: records of {name}: expected {counts}, found {records}"
        )
        entries = mounts_at(volume.mountpoint)
        if counts:
            in_use += 1
            assert [e.fstype for e in entries] == ["overlay"], f"{when}: {name} in use: {entries}"
            assert volume.entries() == MOUNTED_ENTRIES, f"{when}: {name}: {volume.entries()}"
        else:
            assert entries == [], f"{when}: {name} is not in use but mounted: {entries}"
            assert volume.entries() == IDLE_ENTRIES, f"{when}: {name}: {volume.entries()}"
        status = plugin.ok("/VolumeDriver.Get", {"Name": name})["Volume"]["Status"]  # type: ignore[index]
        assert status["ActiveMounts"] == sum(counts.values()), f"{when}: {name}: {status}"
        assert status["Mounted"] is bool(counts), f"{when}: {name}: {status}"
    stray = [
        m
        for m in mounts_under(ws.dir)
        if Path(m.mount_point).name != "mountpoint" or Path(m.mount_point).parent.parent != ws.root
    ]
    assert stray == [], f"{when}: mounts that are no volume's: {stray}"
    return in_use


def check_log(daemon: Daemon) -> None:
    log = daemon.log()
    bad = [
        line
        for line in log.splitlines()
        if " ERROR " in line or " WARNING " in line or "Traceback" in line
    ]
    assert not bad, "the daemon logged problems under a correct load:\n" + "\n".join(bad[:40])


def test_load_records_exact_and_mounted_exactly_when_in_use(
    ws: Workspace, daemon: Daemon, client: PluginClient
) -> None:
    seed = int(os.environ.get("DOT_LOAD_SEED") or random.SystemRandom().randrange(1 << 32))
    total_calls = int(os.environ.get("DOT_LOAD_CALLS") or DEFAULT_CALLS)
    print(f"\nload test: DOT_LOAD_SEED={seed} DOT_LOAD_CALLS={total_calls}", flush=True)
    for name in volume_names():
        client.create(name, ws.base, volatile=str(is_volatile(name)).lower())
    master = random.Random(seed)
    clients = [
        LoadClient(i, ws, random.Random(master.getrandbits(64)), client, client.connection())
        for i in range(CLIENTS)
    ]
    stop = threading.Event()
    per_phase = max(1, total_calls // (CLIENTS * PHASES))
    started = time.monotonic()
    try:
        for phase in range(1, PHASES + 1):

            def work(c: LoadClient) -> None:
                for _ in range(per_phase):
                    if stop.is_set():
                        return
                    c.step()

            try:
                run_clients(clients, work, stop)
                in_use = check_state(ws, client, clients, f"checkpoint {phase}")
            except AssertionError as error:
                raise AssertionError(f"DOT_LOAD_SEED={seed}: {error}") from error
            held = sum(sum(c.held.values()) for c in clients)
            print(f"checkpoint {phase}: {in_use} volumes in use, {held} mounts held", flush=True)

        def release_all(c: LoadClient) -> None:
            for key in sorted(c.held.elements()):
                c.unmount(key)

        try:
            run_clients(clients, release_all, stop)
            assert check_state(ws, client, clients, "after every unmount") == 0
            assert mounts_under(ws.dir) == [], "after every unmount, something is still mounted"
            check_log(daemon)
        except AssertionError as error:
            raise AssertionError(f"DOT_LOAD_SEED={seed}: {error}") from error
    finally:
        for c in clients:
            c.connection.close()
    elapsed = time.monotonic() - started
    latencies = sorted(x for c in clients for x in c.latencies)
    calls = sum((c.calls for c in clients), Counter())
    print(
        f"{len(latencies)} calls in {elapsed:.1f} s ({len(latencies) / elapsed:.0f}/s): "
        + ", ".join(f"{k.rsplit('.', 1)[1]} {n}" for k, n in sorted(calls.items()))
    )
    print(
        f"latency: median {statistics.median(latencies) * 1000:.1f} ms, "
        f"p99 {latencies[int(len(latencies) * 0.99)] * 1000:.1f} ms, "
        f"max {latencies[-1] * 1000:.1f} ms"
    )


# --- memory ------------------------------------------------------------------------------

MEMORY_REQUESTS = 10_000
WARM_UP_REQUESTS = 2_000
MEMORY_THREADS = 4
# Allowed VmRSS growth between the end of the warm-up and the end of the run.
RSS_TOLERANCE_KIB = int(os.environ.get("DOT_LOAD_RSS_TOLERANCE_KIB") or 2048)


def requests_for_memory(ws: Workspace, count: int, rng: random.Random) -> int:
    """`count` requests from MEMORY_THREADS clients: cheap ones, failures, bad JSON and
    Mount/Unmount pairs; a new connection now and then. Returns how many were made."""
    made = Counter[int]()
    plugin = ws.client()

    def run(index: int, seed: int) -> None:
        local = random.Random(seed)
        connection = plugin.connection()
        try:
            while made[index] < count // MEMORY_THREADS:
                if local.random() < 0.1:  # a fresh connection
                    connection.close()
                    connection = plugin.connection()
                roll = local.random()
                volume = local.choice(["mem-a", "mem-b"])
                if roll < 0.2:
                    mount_id = f"{local.getrandbits(256):064x}"
                    plugin.ok("/VolumeDriver.Mount", {"Name": volume, "ID": mount_id},
                              connection=connection)  # fmt: skip
                    plugin.ok("/VolumeDriver.Unmount", {"Name": volume, "ID": mount_id},
                              connection=connection)  # fmt: skip
                    made[index] += 2
                    continue
                if roll < 0.35:
                    plugin.ok("/VolumeDriver.Get", {"Name": volume}, connection=connection)
                elif roll < 0.45:
                    plugin.ok("/VolumeDriver.List", connection=connection)
                elif roll < 0.55:
                    plugin.ok("/Plugin.Activate", connection=connection)
                elif roll < 0.65:
                    plugin.ok("/VolumeDriver.Capabilities", connection=connection)
                elif roll < 0.75:
                    plugin.ok("/VolumeDriver.Path", {"Name": volume}, connection=connection)
                elif roll < 0.85:
                    plugin.err("/VolumeDriver.Get", {"Name": f"none{local.randrange(10**6)}"},
                               connection=connection)  # fmt: skip
                elif roll < 0.95:
                    plugin.err("/VolumeDriver.Mount", {"Name": volume, "ID": "../x"},
                               connection=connection)  # fmt: skip
                else:
                    plugin.err("/VolumeDriver.Get", raw=b'{"Name": ', connection=connection)
                made[index] += 1
        finally:
            connection.close()

    errors: list[BaseException] = []

    def guarded(index: int, seed: int) -> None:
        try:
            run(index, seed)
        except BaseException as error:
            errors.append(error)

    threads = [
        threading.Thread(target=guarded, args=(i, rng.getrandbits(64)))
        for i in range(MEMORY_THREADS)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert not errors, errors
    return sum(made.values())


def settled_status(pid: int, threads: int, timeout: float = 10.0) -> dict[str, int]:
    """/proc/PID/status once the daemon is back to `threads` threads (its idle workers
    have ended)."""
    deadline = time.monotonic() + timeout
    while True:
        status = proc_status(pid)
        if status["Threads"] <= threads or time.monotonic() > deadline:
            return status
        time.sleep(0.05)


def settled_fds(pid: int, fds: int, timeout: float = 5.0) -> int:
    """How many files the daemon holds once it is back to `fds` (it closes a connection
    when it reads the client's end, which may come a moment after the client is gone)."""
    deadline = time.monotonic() + timeout
    while True:
        held = len(os.listdir(f"/proc/{pid}/fd"))
        if held <= fds or time.monotonic() > deadline:
            return held
        time.sleep(0.05)


def test_memory_stays_flat_over_ten_thousand_requests(
    ws: Workspace, daemon: Daemon, client: PluginClient
) -> None:
    client.create("mem-a", ws.base)
    client.create("mem-b", ws.base, volatile="true")
    rng = random.Random(int(os.environ.get("DOT_LOAD_SEED") or 0))
    idle_threads = settled_status(daemon.pid, 1)["Threads"]
    idle_fds = len(os.listdir(f"/proc/{daemon.pid}/fd"))
    requests_for_memory(ws, WARM_UP_REQUESTS, rng)
    # The workers that answered the requests end after workers.WORKER_IDLE_S without work.
    settled_threads = idle_threads
    warm = settled_status(daemon.pid, settled_threads)
    started = time.monotonic()
    made = 0
    figures = []
    for _ in range(2):  # two halves, to see a trend
        made += requests_for_memory(ws, MEMORY_REQUESTS // 2, rng)
        figures.append(settled_status(daemon.pid, settled_threads))
    elapsed = time.monotonic() - started
    end = figures[-1]
    growth = end["VmRSS"] - warm["VmRSS"]
    print(
        f"\n{made} requests in {elapsed:.1f} s; daemon VmRSS after warm-up "
        f"{warm['VmRSS']} KiB, after {made // 2}: {figures[0]['VmRSS']} KiB, after {made}: "
        f"{end['VmRSS']} KiB (growth {growth:+d} KiB, tolerance {RSS_TOLERANCE_KIB} KiB); "
        f"VmHWM {end['VmHWM']} KiB; threads {end['Threads']}"
    )
    assert made >= MEMORY_REQUESTS
    assert daemon.process.poll() is None, daemon.log()[-3000:]
    assert end["Threads"] <= settled_threads, f"worker threads left behind: {end['Threads']}"
    fds = settled_fds(daemon.pid, idle_fds)
    assert fds == idle_fds, f"file descriptors left open: {idle_fds} before, {fds} after"
    assert growth < RSS_TOLERANCE_KIB, (
        f"VmRSS grew by {growth} KiB over {made} requests (from {warm['VmRSS']} to "
        f"{end['VmRSS']} KiB)"
    )
    for name in ("mem-a", "mem-b"):
        assert ws.volume(name).records() == {}
        assert mounts_at(ws.volume(name).mountpoint) == []
    assert client.names() == ["mem-a", "mem-b"]
