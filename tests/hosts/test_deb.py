"""The .deb (packaging/deb/build.py), installed with dpkg -i into Debian 11, 12 and 13
roots with their own python3 (SPEC B10): the command, the package where that
python3 finds it, the units, a daemon run from it serving a real overlay, and removal,
upgrade and purge leaving the volumes alone."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from docker_on_top import __version__
from docker_on_top.systemd import units_running

from ..mounts import mounts_under
from .debian import SUITES, Chroot, DaemonInRoot, chroot_of

REPO = Path(__file__).resolve().parents[2]
COMMAND = "/usr/bin/docker-on-top"
UNIT_DIR = "/lib/systemd/system"
PACKAGE_DIR = "/usr/lib/python3/dist-packages/docker_on_top"
STATE_ROOT = "/var/lib/docker-on-top"
SOCKET = "/run/docker/plugins/docker-on-top.sock"
ENABLED_LINK = "/etc/systemd/system/sockets.target.wants/docker-on-top.socket"
# Stands in for systemctl where a test makes the scripts believe systemd runs: it only
# writes down how it was called.
RECORDING_SYSTEMCTL = """#!/bin/sh
echo "$*" >> /tmp/systemctl.calls
"""


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, str(REPO / "packaging" / "deb" / "build.py"), "--out", str(out)],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    (built,) = out.glob("*.deb")
    assert built.name == f"docker-on-top_{__version__}_all.deb"
    return built


@pytest.fixture(params=sorted(SUITES))
def root(request: pytest.FixtureRequest) -> Iterator[Chroot]:
    with chroot_of(request.param, with_source=False) as chroot:
        # The state root on the host's file system: an overlay's upper directory (a
        # volume's changes) cannot be on the chroot's own overlay.
        state = chroot.tmp.parent / "state"
        state.mkdir()
        target = chroot.host_path(STATE_ROOT)
        target.mkdir(parents=True)
        subprocess.run(["mount", "--bind", str(state), str(target)], check=True)
        subprocess.run(["mount", "--make-private", str(target)], check=True)
        yield chroot


def dpkg(root: Chroot, *arguments: str) -> subprocess.CompletedProcess[str]:
    result = root.run(["dpkg", *arguments], env={"DEBIAN_FRONTEND": "noninteractive"})
    assert result.returncode == 0, f"dpkg {' '.join(arguments)}:\n{result.stdout}{result.stderr}"
    return result


def install(root: Chroot, deb: Path) -> subprocess.CompletedProcess[str]:
    copy = root.tmp / deb.name
    copy.write_bytes(deb.read_bytes())
    return dpkg(root, "-i", f"/tmp/{deb.name}")


def systemctl_calls(record: Path) -> list[str]:
    """What the scripts asked systemctl, daemon-reloads aside (deb-systemd-helper adds
    its own)."""
    return [call for call in record.read_text().splitlines() if "daemon-reload" not in call]


def pretend_systemd_runs(root: Chroot) -> Path:
    """/run/systemd/system and a systemctl that records its calls; returns the record."""
    root.host_path("/run/systemd/system").mkdir(parents=True)
    fake = root.host_path("/usr/local/sbin/systemctl")
    fake.write_text(RECORDING_SYSTEMCTL)
    fake.chmod(0o755)
    return root.tmp / "systemctl.calls"


def tree(folder: Path) -> dict[str, bytes | None]:
    """Every path below `folder` with a regular file's content (None for others)."""
    found: dict[str, bytes | None] = {}
    for parent, folders, files in os.walk(folder):
        for name in folders + files:
            path = Path(parent) / name
            relative = str(path.relative_to(folder))
            is_file = path.is_file() and not path.is_symlink()
            found[relative] = path.read_bytes() if is_file else None
    return found


@pytest.fixture
def daemon(root: Chroot, deb: Path) -> Iterator[DaemonInRoot]:
    """The daemon run from the package's command inside the root, with its defaults."""
    install(root, deb)
    started = DaemonInRoot(root, [COMMAND, "serve", "--log-level", "debug"], SOCKET)
    try:
        yield started
    finally:
        started.close()


def make_base(root: Chroot) -> str:
    base = root.host_path("/srv/base")
    base.mkdir(parents=True)
    (base / "a").write_text("from the base")
    return "/srv/base"


def test_b10_deb_installs_the_command_the_package_and_the_units(root: Chroot, deb: Path) -> None:
    install(root, deb)
    version = root.run([COMMAND, "--version"])
    assert version.stdout.strip() == f"docker-on-top {__version__}", version
    found = root.run(["python3", "-c", "import docker_on_top; print(docker_on_top.__file__)"])
    assert found.stdout.strip() == f"{PACKAGE_DIR}/__init__.py", found
    assert root.host_path(COMMAND).read_text().startswith("#!/usr/bin/python3\n")
    expected = units_running([COMMAND])
    for name, text in expected.items():
        assert root.host_path(f"{UNIT_DIR}/{name}").read_text() == text
    assert f"ExecStart={COMMAND} serve" in expected["docker-on-top.service"].splitlines()
    depends = root.run(["dpkg-query", "-W", "-f=${Depends}", "docker-on-top"])
    assert depends.stdout == "python3 (>= 3.9), e2fsprogs"  # e2fsprogs: size limits
    # No systemd here: enabled for the next boot, nothing started.
    assert os.readlink(root.host_path(ENABLED_LINK)) == f"{UNIT_DIR}/docker-on-top.socket"
    assert not root.host_path(SOCKET).exists()


def test_b10_daemon_from_the_deb_serves_a_volume_and_removal_keeps_the_state(
    root: Chroot, daemon: DaemonInRoot
) -> None:
    client, base = daemon.client, make_base(root)
    client.create("once", base)
    mountpoint = client.mount("once", "c1")
    merged = root.host_path(mountpoint)
    assert (merged / "a").read_text() == "from the base"
    assert "overlay" in {kind for _, kind in mounts_under(merged)}, mounts_under(merged)
    client.unmount("once", "c1")
    client.remove("once")
    client.create("kept", base)
    (root.host_path(client.mount("kept", "c2")) / "new").write_text("a change")
    client.unmount("kept", "c2")
    daemon.stop()
    state = root.host_path(STATE_ROOT)
    before = tree(state)
    assert "once" not in before and before["kept/upper/new"] == b"a change"

    dpkg(root, "-r", "docker-on-top")
    assert tree(state) == before
    for gone in (COMMAND, PACKAGE_DIR, f"{UNIT_DIR}/docker-on-top.service"):
        assert not root.host_path(gone).exists(), gone
    purge = dpkg(root, "--purge", "docker-on-top")
    assert tree(state) == before
    assert "the volumes in /var/lib/docker-on-top are kept" in purge.stderr
    assert not os.path.lexists(root.host_path(ENABLED_LINK))


def test_b10_upgrade_keeps_volumes_mounted_and_restarts_only_the_service(
    root: Chroot, deb: Path, daemon: DaemonInRoot
) -> None:
    calls = pretend_systemd_runs(root)
    client = daemon.client
    client.create("busy", make_base(root))
    merged = root.host_path(client.mount("busy", "c1"))
    install(root, deb)  # the same version again: prerm upgrade, postinst configure OLD
    assert systemctl_calls(calls) == ["try-restart docker-on-top.service"]
    assert [kind for _, kind in mounts_under(merged)] == ["overlay"]
    assert (merged / "a").read_text() == "from the base"
    client.unmount("busy", "c1")


def test_b10_systemd_gets_the_socket_started_on_install_and_stopped_on_removal(
    root: Chroot, deb: Path
) -> None:
    calls = pretend_systemd_runs(root)
    install(root, deb)
    assert systemctl_calls(calls) == ["start docker-on-top.socket"]
    calls.unlink()
    dpkg(root, "-r", "docker-on-top")
    assert systemctl_calls(calls) == ["stop docker-on-top.socket docker-on-top.service"]
