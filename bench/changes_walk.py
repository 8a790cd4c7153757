"""How long `diff` and `export` take on a large upper, against a plain `find` walk of it.

The upper holds FILES small files in folders of 1,000, a tenth of them changes of base
files and a hundredth whiteouts (0/0 character devices), made directly on tmpfs (making
100,000 files through an overlay on disk takes minutes, and the walk is what is timed).
GNU tar archiving the same upper is timed too: the floor for anything that reads every
file's content and xattrs, as export must.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import stat
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from docker_on_top import changes

PER_FOLDER = 1000
# Each figure is the median of this many runs: the machine may be shared.
RUNS = 5


def populate(upper: Path, base: Path, files: int) -> None:
    for number in range(files):
        folder = f"d{number // PER_FOLDER:04d}"
        if number % PER_FOLDER == 0:
            (upper / folder).mkdir()
            (base / folder).mkdir()
        name = f"f{number:06d}"
        if number % 100 == 0:
            (base / folder / name).write_bytes(b"base")
            os.mknod(upper / folder / name, stat.S_IFCHR | 0o600, os.makedev(0, 0))
        else:
            if number % 10 == 0:
                (base / folder / name).write_bytes(b"base")
            (upper / folder / name).write_bytes(b"change")


def _median_seconds(action: Callable[[], object], runs: int) -> float:
    seconds = []
    for _ in range(runs):
        started = time.perf_counter()
        action()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def _find(upper: Path) -> None:
    subprocess.run(["find", str(upper)], stdout=subprocess.DEVNULL, check=True)


def _gnu_tar(upper: Path) -> None:
    """GNU tar's pax archive of the upper, with xattrs, into a pipe: writing to /dev/null
    itself, it would skip reading the files."""
    tar = subprocess.Popen(
        ["tar", "--xattrs", "--format=posix", "-cf", "-", "-C", str(upper), "."],
        stdout=subprocess.PIPE,
    )
    subprocess.run(["cat"], stdin=tar.stdout, stdout=subprocess.DEVNULL, check=True)
    assert tar.stdout is not None
    tar.stdout.close()
    if tar.wait() != 0:
        raise subprocess.CalledProcessError(tar.returncode, tar.args)


def _diff(upper: Path, base: Path) -> int:
    """How many changes diff finds (it streams them)."""
    return sum(1 for _ in changes.diff(upper, base))


def _export(upper: Path) -> None:
    with open(os.devnull, "wb") as sink:
        changes.export_layer(upper, sink)


def run(files: int, runs: int = RUNS) -> dict[str, float | int]:
    scratch = Path(tempfile.mkdtemp(prefix="dot-bench-walk-", dir="/dev/shm"))
    load_before = os.getloadavg()[0]
    try:
        upper, base = scratch / "upper", scratch / "base"
        upper.mkdir()
        base.mkdir()
        populate(upper, base, files)
        found = _diff(upper, base)
        find_s = _median_seconds(lambda: _find(upper), runs)
        diff_s = _median_seconds(lambda: _diff(upper, base), runs)
        export_s = _median_seconds(lambda: _export(upper), runs)
        gnu_tar_s = _median_seconds(lambda: _gnu_tar(upper), runs)
    finally:
        shutil.rmtree(scratch)
    return {
        "files": files,
        "changes": found,
        "runs": runs,
        "find_s": round(find_s, 3),
        "diff_s": round(diff_s, 3),
        "export_s": round(export_s, 3),
        "gnu_tar_s": round(gnu_tar_s, 3),
        "diff_ratio": round(diff_s / find_s, 2),
        "export_ratio": round(export_s / find_s, 2),
        "gnu_tar_ratio": round(gnu_tar_s / find_s, 2),
        "export_vs_gnu_tar": round(export_s / gnu_tar_s, 2),
        "load_average_before": round(load_before, 2),
        "load_average_after": round(os.getloadavg()[0], 2),
    }


def report(result: dict[str, float | int]) -> str:
    return (
        f"Upper of {result['files']:,} files on tmpfs, medians of {result['runs']} runs:"
        f" find {result['find_s']} s; diff {result['diff_s']} s ({result['diff_ratio']}x find);"
        f" export {result['export_s']} s ({result['export_ratio']}x find,"
        f" {result['export_vs_gnu_tar']}x GNU tar); GNU tar {result['gnu_tar_s']} s"
        f" ({result['gnu_tar_ratio']}x find); target within 2x find;"
        f" load average {result['load_average_before']} to {result['load_average_after']}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=RUNS, help="runs per figure (median)")
    arguments = parser.parse_args()
    result = run(arguments.files, arguments.runs)
    print(json.dumps(result))
    print(report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
