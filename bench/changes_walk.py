"""How long `diff` and `export` take on a large upper, against a plain `find` walk of it.

The upper holds FILES small files in folders of 1,000, a tenth of them changes of base
files and a hundredth whiteouts (0/0 character devices), made directly on tmpfs (making
100,000 files through an overlay on disk takes minutes, and the walk is what is timed).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from docker_on_top import changes

PER_FOLDER = 1000


def _populate(upper: Path, base: Path, files: int) -> None:
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


def _timed(action: object) -> float:
    started = time.perf_counter()
    action()  # type: ignore[operator]
    return time.perf_counter() - started


def run(files: int) -> dict[str, float | int]:
    scratch = Path(tempfile.mkdtemp(prefix="dot-bench-walk-", dir="/dev/shm"))
    try:
        upper, base = scratch / "upper", scratch / "base"
        upper.mkdir()
        base.mkdir()
        _populate(upper, base, files)
        find_s = _timed(
            lambda: subprocess.run(["find", str(upper)], stdout=subprocess.DEVNULL, check=True)
        )
        found: list[changes.Change] = []
        diff_s = _timed(lambda: found.extend(changes.diff(upper, base)))
        with open(os.devnull, "wb") as sink:
            export_s = _timed(lambda: changes.export_layer(upper, sink))
    finally:
        shutil.rmtree(scratch)
    return {
        "files": files,
        "changes": len(found),
        "find_s": round(find_s, 3),
        "diff_s": round(diff_s, 3),
        "export_s": round(export_s, 3),
        "diff_ratio": round(diff_s / find_s, 2),
        "export_ratio": round(export_s / find_s, 2),
    }


def report(result: dict[str, float | int]) -> str:
    return (
        f"Upper of {result['files']:,} files on tmpfs: find {result['find_s']} s; "
        f"diff {result['diff_s']} s ({result['diff_ratio']}x find); "
        f"export {result['export_s']} s ({result['export_ratio']}x find); target within 2x"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=100_000)
    result = run(parser.parse_args().files)
    print(json.dumps(result))
    print(report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
