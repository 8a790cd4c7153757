#!/usr/bin/env python3
"""Start-up of our daemon on a state root where many volumes were left by a crash.

    python3 bench/startup.py [--count 10000] [--rounds 3] [--repo DIR] [--json FILE]

Each volume is written in the on-disk format of the contract, then made to look as a
crash or a reboot leaves it: a `mountpoint/` and a `workdir/` that are not mounted and a
stale usage record. A daemon of ours (the checkout at --repo, default this one) is then
spawned on that root under a private driver name and socket, and timed, in seconds from
the spawn:
  activate_s   until it answers Plugin.Activate (and cpu_at_activate_s, the daemon's CPU
               time then: unlike the wall time, a busy machine does not move it much);
  get_s        until it answers a Get of the last volume by name (the last one a
               background recovery in name order reaches), which must say ActiveMounts 0;
  recovered_s  until its start-up recovery has finished: the daemon holds a shared flock
               on the state root while it recovers in the background (a daemon that
               recovers before serving has finished by its first answer);
  cpu_s        the daemon's CPU time (user + system) at that point;
  get_during_p50_us, get_after_p50_us
               p50 of 50 Gets of the first volume while the background still works
               (when it still did at their end) and once it is done.
After each round every volume must be recovered (no mountpoint/, no record). The daemon
is stopped by its PID, the temporary folder (under /var/tmp) is removed. Needs root.

bench/run_all.py may call `run(count)`; it returns the figures as a dict.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(REPO))

import protocol  # noqa: E402

from docker_on_top.recovery import daemon_recovering  # noqa: E402

STALE_ID = "0" * 64
TIMEOUT_S = 120.0


def log(message: str) -> None:
    print(f"[startup] {message}", file=sys.stderr, flush=True)


def populate(root: Path, base: Path, names: list[str]) -> None:
    """The volumes as the Go plugin writes them (nothing mounted)."""
    metadata = json.dumps({"BaseDirPath": str(base), "Volatile": False}).encode()
    os.makedirs(root, mode=0o700, exist_ok=True)
    for name in names:
        folder = root / name
        os.mkdir(folder, 0o700)
        os.mkdir(folder / "upper")
        os.mkdir(folder / "activemounts")
        fd = os.open(folder / "metadata.json", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, metadata)
        os.close(fd)


def crash(root: Path, names: list[str]) -> None:
    """What a crash or a reboot leaves: unmounted mountpoint/ and workdir/, a record."""
    # Empty workdir/ folders that an earlier round's recovery left go first.
    for name in names:
        with contextlib.suppress(FileNotFoundError):
            os.rmdir(root / name / "workdir")
    for name in names:
        folder = root / name
        os.mkdir(folder / "mountpoint")
        os.mkdir(folder / "workdir")
        os.mkdir(folder / "workdir" / "work")  # the kernel makes it at the mount
        fd = os.open(folder / "activemounts" / STALE_ID, os.O_WRONLY | os.O_CREAT, 0o644)
        os.write(fd, b'{"UsageCount":1}')
        os.close(fd)


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def not_recovered(root: Path, names: list[str]) -> list[str]:
    return [
        name
        for name in names
        if (root / name / "mountpoint").exists() or os.listdir(root / name / "activemounts")
    ]


def one_round(workspace: Path, names: list[str], repo: Path) -> dict[str, float]:
    root = workspace / "root"
    socket_path = workspace / "dot.sock"
    crash(root, names)
    environment = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_ON_TOP_")}
    environment["PYTHONPATH"] = str(repo)
    command = [
        sys.executable, "-m", "docker_on_top", "serve",
        "--name", f"dot-startup-{secrets.token_hex(3)}", "--root", str(root),
        "--socket", str(socket_path), "--log-level", "warning",
    ]  # fmt: skip
    with open(workspace / "daemon.log", "ab") as log_file:
        started = time.perf_counter()
        process = subprocess.Popen(
            command,
            cwd=repo,  # `-m` looks in the current folder first
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
            env=environment,
        )
    try:
        activate = protocol.encode("Plugin.Activate", close=True)
        while True:
            try:
                status, _ = protocol.call_once(str(socket_path), activate)
                if status == 200:
                    break
            except OSError:
                pass
            if process.poll() is not None or time.perf_counter() - started > TIMEOUT_S:
                raise RuntimeError(f"the daemon did not answer; see {workspace / 'daemon.log'}")
            time.sleep(0.001)
        activate_s = time.perf_counter() - started
        cpu_at_activate_s = cpu_seconds(process.pid)
        get = protocol.encode("VolumeDriver.Get", {"Name": names[-1]}, close=True)
        status, body = protocol.call_once(str(socket_path), get)
        get_s = time.perf_counter() - started
        reply = json.loads(body)
        if status != 200 or reply["Volume"]["Status"]["ActiveMounts"] != 0:
            raise RuntimeError(f"Get {names[-1]} before its recovery answered {status} {reply}")
        get_during_us = get_latency_us(socket_path, names[0])
        still_recovering = daemon_recovering(str(root))
        while daemon_recovering(str(root)):
            if time.perf_counter() - started > TIMEOUT_S:
                raise RuntimeError("the start-up recovery did not finish")
            time.sleep(0.002)
        recovered_s = time.perf_counter() - started
        cpu_s = cpu_seconds(process.pid)
        get_after_us = get_latency_us(socket_path, names[0])
        left = not_recovered(root, names)
        if left:
            raise RuntimeError(f"{len(left)} volumes not recovered, e.g. {left[:3]}")
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    figures = {
        "activate_s": activate_s,
        "cpu_at_activate_s": cpu_at_activate_s,
        "get_s": get_s,
        "recovered_s": recovered_s,
        "cpu_s": cpu_s,
    }
    figures["get_after_p50_us"] = get_after_us
    if still_recovering:  # else the background was done before the Gets ended
        figures["get_during_p50_us"] = get_during_us
    return figures


def get_latency_us(socket_path: Path, name: str, count: int = 50) -> float:
    """p50 of `count` Gets of one volume over one keep-alive connection."""
    connection = protocol.Connection(str(socket_path))
    try:
        raw = protocol.encode("VolumeDriver.Get", {"Name": name})
        samples = []
        for _ in range(count):
            begun = time.perf_counter_ns()
            status, _ = connection.call(raw)
            samples.append(time.perf_counter_ns() - begun)
            if status != 200:
                raise RuntimeError(f"Get {name} answered {status}")
    finally:
        connection.close()
    return round(statistics.median(samples) / 1000, 1)


def run(count: int = 10_000, *, rounds: int = 3, repo: Path = REPO) -> dict:
    """The figures of `rounds` start-ups on `count` crashed volumes: the median of each,
    and every round's."""
    workspace = Path(tempfile.mkdtemp(prefix="dot-startup-", dir="/var/tmp"))
    try:
        (workspace / "base").mkdir()
        (workspace / "base" / "kept.txt").write_text("base kept\n")
        names = [f"v{index:05d}" for index in range(count)]
        populate(workspace / "root", workspace / "base", names)
        measured = []
        for index in range(rounds):
            measured.append(one_round(workspace, names, repo))
            log(f"round {index + 1}: " + ", ".join(f"{k} {v:.3f}" for k, v in measured[-1].items()))
        return {
            "what": "seconds from spawning the daemon, with volumes left by a crash",
            "volumes": count,
            "rounds": measured,
            **{
                key: round(statistics.median(r[key] for r in measured if key in r), 3)
                for key in sorted({key for r in measured for key in r})
            },
        }
    finally:
        shutil.rmtree(workspace, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=10_000, help="volumes left by a crash")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repo", type=Path, default=REPO, help="the checkout to run")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    arguments = parser.parse_args(argv)
    results = run(arguments.count, rounds=arguments.rounds, repo=arguments.repo)
    text = json.dumps(results, indent=2)
    print(text)
    if arguments.json:
        arguments.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
