#!/usr/bin/env python3
"""Peak memory (RSS) of `docker-on-top diff --json`, `ls --json` and `inspect` over an
upper of FILES files (200,000 by default; issue 12 asks for at most 64 MB for diff).

The volume lives in a temporary state root on tmpfs, its upper filled as in
changes_walk.py (folders of 1,000 files, changes of base files and whiteouts among
them). Each command runs in a process of its own, its output thrown away, and its peak
RSS is what GNU time (/usr/bin/time, needed) reports for it. Memory, not time: nothing
is timed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(BENCH))

import changes_walk  # noqa: E402

from docker_on_top.driver import Driver  # noqa: E402
from docker_on_top.recovery import recover  # noqa: E402
from docker_on_top.store import VolumeStore  # noqa: E402

LIMIT_MB = 64
COMMANDS = {
    "diff_json": ("diff", "v", "--json"),
    "ls_json": ("ls", "--json"),
    "inspect": ("inspect", "v"),
}


def peak_rss_mb(argv: list[str]) -> float:
    """The peak RSS of a command, in MB (10^6 bytes), its output thrown away. Measured by
    GNU time: a child's ru_maxrss counts the memory of the process it was forked from,
    so this benchmark's own would count if it waited for the command itself."""
    with tempfile.NamedTemporaryFile("r") as measured, open(os.devnull, "wb") as sink:
        subprocess.run(
            ["/usr/bin/time", "-f", "%M", "-o", measured.name, *argv],
            stdout=sink,
            cwd=REPO,
            check=True,
        )
        return round(int(measured.read().split()[-1]) * 1024 / 1e6, 1)


def run(files: int) -> dict[str, float | int]:
    scratch = Path(tempfile.mkdtemp(prefix="dot-bench-memory-", dir="/dev/shm"))
    try:
        root, base = scratch / "root", scratch / "base"
        base.mkdir()
        driver = Driver(VolumeStore(root))
        recover(driver.store, driver.releases)
        driver.create("v", {"base": str(base)})
        changes_walk.populate(root / "v" / "upper", base, files)
        found: dict[str, float | int] = {"files": files, "limit_mb": LIMIT_MB}
        for key, command in COMMANDS.items():
            argv = [sys.executable, "-m", "docker_on_top", *command, "--root", str(root)]
            found[f"{key}_peak_rss_mb"] = peak_rss_mb(argv)
        found["python_peak_rss_mb"] = peak_rss_mb(
            [sys.executable, "-c", "import docker_on_top.cli"]
        )
    finally:
        shutil.rmtree(scratch)
    return found


def report(result: dict[str, float | int]) -> str:
    return (
        f"Peak RSS over an upper of {result['files']:,} files: diff --json"
        f" {result['diff_json_peak_rss_mb']} MB (limit {result['limit_mb']} MB), ls --json"
        f" {result['ls_json_peak_rss_mb']} MB, inspect {result['inspect_peak_rss_mb']} MB;"
        f" the interpreter with the command line loaded {result['python_peak_rss_mb']} MB"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=200_000)
    arguments = parser.parse_args()
    result = run(arguments.files)
    print(json.dumps(result))
    print(report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
