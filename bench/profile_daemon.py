#!/usr/bin/env python3
"""Where the daemon's time goes: py-spy samples of our daemon under one kind of load.

    python3 bench/profile_daemon.py [--load mount|burst|list|newconn] [--tmpfs] [--raw FILE]

Starts a daemon of ours (private name, temporary root and socket), attaches py-spy to it
(`pip install py-spy`; it samples without stopping the process) and drives one load:

  mount    Mount + Unmount pairs of one volume over one keep-alive connection, so every
           Mount mounts the overlay and every Unmount unmounts it (--count pairs);
  get      Get of one volume over one keep-alive connection (--count requests);
  burst    50 concurrent Mounts of one volume with 50 IDs, then 50 concurrent Unmounts
           (--count bursts);
  list     List with 10,000 volumes written into the state root (--count Lists);
  newconn  Capabilities on a new connection each (--count requests).

Prints the share of the samples each function takes itself (leaf frames: a syscall shows
up as the Python call that makes it) and cumulatively, over the threads that serve
requests. Not part of `make bench`: it is for finding what to make faster. Needs root.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import protocol  # noqa: E402
from kernel_floor import unmount_under  # noqa: E402
from run_all import SCRATCH_PARENT, TMPFS_PARENT, Daemon  # noqa: E402

_LINE = re.compile(r" \(([^)]*?)(?::\d+)?\)$")


def _frame_name(frame: str) -> str:
    """'Driver.mount (docker_on_top/driver.py:217)' -> 'Driver.mount (docker_on_top/driver.py)'."""
    return _LINE.sub(lambda match: f" ({match.group(1)})", frame.strip())


def summarise(raw: Path, top: int) -> str:
    self_time: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if "PluginServer" not in stack:  # only the loop and the workers, serving requests
            continue
        count = int(count_text)
        frames = [_frame_name(frame) for frame in stack.split(";")[2:]]
        if not frames:
            continue
        total += count
        self_time[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    if not total:
        return "no samples of the connection threads"
    lines = [f"{total} samples of the request threads", "", "self time (leaf frames):"]
    for frame, count in self_time.most_common(top):
        lines.append(f"  {100 * count / total:5.1f} %  {frame}")
    lines += ["", "cumulative time:"]
    for frame, count in inclusive.most_common(top * 2):
        lines.append(f"  {100 * count / total:5.1f} %  {frame}")
    return "\n".join(lines)


def drive(
    load: str,
    count: int | None,
    connection: protocol.Connection,
    name: str,
    daemon: Daemon,
    base: Path,
) -> int:
    """Run the load; how many units of it ran."""
    socket_path = str(daemon.socket_path)

    def check(status: int, body: bytes, what: str) -> None:
        if protocol.error_of(status, body):
            raise RuntimeError(f"{what}: {protocol.error_of(status, body)}")

    if load == "mount":
        count = count or 2000
        for _ in range(count):
            mount_id = secrets.token_hex(32)
            for endpoint in ("Mount", "Unmount"):
                status, body = connection.call(
                    protocol.encode(f"VolumeDriver.{endpoint}", {"Name": name, "ID": mount_id})
                )
                check(status, body, endpoint)
    elif load == "get":
        count = count or 5000
        raw = protocol.encode("VolumeDriver.Get", {"Name": name})
        for _ in range(count):
            status, body = connection.call(raw)
            check(status, body, "Get")
    elif load == "burst":
        count = count or 40
        for _ in range(count):
            ids = [secrets.token_hex(32) for _ in range(protocol.BURST_SIZE)]
            for endpoint in ("Mount", "Unmount"):
                _, replies = protocol.concurrent(
                    socket_path,
                    [
                        protocol.encode(
                            f"VolumeDriver.{endpoint}", {"Name": name, "ID": mount_id}, close=True
                        )
                        for mount_id in ids
                    ],
                )
                for status, body in replies:
                    check(status, body, endpoint)
    elif load == "list":
        count = count or 10
        for _ in range(count):
            status, body = connection.call(protocol.encode("VolumeDriver.List", {}))
            check(status, body, "List")
    else:
        count = count or 3000
        raw = protocol.encode("VolumeDriver.Capabilities", None, close=True)
        for _ in range(count):
            status, body = protocol.call_once(socket_path, raw)
            check(status, body, "Capabilities")
    return count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--load", choices=("mount", "get", "burst", "list", "newconn"), default="mount"
    )
    parser.add_argument("--count", type=int, help="how much load (default: by --load)")
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--raw", type=Path, help="keep py-spy's collapsed stacks here")
    parser.add_argument(
        "--tmpfs",
        action="store_true",
        help="state root on /dev/shm: no disk, so the daemon's own cost stands out",
    )
    arguments = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("profile_mount.py needs root", file=sys.stderr)
        return 1
    py_spy = shutil.which("py-spy")
    if py_spy is None:
        print("profile_mount.py needs py-spy: pip install py-spy", file=sys.stderr)
        return 1
    parent = TMPFS_PARENT if arguments.tmpfs else SCRATCH_PARENT
    workspace = Path(tempfile.mkdtemp(prefix="dot-bench-profile-", dir=parent))
    daemon = Daemon(
        f"dot-bench-{secrets.token_hex(4)}",
        workspace / "root",
        workspace / "p.sock",
        workspace / "daemon.log",
    )
    sampler = None
    try:
        base = protocol.make_base(str(workspace))
        daemon.start()
        socket_path = str(daemon.socket_path)
        connection = protocol.Connection(socket_path)
        name = "dotprofile"
        connection.call(
            protocol.encode("VolumeDriver.Create", {"Name": name, "Opts": {"base": str(base)}})
        )
        if arguments.load == "list":
            protocol.Bench(socket_path, daemon.root, base).populate(10_000)
        raw = arguments.raw or workspace / "profile.txt"
        sampler = subprocess.Popen(
            [
                py_spy, "record", "--pid", str(daemon.pid), "--rate", str(arguments.rate),
                "--nonblocking", "--threads", "--format", "raw", "--output", str(raw),
            ],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        time.sleep(1.0)
        started = time.perf_counter()
        count = drive(arguments.load, arguments.count, connection, name, daemon, base)
        elapsed = time.perf_counter() - started
        sampler.send_signal(signal.SIGINT)
        _, errors = sampler.communicate(timeout=60)
        sampler = None
        connection.call(protocol.encode("VolumeDriver.Remove", {"Name": name}))
        connection.close()
        print(
            f"load {arguments.load}: {count} in {elapsed:.2f} s "
            f"({1000 * elapsed / count:.2f} ms each, with py-spy attached)\n"
        )
        if not raw.exists():
            print(f"py-spy wrote nothing: {errors.decode(errors='replace')}", file=sys.stderr)
            return 1
        print(summarise(raw, arguments.top))
    finally:
        if sampler is not None:
            sampler.kill()
            sampler.wait()
        daemon.stop()
        unmount_under(workspace)
        shutil.rmtree(workspace, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
