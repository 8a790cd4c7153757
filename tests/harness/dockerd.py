"""The end-to-end tests' own dockerd, beside any other on the host (see `Dockerd`)."""

from __future__ import annotations

import contextlib
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from .commands import CommandError, sh, stop_pid, tail, unmount_all_under


def docker_answers(host):
    """True when the dockerd at `host` (a DOCKER_HOST address) answers `docker info`."""
    try:
        return (
            sh(
                ["docker", "--host", host, "info", "--format", "{{.ServerVersion}}"],
                check=False,
                timeout=20,
            ).returncode
            == 0
        )
    except CommandError:
        return False


class Dockerd:
    """The tests' own dockerd, beside any other on the host (never one that already runs).

    Everything of it is its own: data root and pid file in `workdir`, the socket that
    DOCKER_HOST names, an exec root under /run (short: a managed plugin's socket path,
    EXEC_ROOT/plugins/<64-hex ID>/docker-on-top.sock, must fit in a unix socket
    address), a config file (not /etc/docker/daemon.json) and containerd namespaces
    of its own, in case it shares a system containerd with another dockerd."""

    def __init__(self, workdir: Path, logs: Path):
        tag = secrets.token_hex(3)
        self.workdir = workdir
        self.log_path = logs / "dockerd.log"
        self.pidfile = workdir / "dockerd.pid"
        self.data_root = workdir / "data"
        self.exec_root = Path(f"/run/dot{tag}")
        self.host = f"unix://{workdir / 'docker.sock'}"
        self.proc = None
        config = workdir / "daemon.json"
        config.write_text("{}\n")
        self.args = [
            "dockerd",
            "--config-file", config,
            "--data-root", self.data_root,
            "--exec-root", self.exec_root,
            "--pidfile", self.pidfile,
            "--host", self.host,
            "--containerd-namespace", f"dot-e2e-{tag}",
            "--containerd-plugins-namespace", f"dot-e2e-{tag}-plugins",
            "--iptables=false",
            "--ip6tables=false",
            "--bridge=none",
            *shlex.split(os.environ.get("DOT_E2E_DOCKERD_ARGS", "")),
        ]  # fmt: skip

    def log_tail(self, lines=80, important=False):
        text = tail(self.log_path, 100_000 if important else lines)
        if important:
            keep = [
                x for x in text.splitlines() if "level=info" not in x and "level=debug" not in x
            ]
            text = "\n".join(keep[-lines:])
        return text

    def start(self, timeout=60):
        args = [str(a) for a in self.args]
        with open(self.log_path, "ab") as logf:
            logf.write(f"\n===== starting: {shlex.join(args)}\n".encode())
            logf.flush()
            self.proc = subprocess.Popen(
                args,
                stdout=logf,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(
                    f"dockerd exited with code {self.proc.returncode} while starting; "
                    f"its log:\n{self.log_tail(200)}",
                    pytrace=False,
                )
            if docker_answers(self.host):
                return
            time.sleep(0.5)
        self.stop()
        pytest.fail(
            f"dockerd did not answer `docker info` within {timeout}s; "
            f"its log:\n{self.log_tail(200)}",
            pytrace=False,
        )

    def stop(self):
        if self.proc is None:
            return
        children = self._children(self.proc.pid)
        if not stop_pid(self.proc, 60):
            # It had to be killed: the containerd it spawned would linger.
            for pid in children:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self.proc = None

    def restart(self):
        self.stop()
        self.start()

    def remove(self):
        """After stop: what it left mounted (layers, network namespaces), its exec root."""
        for folder in (self.data_root, self.exec_root):
            unmount_all_under(folder)
        shutil.rmtree(self.exec_root, ignore_errors=True)

    @staticmethod
    def _children(pid):
        out = []
        for task in Path(f"/proc/{pid}/task").glob("*"):
            with contextlib.suppress(OSError):
                out += [int(x) for x in (task / "children").read_text().split()]
        return out
