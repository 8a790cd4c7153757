#!/usr/bin/env python3
"""The extra cost of a size limit (SPEC B13): making a volume's ext4 image, per size,
against making a plain folder; its first mount (attach a loop device + mount ext4) and
its unmount; an overlay on it against one on a plain folder; a sized tmpfs; usage().

    python3 bench/sized.py [--dir DIR] [--quick] [--json FILE]

Everything is made in a temporary folder under DIR (default /var/tmp, the filesystem
of the default state root) and unmounted, detached and removed at the end, also on
failure. Needs root and e2fsprogs. Figures are medians (the machine may be shared).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from docker_on_top import kernel, loopdev, sizelimit

MIB = 1 << 20
GIB = 1 << 30
IMAGE_SIZES = {"64M": 64 * MIB, "1G": GIB, "10G": 10 * GIB, "100G": 100 * GIB, "1T": 1 << 40}
WRITTEN = 64 * MIB


def _median_ms(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1000, 2)


def _timed(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def _write_and_fsync(path: Path) -> None:
    chunk = b"\xa5" * MIB
    with open(path, "wb", buffering=0) as file:
        for _ in range(WRITTEN // MIB):
            file.write(chunk)
        os.fsync(file.fileno())


def measure(scratch: Path, runs: int) -> dict[str, object]:
    lower = scratch / "lower"
    lower.mkdir()
    (lower / "file").write_text("from the base")

    plain = []
    for run in range(runs):
        plain.append(_timed(lambda run=run: (scratch / f"plain-{run}").mkdir()))
    make: dict[str, dict[str, float]] = {}
    for label, size in IMAGE_SIZES.items():
        samples, allocated = [], 0
        for run in range(runs):
            image = scratch / f"{label}-{run}.img"
            samples.append(_timed(lambda image=image, size=size: sizelimit.make_image(image, size)))
            allocated = image.stat().st_blocks * 512
            image.unlink()
        make[label] = {"ms": _median_ms(samples), "host_disk_mib": round(allocated / MIB, 1)}

    image = scratch / "volume.img"
    sizelimit.make_image(image, 10 * GIB)
    target = scratch / "changes"
    target.mkdir()
    mount, unmount = [], []
    for _ in range(runs):
        mount.append(_timed(lambda: sizelimit.mount_image(image, target)))
        unmount.append(_timed(lambda: kernel.unmount(target)))
        if loopdev.backed_by(image):
            raise RuntimeError(f"{image} is still attached after its unmount")
    tmpfs = scratch / "volatile"
    tmpfs.mkdir()
    tmpfs_mount, tmpfs_unmount = [], []
    for _ in range(runs):
        tmpfs_mount.append(_timed(lambda: sizelimit.mount_tmpfs(tmpfs, GIB)))
        tmpfs_unmount.append(_timed(lambda: kernel.unmount(tmpfs)))

    sizelimit.mount_image(image, target)
    try:
        usage_s = []
        for _ in range(max(runs, 100)):
            usage_s.append(_timed(lambda: sizelimit.usage(target)))
        overlay: dict[str, dict[str, float]] = {}
        for kind, folder in (("plain", scratch / "plain-0"), ("image", target)):
            view = scratch / f"view-{kind}"
            view.mkdir()
            up, down = [], []
            for run in range(runs):
                upper, work = folder / f"upper-{run}", folder / f"work-{run}"
                upper.mkdir()
                work.mkdir()
                up.append(
                    _timed(
                        lambda upper=upper, work=work, view=view: kernel.mount_overlay(
                            source="dot-bench", lowers=[lower], upper=upper, work=work, target=view
                        )
                    )
                )
                down.append(_timed(lambda view=view: kernel.unmount(view)))
            writes = [_timed(lambda folder=folder: _write_and_fsync(folder / "written"))]
            writes += [_timed(lambda folder=folder: _write_and_fsync(folder / "written"))]
            overlay[kind] = {
                "overlay_mount_ms": _median_ms(up),
                "overlay_unmount_ms": _median_ms(down),
                "write_64mib_fsync_ms": _median_ms(writes),
            }
    finally:
        kernel.unmount(target)
    return {
        "runs": runs,
        "mkdir_ms": _median_ms(plain),
        "make_image": make,
        "first_mount_ms": _median_ms(mount),
        "unmount_ms": _median_ms(unmount),
        "tmpfs_mount_ms": _median_ms(tmpfs_mount),
        "tmpfs_unmount_ms": _median_ms(tmpfs_unmount),
        "usage_us": round(statistics.median(usage_s) * 1e6, 1),
        "overlay": overlay,
    }


def _clean(scratch: Path) -> None:
    with open("/proc/self/mountinfo") as table:
        points = [line.split()[4].encode().decode("unicode_escape") for line in table]
    for point in reversed(points):
        if point.startswith(f"{scratch}/"):
            kernel.unmount(Path(point), flags=kernel.MNT_DETACH)
    for entry in os.scandir(scratch):
        if entry.name.endswith(".img"):
            for number in loopdev.backed_by(Path(entry.path)):
                loopdev.detach(number)
    shutil.rmtree(scratch, ignore_errors=True)


def run(parent: str | None = None, quick: bool = False) -> dict[str, object]:
    scratch = Path(tempfile.mkdtemp(prefix="dot-bench-sized-", dir=parent or "/var/tmp"))
    try:
        return measure(scratch, runs=3 if quick else 9)
    finally:
        _clean(scratch)


def report(result: dict) -> str:
    made = ", ".join(
        f"{label} {figures['ms']:.0f} ms ({figures['host_disk_mib']:g} MiB on disk)"
        for label, figures in result["make_image"].items()
    )
    plain, image = result["overlay"]["plain"], result["overlay"]["image"]
    return "\n".join(
        [
            f"Size limits (medians of {result['runs']}): make an ext4 image: {made}; "
            f"a plain folder {result['mkdir_ms']:.2f} ms",
            f"  first mount of an image (attach + mount ext4) {result['first_mount_ms']:.1f} ms, "
            f"unmount (+ detach) {result['unmount_ms']:.1f} ms; sized tmpfs mount "
            f"{result['tmpfs_mount_ms']:.2f} ms, unmount {result['tmpfs_unmount_ms']:.2f} ms; "
            f"usage() {result['usage_us']:.0f} µs",
            f"  overlay mount/unmount, upper on a plain folder {plain['overlay_mount_ms']:.2f}/"
            f"{plain['overlay_unmount_ms']:.2f} ms, on the image {image['overlay_mount_ms']:.2f}/"
            f"{image['overlay_unmount_ms']:.2f} ms; 64 MiB write + fsync "
            f"{plain['write_64mib_fsync_ms']:.0f} ms plain, {image['write_64mib_fsync_ms']:.0f} ms "
            "in the image",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", help="where to make the scratch folder (default: /var/tmp)")
    parser.add_argument("--quick", action="store_true", help="3 runs per figure instead of 9")
    parser.add_argument("--json", type=Path, help="write the results to this file")
    arguments = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("sized.py needs root (it attaches loop devices and mounts)", file=sys.stderr)
        return 1
    result = run(arguments.dir, arguments.quick)
    if arguments.json:
        arguments.json.write_text(json.dumps(result, indent=2) + "\n")
    print(report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
