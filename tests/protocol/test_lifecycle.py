"""B9 stopping and starting the daemon; B6 settings from flags and environment variables."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from docker_on_top import __version__

from .conftest import (
    REPO,
    Workspace,
    clean_environment,
    flock_held,
    http_request,
    mounts_at,
    parse_responses,
    socket_answers,
)

# --- B9 ----------------------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_b9_stop_signal_removes_socket_and_keeps_mounted_volume(ws: Workspace, signum: int) -> None:
    daemon = ws.start()
    client = ws.client()
    client.create("v", ws.base)
    volume = ws.volume("v")
    client.mount("v", "c1")
    daemon.signal(signum)
    assert daemon.wait_exit() == 0, daemon.log()
    assert not ws.socket.exists()
    (entry,) = mounts_at(volume.mountpoint)
    assert entry.fstype == "overlay"
    assert volume.records() == {"c1": {"UsageCount": 1}}
    assert (volume.mountpoint / "kept.txt").read_text() == "base kept\n"


def test_b9_stop_with_an_idle_keep_alive_connection_is_prompt(ws: Workspace) -> None:
    daemon = ws.start()
    connection = ws.client().connection()
    try:
        ws.client().call("/Plugin.Activate", connection=connection)
        started = time.monotonic()
        assert daemon.stop(timeout=5) == 0
        assert time.monotonic() - started < 3
    finally:
        connection.close()
    assert not ws.socket.exists()


def test_b9_stop_finishes_a_request_in_flight(ws: Workspace) -> None:
    """A Mount waiting for the volume's lock when SIGTERM comes is answered, then it stops."""
    daemon = ws.start()
    client = ws.client()
    client.create("v", ws.base)
    volume = ws.volume("v")
    replies: list[object] = []
    with flock_held(volume.activemounts):
        thread = threading.Thread(target=lambda: replies.append(client.mount("v", "c1")))
        thread.start()
        time.sleep(0.3)
        daemon.signal(signal.SIGTERM)
        time.sleep(0.3)
        assert daemon.process.poll() is None, "the daemon quit with a request in flight"
    thread.join(5)
    assert replies == [f"{volume.mountpoint}/"]
    assert daemon.wait_exit() == 0
    assert len(mounts_at(volume.mountpoint)) == 1
    assert volume.records() == {"c1": {"UsageCount": 1}}
    assert not ws.socket.exists()


def test_b9_stop_answers_a_request_being_received(ws: Workspace) -> None:
    """A request half-way through arriving at SIGTERM is in flight too: it gets its answer."""
    daemon = ws.start()
    body = b'{"Name": "v", "Opts": {"base": "%s"}}' % str(ws.base).encode()
    request = http_request("/VolumeDriver.Create", body)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    try:
        sock.connect(str(ws.socket))
        sock.sendall(request[:-10])
        time.sleep(0.2)
        daemon.signal(signal.SIGTERM)
        time.sleep(0.2)
        with contextlib.suppress(OSError):
            sock.sendall(request[-10:])
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    finally:
        sock.close()
    assert daemon.wait_exit() == 0
    replies = parse_responses(received)
    assert [r.status for r in replies] == [200], received
    assert ws.volume("v").metadata.exists()


def test_b9_stale_socket_file_is_replaced_at_start(ws: Workspace) -> None:
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(ws.socket))
    stale.close()
    assert ws.socket.is_socket() and not socket_answers(ws.socket)
    ws.start()
    ws.client().alive()


def test_b9_a_non_socket_file_at_the_socket_path_is_not_deleted(ws: Workspace) -> None:
    ws.socket.write_text("not a socket\n")
    daemon = ws.spawn(ws.serve_args())
    assert daemon.wait_exit() != 0
    assert ws.socket.read_text() == "not a socket\n"
    assert str(ws.socket) in daemon.log()


def test_b9_second_instance_on_a_live_socket_refuses_to_start(ws: Workspace) -> None:
    first = ws.start()
    client = ws.client()
    client.create("v", ws.base)
    client.mount("v", "c1")
    inode = ws.socket.stat().st_ino
    second = ws.spawn(ws.serve_args(name=f"{ws.name}-2", root=ws.dir / "root2"))
    status = second.wait_exit()
    assert status != 0
    log = second.log()
    assert str(ws.socket) in log and "already" in log, log
    assert first.process.poll() is None
    assert ws.socket.stat().st_ino == inode
    client.alive()
    client.mount("v", "c2")
    assert ws.volume("v").records() == {"c1": {"UsageCount": 1}, "c2": {"UsageCount": 1}}


def test_b9_second_instance_refusing_to_start_touches_no_state(ws: Workspace) -> None:
    """Same socket and same root: it must refuse before it changes anything of the first's.

    The state holds what the running first instance may legitimately have at any moment:
    a volume being created (folder made, metadata.json not yet written) and a volume
    being mounted by its first user (mountpoint/ and workdir/ made, overlay not yet
    mounted). A recovery run by the refused instance would delete the first and pull the
    mountpoint from under the second.
    """
    ws.start()
    client = ws.client()
    client.create("v", ws.base)
    client.create("m", ws.base)
    client.mount("v", "c1")
    creating = ws.volume("creating")
    creating.upper.mkdir(parents=True)
    creating.activemounts.mkdir()
    mounting = ws.volume("m")
    mounting.mountpoint.mkdir()
    mounting.workdir.mkdir()
    before = ws.state()
    second = ws.spawn(ws.serve_args())
    assert second.wait_exit() != 0
    assert ws.state() == before, "the refused instance changed the running one's state"
    client.alive()


def test_b6_second_instance_under_another_name_runs_beside(ws: Workspace) -> None:
    ws.start()
    other_socket, other_root = ws.dir / "other.sock", ws.dir / "other-root"
    ws.start(ws.serve_args(name=f"{ws.name}-b", root=other_root, socket=other_socket),
             socket=other_socket)  # fmt: skip
    first, second = ws.client(), ws.client(other_socket)
    first.create("one", ws.base)
    second.create("two", ws.base)
    first.mount("one", "c1")
    second.mount("two", "c1")
    assert first.names() == ["one"]
    assert second.names() == ["two"]
    assert (ws.root / "one").is_dir() and not (ws.root / "two").exists()
    assert (other_root / "two").is_dir() and not (other_root / "one").exists()
    assert len(mounts_at(ws.root / "one" / "mountpoint")) == 1
    assert len(mounts_at(other_root / "two" / "mountpoint")) == 1


# --- B6 ----------------------------------------------------------------------------------


def test_b6_settings_from_environment_variables(ws: Workspace) -> None:
    root, sock = ws.dir / "env-root", ws.dir / "env.sock"
    name = f"{ws.name}-env"
    env = {
        "DOCKER_ON_TOP_NAME": name,
        "DOCKER_ON_TOP_ROOT": str(root),
        "DOCKER_ON_TOP_SOCKET": str(sock),
        "DOCKER_ON_TOP_LOG_LEVEL": "debug",
    }
    daemon = ws.start(["serve"], socket=sock, env=env)
    client = ws.client(sock)
    client.create("v", ws.base)
    assert (root / "v" / "metadata.json").exists()
    assert not ws.root.exists()
    assert not ws.socket.exists()
    log = daemon.log()
    assert name in log
    assert "DEBUG" in log and "/VolumeDriver.Create" in log
    assert daemon.stop() == 0
    assert not sock.exists()


@pytest.mark.parametrize("setting", ["name", "root", "socket", "log_level"])
def test_b6_flag_wins_over_environment_variable(ws: Workspace, setting: str) -> None:
    env_values = {
        "name": f"{ws.name}-env",
        "root": str(ws.dir / "env-root"),
        "socket": str(ws.dir / "env.sock"),
        "log_level": "error",
    }
    flag_values = {
        "name": f"{ws.name}-flag",
        "root": str(ws.dir / "flag-root"),
        "socket": str(ws.dir / "flag.sock"),
        "log_level": "debug",
    }
    # Only the setting under test is given both ways; the others come from flags.
    env = {f"DOCKER_ON_TOP_{setting.upper()}": env_values[setting]}
    args = ["serve"]
    for key in ("name", "root", "socket", "log_level"):
        value = flag_values[key] if key == setting else {
            "name": ws.name, "root": str(ws.root), "socket": str(ws.socket), "log_level": "debug"
        }[key]  # fmt: skip
        args += [f"--{key.replace('_', '-')}", value]
    sock = Path(flag_values["socket"]) if setting == "socket" else ws.socket
    root = Path(flag_values["root"]) if setting == "root" else ws.root
    daemon = ws.start(args, socket=sock, env=env)
    client = ws.client(sock)
    client.create("v", ws.base)
    assert (root / "v").is_dir()
    assert not Path(env_values["root"]).exists()
    assert not Path(env_values["socket"]).exists()
    log = daemon.log()
    if setting == "name":
        assert flag_values["name"] in log and env_values["name"] not in log
    if setting == "log_level":
        assert "DEBUG" in log


def test_b6_environment_log_level_is_applied(ws: Workspace) -> None:
    args = ["serve", "--name", ws.name, "--root", str(ws.root), "--socket", str(ws.socket)]
    daemon = ws.start(args, env={"DOCKER_ON_TOP_LOG_LEVEL": "warning"})
    ws.client().create("v", ws.base)
    assert "DEBUG" not in daemon.log() and "INFO" not in daemon.log()


def test_b6_invalid_setting_is_refused_with_a_message(ws: Workspace) -> None:
    args = ["serve", "--name", ws.name, "--root", str(ws.root), "--socket", str(ws.socket)]
    daemon = ws.spawn(args, env={"DOCKER_ON_TOP_LOG_LEVEL": "chatty"})
    assert daemon.wait_exit() != 0
    assert "chatty" in daemon.log()
    assert not ws.socket.exists() and not ws.root.exists()


def test_b6_version_flag_prints_the_version() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "docker_on_top", "--version"],
        cwd=REPO, env=clean_environment(), capture_output=True, text=True, timeout=10,
    )  # fmt: skip
    assert result.returncode == 0
    assert result.stdout.strip() == f"docker-on-top {__version__}"


@pytest.mark.parametrize("form", ["serve", "no-subcommand", "flags-before-serve"])
def test_b6_serve_and_no_subcommand_both_run_the_daemon(ws: Workspace, form: str) -> None:
    flags = ["--name", ws.name, "--root", str(ws.root), "--socket", str(ws.socket),
             "--log-level", "debug"]  # fmt: skip
    args = {"serve": ["serve", *flags], "no-subcommand": flags,
            "flags-before-serve": [*flags, "serve"]}[form]  # fmt: skip
    daemon = ws.start(args)
    client = ws.client()
    client.create("v", ws.base)
    assert client.names() == ["v"]
    assert (ws.root / "v" / "metadata.json").exists()
    assert daemon.stop() == 0


def test_socket_file_is_root_owned_mode_0660(ws: Workspace, daemon: object) -> None:
    st = ws.socket.stat()
    assert (st.st_uid, st.st_gid) == (0, 0)
    assert st.st_mode & 0o777 == 0o660


def test_b6_state_root_with_a_backslash_is_refused_or_works(ws: Workspace) -> None:
    """The state root's paths go into the overlay option string, like the base's."""
    root = ws.dir / "state\\root"
    daemon = ws.spawn(ws.serve_args(root=root))
    deadline = time.monotonic() + 10
    while not ws.socket.exists() and daemon.process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    if daemon.process.poll() is not None:
        assert daemon.process.returncode != 0 and "root" in daemon.log()
        return
    daemon.wait_ready(ws.socket)
    client = ws.client()
    client.create("v", ws.base)
    mountpoint = Path(client.mount("v", "c1"))
    (mountpoint / "added.txt").write_text("added\n")
    assert (root / "v" / "upper" / "added.txt").read_text() == "added\n"


@pytest.mark.parametrize("host_root", [None, "/"])
def test_log_lines_carry_a_timestamp_unless_running_as_a_managed_plugin(
    ws: Workspace, host_root: str | None
) -> None:
    """dockerd stamps each line of a managed plugin's log (host root set) itself."""
    extra = [] if host_root is None else ["--host-root", host_root]
    daemon = ws.start([*ws.serve_args(), *extra])
    ws.client().create("v", ws.base)
    daemon.stop()
    lines = daemon.log().splitlines()
    assert lines, "nothing logged"
    stamped = [line[:2] == "20" and line[4] == "-" for line in lines]
    assert stamped == [host_root is None] * len(lines), lines
    assert all(line.split()[int(host_root is None) * 2] in LEVELS for line in lines), lines


LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
