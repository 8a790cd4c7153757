"""The benchmark scripts that import the package still run against it, on a few
iterations each: an API they call that went away (as `sizelimit.unmount_image` once did)
would otherwise show only as a part `make bench` skips. Nothing here is timed; the
figures are checked only for being there."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ..mounts import backing_files, mounts_under

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "bench"
# A bound on a hang, not a timing.
SCRIPT_TIMEOUT_S = 300


def run_script(name: str, *arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(BENCH / name), *arguments],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=SCRIPT_TIMEOUT_S,
        check=False,
    )


def test_the_size_limit_benchmark_runs(tmp_path: Path) -> None:
    output = tmp_path / "sized.json"
    done = run_script("sized.py", "--dir", str(tmp_path), "--quick", "--json", str(output))
    assert done.returncode == 0, done.stderr
    figures = json.loads(output.read_text())
    assert figures["first_mount_ms"] > 0 and figures["unmount_ms"] > 0
    assert figures["make_image"], figures
    assert mounts_under(tmp_path) == []
    assert not [path for path in backing_files() if path.startswith(str(tmp_path))]


def test_the_layers_benchmark_runs(tmp_path: Path) -> None:
    output = tmp_path / "layers.json"
    done = run_script(
        "layers.py", "--dir", str(tmp_path), "--files", "200", "--runs", "1", "--json", str(output)
    )
    assert done.returncode == 0, done.stderr
    assert "snapshot" in json.dumps(json.loads(output.read_text()))
    assert mounts_under(tmp_path) == []


def test_the_kernel_floor_runs(tmp_path: Path) -> None:
    output = tmp_path / "floor.json"
    done = run_script(
        "kernel_floor.py",
        "--dir", str(tmp_path), "--iterations", "5", "--warmup", "1", "--json", str(output),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    figures = json.loads(output.read_text())
    assert figures["iterations"] == 5
    assert mounts_under(tmp_path) == []


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs")
def test_the_placement_benchmark_runs() -> None:
    done = run_script("placement.py", "--rounds", "1", "--requests", "20")
    assert done.returncode == 0, done.stderr
    for placement in ("one CPU", "two CPUs", "unpinned"):
        assert placement in done.stdout, done.stdout
    assert done.stdout.count("ours") == 9, done.stdout  # 3 calls in each of 3 placements
