#!/usr/bin/env python3
"""Under dockerd: what a volume plugin adds to `docker run`, against Docker's own mounts.

    python3 bench/docker_bench.py --driver NAME [--compare-driver GO] [--rounds 20]
                                  [--json FILE]

Times `docker run --rm --network none -v SRC:/d IMAGE true` with three or four kinds of
SRC, in interleaved rounds (the order rotates every round, so drift hits all kinds alike):

  plugin         a volume of the plugin serving as driver NAME (-o base=BASE)
  go_plugin      with --compare-driver GO, a volume of that other plugin (the Go
                 original), already serving where the dockerd finds it
  local_overlay  a `local`-driver volume that mounts the same overlay itself
                 (-o type=overlay -o device=overlay -o o=lowerdir=BASE,upperdir=..,workdir=..)
  bind           a bind mount of BASE

It uses the dockerd that `docker info` reaches and never starts or stops it; without one
it says so and skips, unless asked with --private-dockerd to start a dockerd of its own
(own data root, exec root, socket and pidfile in a scratch folder, beside any other
dockerd), which it stops by its PID at the end. The image is built with `docker import`
from Debian's static busybox (no pull), under a private tag. Everything it creates
(containers, volumes, the image, its scratch folder) is removed at the end, and nothing
else is touched.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import kernel_floor

BUSYBOX = "/bin/busybox"
KINDS = ("plugin", "go_plugin", "local_overlay", "bind")
# The dockerd to talk to: None for the default one (DOCKER_HOST or /var/run/docker.sock).
docker_host: str | None = None


def log(message: str) -> None:
    print(f"[docker] {message}", file=sys.stderr, flush=True)


def docker(*args: str, timeout: float = 120, check: bool = True, stdin: bytes | None = None) -> str:
    environment = None
    if docker_host is not None:
        environment = dict(os.environ, DOCKER_HOST=docker_host)
    completed = subprocess.run(
        ["docker", *args],
        env=environment,
        input=stdin,
        capture_output=True,
        timeout=timeout,
        check=False,
    )
    if check and completed.returncode != 0:
        raise RuntimeError(
            f"docker {' '.join(args)} failed: {completed.stderr.decode(errors='replace').strip()}"
        )
    return completed.stdout.decode(errors="replace").strip()


def dockerd_version() -> str | None:
    """The server version of the dockerd `docker` reaches, or None when none answers."""
    if shutil.which("docker") is None:
        return None
    try:
        version = docker("info", "--format", "{{.ServerVersion}}", timeout=20)
    except (RuntimeError, subprocess.TimeoutExpired):
        return None
    return version or None


class PrivateDockerd:
    """A dockerd of our own (opt-in), beside any other: every path of it is in `folder`."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.socket = folder / "docker.sock"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60) -> None:
        global docker_host
        self.folder.mkdir(parents=True, exist_ok=True)
        config = self.folder / "daemon.json"
        config.write_text("{}\n")
        with open(self.folder / "dockerd.log", "ab") as log_file:
            self.process = subprocess.Popen(
                [
                    "dockerd", "--config-file", str(config),
                    "--data-root", str(self.folder / "data"),
                    "--exec-root", str(self.folder / "exec"),
                    "--pidfile", str(self.folder / "dockerd.pid"),
                    "--host", f"unix://{self.socket}",
                    "--iptables=false", "--ip6tables=false", "--bridge=none",
                ],
                stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file,
            )  # fmt: skip
        docker_host = f"unix://{self.socket}"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"dockerd exited with {self.process.returncode}: "
                    + (self.folder / "dockerd.log").read_text(errors="replace")[-1500:]
                )
            if dockerd_version() is not None:
                return
            time.sleep(0.2)
        raise RuntimeError(f"the private dockerd did not answer within {timeout} s")

    def stop(self) -> None:
        global docker_host
        docker_host = None
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def build_image(workspace: Path, tag: str) -> None:
    """A busybox image from the host's static busybox: /bin/busybox and its applet links."""
    rootfs = workspace / "rootfs"
    (rootfs / "bin").mkdir(parents=True)
    for folder in ("etc", "proc", "sys", "dev", "tmp"):
        (rootfs / folder).mkdir()
    shutil.copy2(BUSYBOX, rootfs / "bin" / "busybox")
    applets = subprocess.run(
        [BUSYBOX, "--list"], capture_output=True, text=True, check=True
    ).stdout.split()
    for applet in applets:
        if applet != "busybox":
            (rootfs / "bin" / applet).symlink_to("busybox")
    archive = workspace / "rootfs.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(rootfs, arcname=".")
    docker("import", str(archive), tag, timeout=120)
    archive.unlink()
    shutil.rmtree(rootfs)


def _run_container(name: str, mount: str, image: str, command: list[str]) -> float:
    started = time.perf_counter()
    docker("run", "--rm", "--name", name, "--network", "none", "-v", mount, image, *command)
    return time.perf_counter() - started


def run(
    driver: str,
    *,
    compare_driver: str | None = None,
    rounds: int = 20,
    warmup: int = 2,
    parent: str | None = None,
) -> dict[str, object]:
    version = dockerd_version()
    if version is None:
        return {"skipped": "no dockerd answers `docker info`; the docker-level part needs one"}
    tag = secrets.token_hex(4)
    prefix = f"dot-bench-{tag}"
    image = f"dot-bench-busybox:{tag}"
    workspace = Path(tempfile.mkdtemp(prefix="dot-bench-docker-", dir=parent))
    base = workspace / "base"
    base.mkdir()
    for index in range(8):
        (base / f"file{index}.txt").write_text(f"base file {index}\n")
    upper, work = workspace / "local" / "upper", workspace / "local" / "work"
    upper.mkdir(parents=True)
    work.mkdir()
    volumes: list[str] = []
    image_made = False
    try:
        log(f"dockerd {version}; building {image} from {BUSYBOX}")
        build_image(workspace, image)
        image_made = True
        plugin_volume, local_volume = f"{prefix}-plugin", f"{prefix}-local"
        docker("volume", "create", "--driver", driver, "-o", f"base={base}", plugin_volume)
        volumes.append(plugin_volume)
        docker(
            "volume", "create", "--driver", "local",
            "-o", "type=overlay", "-o", "device=overlay",
            "-o", f"o=lowerdir={base},upperdir={upper},workdir={work}",
            local_volume,
        )  # fmt: skip
        volumes.append(local_volume)
        mounts = {
            "plugin": f"{plugin_volume}:/d",
            "local_overlay": f"{local_volume}:/d",
            "bind": f"{base}:/d",
        }
        if compare_driver is not None:
            go_volume = f"{prefix}-go"
            docker("volume", "create", "--driver", compare_driver, "-o", f"base={base}", go_volume)
            volumes.append(go_volume)
            mounts["go_plugin"] = f"{go_volume}:/d"
        kinds = tuple(kind for kind in KINDS if kind in mounts)
        # Each kind shows the base's files before anything is timed.
        for kind, mount in mounts.items():
            _run_container(f"{prefix}-check-{kind}", mount, image, ["test", "-f", "/d/file0.txt"])
        samples: dict[str, list[float]] = {kind: [] for kind in kinds}
        log(f"{rounds} interleaved rounds of {', '.join(kinds)} after {warmup} warm-up ones")
        for round_index in range(warmup + rounds):
            shift = round_index % len(kinds)
            for kind in kinds[shift:] + kinds[:shift]:
                seconds = _run_container(
                    f"{prefix}-{round_index}-{kind}", mounts[kind], image, ["true"]
                )
                if round_index >= warmup:
                    samples[kind].append(seconds)
        medians = {kind: statistics.median(values) for kind, values in samples.items()}
        paired = [
            plugin - local for plugin, local in zip(samples["plugin"], samples["local_overlay"])
        ]
        compared: dict[str, object] = {}
        if "go_plugin" in medians:
            compared = {
                "compare_driver": compare_driver,
                "ratio_plugin_to_go_plugin": round(medians["plugin"] / medians["go_plugin"], 4),
                "median_paired_difference_plugin_minus_go_ms": round(
                    statistics.median(
                        plugin - go for plugin, go in zip(samples["plugin"], samples["go_plugin"])
                    )
                    * 1000,
                    1,
                ),
            }
        return {
            "dockerd": version,
            "rounds": rounds,
            "warmup": warmup,
            "command": "docker run --rm --network none -v SRC:/d IMAGE true",
            "median_ms": {kind: round(value * 1000, 1) for kind, value in medians.items()},
            "min_ms": {kind: round(min(values) * 1000, 1) for kind, values in samples.items()},
            "all_ms": {
                kind: [round(value * 1000, 1) for value in values]
                for kind, values in samples.items()
            },
            "ratio_plugin_to_local_overlay": round(medians["plugin"] / medians["local_overlay"], 4),
            "ratio_plugin_to_bind": round(medians["plugin"] / medians["bind"], 4),
            "ratio_local_overlay_to_bind": round(medians["local_overlay"] / medians["bind"], 4),
            "median_paired_difference_plugin_minus_local_ms": round(
                statistics.median(paired) * 1000, 1
            ),
            **compared,
        }
    except (RuntimeError, subprocess.TimeoutExpired) as error:
        return {"skipped": f"the docker-level part failed: {error}"}
    finally:
        for container in docker(
            "ps", "-aq", "--filter", f"name={prefix}", check=False, timeout=60
        ).split():
            docker("rm", "-f", container, check=False, timeout=60)
        for volume in volumes:
            docker("volume", "rm", "-f", volume, check=False, timeout=60)
        if image_made:
            docker("rmi", "-f", image, check=False, timeout=60)
        kernel_floor.unmount_under(workspace)
        shutil.rmtree(workspace, ignore_errors=True)


def table(results: dict[str, object]) -> str:
    if "skipped" in results:
        return f"Under dockerd: skipped ({results['skipped']})"
    medians = results["median_ms"]
    lines = [
        f"Under dockerd {results['dockerd']}: `{results['command']}`, median of "
        f"{results['rounds']} interleaved rounds",
    ]
    for kind in KINDS:
        if kind in medians:
            lines.append(f"  {kind:<16}{medians[kind]:8.1f} ms")
    lines.append(
        f"  plugin / local overlay {results['ratio_plugin_to_local_overlay']:.3f}"
        f"   plugin / bind {results['ratio_plugin_to_bind']:.3f}"
        "   paired difference plugin - local "
        f"{results['median_paired_difference_plugin_minus_local_ms']} ms"
    )
    if "ratio_plugin_to_go_plugin" in results:
        lines.append(
            f"  plugin / Go original's plugin {results['ratio_plugin_to_go_plugin']:.3f}"
            "   paired difference plugin - Go "
            f"{results['median_paired_difference_plugin_minus_go_ms']} ms"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--driver", required=True, help="driver name the plugin serves as")
    parser.add_argument(
        "--compare-driver",
        metavar="GO",
        help="also time a volume of this other plugin (the Go original), already serving",
    )
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", type=Path, help="write the results to this file")
    parser.add_argument(
        "--private-dockerd",
        action="store_true",
        help="start a dockerd of our own for the run (and stop it after)",
    )
    arguments = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("docker_bench.py needs root", file=sys.stderr)
        return 1
    private = None
    if arguments.private_dockerd:
        private = PrivateDockerd(
            Path(tempfile.mkdtemp(prefix="dot-bench-dockerd-", dir="/var/tmp"))
        )
    try:
        if private is not None:
            private.start()
        results = run(
            arguments.driver,
            compare_driver=arguments.compare_driver,
            rounds=arguments.rounds,
            warmup=arguments.warmup,
        )
    finally:
        if private is not None:
            private.stop()
            kernel_floor.unmount_under(private.folder)
            shutil.rmtree(private.folder, ignore_errors=True)
    if arguments.json:
        arguments.json.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
