"""bench/protocol.py, the client `make bench` measures every daemon with, runs against
ours and gets what it expects of each part, on a few iterations: a part that broke
would otherwise show only in a benchmark run. Nothing here is timed; the figures are
checked only for being there, and the bursts for leaving the exact final state."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from .conftest import REPO, Daemon, Workspace, mounts_under

# A bound on a hang, not a timing.
SCRIPT_TIMEOUT_S = 300


def test_the_protocol_benchmark_runs_against_our_daemon(ws: Workspace, daemon: Daemon) -> None:
    output = ws.dir / "protocol.json"
    done = subprocess.run(
        [
            sys.executable, str(REPO / "bench" / "protocol.py"), "--socket", str(ws.socket),
            "--state-dir", str(ws.root), "--json", str(output), "--quiet",
            "--iterations", "5", "--warmup", "1", "--parts", "latency,bursts,awake",
        ],
        cwd=REPO, capture_output=True, text=True, timeout=SCRIPT_TIMEOUT_S, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    results = json.loads(output.read_text())
    assert results["errors"] == [], results["errors"]
    for mode in ("keepalive", "newconn"):
        latency = results["latency"][mode]
        assert latency["failures"] == 0
        assert all(figures["n"] == 5 for figures in latency["endpoints"].values()), latency
    for burst in results["bursts"].values():
        assert burst["exact"] and burst["failures"] == 0, burst
    assert set(results["awake"]["after_capabilities"]) == {"Get", "List"}
    assert mounts_under(ws.root) == []
    assert sorted(path.name for path in Path(ws.root).iterdir()) == []
