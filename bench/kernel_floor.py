#!/usr/bin/env python3
"""The kernel floor: the filesystem work of Mount and Unmount in one process, no protocol.

    python3 bench/kernel_floor.py [--dir DIR] [--json FILE]

Each iteration works on a fresh volume folder (made untimed, like the protocol benchmark's
fresh volumes) and times two levels of work:

  bare    Mount:   mkdir mountpoint/, mkdir workdir/, mount(2) overlay
          Unmount: umount2(2), rmdir workdir/work/, rmdir workdir/, rmdir mountpoint/
  state   the same plus what the contract adds around it: open + flock activemounts/,
          read metadata.json, scan activemounts/, write the record atomically (write a
          temporary file, rename) / read it, unlink it and scan activemounts/ again.

A third measure is what durability adds to a Create (SPEC B2), timed alone on a fresh
volume folder each time: the fsync of a just written metadata.json, then, after its
rename into place, the fsync of the volume's folder (`create_fsync`); and the fsync of
the parent folder (the state root) that makes the new folder itself durable
(`create_fsync_root`).

Besides wall time it records this thread's CPU time (user + system) for each step, which
does not count waiting for a core and so compares with the daemon's CPU time per request
on a busy machine too.

The mount options are the ones the daemon uses (lowerdir, upperdir, workdir and the
pinned-off index, metacopy, redirect_dir and xino). Syscalls go through ctypes, as in the
daemon; the Python cost around them is a few microseconds per call. Needs root.
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import json
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
PINNED_OFF = "index=off,metacopy=off,redirect_dir=off,xino=off"
KEYS = (
    "mount_bare",
    "unmount_bare",
    "mount_state",
    "unmount_state",
    "create_fsync",
    "create_fsync_root",
)


def _mount(source: bytes, target: bytes, options: bytes) -> None:
    if _libc.mount(source, target, b"overlay", 0, options) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), target.decode())


def _umount(target: bytes) -> None:
    if _libc.umount2(target, 0) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), target.decode())


def _summary(samples_ns: list[int]) -> dict[str, float]:
    values = sorted(sample / 1000 for sample in samples_ns)
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return {
        "n": len(values),
        "p50": round(cuts[49], 1),
        "p90": round(cuts[89], 1),
        "p99": round(cuts[98], 1),
        "mean": round(statistics.fmean(values), 1),
        "min": round(values[0], 1),
        "max": round(values[-1], 1),
    }


def measure(workspace: Path, *, iterations: int = 300, warmup: int = 20) -> dict[str, object]:
    base = workspace / "base"
    base.mkdir()
    for index in range(8):
        (base / f"file{index}.txt").write_text(f"base file {index}\n")
    metadata = json.dumps({"BaseDirPath": str(base), "Volatile": False}).encode()
    samples: dict[str, list[int]] = {
        "mount_bare": [],
        "unmount_bare": [],
        "mount_state": [],
        "unmount_state": [],
    }
    # CPU time of this thread (user + system): unlike wall time, it does not count waiting
    # for a core, so it compares with the daemon's CPU time on a busy machine too.
    cpu_samples: dict[str, list[int]] = {key: [] for key in samples}
    clock = time.perf_counter_ns
    cpu_clock = time.thread_time_ns
    for level in ("bare", "state"):
        for iteration in range(warmup + iterations):
            folder = workspace / f"{level}-{iteration}"
            upper, records = folder / "upper", folder / "activemounts"
            workdir, mountpoint = folder / "workdir", folder / "mountpoint"
            folder.mkdir()
            upper.mkdir()
            records.mkdir()
            (folder / "metadata.json").write_bytes(metadata)
            options = (f"lowerdir={base},upperdir={upper},workdir={workdir},{PINNED_OFF}").encode()
            source = f"dot-bench-floor_{iteration}".encode()
            target = os.fsencode(mountpoint)
            mount_id = secrets.token_hex(32)
            record = records / mount_id
            staging = folder / ".activemount.tmp"
            if level == "bare":
                started, cpu_started = clock(), cpu_clock()
                os.mkdir(mountpoint)
                os.mkdir(workdir)
                _mount(source, target, options)
                mount_ns, mount_cpu = clock() - started, cpu_clock() - cpu_started
                started, cpu_started = clock(), cpu_clock()
                _umount(target)
                os.rmdir(workdir / "work")
                os.rmdir(workdir)
                os.rmdir(mountpoint)
                unmount_ns, unmount_cpu = clock() - started, cpu_clock() - cpu_started
            else:
                started, cpu_started = clock(), cpu_clock()
                lock = os.open(records, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                fcntl.flock(lock, fcntl.LOCK_EX)
                json.loads((folder / "metadata.json").read_bytes())
                with os.scandir(records) as entries:
                    first_user = next(entries, None) is None
                assert first_user
                os.mkdir(mountpoint)
                os.mkdir(workdir)
                _mount(source, target, options)
                fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
                os.write(fd, b'{"UsageCount":1}')
                os.close(fd)
                os.rename(staging, record)
                os.close(lock)
                mount_ns, mount_cpu = clock() - started, cpu_clock() - cpu_started
                started, cpu_started = clock(), cpu_clock()
                lock = os.open(records, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                fcntl.flock(lock, fcntl.LOCK_EX)
                json.loads(record.read_bytes())
                os.unlink(record)
                with os.scandir(records) as entries:
                    now_unused = next(entries, None) is None
                assert now_unused
                _umount(target)
                os.rmdir(workdir / "work")
                os.rmdir(workdir)
                os.rmdir(mountpoint)
                os.close(lock)
                unmount_ns, unmount_cpu = clock() - started, cpu_clock() - cpu_started
            if iteration >= warmup:
                samples[f"mount_{level}"].append(mount_ns)
                samples[f"unmount_{level}"].append(unmount_ns)
                cpu_samples[f"mount_{level}"].append(mount_cpu)
                cpu_samples[f"unmount_{level}"].append(unmount_cpu)
            shutil.rmtree(folder)
    fsync_samples = create_fsync(workspace, metadata, iterations=iterations, warmup=warmup)
    return {
        "iterations": iterations,
        "warmup": warmup,
        "options": f"lowerdir=...,upperdir=...,workdir=...,{PINNED_OFF}",
        **{key: _summary(values) for key, values in samples.items()},
        **{key: _summary(values) for key, values in fsync_samples.items()},
        "cpu_mean_us": {
            key: round(statistics.fmean(values) / 1000, 1) for key, values in cpu_samples.items()
        },
    }


def create_fsync(
    workspace: Path, metadata: bytes, *, iterations: int, warmup: int
) -> dict[str, list[int]]:
    """The fsyncs of a Create, in the order the daemon makes them, each folder fresh:
    metadata.json's data, its folder after the rename, and the folder's parent."""
    parent = workspace / "created"
    parent.mkdir()
    samples: dict[str, list[int]] = {"create_fsync": [], "create_fsync_root": []}
    clock = time.perf_counter_ns
    for iteration in range(warmup + iterations):
        folder = parent / f"volume-{iteration}"
        folder.mkdir(mode=0o700)
        (folder / "upper").mkdir()
        (folder / "activemounts").mkdir()
        staging = folder / ".metadata.json.tmp"
        fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        os.write(fd, metadata)
        started = clock()
        os.fsync(fd)
        file_ns = clock() - started
        os.close(fd)
        os.rename(staging, folder / "metadata.json")
        folder_ns = _timed_directory_fsync(folder)
        root_ns = _timed_directory_fsync(parent)
        if iteration >= warmup:
            samples["create_fsync"].append(file_ns + folder_ns)
            samples["create_fsync_root"].append(root_ns)
    shutil.rmtree(parent)
    return samples


def _timed_directory_fsync(directory: Path) -> int:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        started = time.perf_counter_ns()
        os.fsync(fd)
        return time.perf_counter_ns() - started
    finally:
        os.close(fd)


def unmount_under(folder: Path) -> int:
    """Detach every mount below `folder`, deepest first; how many there were."""
    prefix = str(folder) + "/"
    with open("/proc/self/mountinfo") as table:
        points = [line.split()[4].encode().decode("unicode_escape") for line in table]
    leftovers = [point for point in points if point.startswith(prefix)]
    for point in reversed(leftovers):
        _libc.umount2(os.fsencode(point), 2)  # MNT_DETACH
    return len(leftovers)


def run(parent: str | None = None, **kwargs: int) -> dict[str, object]:
    workspace = Path(tempfile.mkdtemp(prefix="dot-bench-floor-", dir=parent))
    try:
        return measure(workspace, **kwargs)
    finally:
        unmount_under(workspace)
        shutil.rmtree(workspace, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", help="where to make the scratch folder (default: /tmp)")
    parser.add_argument("--json", type=Path, help="write the results to this file")
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=20)
    arguments = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("kernel_floor.py needs root (it mounts overlays)", file=sys.stderr)
        return 1
    results = run(arguments.dir, iterations=arguments.iterations, warmup=arguments.warmup)
    if arguments.json:
        arguments.json.write_text(json.dumps(results, indent=2) + "\n")
    print("Kernel floor (µs)           p50    p90    p99")
    for key in KEYS:
        figures = results[key]
        print(f"  {key:<22}{figures['p50']:>8.0f} {figures['p90']:>6.0f} {figures['p99']:>6.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
