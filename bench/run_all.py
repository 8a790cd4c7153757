#!/usr/bin/env python3
"""`make bench`: every benchmark against a temporary daemon of ours, and the targets.

    python3 bench/run_all.py [--quick] [--no-docker] [--private-dockerd] [--json FILE]
                             [--compare SOCKET [--compare-state-dir DIR]]

Writes bench/results/latest.json and prints a table, issue 16's targets last, each as
met, MISSED or n/a with its figures. Needs root. The daemon runs under a private driver
name (dot-bench-<random>) with a temporary state root and socket under /var/tmp (the same
filesystem as the default /var/lib), and is stopped by its PID; what is left mounted
under the temporary folder is unmounted and the folder removed, also on failure or
Ctrl-C. The kernel floor and the fsync cost of a Create are measured in the same run, in
that folder (the state root's filesystem).

With --compare, another implementation already serving on SOCKET (the Go original) is
measured in the same run by the same client: bench/protocol.py's latency and bursts in
interleaved rounds (ours, it, it, ours, ...; the medians of the rounds count), then its
CPU, memory and (with --compare-state-dir) scale parts. Without it, the Go figures are
issue 16's reference values and the targets it gives no figure for are n/a.

The docker-level part uses the dockerd that `docker info` reaches (never starting or
stopping one) and skips itself with a message when there is none; with --private-dockerd
it starts a dockerd of its own (own data root, exec root, socket and pidfile under the
temporary folder) and stops it by its PID at the end. With --compare it also starts a
second instance of the executable serving on SOCKET, with the Go original's flags
(-root, -socket), on /run/docker/plugins/<private name>-go.sock, where a dockerd finds a
legacy plugin, and stops it by its PID at the end.

The figures never fail anything: the exit status is 0 once the benchmarks ran, whatever
they show.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
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

import changes_walk  # noqa: E402
import diff_memory  # noqa: E402
import docker_bench  # noqa: E402
import kernel_floor  # noqa: E402
import layers  # noqa: E402
import protocol  # noqa: E402
import sized  # noqa: E402

# The Go original (docker-on-top v0.1.2) as issue 16 quotes it (keep-alive p50, this
# machine, another day): the comparison when no --compare socket measures it in the same
# run. The issue gives no Get, List or one-volume burst figure: those targets are then n/a.
GO_REFERENCE_P50_US = {
    "Create": 656.0,
    "Mount": 1010.0,
    "Unmount": 2703.0,
    "Remove": 1551.0,
    "Capabilities": 286.0,  # the bare round trip
}
GO_REFERENCE_BURSTS_MS = {"many_volumes": (59.0, 62.0)}
FLOOR_REFERENCE_US = {"mount": 370, "unmount": 1500}  # the floor, for context only
STARTUP_FIRST_ANSWER_S = 1.0
RSS_IDLE_LIMIT_MB = 25.0
RSS_FLAT_LIMIT_MB = 0.5  # "flat": what 20,000 requests may add, after 1,000 to warm up
MB = 1_000_000 / (1 << 20)  # one MB in MiB
SCRATCH_PARENT = "/var/tmp"
TMPFS_PARENT = "/dev/shm"
READY_TIMEOUT_S = 60.0
BACKGROUND_TIMEOUT_S = 120.0


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# --- our daemon ---------------------------------------------------------------------------


class Daemon:
    """One daemon process of ours, started and stopped by this script only."""

    def __init__(self, name: str, root: Path, socket_path: Path, log_path: Path) -> None:
        self.name, self.root, self.socket_path, self.log_path = name, root, socket_path, log_path
        self.process: subprocess.Popen[bytes] | None = None
        self.spawned = 0.0  # time.perf_counter() when the process was last spawned

    def start(self) -> float:
        """Start it; seconds from spawn until it answers Plugin.Activate."""
        environment = dict(os.environ, PYTHONPATH=str(REPO))
        for key in list(environment):
            if key.startswith("DOCKER_ON_TOP_"):
                del environment[key]
        with open(self.log_path, "ab") as log_file:
            started = self.spawned = time.perf_counter()
            self.process = subprocess.Popen(
                [
                    sys.executable, "-m", "docker_on_top", "serve",
                    "--name", self.name, "--root", str(self.root),
                    "--socket", str(self.socket_path), "--log-level", "warning",
                ],
                stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file, env=environment,
            )  # fmt: skip
        raw = protocol.encode("Plugin.Activate", close=True)
        while True:
            try:
                status, _ = protocol.call_once(str(self.socket_path), raw)
                if status == 200:
                    return time.perf_counter() - started
            except OSError:
                pass
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"the daemon exited with {self.process.returncode}; see {self.log_path}:\n"
                    + self.log_path.read_text(errors="replace")[-2000:]
                )
            if time.perf_counter() - started > READY_TIMEOUT_S:
                raise RuntimeError(f"the daemon did not answer within {READY_TIMEOUT_S} s")
            time.sleep(0.001)

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def stop(self) -> float:
        """SIGTERM by PID (SIGKILL after 20 s); seconds until it exited."""
        if self.process is None:
            return 0.0
        started = time.perf_counter()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                log(f"daemon {self.process.pid} did not stop on SIGTERM; killing it")
                self.process.kill()
                self.process.wait()
        self.process = None
        return time.perf_counter() - started


# --- the machine -------------------------------------------------------------------------


def machine(scratch: Path) -> dict[str, object]:
    cpu = ""
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as meminfo:
        memory_kib = int(meminfo.readline().split()[1])
    filesystem = subprocess.run(
        ["findmnt", "-n", "-o", "FSTYPE,SOURCE,OPTIONS", "--target", str(scratch)],
        capture_output=True, text=True, check=False,
    ).stdout.strip()  # fmt: skip
    commit = subprocess.run(
        ["git", "-C", str(REPO), "describe", "--always", "--dirty", "--abbrev=12"],
        capture_output=True, text=True, check=False,
    ).stdout.strip()  # fmt: skip
    return {
        "commit": commit or "unknown",
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(memory_kib / (1 << 20), 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "state_root_filesystem": filesystem,
        "load_average_at_start": [round(value, 2) for value in os.getloadavg()],
    }


# --- targets -----------------------------------------------------------------------------


def go_figures(results: dict) -> dict:
    """The Go original's figures: measured in this run with --compare, else the issue's
    reference values (None where the issue gives none)."""
    compared = (results.get("compared") or {}).get("protocol")
    docker = results.get("docker") or {}
    if not compared:
        return {
            "measured": False,
            "p50_us": dict(GO_REFERENCE_P50_US),
            "bursts_ms": dict(GO_REFERENCE_BURSTS_MS),
            "docker_run_ms": None,
        }
    keep = compared["latency"]["keepalive"]["endpoints"]
    bursts = compared["bursts"]
    return {
        "measured": True,
        "p50_us": {endpoint: figures["p50"] for endpoint, figures in keep.items()},
        "bursts_ms": {
            key: (burst["mount_ms"]["median"], burst["unmount_ms"]["median"])
            for key, burst in bursts.items()
        },
        "docker_run_ms": (docker.get("median_ms") or {}).get("go_plugin"),
    }


def _target(
    name: str,
    measured: float | None,
    limit: float | None,
    unit: str,
    *,
    go: float | None = None,
    factor: float | None = None,
    note: str = "",
) -> dict:
    """One target: met when `measured` <= `limit`; `go` and `factor` say where a limit
    relative to the Go original comes from (limit = factor x go)."""
    entry: dict = {"name": name, "unit": unit, "measured": measured, "limit": limit, "note": note}
    if go is not None:
        entry["go"] = go
        entry["factor"] = factor
        if measured is not None and go:
            entry["ratio_to_go"] = round(measured / go, 3)
    if measured is None or limit is None:
        entry["met"] = None
    else:
        digits = {"s": 3, "x": 3, "MB": 2}.get(unit, 1)
        entry["measured"] = round(measured, digits)
        entry["limit"] = round(limit, digits)
        entry["met"] = measured <= limit
    return entry


def _relative(
    name: str,
    measured: float | None,
    go: float | None,
    factor: float,
    unit: str,
    note: str = "",
    *,
    against: str = "Go",
) -> dict:
    limit = None if go is None else factor * go
    entry = _target(name, measured, limit, unit, go=go, factor=factor, note=note)
    entry["against"] = against
    return entry


def targets(results: dict) -> list[dict]:
    """Each target of issue 16, in its order: what was measured, the limit, met or not."""
    go = go_figures(results)
    found: list[dict] = []
    proto = results.get("protocol") or {}
    floor = results.get("kernel_floor") or {}
    if proto:
        keep = proto["latency"]["keepalive"]["endpoints"]
        for endpoint, factor, part in (("Mount", 0.8, "mount"), ("Unmount", 0.4, "unmount")):
            note = ""
            if floor:
                note = (
                    f"kernel floor {floor[part + '_bare']['p50']:.0f} µs bare, "
                    f"{floor[part + '_state']['p50']:.0f} µs with lock and records"
                )
            found.append(
                _relative(
                    f"{endpoint} p50 <= {factor} x Go", keep[endpoint]["p50"],
                    go["p50_us"].get(endpoint), factor, "µs", note,
                )
            )  # fmt: skip
        for endpoint in ("Remove", "Get", "List", "Capabilities"):
            found.append(
                _relative(
                    f"{endpoint} p50 <= 1.0 x Go", keep[endpoint]["p50"],
                    go["p50_us"].get(endpoint), 1.0, "µs",
                )
            )  # fmt: skip
        fsync = (floor.get("create_fsync") or {}).get("p50")
        go_create = go["p50_us"].get("Create")
        limit = None if fsync is None or go_create is None else go_create + fsync
        found.append(
            _target(
                "Create p50 <= Go + fsync of metadata.json and its folder",
                keep["Create"]["p50"], limit, "µs", go=go_create, factor=1.0,
                note="fsync not measured" if fsync is None else
                f"Go {go_create:g} µs + fsync {fsync:.0f} µs measured in this run on the state "
                "root's filesystem",
            )
        )  # fmt: skip
        for key, factor, label in (
            ("one_volume", 0.8, "50 IDs on one volume"),
            ("many_volumes", 1.0, "50 different volumes at once"),
        ):
            burst = proto["bursts"][key]
            go_mount, go_unmount = go["bursts_ms"].get(key) or (None, None)
            for what, theirs in (("mount", go_mount), ("unmount", go_unmount)):
                found.append(
                    _relative(
                        f"burst, {label}: {what} <= {factor} x Go",
                        burst[f"{what}_ms"]["median"], theirs, factor, "ms",
                    )
                )  # fmt: skip
    startup = (results.get("startup") or {}).get("crashed") or {}
    if startup:
        found.append(
            _target(
                f"start-up, {startup['volumes']:,} volumes left by a crash: first answer < 1 s",
                startup.get("activate_s"), STARTUP_FIRST_ANSWER_S, "s",
                note=f"a Get of one answered {startup.get('get_s')} s, recovery done "
                f"{startup.get('recovered_s')} s after the spawn",
            )
        )  # fmt: skip
    docker = results.get("docker") or {}
    medians = docker.get("median_ms") or {}
    ours_docker = medians.get("plugin")
    found.append(
        _relative(
            "docker run: our volume <= the Go original's volume", ours_docker,
            go["docker_run_ms"], 1.0, "ms",
        )
    )  # fmt: skip
    found.append(
        _relative(
            "docker run: our volume <= 1.02 x a local overlay volume", ours_docker,
            medians.get("local_overlay"), 1.02, "ms", against="local overlay",
        )
    )  # fmt: skip
    if proto:
        memory = proto["memory"]
        idle = (memory.get("idle") or {}).get("vmrss_mib")
        found.append(
            _target(
                "RSS idle < 25 MB", None if idle is None else idle / MB, RSS_IDLE_LIMIT_MB, "MB",
                note="after the latency rounds, the bursts and the CPU part",
            )
        )  # fmt: skip
        growth = memory.get("growth_20k_mib")
        before = (memory.get("before_load") or {}).get("vmrss_mib")
        after = (memory.get("after_20k_requests") or {}).get("vmrss_mib")
        found.append(
            _target(
                f"RSS flat over 20,000 requests (growth <= {RSS_FLAT_LIMIT_MB} MB)",
                None if growth is None else growth / MB, RSS_FLAT_LIMIT_MB, "MB",
                note="" if before is None or after is None else
                f"{before / MB:.2f} MB before, {after / MB:.2f} MB after; the second 10,000 "
                f"added {memory['growth_second_10k_mib'] / MB:.2f} MB",
            )
        )  # fmt: skip
        exact = all(burst["exact"] for burst in proto["bursts"].values())
        found.append(
            {
                "name": "(check) every burst left the exact final state",
                "measured": exact,
                "met": exact,
            }
        )
    return found


def target_lines(found: list[dict]) -> list[str]:
    lines = []
    for target in found:
        verdict = {True: "met", False: "MISSED", None: "n/a"}[target["met"]]
        measured, unit = target["measured"], target.get("unit", "")
        if isinstance(measured, bool):
            shown = "yes" if measured else "no"
        elif measured is None:
            shown = "not measured"
        elif target.get("go") is not None and target.get("factor") is not None:
            shown = f"{measured:g} {unit}, {target.get('against', 'Go')} {target['go']:g} {unit}"
            if "ratio_to_go" in target:
                shown += f": {target['ratio_to_go']:.2f} x"
            shown += f" (limit {target['limit']:g} {unit})"
        elif target["limit"] is None:
            shown = f"{measured:g} {unit}, no Go figure (the issue gives none; use --compare)"
        else:
            shown = f"{measured:g} {unit} (limit {target['limit']:g} {unit})"
        if target.get("note"):
            shown += f"; {target['note']}"
        lines.append(f"  {verdict:<7}{target['name']:<62} {shown}")
    return lines


# --- the report ------------------------------------------------------------------------


def _row(label: str, figures: dict, width: int = 26) -> str:
    return f"{label:<{width}}{figures['p50']:>8.0f} {figures['p90']:>7.0f} {figures['p99']:>7.0f}"


def _each_round(latency: dict, endpoint: str) -> str:
    return ", ".join(
        f"{value:.0f}" for value in latency["keepalive"]["endpoints"][endpoint]["rounds_p50"]
    )


def _awake_lines(ours: dict, theirs: dict | None) -> list[str]:
    """The awake part (not a target): what the latency part's calls cost without the
    wait before them, and what an idle gap adds."""
    lines = []
    for group, label in (
        ("after_capabilities", "  Right after a Capabilities (the daemon awake), p50:"),
        ("capabilities_after_gap", "  Capabilities p50 after an idle gap of"),
    ):
        figures = ours.get("awake", {}).get(group)
        if not figures:
            continue
        go = (theirs or {}).get("awake", {}).get(group, {})
        shown = [
            f"{key} ours {value:.0f}" + (f", Go {go[key]:.0f}" if key in go else "")
            for key, value in figures.items()
        ]
        lines.append(f"{label} " + "; ".join(shown) + " µs")
    return lines


def report(results: dict) -> str:
    go = go_figures(results)
    compared = results.get("compared")
    info = results["machine"]
    lines = [
        f"docker-on-top benchmarks, {results['generated']} ({results['duration_s']:.0f} s in all)",
        f"machine: {info['cpu']}, {info['cores']} cores, {info['memory_gib']} GiB, Linux "
        f"{info['kernel']}, Python {info['python']}; state root on "
        f"{info['state_root_filesystem'].split()[0]}; load average "
        f"{info['load_average_at_start'][0]} at start, {info['load_average_at_end'][0]} at the end",
        f"commit {info['commit']}; Go figures: "
        + (
            f"measured in this run on {compared['socket']} (--compare), in the same interleaved "
            "rounds as ours"
            if compared
            else "the issue's reference values for the Go original (not measured in this run)"
        ),
    ]
    proto = results.get("protocol")
    if proto:
        latency = proto["latency"]
        go_new = {}
        if compared:
            go_new = {
                endpoint: figures["p50"]
                for endpoint, figures in compared["protocol"]["latency"]["newconn"][
                    "endpoints"
                ].items()
            }
        lines += [
            "",
            f"Latency, µs, medians of {proto['rounds']} interleaved rounds' percentiles"
            f" ({latency['keepalive']['iterations_per_round']} iterations a round)",
            "                  keep-alive: p50     p90     p99 |  new conn: p50     p90     p99 |"
            "  Go p50 (new conn)",
        ]
        for endpoint in protocol.ENDPOINTS:
            keep = latency["keepalive"]["endpoints"][endpoint]
            new = latency["newconn"]["endpoints"][endpoint]
            theirs = go["p50_us"].get(endpoint)
            shown = "" if theirs is None else f"{theirs:.0f}"
            if endpoint in go_new:
                shown += f" ({go_new[endpoint]:.0f})"
            lines.append(f"{_row('  ' + endpoint, keep)} |{_row('', new, 7)} | {shown:>8}")
        go_latency = compared["protocol"]["latency"] if compared else None
        for endpoint in ("Mount", "Unmount"):
            line = f"  {endpoint} p50 of each round: ours {_each_round(latency, endpoint)}"
            if go_latency is not None:
                line += f"; Go {_each_round(go_latency, endpoint)}"
            lines.append(line)
        lines += _awake_lines(proto, compared["protocol"] if compared else None)
    floor = results.get("kernel_floor")
    if floor:
        lines += [
            "",
            f"Kernel floor (this run, medians of {floor['rounds']} rounds interleaved with the "
            "daemons'), one process, no protocol",
            "  µs                                                 p50     p90     p99",
        ]
        for key, label in (
            ("mount_bare", "mount: mkdir x2 + mount(2)"),
            ("unmount_bare", "unmount: umount2(2) + rmdir x3"),
            ("mount_state", "mount + flock + record files"),
            ("unmount_state", "unmount + flock + record files"),
            ("create_fsync", "Create: fsync metadata.json + its folder"),
            ("create_fsync_root", "Create: then fsync of the state root"),
        ):
            lines.append(
                f"{_row('  ' + label, floor[key], 50)}   (rounds: "
                + ", ".join(f"{value:.0f}" for value in floor[key]["rounds_p50"])
                + ")"
            )
        lines.append(
            f"  (the issue's floor, another day: Mount ~{FLOOR_REFERENCE_US['mount']} µs, "
            f"Unmount ~{FLOOR_REFERENCE_US['unmount']} µs)"
        )
        if proto:
            keep = proto["latency"]["keepalive"]["endpoints"]
            line = (
                "  p50 above the bare floor: ours Mount "
                f"{keep['Mount']['p50'] - floor['mount_bare']['p50']:.0f} µs, Unmount "
                f"{keep['Unmount']['p50'] - floor['unmount_bare']['p50']:.0f} µs"
            )
            mount_go, unmount_go = go["p50_us"].get("Mount"), go["p50_us"].get("Unmount")
            if mount_go is not None and unmount_go is not None:
                line += (
                    f"; Go Mount {mount_go - floor['mount_bare']['p50']:.0f} µs, Unmount "
                    f"{unmount_go - floor['unmount_bare']['p50']:.0f} µs"
                )
            lines.append(line)
    cpu = (proto or {}).get("cpu") or {}
    if "Mount+Unmount" in cpu:
        floor_cpu = (floor or {}).get("cpu_mean_us") or {}
        lines += [
            "",
            "Daemon CPU time per request (all threads, user + system; waiting for a core does "
            "not count), µs:",
            f"  ours: Capabilities {cpu['Capabilities']['cpu_us']:.0f}, "
            f"Get {cpu['Get']['cpu_us']:.0f}, List {cpu['List']['cpu_us']:.0f}, "
            f"Mount + Unmount {cpu['Mount+Unmount']['cpu_us']:.0f}, "
            f"Create + Remove {cpu['Create+Remove']['cpu_us']:.0f}",
        ]
        go_cpu = ((compared or {}).get("protocol") or {}).get("cpu") or {}
        if "Mount+Unmount" in go_cpu:
            lines.append(
                f"  Go:   Capabilities {go_cpu['Capabilities']['cpu_us']:.0f}, "
                f"Get {go_cpu['Get']['cpu_us']:.0f}, List {go_cpu['List']['cpu_us']:.0f}, "
                f"Mount + Unmount {go_cpu['Mount+Unmount']['cpu_us']:.0f}, "
                f"Create + Remove {go_cpu['Create+Remove']['cpu_us']:.0f}"
            )
        if floor_cpu:
            lines.append(
                "  kernel floor CPU, Mount + Unmount: "
                f"{floor_cpu['mount_bare'] + floor_cpu['unmount_bare']:.0f} bare, "
                f"{floor_cpu['mount_state'] + floor_cpu['unmount_state']:.0f} with lock and records"
            )
    if proto:
        lines.append("")
        for key, label in (("one_volume", "1 volume x 50 IDs"), ("many_volumes", "50 volumes")):
            burst = proto["bursts"][key]
            line = (
                f"Burst, {label:<18} mount {burst['mount_ms']['median']:6.1f} ms, unmount "
                f"{burst['unmount_ms']['median']:6.1f} ms (median of {burst['rounds']}); "
                f"final state exact: {'yes' if burst['exact'] else 'NO'}"
            )
            go_mount, go_unmount = go["bursts_ms"].get(key) or (None, None)
            if go_mount is not None:
                line += f"; Go {go_mount:.1f} / {go_unmount:.1f} ms"
            lines.append(line)
        memory = proto["memory"]
        lines.append("")
        for key, label in (
            ("idle", "idle (after the rounds)"),
            ("before_load", "before 20,000 requests (warm)"),
            ("after_10k_requests", "after 10,000 of them"),
            ("after_20k_requests", "after 20,000 of them"),
        ):
            if memory.get(key):
                lines.append(f"RSS {label:<30}{memory[key]['vmrss_mib']:6.1f} MiB")
        fresh = proto.get("idle_fresh")
        if fresh:
            lines.append(f"RSS {'idle, just started':<30}{fresh['vmrss_mib']:6.1f} MiB")
        rss_10k = (results.get("startup") or {}).get("rss_idle_10k")
        if rss_10k:
            lines.append(
                f"RSS {'idle with 10,000 volumes':<30}{rss_10k['vmrss_mib']:6.1f} MiB "
                f"(peak {rss_10k['vmhwm_mib']:.1f} MiB)"
            )
        go_memory = ((compared or {}).get("protocol") or {}).get("memory") or {}
        if go_memory.get("idle") and go_memory.get("after_20k_requests"):
            lines.append(
                f"  (Go: {go_memory['idle']['vmrss_mib']:.1f} MiB idle, "
                f"{go_memory['after_20k_requests']['vmrss_mib']:.1f} MiB after 20,000 requests)"
            )
        scale = proto.get("scale")
        if scale:
            go_scale = ((compared or {}).get("protocol") or {}).get("scale") or {}
            lines += [
                "",
                f"With {scale['volumes']} volumes, µs      p50     p90     p99"
                + ("  | Go p50" if go_scale else ""),
            ]
            for endpoint in ("Get", "Mount", "Unmount", "List"):
                row = _row(f"  {endpoint}", scale[endpoint])
                if go_scale:
                    row += f"  | {go_scale[endpoint]['p50']:6.0f}"
                lines.append(row)
            line = f"  List complete: ours {'yes' if scale['list_complete'] else 'NO'}"
            if go_scale:
                line += f", Go {'yes' if go_scale['list_complete'] else 'NO'}"
            lines.append(line)
    startup = results.get("startup")
    if startup:
        crashed = startup["crashed"]
        lines += [
            "",
            "Start-up until the first answer: empty root "
            f"{startup['empty_s']['median']:.2f} s; {startup['scale_volumes']} volumes "
            f"{startup['clean_10k_s']['median']:.2f} s",
            f"  {crashed['volumes']} volumes left by a crash "
            f"({crashed.get('measured_by', 'bench/startup.py')}): "
            f"first answer {crashed['activate_s']} s, a Get of one of them "
            f"{crashed['get_s']} s, recovery done {crashed['recovered_s']} s "
            "(seconds from the spawn)",
        ]
    tmpfs = results.get("tmpfs") or {}
    if "latency" in tmpfs:
        keep = tmpfs["latency"]["keepalive"]["endpoints"]
        new = tmpfs["latency"]["newconn"]["endpoints"]
        tmpfs_floor = tmpfs["kernel_floor"]
        lines += [
            "",
            f"State root on tmpfs ({TMPFS_PARENT}, no disk), p50 µs: "
            f"Mount {keep['Mount']['p50']:.0f} (floor {tmpfs_floor['mount_bare']['p50']:.0f}, "
            f"with records {tmpfs_floor['mount_state']['p50']:.0f}), "
            f"Unmount {keep['Unmount']['p50']:.0f} "
            f"(floor {tmpfs_floor['unmount_bare']['p50']:.0f}, "
            f"with records {tmpfs_floor['unmount_state']['p50']:.0f})",
            f"  Create {keep['Create']['p50']:.0f}, Remove {keep['Remove']['p50']:.0f}, "
            f"Get {keep['Get']['p50']:.0f}, Capabilities {keep['Capabilities']['p50']:.0f}; "
            f"new connection: Mount {new['Mount']['p50']:.0f}, "
            f"Unmount {new['Unmount']['p50']:.0f}, Capabilities {new['Capabilities']['p50']:.0f}",
        ]
        tmpfs_cpu = tmpfs.get("cpu") or {}
        if "Mount+Unmount" in tmpfs_cpu:
            floor_cpu = tmpfs_floor["cpu_mean_us"]
            lines.append(
                f"  daemon CPU µs: Capabilities {tmpfs_cpu['Capabilities']['cpu_us']:.0f}, "
                f"Get {tmpfs_cpu['Get']['cpu_us']:.0f}, "
                f"Mount + Unmount {tmpfs_cpu['Mount+Unmount']['cpu_us']:.0f} (floor "
                f"{floor_cpu['mount_bare'] + floor_cpu['unmount_bare']:.0f} bare, "
                f"{floor_cpu['mount_state'] + floor_cpu['unmount_state']:.0f} with records)"
            )
    elif tmpfs:
        lines += ["", f"State root on tmpfs: skipped ({tmpfs.get('skipped')})"]
    if results.get("docker"):
        lines += ["", docker_bench.table(results["docker"])]
    if proto and proto.get("errors"):
        lines += ["", "Unexpected failures in the protocol part (first ones):"]
        lines += [f"  {error}" for error in proto["errors"]]
    if compared and compared["protocol"].get("errors"):
        lines += ["", "Unexpected failures of the compared implementation (first ones):"]
        lines += [f"  {error}" for error in compared["protocol"]["errors"]]
    walk = results.get("changes_walk")
    if walk:
        lines += ["", changes_walk.report(walk)]
    limits = results.get("sized") or {}
    if "skipped" in limits:
        lines += ["", f"Size limits: skipped ({limits['skipped']})"]
    elif limits:
        lines += ["", sized.report(limits)]
    stacked = results.get("layers")
    if stacked:
        lines += ["", layers.report(stacked)]
    memory = results.get("diff_memory")
    if memory:
        lines += ["", diff_memory.report(memory)]
    lines += [
        "",
        "Targets of issue 16 (p50 ratios against the Go original; Go "
        + ("measured in this run" if go["measured"] else "from the issue's reference values")
        + ")",
    ]
    lines += target_lines(results.get("targets", []))
    return "\n".join(lines)


# --- the run ---------------------------------------------------------------------------


def _median(values: list[float]) -> dict[str, float]:
    return {
        "median": round(statistics.median(values), 3),
        "all": [round(value, 3) for value in values],
    }


def settled_memory(pid: int | None, timeout: float = 20.0) -> dict | None:
    """The daemon's memory once it is idle: no thread but the main one is left (start-up
    work in the background has ended), or after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    time.sleep(0.3)
    figures = protocol.process_memory(pid)
    while figures and figures.get("threads", 1) > 1 and time.monotonic() < deadline:
        time.sleep(0.2)
        figures = protocol.process_memory(pid)
    return figures


def mark_crashed(root: Path, prefix: str) -> None:
    """Make every scale volume look as a crash or reboot leaves it: a mountpoint/ and a
    workdir/ that are not mounted, and a usage record."""
    for entry in os.scandir(root):
        if entry.name.startswith(prefix):
            os.mkdir(os.path.join(entry.path, "mountpoint"))
            os.mkdir(os.path.join(entry.path, "workdir"))
            with open(os.path.join(entry.path, "activemounts", "0" * 64), "w") as record:
                record.write('{"UsageCount":1}')


def tmpfs_part(workspace: Path, name: str, iterations: int, daemons: list[Daemon]) -> dict:
    """The kernel floor and the latency again with the state root on tmpfs: no disk, so
    what is left above the floor is the daemon's own cost."""
    kind = subprocess.run(
        ["findmnt", "-n", "-o", "FSTYPE", "--target", TMPFS_PARENT],
        capture_output=True, text=True, check=False,
    ).stdout.split()  # fmt: skip
    if not kind or kind[0] != "tmpfs":
        return {"skipped": f"{TMPFS_PARENT} is not a tmpfs"}
    log(f"state root on tmpfs ({TMPFS_PARENT}): kernel floor and latency")
    scratch = Path(tempfile.mkdtemp(prefix="dot-bench-", dir=TMPFS_PARENT))
    daemon = Daemon(f"{name}-t", scratch / "root", scratch / "p.sock", workspace / "tmpfs.log")
    daemons.append(daemon)
    try:
        floor = kernel_floor.run(str(scratch), iterations=iterations, warmup=20)
        daemon.start()
        output = workspace / "tmpfs.json"
        subprocess.run(
            [
                sys.executable, str(BENCH / "protocol.py"), "--socket", str(daemon.socket_path),
                "--state-dir", str(daemon.root), "--json", str(output), "--quiet",
                "--iterations", str(iterations), "--parts", "latency,cpu",
            ],
            check=True,
        )  # fmt: skip
        measured = json.loads(output.read_text())
        return {"kernel_floor": floor, "latency": measured["latency"], "cpu": measured.get("cpu")}
    except (subprocess.CalledProcessError, RuntimeError, OSError) as error:
        return {"skipped": f"failed: {error}"}
    finally:
        daemon.stop()
        kernel_floor.unmount_under(scratch)
        shutil.rmtree(scratch, ignore_errors=True)


def sized_part(workspace: Path, quick: bool) -> dict:
    """bench/sized.py; where it cannot run (no e2fsprogs, no loop devices) or fails, that
    is noted in the results and the run goes on."""
    try:
        return sized.run(str(workspace), quick)
    except Exception as error:
        log(f"the size-limit part failed: {error}")
        return {"skipped": f"failed: {type(error).__name__}: {error}"}


def protocol_part(
    socket_path: str,
    state_dir: Path | None,
    output: Path,
    parts: str,
    iterations: int,
    extra: tuple[str, ...] = (),
) -> dict:
    """One run of bench/protocol.py (a process of its own) with these parts."""
    command = [
        sys.executable, str(BENCH / "protocol.py"), "--socket", socket_path,
        "--json", str(output), "--quiet", "--iterations", str(iterations), "--parts", parts,
        *extra,
    ]  # fmt: skip
    if state_dir is not None:
        command += ["--state-dir", str(state_dir)]
    completed = subprocess.run(command, check=False)
    if completed.returncode != 0 or not output.exists():
        raise RuntimeError(
            f"bench/protocol.py on {socket_path} failed with exit status {completed.returncode}"
        )
    measured: dict = json.loads(output.read_text())
    output.unlink()
    return measured


def merge_rounds(rounds: list[dict]) -> dict:
    """Latency and bursts of several rounds as one: each percentile the median of the
    rounds' ones, each burst wall time the median of all rounds' bursts."""
    latency = {}
    for mode in ("keepalive", "newconn"):
        endpoints = {}
        for endpoint in protocol.ENDPOINTS:
            each = [found["latency"][mode]["endpoints"][endpoint] for found in rounds]
            endpoints[endpoint] = {
                **{
                    key: round(statistics.median(figures[key] for figures in each), 1)
                    for key in ("p50", "p90", "p99")
                },
                "n": sum(figures["n"] for figures in each),
                "rounds_p50": [figures["p50"] for figures in each],
            }
        latency[mode] = {
            "mode": mode,
            "rounds": len(rounds),
            "iterations_per_round": rounds[0]["latency"][mode]["iterations"],
            "failures": sum(found["latency"][mode]["failures"] for found in rounds),
            "endpoints": endpoints,
        }
    bursts = {}
    for key in ("one_volume", "many_volumes"):
        each = [found["bursts"][key] for found in rounds]
        merged: dict = {"rounds": sum(burst["rounds"] for burst in each), "size": each[0]["size"]}
        for what in ("mount_ms", "unmount_ms"):
            walls = [wall for burst in each for wall in burst[what]["all"]]
            merged[what] = {
                "median": round(statistics.median(walls), 2),
                "rounds_median": [burst[what]["median"] for burst in each],
                "all": walls,
            }
        merged["failures"] = sum(burst["failures"] for burst in each)
        merged["exact"] = all(burst["exact"] for burst in each)
        merged["problems"] = [problem for burst in each for problem in burst["problems"]][:10]
        bursts[key] = merged
    awake = {
        group: {
            key: round(statistics.median(found["awake"][group][key]["p50"] for found in rounds), 1)
            for key in rounds[0]["awake"][group]
        }
        for group in ("after_capabilities", "capabilities_after_gap")
        if all("awake" in found for found in rounds)
    }
    return {
        "rounds": len(rounds),
        "latency": latency,
        "bursts": bursts,
        "awake": awake,
        "idle_fresh": rounds[0]["memory"].get("idle"),
        "errors": [error for found in rounds for error in found["errors"]][:20],
    }


def merge_floors(rounds: list[dict]) -> dict:
    """The kernel floor of several rounds as one: each figure the median of the rounds'."""
    merged: dict = {"rounds": len(rounds), "iterations_per_round": rounds[0]["iterations"]}
    merged["options"] = rounds[0]["options"]
    for key in kernel_floor.KEYS:
        merged[key] = {
            figure: round(statistics.median(found[key][figure] for found in rounds), 1)
            for figure in ("p50", "p90", "p99")
        }
        merged[key]["rounds_p50"] = [found[key]["p50"] for found in rounds]
    merged["cpu_mean_us"] = {
        key: round(statistics.median(found["cpu_mean_us"][key] for found in rounds), 1)
        for key in rounds[0]["cpu_mean_us"]
    }
    return merged


def protocol_rounds(
    sides: list[tuple[str, str, Path | None]], workspace: Path, rounds: int, iterations: int
) -> tuple[dict, dict[str, dict]]:
    """The kernel floor, then latency and bursts of each side, in interleaved rounds
    (floor, ours, Go, floor, Go, ours, ...) so that the machine's swings hit all alike;
    (the floor, each side's figures), each merged over the rounds.

    The sides take turns to go first: on this machine's state disk a folder made just
    after many were removed costs up to 5 times more (ext4 looks past the inodes freed
    recently), so the side that runs right after the floor's churn, or in a slow stretch
    of the round, would otherwise always be the same one."""
    floors: list[dict] = []
    found: dict[str, list[dict]] = {label: [] for label, _, _ in sides}
    for index in range(rounds):
        log(f"round {index + 1} of {rounds}: kernel floor and the fsync cost of a Create")
        floors.append(kernel_floor.run(str(workspace), iterations=iterations, warmup=20))
        for label, socket_path, state_dir in sides if index % 2 == 0 else sides[::-1]:
            log(f"round {index + 1} of {rounds}: {label} on {socket_path}")
            found[label].append(
                protocol_part(
                    socket_path, state_dir, workspace / f"round-{label}.json",
                    "latency,bursts,awake", iterations,
                )
            )  # fmt: skip
    return merge_floors(floors), {label: merge_rounds(each) for label, each in found.items()}


def crashed_startup(daemon: Daemon, root: Path, prefix: str, count: int) -> dict:
    """Start-up on `count` volumes left by a crash, in seconds from the spawn: until the
    first answer (Plugin.Activate: `activate_s`, what the target reads), until the answer
    to a Get of one of them (`get_s`), and until the daemon is down to its main thread,
    whatever it did in the background ended (`recovered_s`). Leaves the daemon stopped.

    The same keys as bench/startup.py's `run(count)`, which measures the same on volumes
    of its own, in rounds, and tells the end of the recovery by the flock on the state
    root; here the scale part's volumes are reused, so it costs no second 10,000.
    """
    mark_crashed(root, prefix)
    activate = daemon.start()
    name = f"{prefix}-scale-{count - 1:05d}"
    status, body = protocol.call_once(
        str(daemon.socket_path), protocol.encode("VolumeDriver.Get", {"Name": name}, close=True)
    )
    get = time.perf_counter() - daemon.spawned
    problem = protocol.error_of(status, body)
    recovered = None
    deadline = time.monotonic() + BACKGROUND_TIMEOUT_S
    while time.monotonic() < deadline:
        figures = protocol.process_memory(daemon.pid)
        if figures is None or figures.get("threads", 1) <= 1:
            recovered = round(time.perf_counter() - daemon.spawned, 3)
            break
        time.sleep(0.05)
    daemon.stop()
    return {
        "what": "seconds from spawning the daemon, with volumes left by a crash",
        "measured_by": "bench/run_all.py crashed_startup()",
        "volumes": count,
        "activate_s": round(activate, 3),
        "get_s": round(get, 3),
        "get_error": problem,
        "recovered_s": recovered,
    }


class GoInstance:
    """A second instance of the implementation on --compare (the Go original) for the
    dockerd part, where a dockerd finds a legacy plugin: /run/docker/plugins/NAME.sock.

    Its binary is the one serving on --compare (/proc/PID/exe), started with the Go
    original's flags (-root, -socket) and a state root of its own; stopped by its PID."""

    def __init__(self, binary: str, name: str, root: Path, log_path: Path) -> None:
        self.binary, self.name, self.root, self.log_path = binary, name, root, log_path
        self.socket_path = Path("/run/docker/plugins") / f"{name}.sock"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.root.mkdir(parents=True)
        with open(self.log_path, "ab") as log_file:
            self.process = subprocess.Popen(
                [self.binary, "-root", f"{self.root}/", "-socket", str(self.socket_path)],
                stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file,
            )  # fmt: skip
        deadline = time.monotonic() + READY_TIMEOUT_S
        raw = protocol.encode("Plugin.Activate", close=True)
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"{self.binary} exited with {self.process.returncode}; see {self.log_path}"
                )
            try:
                if protocol.call_once(str(self.socket_path), raw)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.01)
        raise RuntimeError(f"{self.binary} did not answer on {self.socket_path}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()


def compared_binary(socket_path: str) -> str | None:
    """The executable of the process serving on `socket_path` (SO_PEERCRED)."""
    pid = protocol.peer_pid(socket_path)
    if pid is None:
        return None
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None


def docker_part(
    arguments: argparse.Namespace, workspace: Path, name: str, daemons: list[Daemon]
) -> dict:
    """bench/docker_bench.py with our daemon (and, with --compare, a Go instance of its
    own) serving where the dockerd finds plugins."""
    if arguments.no_docker:
        return {"skipped": "--no-docker"}
    if not arguments.private_dockerd and docker_bench.dockerd_version() is None:
        log("no dockerd answers `docker info`: skipping the docker-level part")
        return {
            "skipped": "no dockerd answers `docker info`; start one, or pass --private-dockerd "
            "(make bench BENCH_ARGS=--private-dockerd) to let the benchmark run its own"
        }
    private = None
    if arguments.private_dockerd:
        log("starting a private dockerd (--private-dockerd)")
        private = docker_bench.PrivateDockerd(workspace / "dockerd")
    docker_name = f"{name}-d"
    docker_daemon = Daemon(
        docker_name,
        workspace / "docker-root",
        Path("/run/docker/plugins") / f"{docker_name}.sock",
        workspace / "docker-daemon.log",
    )
    daemons.append(docker_daemon)
    go = None
    if arguments.compare:
        binary = compared_binary(arguments.compare)
        if binary is None:
            log(f"cannot tell the executable serving on {arguments.compare}: no Go volume")
        else:
            go = GoInstance(binary, f"{name}-go", workspace / "go-root", workspace / "go.log")
    try:
        if private is not None:
            private.start()
        docker_daemon.start()
        if go is not None:
            log(f"a second instance of {go.binary} on {go.socket_path}")
            go.start()
        log(f"docker-level part, driver {docker_name}" + (f" and {go.name}" if go else ""))
        results = docker_bench.run(
            docker_name,
            compare_driver=None if go is None else go.name,
            rounds=5 if arguments.quick else 20,
            parent=str(workspace),
        )
        if private is not None:
            results["dockerd_started_by_the_benchmark"] = True
        return results
    except RuntimeError as error:
        return {"skipped": f"the docker-level part failed: {error}"}
    finally:
        if go is not None:
            go.stop()
        docker_daemon.stop()
        if private is not None:
            private.stop()


def run(arguments: argparse.Namespace, workspace: Path, daemons: list[Daemon]) -> dict:
    started = time.perf_counter()
    name = f"dot-bench-{secrets.token_hex(4)}"
    root = workspace / "root"
    socket_path = workspace / "p.sock"
    results: dict = {
        "generated": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(workspace),
        "reference_go": {
            "note": "the Go original v0.1.2 as issue 16 quotes it; used only without --compare",
            "p50_us": GO_REFERENCE_P50_US,
            "bursts_ms": GO_REFERENCE_BURSTS_MS,
        },
    }
    iterations = 40 if arguments.quick else 300
    rounds = 3 if arguments.quick else 5
    scale = 1000 if arguments.quick else 10_000

    log("diff and export of a large upper against a find walk")
    results["changes_walk"] = changes_walk.run(10_000 if arguments.quick else 100_000)
    log("size limits: ext4 images on loop devices, sized tmpfs")
    results["sized"] = sized_part(workspace, arguments.quick)
    log("layers: snapshot and clone of a volume with many changed files")
    results["layers"] = layers.run(str(workspace), arguments.quick)
    log("peak memory of diff --json, ls --json and inspect over a large upper")
    results["diff_memory"] = diff_memory.run(20_000 if arguments.quick else 200_000)

    daemon = Daemon(name, root, socket_path, workspace / "daemon.log")
    daemons.append(daemon)
    log("start-up on an empty root, 3 times")
    empty = []
    for _ in range(3):
        empty.append(daemon.start())
        daemon.stop()
    daemon.start()

    sides: list[tuple[str, str, Path | None]] = [("ours", str(socket_path), root)]
    compare_state = Path(arguments.compare_state_dir) if arguments.compare_state_dir else None
    if arguments.compare:
        sides.append(("go", arguments.compare, compare_state))
    # The kernel floor and the fsync cost run in the workspace: the state root's filesystem.
    results["kernel_floor"], merged = protocol_rounds(sides, workspace, rounds, iterations)

    log(f"ours: CPU per request, memory over 20,000 requests, {scale} volumes")
    rest = protocol_part(
        str(socket_path), root, workspace / "rest-ours.json", "cpu,memory,scale", iterations,
        ("--scale", str(scale), "--keep-scale-volumes"),
    )  # fmt: skip
    proto = {**merged["ours"], **{key: rest[key] for key in ("cpu", "memory", "scale")}}
    proto["errors"] = (merged["ours"]["errors"] + rest["errors"])[:20]
    results["protocol"] = proto
    stop_10k = daemon.stop()
    if arguments.compare:
        log(f"{arguments.compare}: CPU per request, memory over 20,000 requests (--compare)")
        parts, extra = "cpu,memory", ()
        if compare_state is not None:
            parts, extra = "cpu,memory,scale", ("--scale", str(scale))
        go_rest = protocol_part(
            arguments.compare, compare_state, workspace / "rest-go.json", parts, iterations, extra
        )
        go_proto = {**merged["go"], **{key: go_rest[key] for key in go_rest if key != "errors"}}
        go_proto["errors"] = (merged["go"]["errors"] + go_rest["errors"])[:20]
        results["compared"] = {"socket": arguments.compare, "protocol": go_proto}

    log(f"start-up with {scale} volumes, 3 times, then with them left by a crash")
    clean = []
    rss_idle_10k = None
    for attempt in range(3):
        clean.append(daemon.start())
        if attempt == 0:
            rss_idle_10k = settled_memory(daemon.pid)
        daemon.stop()
    results["startup"] = {
        "what": "seconds from spawning the daemon until it answers Plugin.Activate",
        "scale_volumes": scale,
        "empty_s": _median(empty),
        "clean_10k_s": _median(clean),
        "crashed": crashed_startup(daemon, root, proto["scale"]["prefix"], scale),
        "stop_with_10k_s": round(stop_10k, 3),
        "rss_idle_10k": rss_idle_10k,
    }
    shutil.rmtree(root, ignore_errors=True)

    results["tmpfs"] = tmpfs_part(workspace, name, iterations, daemons)
    results["docker"] = docker_part(arguments, workspace, name, daemons)
    results["duration_s"] = round(time.perf_counter() - started, 1)
    results["machine"]["load_average_at_end"] = [round(value, 2) for value in os.getloadavg()]
    results["targets"] = targets(results)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer iterations, 1,000 volumes")
    parser.add_argument("--no-docker", action="store_true", help="skip the docker-level part")
    parser.add_argument(
        "--private-dockerd",
        action="store_true",
        help="start a dockerd of the benchmark's own for the docker-level part (beside any "
        "other one; stopped at the end) instead of using the one `docker info` reaches",
    )
    parser.add_argument(
        "--json", type=Path, default=BENCH / "results" / "latest.json", help="results file"
    )
    parser.add_argument(
        "--compare",
        metavar="SOCKET",
        help="also measure another implementation already serving on SOCKET (the Go original)",
    )
    parser.add_argument(
        "--compare-state-dir",
        metavar="DIR",
        help="its state root: adds the on-disk checks and the scale part for it",
    )
    arguments = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("make bench needs root: the daemon mounts overlays (run it as root)", file=sys.stderr)
        return 1

    def interrupted(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupted)
    workspace = Path(tempfile.mkdtemp(prefix="dot-bench-", dir=SCRATCH_PARENT))
    daemons: list[Daemon] = []
    try:
        results = run(arguments, workspace, daemons)
    finally:
        for daemon in daemons:
            daemon.stop()
        left = kernel_floor.unmount_under(workspace)
        if left:
            log(f"unmounted {left} leftover mount(s) under {workspace}")
        shutil.rmtree(workspace, ignore_errors=True)
    arguments.json.parent.mkdir(parents=True, exist_ok=True)
    arguments.json.write_text(json.dumps(results, indent=2) + "\n")
    print(report(results))
    print(f"\nresults: {arguments.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
