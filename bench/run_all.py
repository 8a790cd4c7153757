#!/usr/bin/env python3
"""`make bench`: every benchmark against a temporary daemon of ours.

    python3 bench/run_all.py [--quick] [--no-docker] [--private-dockerd] [--json FILE]
                             [--compare SOCKET [--compare-state-dir DIR]]

Writes bench/results/latest.json and prints a table. Needs root. The daemon runs under a
private driver name (dot-bench-<random>) with a temporary state root and socket under
/var/tmp (the same filesystem as the default /var/lib), and is stopped by its PID; what
is left mounted under the temporary folder is unmounted and the folder removed, also on
failure or Ctrl-C. The docker-level part uses the dockerd that `docker info` reaches
(never starting or stopping one) and skips itself with a message when there is none.

With --private-dockerd it starts a dockerd of its own instead (own data root, exec root,
socket and pidfile under the temporary folder) and stops it by its PID at the end.

With --compare, bench/protocol.py also measures another implementation of the protocol
already serving on SOCKET (the Go original, say), right after ours in the same run; its
figures then replace the issue's reference values in the targets and the table.

The figures never fail anything: the exit status is 0 once the benchmarks ran, whatever
they show. Targets and the Go original's reference figures are printed beside them.
"""

from __future__ import annotations

import argparse
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
import docker_bench  # noqa: E402
import kernel_floor  # noqa: E402
import protocol  # noqa: E402
import sized  # noqa: E402

# The Go original (docker-on-top v0.1.2), measured on this kind of machine with the same
# kind of client, as quoted in the benchmark issue: the comparison when no --compare
# socket measures it in the same run.
GO_REFERENCE = {
    "Mount_p50_us": 631,
    "Unmount_p50_us": 1064,
    "Create_p50_us": 399,
    "Remove_p50_us": 657,
    "round_trip_p50_us": 151,
    "burst_one_volume_mount_ms": 23,
    "burst_one_volume_unmount_ms": 24,
    "rss_idle_mb": 6,
    "rss_after_load_mb": 13,
    "floor_mount_us": 195,
    "floor_unmount_us": 660,
}
MB = 1_000_000 / (1 << 20)  # one MB in MiB
SCRATCH_PARENT = "/var/tmp"
TMPFS_PARENT = "/dev/shm"
READY_TIMEOUT_S = 60.0


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# --- our daemon ---------------------------------------------------------------------------


class Daemon:
    """One daemon process of ours, started and stopped by this script only."""

    def __init__(self, name: str, root: Path, socket_path: Path, log_path: Path) -> None:
        self.name, self.root, self.socket_path, self.log_path = name, root, socket_path, log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> float:
        """Start it; seconds from spawn until it answers Plugin.Activate."""
        environment = dict(os.environ, PYTHONPATH=str(REPO))
        for key in list(environment):
            if key.startswith("DOCKER_ON_TOP_"):
                del environment[key]
        with open(self.log_path, "ab") as log_file:
            started = time.perf_counter()
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
    """The Go original's figures: measured in this run with --compare, else the issue's."""
    compared = (results.get("compared") or {}).get("protocol")
    if not compared:
        return GO_REFERENCE
    keep = compared["latency"]["keepalive"]["endpoints"]
    bursts = compared["bursts"]["one_volume"]
    memory = compared["memory"]
    return {
        **GO_REFERENCE,
        "Mount_p50_us": keep["Mount"]["p50"],
        "Unmount_p50_us": keep["Unmount"]["p50"],
        "Create_p50_us": keep["Create"]["p50"],
        "Remove_p50_us": keep["Remove"]["p50"],
        "round_trip_p50_us": keep["Capabilities"]["p50"],
        "burst_one_volume_mount_ms": bursts["mount_ms"]["median"],
        "burst_one_volume_unmount_ms": bursts["unmount_ms"]["median"],
        "rss_idle_mb": round(((memory.get("idle") or {}).get("vmrss_mib") or 0) / MB, 1),
        "rss_after_load_mb": round(
            ((memory.get("after_20k_requests") or {}).get("vmrss_mib") or 0) / MB, 1
        ),
    }


def targets(results: dict) -> list[dict]:
    """Each target of the issue: what was measured, the limit, met or not."""
    go = go_figures(results)
    checks: list[tuple[str, float | None, float, str]] = []
    proto = results.get("protocol") or {}
    if proto:
        keep = proto["latency"]["keepalive"]["endpoints"]
        one = proto["bursts"]["one_volume"]
        checks += [
            ("Mount p50 (keep-alive) <= 0.8 x Go", keep["Mount"]["p50"],
             0.8 * go["Mount_p50_us"], "µs"),
            ("Unmount p50 (keep-alive) <= 0.8 x Go", keep["Unmount"]["p50"],
             0.8 * go["Unmount_p50_us"], "µs"),
            ("50 Mounts of one volume at once <= Go", one["mount_ms"]["median"],
             go["burst_one_volume_mount_ms"], "ms"),
            ("50 Unmounts of one volume at once <= Go", one["unmount_ms"]["median"],
             go["burst_one_volume_unmount_ms"], "ms"),
        ]  # fmt: skip
        scale = proto.get("scale")
        if scale:
            name = f"Get p50 with {scale['volumes']} volumes < 300 µs"
            checks.append((name, scale["Get"]["p50"], 300, "µs"))
        memory = proto["memory"]
        idle = (memory.get("idle") or {}).get("vmrss_mib")
        growth = memory.get("growth_second_10k_mib")
        checks.append(("RSS idle < 25 MB", idle / MB if idle else None, 25, "MB"))
        name = "RSS growth, 10,000 requests after warm-up (<= 0.5 MB)"
        checks.append((name, None if growth is None else growth / MB, 0.5, "MB"))
    startup = results.get("startup") or {}
    if startup:
        name = f"start-up with {startup['scale_volumes']} volumes < 2 s"
        checks.append((name, startup["clean_10k_s"]["median"], 2.0, "s"))
    ratio = (results.get("docker") or {}).get("ratio_plugin_to_local_overlay")
    checks.append(("docker run: plugin / local overlay <= 1.02", ratio, 1.02, "x"))
    found = []
    for name, measured, limit, unit in checks:
        entry = {"name": name, "limit": round(limit, 2), "unit": unit, "measured": measured}
        if measured is None:
            entry["met"] = None
        else:
            entry["measured"] = round(measured, 3 if unit == "x" else 2)
            entry["met"] = measured <= limit
            entry["ratio_to_limit"] = round(measured / limit, 3)
        found.append(entry)
    if proto:
        exact = all(burst["exact"] for burst in proto["bursts"].values())
        found.append(
            {"name": "bursts leave the exact final state", "measured": exact, "met": exact}
        )
    return found


# --- the report ------------------------------------------------------------------------


def _row(label: str, figures: dict, width: int = 26) -> str:
    return f"{label:<{width}}{figures['p50']:>8.0f} {figures['p90']:>7.0f} {figures['p99']:>7.0f}"


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
            f"measured in this run on {compared['socket']} (--compare)"
            if compared
            else "the issue's reference values for the Go original (not measured in this run)"
        ),
    ]
    proto = results.get("protocol")
    if proto:
        latency = proto["latency"]
        reference = {
            "Mount": go["Mount_p50_us"], "Unmount": go["Unmount_p50_us"],
            "Create": go["Create_p50_us"], "Remove": go["Remove_p50_us"],
            "Capabilities": go["round_trip_p50_us"],
        }  # fmt: skip
        if compared:
            measured = compared["protocol"]["latency"]["keepalive"]["endpoints"]
            reference = {endpoint: round(figures["p50"]) for endpoint, figures in measured.items()}
        lines += [
            "",
            "Latency, µs       keep-alive: p50     p90     p99 |  new conn: p50     p90     p99 |"
            "  Go p50",
        ]
        for endpoint in protocol.ENDPOINTS:
            keep = latency["keepalive"]["endpoints"][endpoint]
            new = latency["newconn"]["endpoints"][endpoint]
            lines.append(
                f"{_row('  ' + endpoint, keep)} |{_row('', new, 7)} |"
                f"{reference.get(endpoint, ''):>8}"
            )
    floor = results.get("kernel_floor")
    if floor:
        lines += [
            "",
            "Kernel floor, one process, no protocol, µs   p50     p90     p99 | Go-era floor",
        ]
        for key, label, then in (
            ("mount_bare", "mount: mkdir x2 + mount(2)", go["floor_mount_us"]),
            ("unmount_bare", "unmount: umount2(2) + rmdir x3", go["floor_unmount_us"]),
            ("mount_state", "mount + flock + record files", ""),
            ("unmount_state", "unmount + flock + record files", ""),
        ):
            lines.append(f"{_row('  ' + label, floor[key], 40)} |{then:>8}")
        if proto:
            keep = proto["latency"]["keepalive"]["endpoints"]
            mount_floor, unmount_floor = (
                (floor["mount_bare"]["p50"], floor["unmount_bare"]["p50"])
                if compared
                else (go["floor_mount_us"], go["floor_unmount_us"])
            )
            lines.append(
                "  daemon p50 above the bare floor: Mount "
                f"{keep['Mount']['p50'] - floor['mount_bare']['p50']:.0f} µs, Unmount "
                f"{keep['Unmount']['p50'] - floor['unmount_bare']['p50']:.0f} µs (Go"
                f"{' in this run' if compared else ', from the reference figures'}: "
                f"{go['Mount_p50_us'] - mount_floor:.0f} / "
                f"{go['Unmount_p50_us'] - unmount_floor:.0f} µs)"
            )
    cpu = (proto or {}).get("cpu") or {}
    if "Mount+Unmount" in cpu:
        floor_cpu = (floor or {}).get("cpu_mean_us") or {}
        lines += [
            "",
            "Daemon CPU time per request (all threads, user + system; waiting for a core does "
            "not count), µs:",
            f"  Capabilities {cpu['Capabilities']['cpu_us']:.0f}, Get {cpu['Get']['cpu_us']:.0f}, "
            f"Mount + Unmount {cpu['Mount+Unmount']['cpu_us']:.0f}, "
            f"Create + Remove {cpu['Create+Remove']['cpu_us']:.0f}",
        ]
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
            lines.append(
                f"Burst, {label:<18} mount {burst['mount_ms']['median']:6.1f} ms, unmount "
                f"{burst['unmount_ms']['median']:6.1f} ms (median of {burst['rounds']}); "
                f"final state exact: {'yes' if burst['exact'] else 'NO'}"
            )
        go_bursts = f"1 volume x 50 IDs, mount {go['burst_one_volume_mount_ms']} ms, unmount "
        go_bursts += f"{go['burst_one_volume_unmount_ms']} ms"
        if compared:
            many = compared["protocol"]["bursts"]["many_volumes"]
            go_bursts += f"; 50 volumes, mount {many['mount_ms']['median']} ms, unmount "
            go_bursts += f"{many['unmount_ms']['median']} ms"
        lines.append(f"  (Go: {go_bursts})")
        memory = proto["memory"]
        lines.append("")
        for key, label in (
            ("idle", "idle"),
            ("after_bursts", "after the bursts"),
            ("after_10k_requests", "after 10,000 more requests"),
            ("after_20k_requests", "after 20,000 more requests"),
        ):
            if memory.get(key):
                lines.append(f"RSS {label:<30}{memory[key]['vmrss_mib']:6.1f} MiB")
        rss_10k = (results.get("startup") or {}).get("rss_idle_10k")
        if rss_10k:
            lines.append(
                f"RSS {'idle with 10,000 volumes':<30}{rss_10k['vmrss_mib']:6.1f} MiB "
                f"(peak {rss_10k['vmhwm_mib']:.1f} MiB)"
            )
        lines.append(
            f"  (Go: {go['rss_idle_mb']} MB idle, {go['rss_after_load_mb']} MB after load)"
        )
        scale = proto.get("scale")
        if scale:
            lines += ["", f"With {scale['volumes']} volumes, µs      p50     p90     p99"]
            for endpoint in ("Get", "Mount", "Unmount", "List"):
                lines.append(_row(f"  {endpoint}", scale[endpoint]))
    startup = results.get("startup")
    if startup:
        lines += [
            "",
            "Start-up until the first answer: empty root "
            f"{startup['empty_s']['median']:.2f} s; {startup['scale_volumes']} volumes "
            f"{startup['clean_10k_s']['median']:.2f} s; {startup['scale_volumes']} volumes "
            f"left by a crash {startup['crashed_10k_s']:.2f} s",
        ]
    tmpfs = results.get("tmpfs") or {}
    if "latency" in tmpfs:
        keep = tmpfs["latency"]["keepalive"]["endpoints"]
        new = tmpfs["latency"]["newconn"]["endpoints"]
        floor = tmpfs["kernel_floor"]
        lines += [
            "",
            f"State root on tmpfs ({TMPFS_PARENT}, no disk), p50 µs: "
            f"Mount {keep['Mount']['p50']:.0f} (floor {floor['mount_bare']['p50']:.0f}, "
            f"with records {floor['mount_state']['p50']:.0f}), "
            f"Unmount {keep['Unmount']['p50']:.0f} (floor {floor['unmount_bare']['p50']:.0f}, "
            f"with records {floor['unmount_state']['p50']:.0f})",
            f"  Create {keep['Create']['p50']:.0f}, Remove {keep['Remove']['p50']:.0f}, "
            f"Get {keep['Get']['p50']:.0f}, Capabilities {keep['Capabilities']['p50']:.0f}; "
            f"new connection: Mount {new['Mount']['p50']:.0f}, "
            f"Unmount {new['Unmount']['p50']:.0f}, Capabilities {new['Capabilities']['p50']:.0f}",
        ]
        tmpfs_cpu = tmpfs.get("cpu") or {}
        if "Mount+Unmount" in tmpfs_cpu:
            floor_cpu = floor["cpu_mean_us"]
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
    lines += ["", "Targets"]
    for target in results.get("targets", []):
        verdict = {True: "met", False: "MISSED", None: "n/a"}[target["met"]]
        measured = target["measured"]
        if isinstance(measured, bool):
            shown = "yes" if measured else "no"
        elif measured is None:
            shown = "not measured"
        else:
            shown = f"{measured:g} {target['unit']} (limit {target['limit']:g})"
            if target["met"] is False:
                shown += f", {(target['ratio_to_limit'] - 1) * 100:.1f} % over"
        lines.append(f"  {verdict:<7}{target['name']:<50} {shown}")
    if proto and proto.get("errors"):
        lines += ["", "Unexpected failures in the protocol part (first ones):"]
        lines += [f"  {error}" for error in proto["errors"]]
    walk = results.get("changes_walk")
    if walk:
        lines += ["", changes_walk.report(walk)]
    limits = results.get("sized") or {}
    if "skipped" in limits:
        lines += ["", f"Size limits: skipped ({limits['skipped']})"]
    elif limits:
        lines += ["", sized.report(limits)]
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


def compare(arguments: argparse.Namespace, workspace: Path, iterations: int, scale: int) -> dict:
    """bench/protocol.py against the other implementation on --compare, as for ours."""
    log(f"the same protocol benchmark against {arguments.compare} (--compare)")
    output = workspace / "compared.json"
    command = [
        sys.executable, str(BENCH / "protocol.py"), "--socket", arguments.compare,
        "--json", str(output), "--quiet", "--iterations", str(iterations),
    ]  # fmt: skip
    if arguments.compare_state_dir:
        command += ["--state-dir", arguments.compare_state_dir, "--scale", str(scale)]
    else:
        command += ["--parts", "latency,cpu,bursts,memory"]
    completed = subprocess.run(command, check=False)
    if completed.returncode != 0 or not output.exists():
        raise RuntimeError(f"bench/protocol.py on {arguments.compare} failed")
    return {"socket": arguments.compare, "protocol": json.loads(output.read_text())}


def run(arguments: argparse.Namespace, workspace: Path, daemons: list[Daemon]) -> dict:
    started = time.perf_counter()
    name = f"dot-bench-{secrets.token_hex(4)}"
    root = workspace / "root"
    socket_path = workspace / "p.sock"
    results: dict = {
        "generated": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine(workspace),
        "reference_go": {
            "note": "the Go original v0.1.2 measured on this kind of machine with the same kind "
            "of client, as quoted in the benchmark issue; not measured in this run",
            **GO_REFERENCE,
        },
    }
    iterations = 60 if arguments.quick else 300
    scale = 1000 if arguments.quick else 10_000

    log("kernel floor")
    results["kernel_floor"] = kernel_floor.run(str(workspace), iterations=iterations, warmup=20)
    log("diff and export of a large upper against a find walk")
    results["changes_walk"] = changes_walk.run(10_000 if arguments.quick else 100_000)
    log("size limits: ext4 images on loop devices, sized tmpfs")
    results["sized"] = sized_part(workspace, arguments.quick)

    daemon = Daemon(name, root, socket_path, workspace / "daemon.log")
    daemons.append(daemon)
    log("start-up on an empty root, 3 times")
    empty = []
    for _ in range(3):
        empty.append(daemon.start())
        daemon.stop()
    daemon.start()

    log(f"protocol benchmark: bench/protocol.py --socket {socket_path} --state-dir {root}")
    protocol_json = workspace / "protocol.json"
    completed = subprocess.run(
        [
            sys.executable, str(BENCH / "protocol.py"), "--socket", str(socket_path),
            "--state-dir", str(root), "--json", str(protocol_json), "--quiet",
            "--iterations", str(iterations), "--scale", str(scale), "--keep-scale-volumes",
        ],
        check=False,
    )  # fmt: skip
    if completed.returncode != 0 or not protocol_json.exists():
        raise RuntimeError(f"bench/protocol.py failed with exit status {completed.returncode}")
    proto = json.loads(protocol_json.read_text())
    results["protocol"] = proto
    stop_10k = daemon.stop()
    if arguments.compare:
        results["compared"] = compare(arguments, workspace, iterations, scale)

    log(f"start-up with {scale} volumes, 3 times")
    clean = []
    for attempt in range(3):
        clean.append(daemon.start())
        if attempt == 0:
            rss_idle_10k = settled_memory(daemon.pid)
        daemon.stop()
    mark_crashed(root, proto["scale"]["prefix"])
    crashed = daemon.start()
    daemon.stop()
    results["startup"] = {
        "what": "seconds from spawning the daemon until it answers Plugin.Activate",
        "scale_volumes": scale,
        "empty_s": _median(empty),
        "clean_10k_s": _median(clean),
        "crashed_10k_s": round(crashed, 3),
        "stop_with_10k_s": round(stop_10k, 3),
        "rss_idle_10k": rss_idle_10k,
    }
    shutil.rmtree(root, ignore_errors=True)

    results["tmpfs"] = tmpfs_part(workspace, name, iterations, daemons)

    if arguments.no_docker:
        results["docker"] = {"skipped": "--no-docker"}
    elif not arguments.private_dockerd and docker_bench.dockerd_version() is None:
        results["docker"] = {
            "skipped": "no dockerd answers `docker info`; start one, or pass --private-dockerd "
            "(make bench BENCH_ARGS=--private-dockerd) to let the benchmark run its own"
        }
        log("no dockerd answers `docker info`: skipping the docker-level part")
    else:
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
        try:
            if private is not None:
                private.start()
            docker_daemon.start()
            log(f"docker-level part, driver {docker_name}")
            results["docker"] = docker_bench.run(
                docker_name, rounds=5 if arguments.quick else 20, parent=str(workspace)
            )
            if private is not None:
                results["docker"]["dockerd_started_by_the_benchmark"] = True
        except RuntimeError as error:
            results["docker"] = {"skipped": f"the docker-level part failed: {error}"}
        finally:
            docker_daemon.stop()
            if private is not None:
                private.stop()
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
