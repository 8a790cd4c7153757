"""The systemd units and `docker-on-top install-systemd`, on a temporary prefix."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from docker_on_top import __version__, cli, systemd

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "packaging" / "systemd"
UNIT_DIR = Path("etc/systemd/system")


def settings_of(text: str) -> dict[str, list[str]]:
    """`Section.Key` -> its values, in order (a unit may repeat a key)."""
    found: dict[str, list[str]] = {}
    section = ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        found.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return found


def install(prefix: Path, *argv: str) -> int:
    return cli.main(["install-systemd", "--prefix", str(prefix), *argv])


@pytest.fixture
def entry_point(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Runs the command as pip's `docker-on-top` script at a path with a space in it."""
    script = tmp_path / "my bin" / "docker-on-top"
    script.parent.mkdir()
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    monkeypatch.setattr(sys, "argv", [str(script), "install-systemd"])
    return script


def test_the_shipped_units_are_what_the_command_installs() -> None:
    for name, text in systemd.shipped_units().items():
        assert (SHIPPED / name).read_text() == text, f"packaging/systemd/{name} differs"
    assert sorted(p.name for p in SHIPPED.iterdir()) == sorted(systemd.UNIT_NAMES)


def test_the_socket_unit_listens_where_dockerd_looks_before_dockerd_starts() -> None:
    socket_unit = settings_of((SHIPPED / "docker-on-top.socket").read_text())
    assert socket_unit["Socket.ListenStream"] == ["/run/docker/plugins/docker-on-top.sock"]
    assert socket_unit["Socket.SocketMode"] == ["0660"]
    assert socket_unit["Socket.SocketUser"] == ["root"]
    assert socket_unit["Socket.SocketGroup"] == ["root"]
    assert socket_unit["Unit.Before"] == ["docker.service"]
    assert socket_unit["Install.WantedBy"] == ["sockets.target"]


def test_the_service_runs_the_daemon_before_dockerd_and_restarts_on_failure() -> None:
    service = settings_of((SHIPPED / "docker-on-top.service").read_text())
    assert service["Unit.Requires"] == ["docker-on-top.socket"]
    assert service["Unit.After"] == ["docker-on-top.socket"]
    assert service["Unit.Before"] == ["docker.service"]
    assert service["Service.ExecStart"] == ["/usr/local/bin/docker-on-top serve"]
    assert service["Service.Restart"] == ["on-failure"]
    # Type=notify would need sd_notify, which the daemon does not send.
    assert service.get("Service.Type", ["simple"]) == ["simple"]
    # A mount namespace of its own would hide the volumes' mounts from dockerd.
    for hiding in ("PrivateTmp", "ProtectSystem", "ProtectHome", "MountFlags", "PrivateMounts"):
        assert f"Service.{hiding}" not in service


def test_install_writes_both_units_running_the_installed_entry_point(
    tmp_path: Path, entry_point: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prefix = tmp_path / "prefix"
    assert install(prefix) == 0
    unit_dir = prefix / UNIT_DIR
    assert sorted(p.name for p in unit_dir.iterdir()) == sorted(systemd.UNIT_NAMES)
    for name in systemd.UNIT_NAMES:
        assert (unit_dir / name).stat().st_mode & 0o777 == 0o644
    assert (unit_dir / "docker-on-top.socket").read_text() == systemd.shipped_units()[
        "docker-on-top.socket"
    ]
    service = settings_of((unit_dir / "docker-on-top.service").read_text())
    assert service["Service.ExecStart"] == [f'"{entry_point}" serve']
    assert "Service.Environment" not in service
    assert service["Unit.Before"] == ["docker.service"]
    out = capsys.readouterr().out
    assert f"wrote {unit_dir / 'docker-on-top.service'}" in out
    assert "systemctl enable --now docker-on-top.socket" in out  # what is left to do


def test_install_from_python_m_runs_this_interpreter_and_this_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "argv", [str(REPO / "docker_on_top" / "__main__.py")])
    prefix = tmp_path / "prefix"
    assert install(prefix) == 0
    service = settings_of((prefix / UNIT_DIR / "docker-on-top.service").read_text())
    (exec_start,) = service["Service.ExecStart"]
    command = shlex.split(exec_start)
    assert command == [sys.executable, "-m", "docker_on_top", "serve"]
    # The unit's command, in systemd's bare environment, runs this very package.
    environment = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    for assignment in service.get("Service.Environment", []):
        key, _, value = shlex.split(assignment)[0].partition("=")
        environment[key] = value
    result = subprocess.run(
        [*command[:-1], "--version"],
        env=environment,
        cwd="/",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["docker-on-top", __version__]
    probe = subprocess.run(
        [command[0], "-c", "import docker_on_top; print(docker_on_top.__file__)"],
        env=environment,
        cwd="/",
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert Path(probe.stdout.strip()) == REPO / "docker_on_top" / "__init__.py"


def test_dry_run_writes_nothing(
    tmp_path: Path, entry_point: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert install(tmp_path / "prefix", "--dry-run") == 0
    assert not (tmp_path / "prefix").exists()
    out = capsys.readouterr().out
    assert "ListenStream=/run/docker/plugins/docker-on-top.sock" in out
    assert f'ExecStart="{entry_point}" serve' in out


class FakeSystemctl:
    def __init__(self, fail: str = "") -> None:
        self.calls: list[tuple[str, ...]] = []
        self.fail = fail

    def __call__(self, *arguments: str) -> subprocess.CompletedProcess[str]:
        self.calls.append(arguments)
        failed = bool(self.fail) and arguments[0] == self.fail
        return subprocess.CompletedProcess(
            ["systemctl", *arguments], 1 if failed else 0, "", "Access denied" if failed else ""
        )


@pytest.fixture
def system(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, entry_point: Path) -> Path:
    """/etc/systemd/system and /run/systemd/system moved under tmp_path; returns the unit dir."""
    unit_dir = tmp_path / "etc-systemd-system"
    monkeypatch.setattr(systemd, "SYSTEMD_UNIT_DIR", unit_dir)
    monkeypatch.setattr(systemd, "SYSTEMD_RUNNING", tmp_path / "run-systemd-system")
    return unit_dir


def test_install_enables_the_socket_where_systemd_runs(
    system: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "run-systemd-system").mkdir()
    systemctl = FakeSystemctl()
    monkeypatch.setattr(systemd, "_systemctl", systemctl)
    assert cli.main(["install-systemd"]) == 0
    assert systemctl.calls == [("daemon-reload",), ("enable", "--now", "docker-on-top.socket")]
    assert sorted(p.name for p in system.iterdir()) == sorted(systemd.UNIT_NAMES)


def test_install_says_so_when_systemd_is_not_running(
    system: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    systemctl = FakeSystemctl()
    monkeypatch.setattr(systemd, "_systemctl", systemctl)
    assert cli.main(["install-systemd"]) == 0
    assert systemctl.calls == []
    out = capsys.readouterr().out
    assert f"wrote {system / 'docker-on-top.socket'}" in out
    assert f"wrote {system / 'docker-on-top.service'}" in out
    assert "systemd is not running here" in out


def test_a_failing_systemctl_fails_the_install(
    system: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    (tmp_path / "run-systemd-system").mkdir()
    systemctl = FakeSystemctl(fail="enable")
    monkeypatch.setattr(systemd, "_systemctl", systemctl)
    assert cli.main(["install-systemd"]) == 1
    assert "systemctl enable --now docker-on-top.socket failed: Access denied" in (
        capsys.readouterr().err
    )


def test_an_unwritable_unit_dir_is_a_clear_error(
    system: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    system.write_text("not a folder")
    assert cli.main(["install-systemd"]) == 1
    assert f"cannot write {system / 'docker-on-top.socket'}" in capsys.readouterr().err


def test_another_instance_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--name", "other", "install-systemd", "--prefix", str(tmp_path)]) == 2
    assert "installs the default instance" in capsys.readouterr().err
    assert not os.listdir(tmp_path)
