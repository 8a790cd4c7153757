#!/usr/bin/env python3
"""Measure a Docker volume plugin that already serves on a unix socket, through the protocol.

    python3 bench/protocol.py --socket PATH [--state-dir DIR] [--json FILE]

This script knows nothing of any implementation: it speaks HTTP/1.1 on the socket with a
tiny client of its own, so the same run can measure ours, the Go original or any other
implementation side by side. It needs root (it reads the mount table and, with
--state-dir, the state files) and it creates, mounts and removes volumes named
`dotbench-<random>-...` with a base directory of its own under /tmp.

What it measures (figures in microseconds unless named otherwise):
  latency  p50/p90/p99 of Create, Get, List, Capabilities, Activate, Mount, Unmount and
           Remove, each iteration on a fresh volume, over one keep-alive connection and
           with a new connection per request;
  bursts   50 concurrent Mounts of one volume with 50 IDs, then 50 concurrent Unmounts;
           50 concurrent Mounts of 50 volumes, then their Unmounts: wall time, and a check
           that the final state is exact (mount table; with --state-dir, the records);
  awake    Get and List each right after a Capabilities (the daemon just awake), and
           Capabilities after idle gaps of 0 to 5 ms: what waking the daemon costs;
  cpu      the daemon's CPU time (user + system, from /proc/PID/stat) per Capabilities,
           Get, List, Mount + Unmount pair and Create + Remove pair: unlike wall time it does not
           count waiting for a core, so it means something on a busy machine too;
  memory   the daemon's RSS (its PID comes from SO_PEERCRED on the socket) when idle,
           after the bursts, and, after 1,000 mixed requests to warm up, before and
           after each of two runs of 10,000 of them;
  scale    Get, List, Mount and Unmount latency with 10,000 volumes. With --state-dir
           the volumes are written straight into the state directory in the documented
           on-disk format (fast); without it they are made with Create and removed with
           Remove (slow). --scale 0 skips this part.

The exit status is 0 whatever the figures are; it is 1 only when the socket does not answer.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import random
import secrets
import selectors
import shutil
import socket
import statistics
import struct
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

ACCEPT = b"application/vnd.docker.plugins.v1.2+json"  # what dockerd sends
ENDPOINTS = (
    "Create",
    "Get",
    "List",
    "Capabilities",
    "Activate",
    "Mount",
    "Unmount",
    "Remove",
)
BURST_SIZE = 50
BURST_ROUNDS = 5
LOAD_REQUESTS = 10_000
LOAD_WARMUP = 1_000  # the same mix first, so that one-time growth (code paths, caches) is over
CALL_TIMEOUT_S = 120.0


def log(message: str) -> None:
    print(f"[protocol] {message}", file=sys.stderr, flush=True)


# --- a tiny HTTP/1.1 client over AF_UNIX ------------------------------------------------


def encode(endpoint: str, document: object = None, *, close: bool = False) -> bytes:
    """One POST as dockerd sends it; `endpoint` is e.g. 'VolumeDriver.Mount'."""
    body = b"" if document is None else json.dumps(document).encode()
    head = (
        b"POST /%s HTTP/1.1\r\nHost: plugin\r\nUser-Agent: dot-bench\r\nAccept: %s\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n"
        % (endpoint.encode(), ACCEPT, len(body))
    )
    if close:
        head += b"Connection: close\r\n"
    return head + b"\r\n" + body


def parse_response(data: bytes, eof: bool) -> tuple[int, bytes, int] | None:
    """(status, body, bytes consumed) of the first response in `data`; None if incomplete.

    Handles Content-Length, chunked bodies (Go's server chunks big replies) and bodies
    ended by the connection's end.
    """
    end = data.find(b"\r\n\r\n")
    if end < 0:
        if eof:
            raise ConnectionError("the connection ended before a reply")
        return None
    lines = data[:end].split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length = -1
    chunked = False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    start = end + 4
    if chunked:
        body = bytearray()
        at = start
        while True:
            line_end = data.find(b"\r\n", at)
            if line_end < 0:
                break
            size = int(data[at:line_end].split(b";", 1)[0], 16)
            at = line_end + 2
            if size == 0:
                while True:  # trailers, up to an empty line
                    line_end = data.find(b"\r\n", at)
                    if line_end < 0:
                        break
                    empty = line_end == at
                    at = line_end + 2
                    if empty:
                        return status, bytes(body), at
                break
            if len(data) < at + size + 2:
                break
            body += data[at : at + size]
            at += size + 2
        if eof:
            raise ConnectionError("the connection ended inside a chunked reply")
        return None
    if length >= 0:
        if len(data) - start < length:
            if eof:
                raise ConnectionError("the connection ended inside a reply")
            return None
        return status, data[start : start + length], start + length
    if not eof:
        return None
    return status, data[start:], len(data)


class Connection:
    """One client connection; `call` sends a request and reads its reply."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(CALL_TIMEOUT_S)
        try:
            self.sock.connect(path)
        except OSError:
            self.sock.close()
            raise
        self.pending = b""

    def call(self, raw: bytes) -> tuple[int, bytes]:
        self.sock.sendall(raw)
        data = self.pending
        eof = False
        while True:
            if data:
                parsed = parse_response(data, eof)
                if parsed is not None:
                    status, body, used = parsed
                    self.pending = data[used:]
                    return status, body
            elif eof:
                raise ConnectionError("the connection ended before a reply")
            chunk = self.sock.recv(65536)
            if not chunk:
                eof = True
            data += chunk

    def close(self) -> None:
        self.sock.close()


def call_once(path: str, raw: bytes) -> tuple[int, bytes]:
    """A request on a connection of its own (send it encoded with close=True)."""
    connection = Connection(path)
    try:
        return connection.call(raw)
    finally:
        connection.close()


def concurrent(path: str, raws: list[bytes]) -> tuple[float, list[tuple[int, bytes]]]:
    """Send every request on its own connection at once; (wall seconds, replies in order).

    One client thread: it connects and sends all requests, then reads the replies as
    they come, so the client adds no thread switching of its own. The wall time runs
    from the first connect to the last complete reply.
    """
    selector = selectors.DefaultSelector()
    sockets: list[socket.socket] = []
    buffers: list[bytes] = [b""] * len(raws)
    replies: list[tuple[int, bytes] | None] = [None] * len(raws)
    started = time.perf_counter()
    try:
        for index, raw in enumerate(raws):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.settimeout(CALL_TIMEOUT_S)
            sock.connect(path)
            sock.sendall(raw)
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ, index)
        left = len(raws)
        deadline = time.monotonic() + CALL_TIMEOUT_S
        while left:
            events = selector.select(timeout=max(0.0, deadline - time.monotonic()))
            if not events:
                raise TimeoutError(f"{left} of {len(raws)} concurrent requests got no reply")
            for key, _ in events:
                index = key.data
                sock = sockets[index]
                try:
                    chunk = sock.recv(65536)
                except BlockingIOError:
                    continue
                buffers[index] += chunk
                parsed = parse_response(buffers[index], not chunk)
                if parsed is not None:
                    replies[index] = (parsed[0], parsed[1])
                    selector.unregister(sock)
                    left -= 1
        wall = time.perf_counter() - started
    finally:
        selector.close()
        for sock in sockets:
            sock.close()
    return wall, [reply for reply in replies if reply is not None]


def error_of(status: int, body: bytes) -> str | None:
    """The failure a reply reports, or None for a success."""
    try:
        document = json.loads(body) if body.strip() else {}
    except ValueError:
        return f"HTTP {status}, body not JSON: {body[:200]!r}"
    err = document.get("Err") if isinstance(document, dict) else None
    if status != 200 or err:
        return f"HTTP {status}: {err or body[:200]!r}"
    return None


def peer_pid(path: str) -> int | None:
    """The PID of the process serving on `path`, from SO_PEERCRED (None if unknown)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    finally:
        sock.close()
    pid = struct.unpack("3i", raw)[0]
    return pid if pid > 0 else None


def process_memory(pid: int | None) -> dict[str, float] | None:
    """VmRSS, VmHWM (MiB) and thread count of `pid`, from /proc."""
    if pid is None:
        return None
    figures: dict[str, float] = {}
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    figures[key.lower() + "_mib"] = int(value.split()[0]) / 1024
                elif key == "Threads":
                    figures["threads"] = int(value)
    except OSError:
        return None
    return figures


def process_cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU time of `pid` so far, all its threads (ended ones included)."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat") as stat_file:
            fields = stat_file.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def mount_count(mount_point: str) -> int:
    """How many mounts sit exactly on `mount_point` in the mount table."""
    wanted = mount_point.rstrip("/") or "/"
    count = 0
    with open("/proc/self/mountinfo") as table:
        for line in table:
            point = line.split(" ", 5)[4]
            if "\\" in point:
                point = point.encode().decode("unicode_escape")
            if point == wanted:
                count += 1
    return count


# --- statistics ---------------------------------------------------------------------------


def summary(samples_ns: list[int]) -> dict[str, float]:
    """p50/p90/p99, mean, min and max in microseconds."""
    if not samples_ns:
        return {"n": 0}
    values = sorted(sample / 1000 for sample in samples_ns)
    if len(values) > 1:
        cuts = statistics.quantiles(values, n=100, method="inclusive")
        p50, p90, p99 = cuts[49], cuts[89], cuts[98]
    else:
        p50 = p90 = p99 = values[0]
    return {
        "n": len(values),
        "p50": round(p50, 1),
        "p90": round(p90, 1),
        "p99": round(p99, 1),
        "mean": round(statistics.fmean(values), 1),
        "min": round(values[0], 1),
        "max": round(values[-1], 1),
    }


@contextlib.contextmanager
def no_gc() -> Iterator[None]:
    """The client's garbage collector stays out of the timed loops."""
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


# --- the benchmark ---------------------------------------------------------------------


class Bench:
    def __init__(self, socket_path: str, state_dir: Path | None, base: Path) -> None:
        self.path = socket_path
        self.state_dir = state_dir
        self.base = str(base)
        self.prefix = f"dotbench-{secrets.token_hex(3)}"
        self.errors: list[str] = []
        self.pid = peer_pid(socket_path)

    # - helpers -

    def _note(self, what: str, status: int, body: bytes) -> bool:
        problem = error_of(status, body)
        if problem is not None:
            if len(self.errors) < 20:
                self.errors.append(f"{what}: {problem}")
            return False
        return True

    def call(self, endpoint: str, document: object = None) -> tuple[int, bytes]:
        status, body = call_once(self.path, encode(endpoint, document, close=True))
        return status, body

    def must(self, endpoint: str, document: object = None) -> dict[str, object]:
        status, body = self.call(endpoint, document)
        problem = error_of(status, body)
        if problem is not None:
            raise RuntimeError(f"{endpoint} {document}: {problem}")
        result = json.loads(body) if body.strip() else {}
        return result if isinstance(result, dict) else {}

    def create_options(self) -> dict[str, str]:
        return {"base": self.base}

    def volume_folder(self, name: str) -> Path | None:
        return None if self.state_dir is None else self.state_dir / name

    # - 1. latency -

    def latency(self, *, keep_alive: bool, iterations: int, warmup: int) -> dict[str, object]:
        mode = "keepalive" if keep_alive else "newconn"
        samples: dict[str, list[int]] = {endpoint: [] for endpoint in ENDPOINTS}
        connection = Connection(self.path) if keep_alive else None
        clock = time.perf_counter_ns

        def send(endpoint: str, raw: bytes) -> tuple[int, bytes, int]:
            if connection is not None:
                started = clock()
                status, body = connection.call(raw)
                return status, body, clock() - started
            started = clock()
            one = Connection(self.path)
            status, body = one.call(raw)
            elapsed = clock() - started
            one.close()
            return status, body, elapsed

        close = not keep_alive
        capabilities = encode("VolumeDriver.Capabilities", None, close=close)
        activate = encode("Plugin.Activate", None, close=close)
        list_all = encode("VolumeDriver.List", {}, close=close)
        failures = 0
        with no_gc():
            for iteration in range(warmup + iterations):
                name = f"{self.prefix}-{mode}-{iteration}"
                mount_id = secrets.token_hex(32)
                steps = (
                    (
                        "Create",
                        encode(
                            "VolumeDriver.Create",
                            {"Name": name, "Opts": self.create_options()},
                            close=close,
                        ),
                    ),
                    ("Get", encode("VolumeDriver.Get", {"Name": name}, close=close)),
                    ("List", list_all),
                    ("Capabilities", capabilities),
                    ("Activate", activate),
                    (
                        "Mount",
                        encode("VolumeDriver.Mount", {"Name": name, "ID": mount_id}, close=close),
                    ),
                    (
                        "Unmount",
                        encode("VolumeDriver.Unmount", {"Name": name, "ID": mount_id}, close=close),
                    ),
                    ("Remove", encode("VolumeDriver.Remove", {"Name": name}, close=close)),
                )
                for endpoint, raw in steps:
                    status, body, elapsed = send(endpoint, raw)
                    if not self._note(f"{mode} {endpoint} {name}", status, body):
                        failures += 1
                    if iteration >= warmup:
                        samples[endpoint].append(elapsed)
        if connection is not None:
            connection.close()
        return {
            "mode": mode,
            "iterations": iterations,
            "warmup": warmup,
            "failures": failures,
            "endpoints": {endpoint: summary(values) for endpoint, values in samples.items()},
        }

    # - 2. bursts -

    def _check_mounted(self, name: str, mountpoint: str, ids: Iterable[str]) -> list[str]:
        problems = []
        mounts = mount_count(mountpoint)
        if mounts != 1:
            problems.append(f"{name}: {mounts} mounts on {mountpoint}, expected 1")
        folder = self.volume_folder(name)
        if folder is not None:
            records = folder / "activemounts"
            found = sorted(entry.name for entry in os.scandir(records))
            if found != sorted(ids):
                problems.append(f"{name}: records {len(found)} IDs, expected {len(list(ids))}")
            for entry in found:
                try:
                    count = json.loads((records / entry).read_bytes()).get("UsageCount")
                except (OSError, ValueError) as error:
                    count = f"unreadable ({error})"
                if count != 1:
                    problems.append(f"{name}: record {entry[:12]} holds {count}, expected 1")
                    break
        return problems

    def _check_unmounted(self, name: str, mountpoint: str) -> list[str]:
        """What the last Unmount left. Our Unmount replies before its teardown (SPEC B11),
        which then runs under the volume's lock: the check waits for it, a bounded time."""
        deadline = time.monotonic() + TEARDOWN_WAIT_S
        while True:
            problems = self._left_after_unmount(name, mountpoint)
            if not problems or time.monotonic() > deadline:
                return problems
            time.sleep(0.005)

    def _left_after_unmount(self, name: str, mountpoint: str) -> list[str]:
        problems = []
        mounts = mount_count(mountpoint)
        if mounts:
            problems.append(f"{name}: {mounts} mounts left on {mountpoint}")
        folder = self.volume_folder(name)
        if folder is not None:
            left = os.listdir(folder / "activemounts")
            if left:
                problems.append(f"{name}: {len(left)} records left after the last unmount")
            for leftover in ("mountpoint", "workdir"):
                if (folder / leftover).exists():
                    problems.append(f"{name}: {leftover}/ left after the last unmount")
        return problems

    def _burst(self, targets: list[tuple[str, str]], rounds: int) -> dict[str, object]:
        """`targets` (volume, ID) pairs mounted all at once, then unmounted all at once."""
        mount_walls: list[float] = []
        unmount_walls: list[float] = []
        problems: list[str] = []
        failures = 0
        mountpoints: dict[str, str] = {}
        for _ in range(rounds):
            with no_gc():
                wall, replies = concurrent(
                    self.path,
                    [
                        encode("VolumeDriver.Mount", {"Name": name, "ID": mount_id}, close=True)
                        for name, mount_id in targets
                    ],
                )
            mount_walls.append(wall)
            for (name, _), (status, body) in zip(targets, replies):
                if not self._note(f"burst Mount {name}", status, body):
                    failures += 1
                    continue
                mountpoint = json.loads(body).get("Mountpoint", "")
                if mountpoints.setdefault(name, mountpoint) != mountpoint:
                    problems.append(f"{name}: two different mountpoints in one burst")
            ids_by_volume: dict[str, list[str]] = {}
            for name, mount_id in targets:
                ids_by_volume.setdefault(name, []).append(mount_id)
            for name, ids in ids_by_volume.items():
                if name in mountpoints:
                    problems += self._check_mounted(name, mountpoints[name], ids)
            with no_gc():
                wall, replies = concurrent(
                    self.path,
                    [
                        encode("VolumeDriver.Unmount", {"Name": name, "ID": mount_id}, close=True)
                        for name, mount_id in targets
                    ],
                )
            unmount_walls.append(wall)
            for (name, _), (status, body) in zip(targets, replies):
                if not self._note(f"burst Unmount {name}", status, body):
                    failures += 1
            for name in ids_by_volume:
                if name in mountpoints:
                    problems += self._check_unmounted(name, mountpoints[name])
        return {
            "rounds": rounds,
            "size": len(targets),
            "mount_ms": _walls(mount_walls),
            "unmount_ms": _walls(unmount_walls),
            "failures": failures,
            "exact": failures == 0 and not problems,
            "state_checked": "mount table and records" if self.state_dir else "mount table",
            "problems": problems[:10],
        }

    def bursts(self, size: int, rounds: int) -> dict[str, object]:
        one = f"{self.prefix}-burst-one"
        self.must("VolumeDriver.Create", {"Name": one, "Opts": self.create_options()})
        many = [f"{self.prefix}-burst-{index}" for index in range(size)]
        for name in many:
            self.must("VolumeDriver.Create", {"Name": name, "Opts": self.create_options()})
        try:
            one_volume = self._burst([(one, secrets.token_hex(32)) for _ in range(size)], rounds)
            many_volumes = self._burst([(name, secrets.token_hex(32)) for name in many], rounds)
        finally:
            for name in [one, *many]:
                self.call("VolumeDriver.Remove", {"Name": name})
        return {"one_volume": one_volume, "many_volumes": many_volumes}

    # - awake: the same calls with the daemon just awake, and idle gaps -

    def awake(self, iterations: int) -> dict[str, object]:
        """Get and List each sent right after a Capabilities (the daemon has just answered,
        so nothing of it is asleep), and Capabilities after an idle gap of each of
        AWAKE_GAPS_MS. A thread asleep for milliseconds is slow to wake (on a VM its
        vCPU may have halted), so in the latency part a call that follows a slow one,
        Get after Create, pays for the wait the daemon had; this part shows how much."""
        name = f"{self.prefix}-awake"
        self.must("VolumeDriver.Create", {"Name": name, "Opts": self.create_options()})
        connection = Connection(self.path)
        clock = time.perf_counter_ns
        capabilities = encode("VolumeDriver.Capabilities", None)
        timed = {
            "Get": encode("VolumeDriver.Get", {"Name": name}),
            "List": encode("VolumeDriver.List", {}),
        }
        samples: dict[str, list[int]] = {key: [] for key in timed}
        gaps: dict[str, list[int]] = {f"{gap_ms} ms": [] for gap_ms in AWAKE_GAPS_MS}
        try:
            with no_gc():
                for _ in range(iterations):
                    for key, raw in timed.items():
                        connection.call(capabilities)
                        started = clock()
                        status, body = connection.call(raw)
                        samples[key].append(clock() - started)
                        self._note(f"awake {key}", status, body)
                    for gap_ms in AWAKE_GAPS_MS:
                        time.sleep(gap_ms / 1000)
                        started = clock()
                        status, body = connection.call(capabilities)
                        gaps[f"{gap_ms} ms"].append(clock() - started)
                        self._note("awake Capabilities", status, body)
        finally:
            connection.close()
            self.call("VolumeDriver.Remove", {"Name": name})
        return {
            "after_capabilities": {key: summary(values) for key, values in samples.items()},
            "capabilities_after_gap": {key: summary(values) for key, values in gaps.items()},
        }

    # - the daemon's own CPU time per request -

    def cpu(self) -> dict[str, object]:
        """CPU time the daemon spends per request (all its threads, user + system), over
        one keep-alive connection. Unlike wall time it does not count waiting for a core,
        so it stays meaningful on a busy machine. Needs the daemon's PID (SO_PEERCRED)."""
        if process_cpu_seconds(self.pid) is None:
            return {"skipped": "the daemon's PID or /proc/PID/stat is not available"}
        connection = Connection(self.path)
        name = f"{self.prefix}-cpu"
        options = self.create_options()
        results: dict[str, object] = {"unit": "µs of daemon CPU per request or pair"}

        def measure(label: str, count: int, requests: Callable[[int], list[bytes]]) -> None:
            batches = [requests(index) for index in range(count)]
            for raws in batches[:10]:  # warm-up
                for raw in raws:
                    connection.call(raw)
            started = process_cpu_seconds(self.pid) or 0.0
            wall = time.perf_counter()
            with no_gc():
                for raws in batches[10:]:
                    for raw in raws:
                        status, body = connection.call(raw)
                        self._note(f"cpu {label}", status, body)
            used = (process_cpu_seconds(self.pid) or 0.0) - started
            results[label] = {
                "cpu_us": round(1e6 * used / (count - 10), 1),
                "wall_us": round(1e6 * (time.perf_counter() - wall) / (count - 10), 1),
                "n": count - 10,
            }

        try:
            measure("Capabilities", 2010, lambda _: [encode("VolumeDriver.Capabilities")])
            self.must("VolumeDriver.Create", {"Name": name, "Opts": options})
            measure("Get", 1010, lambda _: [encode("VolumeDriver.Get", {"Name": name})])
            measure("List", 1010, lambda _: [encode("VolumeDriver.List", {})])

            def mount_pair(_: int) -> list[bytes]:
                document = {"Name": name, "ID": secrets.token_hex(32)}
                return [
                    encode("VolumeDriver.Mount", document),
                    encode("VolumeDriver.Unmount", document),
                ]

            measure("Mount+Unmount", 410, mount_pair)

            def create_pair(index: int) -> list[bytes]:
                volume = f"{name}-{index}"
                return [
                    encode("VolumeDriver.Create", {"Name": volume, "Opts": options}),
                    encode("VolumeDriver.Remove", {"Name": volume}),
                ]

            measure("Create+Remove", 310, create_pair)
        finally:
            self.call("VolumeDriver.Remove", {"Name": name})
            connection.close()
        return results

    # - 4. memory under load -

    def load(self, requests: int) -> dict[str, object]:
        """`requests` mixed requests (all endpoints, successes and refusals), half of
        them on one keep-alive connection, half on a new connection each."""
        name = f"{self.prefix}-load"
        self.must("VolumeDriver.Create", {"Name": name, "Opts": self.create_options()})
        mount_id = secrets.token_hex(32)
        missing = f"{self.prefix}-missing"

        def cycle(close: bool) -> list[tuple[bytes, bool]]:
            return [
                (encode("VolumeDriver.Get", {"Name": name}, close=close), True),
                (encode("VolumeDriver.Capabilities", None, close=close), True),
                (encode("VolumeDriver.List", {}, close=close), True),
                (encode("Plugin.Activate", None, close=close), True),
                (encode("VolumeDriver.Mount", {"Name": name, "ID": mount_id}, close=close), True),
                (encode("VolumeDriver.Path", {"Name": name}, close=close), True),
                (encode("VolumeDriver.Unmount", {"Name": name, "ID": mount_id}, close=close), True),
                (encode("VolumeDriver.Get", {"Name": missing}, close=close), False),
                (
                    encode(
                        "VolumeDriver.Create",
                        {"Name": name, "Opts": {"base": self.base, "bogus": "1"}},
                        close=close,
                    ),
                    False,
                ),
                (
                    encode("VolumeDriver.Mount", {"Name": missing, "ID": mount_id}, close=close),
                    False,
                ),
            ]

        keep_alive_cycle, new_connection_cycle = cycle(False), cycle(True)
        unexpected = 0
        sent = 0
        started = time.perf_counter()
        connection = Connection(self.path)
        try:
            while sent < requests:
                use_keep_alive = (sent // len(keep_alive_cycle)) % 2 == 0
                for raw, should_succeed in (
                    keep_alive_cycle if use_keep_alive else new_connection_cycle
                ):
                    if use_keep_alive:
                        status, body = connection.call(raw)
                    else:
                        status, body = call_once(self.path, raw)
                    if (error_of(status, body) is None) != should_succeed:
                        unexpected += 1
                    sent += 1
        finally:
            connection.close()
            self.call("VolumeDriver.Remove", {"Name": name})
        return {
            "requests": sent,
            "seconds": round(time.perf_counter() - started, 2),
            "unexpected_replies": unexpected,
        }

    # - 3. scale -

    def populate(self, count: int) -> tuple[list[str], float, str]:
        names = [f"{self.prefix}-scale-{index:05d}" for index in range(count)]
        started = time.perf_counter()
        if self.state_dir is not None:
            # The on-disk format of the contract (as the Go plugin writes it).
            metadata = json.dumps({"BaseDirPath": self.base, "Volatile": False}).encode()
            for name in names:
                folder = self.state_dir / name
                os.mkdir(folder)
                os.mkdir(folder / "upper")
                os.mkdir(folder / "activemounts")
                fd = os.open(folder / "metadata.json", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                os.write(fd, metadata)
                os.close(fd)
            how = "written into the state directory"
        else:
            connection = Connection(self.path)
            try:
                for name in names:
                    status, body = connection.call(
                        encode("VolumeDriver.Create", {"Name": name, "Opts": self.create_options()})
                    )
                    if error_of(status, body):
                        raise RuntimeError(f"Create {name}: {error_of(status, body)}")
            finally:
                connection.close()
            how = "created with Create"
        return names, time.perf_counter() - started, how

    def depopulate(self, names: list[str]) -> None:
        if self.state_dir is not None:
            for name in names:
                shutil.rmtree(self.state_dir / name, ignore_errors=True)
            return
        connection = Connection(self.path)
        try:
            for name in names:
                connection.call(encode("VolumeDriver.Remove", {"Name": name}))
        finally:
            connection.close()

    def scale(self, count: int, *, keep: bool) -> dict:
        names, seconds, how = self.populate(count)
        log(f"{count} volumes {how} in {seconds:.1f} s")
        result: dict = {"volumes": count, "populated": how}
        try:
            connection = Connection(self.path)
            clock = time.perf_counter_ns
            picks = random.Random(7).sample(names, min(len(names), 420))

            def timed(raws: list[bytes], warmup: int, what: str) -> dict[str, float]:
                samples = []
                with no_gc():
                    for index, raw in enumerate(raws):
                        started = clock()
                        status, body = connection.call(raw)
                        elapsed = clock() - started
                        self._note(f"scale {what}", status, body)
                        if index >= warmup:
                            samples.append(elapsed)
                return summary(samples)

            result["Get"] = timed(
                [encode("VolumeDriver.Get", {"Name": name}) for name in picks[:320]], 20, "Get"
            )
            mount_samples: dict[str, list[int]] = {"Mount": [], "Unmount": []}
            with no_gc():
                for index, name in enumerate(picks[320:420]):
                    mount_id = secrets.token_hex(32)
                    for endpoint in ("Mount", "Unmount"):
                        started = clock()
                        status, body = connection.call(
                            encode(f"VolumeDriver.{endpoint}", {"Name": name, "ID": mount_id})
                        )
                        elapsed = clock() - started
                        self._note(f"scale {endpoint}", status, body)
                        if index >= 10:
                            mount_samples[endpoint].append(elapsed)
            result["Mount"] = summary(mount_samples["Mount"])
            result["Unmount"] = summary(mount_samples["Unmount"])
            list_raw = encode("VolumeDriver.List", {})
            result["List"] = timed([list_raw] * 7, 2, "List")
            status, body = connection.call(list_raw)
            listed = {volume.get("Name") for volume in json.loads(body).get("Volumes") or []}
            result["list_complete"] = all(name in listed for name in names)
            connection.close()
        finally:
            if not keep:
                self.depopulate(names)
        return result


def _walls(walls: list[float]) -> dict[str, float]:
    values = sorted(wall * 1000 for wall in walls)
    return {
        "median": round(statistics.median(values), 2),
        "min": round(values[0], 2),
        "max": round(values[-1], 2),
        "all": [round(wall * 1000, 2) for wall in walls],
    }


def make_base(parent: str | None = None) -> Path:
    """A small base directory: a few files and a subfolder."""
    base = Path(tempfile.mkdtemp(prefix="dot-bench-base-", dir=parent))
    (base / "sub").mkdir()
    for index in range(8):
        (base / f"file{index}.txt").write_text(f"base file {index}\n")
    (base / "sub" / "nested.txt").write_text("nested\n")
    return base


PARTS = ("latency", "cpu", "bursts", "awake", "memory", "scale")
# The idle gaps of the awake part, in milliseconds.
AWAKE_GAPS_MS = (0, 0.5, 2, 5)
# How long the check of a burst waits for teardowns after the replies (SPEC B11).
TEARDOWN_WAIT_S = 10.0


def run(
    socket_path: str,
    state_dir: Path | None,
    *,
    iterations: int = 300,
    warmup: int = 20,
    scale: int = 10_000,
    keep_scale_volumes: bool = False,
    base_parent: str | None = None,
    parts: Iterable[str] = PARTS,
) -> dict:
    parts = set(parts)
    base = make_base(base_parent)
    try:
        bench = Bench(socket_path, state_dir, base)
        memory: dict = {"pid": bench.pid}
        time.sleep(0.2)  # the probe connection's thread, if any, has ended
        memory["idle"] = process_memory(bench.pid)
        results: dict = {"socket": socket_path, "state_dir": str(state_dir or "")}
        if "latency" in parts:
            log(f"latency, keep-alive: {iterations} iterations after {warmup} warm-up ones")
            keep_alive = bench.latency(keep_alive=True, iterations=iterations, warmup=warmup)
            log(f"latency, a new connection per request: {iterations} after {warmup} warm-up ones")
            new_connection = bench.latency(keep_alive=False, iterations=iterations, warmup=warmup)
            results["latency"] = {"keepalive": keep_alive, "newconn": new_connection}
        if "cpu" in parts:
            log("the daemon's CPU time per request")
            results["cpu"] = bench.cpu()
        if "bursts" in parts:
            log(f"bursts of {BURST_SIZE}, {BURST_ROUNDS} rounds each")
            results["bursts"] = bench.bursts(BURST_SIZE, BURST_ROUNDS)
            time.sleep(0.2)
            memory["after_bursts"] = process_memory(bench.pid)
        if "awake" in parts:
            log(f"awake: Get and List right after a Capabilities, idle gaps; {iterations} each")
            results["awake"] = bench.awake(iterations)
        if "memory" in parts:
            log(f"memory: {LOAD_WARMUP} mixed requests to warm up, then 2 x {LOAD_REQUESTS}")
            memory["warmup"] = bench.load(LOAD_WARMUP)
            time.sleep(0.2)
            before = process_memory(bench.pid)
            first = bench.load(LOAD_REQUESTS)
            time.sleep(0.2)
            memory["after_10k_requests"] = process_memory(bench.pid)
            second = bench.load(LOAD_REQUESTS)
            time.sleep(0.2)
            memory["after_20k_requests"] = process_memory(bench.pid)
            memory["load"] = [first, second]
            memory["before_load"] = before
            rss = [
                (figures or {}).get("vmrss_mib")
                for figures in (before, memory["after_10k_requests"], memory["after_20k_requests"])
            ]
            if None not in rss:
                memory["growth_first_10k_mib"] = round(rss[1] - rss[0], 2)
                memory["growth_second_10k_mib"] = round(rss[2] - rss[1], 2)
                memory["growth_20k_mib"] = round(rss[2] - rss[0], 2)
        results["memory"] = memory
        if "scale" in parts and scale > 0:
            log(f"scale: {scale} volumes")
            results["scale"] = bench.scale(scale, keep=keep_scale_volumes)
            results["scale"]["prefix"] = bench.prefix
        results["errors"] = bench.errors
        return results
    finally:
        shutil.rmtree(base, ignore_errors=True)


# --- the report -------------------------------------------------------------------------


def table(results: dict) -> str:
    lines = []
    latency = results.get("latency") or {}
    lines.append(
        "Protocol latency (µs)       keep-alive: p50    p90    p99 | "
        "new connection: p50    p90    p99"
    )
    for endpoint in ENDPOINTS if latency else ():
        row = f"  {endpoint:<26}"
        for mode in ("keepalive", "newconn"):
            figures = latency[mode]["endpoints"][endpoint]
            row += f"{figures['p50']:>12.0f} {figures['p90']:>6.0f} {figures['p99']:>6.0f} |"
        lines.append(row.rstrip("|"))
    bursts = results.get("bursts") or {}
    for key, label in (("one_volume", "1 volume, 50 IDs"), ("many_volumes", "50 volumes")):
        if key not in bursts:
            continue
        burst = bursts[key]
        lines.append(
            f"Burst {label:<18} mount {burst['mount_ms']['median']:7.1f} ms"
            f"  unmount {burst['unmount_ms']['median']:7.1f} ms  (median of {burst['rounds']})"
            f"  final state exact: {'yes' if burst['exact'] else 'NO'}"
        )
    awake = results.get("awake")
    if awake:
        lines.append(
            "Right after a Capabilities: "
            + ", ".join(
                f"{key} p50 {figures['p50']:.0f} µs"
                for key, figures in awake["after_capabilities"].items()
            )
        )
        lines.append(
            "Capabilities p50 after an idle gap of "
            + ", ".join(
                f"{gap}: {figures['p50']:.0f} µs"
                for gap, figures in awake["capabilities_after_gap"].items()
            )
        )
    cpu = results.get("cpu") or {}
    for label in ("Capabilities", "Get", "List", "Mount+Unmount", "Create+Remove"):
        if label in cpu:
            lines.append(f"Daemon CPU per {label:<16}{cpu[label]['cpu_us']:8.0f} µs")
    memory = results["memory"]
    for key in ("idle", "after_bursts", "after_10k_requests", "after_20k_requests"):
        figures = memory.get(key)
        if figures:
            lines.append(
                f"RSS {key:<24}{figures['vmrss_mib']:7.1f} MiB ({figures['threads']:.0f} threads)"
            )
    scale = results.get("scale")
    if scale:
        count = scale["volumes"]
        for endpoint in ("Get", "Mount", "Unmount", "List"):
            figures = scale[endpoint]
            lines.append(
                f"With {count} volumes: {endpoint:<8} p50 {figures['p50']:9.0f} µs"
                f"  p90 {figures['p90']:9.0f}  p99 {figures['p99']:9.0f}"
            )
    if results.get("errors"):
        lines.append("Unexpected failures (first ones):")
        lines += [f"  {error}" for error in results["errors"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--socket", required=True, help="the plugin's unix socket")
    parser.add_argument(
        "--state-dir",
        type=Path,
        help="the daemon's state root: enables the on-disk state checks and fast scale set-up",
    )
    parser.add_argument("--json", type=Path, help="write the results to this file")
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--scale", type=int, default=10_000, help="volumes for the scale part")
    parser.add_argument(
        "--keep-scale-volumes",
        action="store_true",
        help="leave the scale volumes in --state-dir (to time a restart on them)",
    )
    parser.add_argument(
        "--parts",
        default=",".join(PARTS),
        help=f"comma-separated parts to run (default: all of {','.join(PARTS)})",
    )
    parser.add_argument("--quiet", action="store_true", help="no table on stdout")
    arguments = parser.parse_args(argv)
    if peer_pid(arguments.socket) is None and not os.path.exists(arguments.socket):
        print(f"protocol.py: nothing serves on {arguments.socket}", file=sys.stderr)
        return 1
    try:
        call_once(arguments.socket, encode("Plugin.Activate", close=True))
    except OSError as error:
        print(f"protocol.py: {arguments.socket} does not answer: {error}", file=sys.stderr)
        return 1
    results = run(
        arguments.socket,
        arguments.state_dir,
        iterations=arguments.iterations,
        warmup=arguments.warmup,
        scale=arguments.scale,
        keep_scale_volumes=arguments.keep_scale_volumes,
        parts=[part.strip() for part in arguments.parts.split(",") if part.strip()],
    )
    if arguments.json:
        arguments.json.parent.mkdir(parents=True, exist_ok=True)
        arguments.json.write_text(json.dumps(results, indent=2) + "\n")
    if not arguments.quiet:
        print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
