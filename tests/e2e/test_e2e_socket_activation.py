"""Socket activation, for real, without systemd as PID 1.

`systemd-socket-activate -l SOCKET docker-on-top serve ...` does what systemd's
socket unit does: it listens on the socket, and on the first connection execs the
daemon (same PID) with the listening socket as fd 3 and LISTEN_PID/LISTEN_FDS set.
Its stderr is made to look like journald's stream (JOURNAL_STREAM) as well.
"""

import contextlib
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ..harness.commands import CommandError, apt_install, require_root, sh, stop_pid, wait_until
from .conftest import PLUGIN_SOURCE, Plugin, plugin_call, plugin_environment

pytestmark = pytest.mark.e2e

ACTIVATOR = "systemd-socket-activate"


@pytest.fixture(scope="module")
def activator():
    """systemd-socket-activate, from Debian's `systemd`, installed when missing."""
    require_root()
    if not shutil.which(ACTIVATOR):
        apt_install(["systemd"], recommends=False)
    path = shutil.which(ACTIVATOR)
    if not path:
        pytest.fail(f"no {ACTIVATOR} even after installing Debian's systemd package")
    return os.path.realpath(path)


class SocketActivatedPlugin(Plugin):
    """The plugin behind systemd-socket-activate, the way a systemd socket unit runs it."""

    def start(self, timeout=30):
        """Listens on the socket; the daemon starts only when a request comes."""
        # A socket file left by the last run is systemd-socket-activate's, not the daemon's.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket)
        self.socket.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as logf:
            found = os.fstat(logf.fileno())
            # systemd-socket-activate passes on only the environment named with -E.
            self.activator_cmd = [
                shutil.which(ACTIVATOR),
                "--listen",
                str(self.socket),
                "-E",
                "PYTHONPATH",
                "-E",
                "PYTHONUNBUFFERED=1",
                "-E",
                f"JOURNAL_STREAM={found.st_dev}:{found.st_ino}",
                *self.cmd,
            ]
            logf.write(f"\n===== e2e harness: starting {self.activator_cmd}\n".encode())
            logf.flush()
            self.proc = subprocess.Popen(
                self.activator_cmd,
                cwd="/",
                env=plugin_environment(),
                stdout=logf,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        listening = wait_until(
            lambda: (
                self.proc.poll() is not None
                or (os.path.exists(self.socket) and stat.S_ISSOCK(os.stat(self.socket).st_mode))
            ),
            timeout,
        )
        if self.proc.poll() is not None or not listening:
            pytest.fail(
                f"{ACTIVATOR} did not listen on {self.socket} within {timeout}s "
                f"(exit code {self.proc.poll()}); its log:\n{self.log()}",
                pytrace=False,
            )

    def activated(self):
        """True once the process is the daemon (exec'd in place of the activator)."""
        return os.readlink(f"/proc/{self.proc.pid}/exe") != os.path.realpath(
            shutil.which(ACTIVATOR)
        )

    def children(self):
        tasks = Path(f"/proc/{self.proc.pid}/task")
        return [
            int(pid) for task in tasks.iterdir() for pid in (task / "children").read_text().split()
        ]

    def stop(self):
        """SIGTERM; the daemon must leave the socket file, which is not its own."""
        if self.proc is not None and self.proc.poll() is None:
            activated = self.activated()
            if not stop_pid(self.proc, 20):
                self.problems.append("the plugin did not exit within 20s of SIGTERM (killed)")
            elif self.proc.returncode not in (0, -signal.SIGTERM):
                self.problems.append(f"the plugin exited with code {self.proc.returncode}")
            if activated and not os.path.lexists(self.socket):
                self.problems.append("the daemon removed the socket that systemd passed it")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket)  # systemd-socket-activate's


@pytest.fixture
def plugin_class(activator):
    return SocketActivatedPlugin


def daemon_log_lines(plugin):
    """The lines the daemon wrote (after systemd-socket-activate's "Execing" line)."""
    text = plugin.log(100_000)
    return text.split("Execing ", 1)[1].splitlines()[1:] if "Execing " in text else []


def test_the_daemon_starts_on_the_first_request_and_logs_for_journald(dot):
    plugin = dot.plugin
    time.sleep(0.5)
    assert not plugin.activated(), "the daemon started before any request came"
    assert plugin.children() == [], "systemd-socket-activate started something already"

    status, body = plugin_call(plugin.socket, "/Plugin.Activate", timeout=30)
    assert (status, body) == (200, {"Implements": ["VolumeDriver"]})
    assert plugin.activated(), "a request was answered, but not by the daemon"
    status, body = plugin_call(plugin.socket, "/VolumeDriver.Capabilities")
    assert (status, body) == (200, {"Capabilities": {"Scope": "local"}})

    lines = daemon_log_lines(plugin)
    assert "<6>docker_on_top: serving on the socket passed by systemd" in lines, plugin.log()
    assert "<7>docker_on_top.plugin_api: request /VolumeDriver.Capabilities {}" in lines
    # journald takes the level from `<N>` and adds its own timestamps.
    assert all(re.match(r"<[0-7]>\S", line) for line in lines), plugin.log()
    assert not any(re.search(r"\d\d:\d\d:\d\d", line) for line in lines), plugin.log()


def test_dockerd_uses_the_socket_activated_plugin_end_to_end(dot):
    plugin = dot.plugin
    base = dot.make_base()
    # The first request comes from dockerd.
    vol = dot.create_volume(base)
    assert plugin.activated()
    pid = plugin.proc.pid
    res = dot.run(
        "cat /dot/a; rm /dot/a; echo 789 > /dot/b; echo new > /dot/c", volumes=[(vol, "/dot")]
    )
    assert res.stdout == "123\n"
    dot.assert_idle(vol)

    # Stopped, the daemon leaves the socket file: it belongs to whoever listened on it.
    plugin.proc.send_signal(signal.SIGTERM)
    assert plugin.proc.wait(20) in (0, -signal.SIGTERM), plugin.log()
    assert stat.S_ISSOCK(os.lstat(plugin.socket).st_mode), "the daemon removed the socket"
    assert "stopped; volumes in use stay mounted" in plugin.log()

    # Listening again (as systemd's socket unit always is), a container start wakes it.
    plugin.start()
    assert not plugin.activated()
    res = dot.run("ls /dot; cat /dot/b /dot/c", volumes=[(vol, "/dot")])
    assert res.stdout == "b\nc\n789\nnew\n", "the changes did not survive the restart"
    assert plugin.activated() and plugin.proc.pid != pid
    dot.assert_idle(vol)
    assert sorted(p.name for p in base.iterdir()) == ["a", "b"]
    assert (base / "b").read_text() == "456\n"

    dot.docker("volume", "rm", vol)
    dot.volumes.remove(vol)
    assert not dot.state_dir(vol).exists()


def test_installed_units_pass_systemd_analyze_verify(activator, tmp_path):
    """The units `install-systemd` writes, with ExecStart running this checkout."""
    analyze = shutil.which("systemd-analyze")
    if not analyze:
        pytest.fail("no systemd-analyze, although Debian's systemd package ships it")
    res = subprocess.run(
        [sys.executable, "-m", "docker_on_top", "install-systemd", "--prefix", str(tmp_path)],
        cwd=PLUGIN_SOURCE,
        env=plugin_environment(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    unit_dir = tmp_path / "etc" / "systemd" / "system"
    units = [unit_dir / "docker-on-top.socket", unit_dir / "docker-on-top.service"]
    try:
        sh([analyze, "verify", *units], timeout=60)
    except CommandError as error:
        pytest.fail(f"systemd rejects the units:\n{error}", pytrace=False)
