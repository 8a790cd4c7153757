#!/usr/bin/env python3
"""What a round trip costs by where the client and the daemon run: the p50 of
Capabilities, Get and List over one keep-alive connection, with both pinned to one CPU,
pinned to two different CPUs, and left to the scheduler.

    python3 bench/placement.py [--go BINARY] [--requests 1000] [--rounds 3]

On a VM a thread woken on another vCPU that has gone idle waits for that vCPU to be woken
(an interrupt to the host), so a strict request-reply exchange is fast on one CPU and
slow across two; which of the two the scheduler picks decides most of a cheap call's
latency. With --go, the Go original (started with its flags `-root DIR/ -socket PATH`)
is measured in the same interleaved rounds. Each daemon gets a temporary root and socket
of its own and is stopped by its PID. Not part of `make bench`; needs root.
"""

from __future__ import annotations

import argparse
import gc
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import protocol  # noqa: E402

REPO = BENCH.parent
START_TIMEOUT_S = 10.0
# (label, the daemon's CPUs, the client's CPUs); None: the scheduler's choice.
CALLS = (
    ("VolumeDriver.Capabilities", None),
    ("VolumeDriver.Get", {"Name": "placement"}),
    ("VolumeDriver.List", {}),
)
PLACEMENTS = (
    ("one CPU", {0}, {0}),
    ("two CPUs", {0}, {1}),
    ("unpinned", None, None),
)


def start(command: list[str], socket_path: Path, cpus: set[int] | None) -> subprocess.Popen[bytes]:
    environment = dict(os.environ, PYTHONPATH=str(REPO))
    process = subprocess.Popen(
        command,
        env=environment,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        # The script has no threads of its own, so preexec_fn is safe here.
        preexec_fn=None if cpus is None else lambda: os.sched_setaffinity(0, cpus),
    )
    deadline = time.monotonic() + START_TIMEOUT_S
    raw = protocol.encode("Plugin.Activate", close=True)
    while time.monotonic() < deadline:
        try:
            if protocol.call_once(str(socket_path), raw)[0] == 200:
                return process
        except OSError:
            pass
        time.sleep(0.02)
    process.kill()
    process.wait()
    raise RuntimeError(f"{command[0]} did not answer on {socket_path}")


def round_trips(socket_path: Path, base: Path, requests: int) -> dict[str, float]:
    """The p50 of `requests` of each call on one keep-alive connection, in µs."""
    connection = protocol.Connection(str(socket_path))
    create = {"Name": "placement", "Opts": {"base": str(base)}}
    status, body = connection.call(protocol.encode("VolumeDriver.Create", create))
    if protocol.error_of(status, body) is not None:
        raise RuntimeError(f"Create failed: {protocol.error_of(status, body)}")
    p50s = {}
    try:
        for call, document in CALLS:
            raw = protocol.encode(call, document)
            samples = []
            for _ in range(100):  # warm-up
                connection.call(raw)
            for _ in range(requests):
                started = time.perf_counter_ns()
                connection.call(raw)
                samples.append(time.perf_counter_ns() - started)
            p50s[call.split(".")[-1]] = statistics.median(samples) / 1000
    finally:
        connection.call(protocol.encode("VolumeDriver.Remove", {"Name": "placement"}))
        connection.close()
    return p50s


def measure(kind: str, go_binary: str, cpus: set[int] | None, client: set[int] | None,
            requests: int) -> dict[str, float]:  # fmt: skip
    folder = Path(tempfile.mkdtemp(prefix="dot-placement-", dir="/var/tmp"))
    root, base, socket_path = folder / "root", folder / "base", folder / "plugin.sock"
    root.mkdir()
    base.mkdir()
    if kind == "ours":
        command = [
            sys.executable, "-m", "docker_on_top", "serve", "--name", f"placement{os.getpid()}",
            "--root", str(root), "--socket", str(socket_path), "--log-level", "warning",
        ]  # fmt: skip
    else:
        command = [go_binary, "-root", f"{root}/", "-socket", str(socket_path)]
    everywhere = os.sched_getaffinity(0)
    process = start(command, socket_path, cpus)
    try:
        if client is not None:
            os.sched_setaffinity(0, client)
        return round_trips(socket_path, base, requests)
    finally:
        os.sched_setaffinity(0, everywhere)
        process.send_signal(signal.SIGTERM)
        process.wait()
        subprocess.run(["rm", "-rf", str(folder)], check=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--go", default="", help="the Go original's executable, to compare")
    parser.add_argument("--requests", type=int, default=1000, help="round trips per figure")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians")
    arguments = parser.parse_args(argv)
    if len(os.sched_getaffinity(0)) < 2:
        print("placement.py: needs at least 2 CPUs", file=sys.stderr)
        return 1
    kinds = ["ours"] + (["go"] if arguments.go else [])
    found: dict[tuple[str, str, str], list[float]] = {}
    gc.disable()
    for index in range(arguments.rounds):
        for label, cpus, client in PLACEMENTS:
            for kind in kinds:
                p50s = measure(kind, arguments.go, cpus, client, arguments.requests)
                for call, p50 in p50s.items():
                    found.setdefault((kind, label, call), []).append(p50)
        print(f"round {index + 1} of {arguments.rounds} done", file=sys.stderr)
    print(
        f"Round trips, p50 µs (medians of {arguments.rounds} interleaved rounds of "
        f"{arguments.requests} each; each round's p50 in brackets)"
    )
    for label, _, _ in PLACEMENTS:
        print(f"  {label}")
        for call, _ in CALLS:
            name = call.split(".")[-1]
            cells = []
            for kind in kinds:
                each = found[(kind, label, name)]
                shown = ", ".join(f"{value:.0f}" for value in each)
                cells.append(f"{kind} {statistics.median(each):5.0f} ({shown})")
            print(f"    {name:<13} " + "   ".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
