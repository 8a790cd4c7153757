"""Protocol tests: a real daemon process, its real unix socket, real overlay mounts.

Every test gets its own workspace under /tmp (never the default names or paths):

    <ws>/root/        the daemon's state root
    <ws>/plugin.sock  the daemon's socket
    <ws>/base/        a base directory with a few files
    <ws>/logs/        the daemons' stderr (kept out of state snapshots)

Teardown stops every daemon the test started (SIGTERM by PID, then SIGKILL), unmounts
whatever is still mounted under the workspace, and removes it, also when the test fails.
"""

from __future__ import annotations

import contextlib
import fcntl
import http.client
import json
import os
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from docker_on_top.recovery import daemon_recovering

REPO = Path(__file__).resolve().parents[2]
CONTENT_TYPE = "application/vnd.docker.plugins.v1.1+json"
# What dockerd sends.
ACCEPT = "application/vnd.docker.plugins.v1.2+json"
ENV_KEYS = (
    "DOCKER_ON_TOP_NAME",
    "DOCKER_ON_TOP_ROOT",
    "DOCKER_ON_TOP_SOCKET",
    "DOCKER_ON_TOP_LOG_LEVEL",
)
CALL_TIMEOUT_S = 10.0
START_TIMEOUT_S = 10.0


# --- HTTP over a unix socket -------------------------------------------------------------


# The endpoints whose request needs a JSON body.
ENDPOINTS_WITH_BODY = [
    "/VolumeDriver.Create",
    "/VolumeDriver.Get",
    "/VolumeDriver.Remove",
    "/VolumeDriver.Path",
    "/VolumeDriver.Mount",
    "/VolumeDriver.Unmount",
]


class UnixHTTPConnection(http.client.HTTPConnection):
    """http.client over AF_UNIX: the host name is only used for the Host header."""

    def __init__(self, socket_path: Path | str, timeout: float = CALL_TIMEOUT_S) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = str(socket_path)

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


@dataclass
class Reply:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes

    @property
    def content_type(self) -> str | None:
        return self.headers.get("content-type")

    @property
    def json(self) -> object:
        return json.loads(self.body)

    def __str__(self) -> str:
        return f"HTTP {self.status} {self.headers} {self.body[:500]!r}"


_UNSET = object()


class PluginClient:
    """A client of the daemon; with its state `root`, `unmount` returns only once the
    teardown is done as well (see `wait_for_teardown`)."""

    def __init__(
        self, socket_path: Path, timeout: float = CALL_TIMEOUT_S, root: Path | None = None
    ) -> None:
        self.socket_path = socket_path
        self.timeout = timeout
        self.root = root

    def connection(self) -> UnixHTTPConnection:
        return UnixHTTPConnection(self.socket_path, self.timeout)

    def call(
        self,
        endpoint: str,
        body: object = _UNSET,
        *,
        raw: bytes | None = None,
        method: str = "POST",
        headers: Mapping[str, str] | None = None,
        connection: UnixHTTPConnection | None = None,
    ) -> Reply:
        """One request; `body` is JSON-encoded, `raw` is sent as is; neither: empty body."""
        if raw is None:
            raw = b"" if body is _UNSET else json.dumps(body).encode()
        all_headers = {"Accept": ACCEPT}  # dockerd sends no Content-Type
        all_headers.update(headers or {})
        own = connection is None
        conn = connection or self.connection()
        try:
            conn.request(method, endpoint, body=raw, headers=all_headers)
            response = conn.getresponse()
            data = response.read()
            return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, data)
        finally:
            if own:
                conn.close()

    def ok(self, endpoint: str, body: object = _UNSET, **kwargs: object) -> dict[str, object]:
        reply = self.call(endpoint, body, **kwargs)  # type: ignore[arg-type]
        assert reply.status == 200, f"{endpoint} {body!r} -> {reply}"
        assert reply.content_type == CONTENT_TYPE, str(reply)
        document = reply.json
        assert isinstance(document, dict), str(reply)
        assert not document.get("Err"), str(reply)
        return document

    def err(self, endpoint: str, body: object = _UNSET, **kwargs: object) -> str:
        """Asserts the failure format: HTTP 500, {"Err": "<non-empty message>"}."""
        reply = self.call(endpoint, body, **kwargs)  # type: ignore[arg-type]
        assert reply.status == 500, f"{endpoint} {body!r} -> {reply}"
        assert reply.content_type == CONTENT_TYPE, str(reply)
        document = reply.json
        assert isinstance(document, dict) and set(document) == {"Err"}, str(reply)
        assert isinstance(document["Err"], str) and document["Err"].strip(), str(reply)
        return document["Err"]

    # Shorthands for the common calls.
    def create(self, name: str, base: Path | str, **options: str) -> None:
        self.ok("/VolumeDriver.Create", {"Name": name, "Opts": {"base": str(base), **options}})

    def mount(self, name: str, mount_id: str) -> str:
        reply = self.ok("/VolumeDriver.Mount", {"Name": name, "ID": mount_id})
        return reply["Mountpoint"]  # type: ignore[return-value]

    def unmount(self, name: str, mount_id: str) -> None:
        self.ok("/VolumeDriver.Unmount", {"Name": name, "ID": mount_id})
        self.wait_for_teardown(name)

    def wait_for_teardown(self, name: str) -> None:
        """An Unmount replies before its teardown, which holds the volume's lock (SPEC
        B11): the teardown is done once the lock is free, as the next Mount finds it."""
        if self.root is not None:
            wait_for_lock(self.root / name / "activemounts", self.timeout)

    def remove(self, name: str) -> None:
        self.ok("/VolumeDriver.Remove", {"Name": name})

    def names(self) -> list[str]:
        volumes = self.ok("/VolumeDriver.List")["Volumes"]
        assert isinstance(volumes, list)
        return sorted(v["Name"] for v in volumes)

    def alive(self) -> None:
        """A normal request is answered normally."""
        assert self.ok("/Plugin.Activate") == {"Implements": ["VolumeDriver"]}


def raw_exchange(
    socket_path: Path, data: bytes, *, timeout: float = 5.0, half_close: bool = False
) -> bytes:
    """Send raw bytes, then read until the server closes (or `timeout` passes)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    received = bytearray()
    try:
        sock.connect(str(socket_path))
        # The server may answer and close before reading everything we send.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(data)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not chunk:
                break
            received += chunk
    finally:
        sock.close()
    return bytes(received)


def parse_responses(data: bytes) -> list[Reply]:
    """Split raw bytes into HTTP responses (Content-Length framed)."""
    replies = []
    while data:
        head, separator, rest = data.partition(b"\r\n\r\n")
        assert separator, f"incomplete response head: {data[:300]!r}"
        lines = head.decode("latin-1").split("\r\n")
        version, status, *_ = lines[0].split(" ", 2)
        assert version.startswith("HTTP/1."), lines[0]
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", len(rest)))
        replies.append(Reply(int(status), headers, rest[:length]))
        data = rest[length:]
    return replies


def http_request(endpoint: str, body: bytes, *, extra: str = "") -> bytes:
    return (
        f"POST {endpoint} HTTP/1.1\r\nHost: plugin\r\nAccept: {ACCEPT}\r\n{extra}"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


# --- the kernel's view -----------------------------------------------------------------


@dataclass(frozen=True)
class MountEntry:
    mount_point: str
    fstype: str
    source: str
    super_options: tuple[str, ...]


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo.
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and len(field[i + 1 : i + 4]) == 3 and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mountinfo() -> list[MountEntry]:
    entries = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split(" ")
        dash = fields.index("-")
        entries.append(
            MountEntry(
                mount_point=_unescape(fields[4]),
                fstype=fields[dash + 1],
                source=_unescape(fields[dash + 2]),
                super_options=tuple(_unescape(o) for o in fields[dash + 3].split(",")),
            )
        )
    return entries


def mounts_at(path: Path | str) -> list[MountEntry]:
    path = os.path.normpath(str(path))
    return [m for m in mountinfo() if m.mount_point == path]


def mounts_under(path: Path | str) -> list[MountEntry]:
    path = os.path.normpath(str(path))
    return [m for m in mountinfo() if m.mount_point == path or m.mount_point.startswith(path + "/")]


def unmount_all_under(path: Path) -> None:
    for _ in range(20):
        entries = mounts_under(path)
        if not entries:
            return
        for entry in sorted(entries, key=lambda m: len(m.mount_point), reverse=True):
            subprocess.run(["umount", "-l", entry.mount_point], capture_output=True, check=False)
    raise RuntimeError(f"cannot unmount everything under {path}: {mounts_under(path)}")


def is_volatile_mount(entry: MountEntry) -> bool:
    # Older kernels show `volatile`; since the fsync= option (6.x) it is `fsync=volatile`.
    return "volatile" in entry.super_options or "fsync=volatile" in entry.super_options


def snapshot(*paths: Path) -> dict[str, tuple[object, ...]]:
    """Everything observable in a tree except times: names, types, modes, contents."""
    state: dict[str, tuple[object, ...]] = {}
    for top in paths:
        if not os.path.lexists(top):
            state[str(top)] = ("absent",)
            continue
        for directory, subdirs, files in os.walk(top):
            subdirs.sort()
            for name in [".", *sorted(subdirs), *sorted(files)]:
                path = os.path.normpath(os.path.join(directory, name))
                st = os.lstat(path)
                if stat.S_ISREG(st.st_mode):
                    content: object = Path(path).read_bytes()
                elif stat.S_ISLNK(st.st_mode):
                    content = os.readlink(path)
                elif stat.S_ISCHR(st.st_mode):
                    content = st.st_rdev
                else:
                    content = None
                state[path] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), content)
    return state


@contextlib.contextmanager
def flock_held(directory: Path) -> Iterator[None]:
    """Hold the exclusive flock the daemon takes on a volume's activemounts/."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def wait_for_lock(directory: Path, timeout: float) -> None:
    """Wait until the flock the daemon takes on a volume's activemounts/ is free (take it
    and let it go); nothing to wait for when the folder is gone."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        return
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"{directory} stays locked for over {timeout} s") from None
                time.sleep(0.001)
    finally:
        os.close(fd)


# The syscalls in which a thread waits for a volume's lock: flock(2), or the sleep
# between the tries of a bounded wait (time.sleep: clock_nanosleep, select on Python
# before 3.11), by their numbers on the machines the tests run on (/proc/TID/syscall).
_LOCK_WAIT_SYSCALLS = {
    "x86_64": {"73", "35", "230", "23", "270"},  # flock nanosleep clock_nanosleep select pselect6
    "aarch64": {"32", "101", "115", "72"},  # flock nanosleep clock_nanosleep pselect6
}


def threads_waiting_for_a_lock(pid: int) -> int:
    """How many threads of the daemon wait for a volume's lock right now (nothing else in
    it sleeps or calls flock: the loop waits in epoll_wait, idle workers on a futex)."""
    numbers = _LOCK_WAIT_SYSCALLS[os.uname().machine]
    waiting = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            if Path(f"/proc/{pid}/task/{tid}/syscall").read_text().split()[0] in numbers:
                waiting += 1
    return waiting


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.01)


# --- the daemon ------------------------------------------------------------------------


def clean_environment(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ENV_KEYS}
    env["PYTHONPATH"] = str(REPO)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def socket_answers(path: Path) -> bool:
    try:
        PluginClient(path, timeout=2.0).alive()
    except (OSError, AssertionError, http.client.HTTPException):
        return False
    return True


class Daemon:
    def __init__(self, args: Sequence[str], env: Mapping[str, str], log_path: Path) -> None:
        self.args = list(args)
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115
        self.process = subprocess.Popen(
            [sys.executable, "-m", "docker_on_top", *self.args],
            cwd=REPO,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(
        self, socket_path: Path, timeout: float = START_TIMEOUT_S, *, recovered: bool = True
    ) -> None:
        """Until the socket answers and, with `recovered`, the daemon's start-up recovery
        (which goes on in the background) has finished: tests look at the state then."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(
                    f"daemon exited with {self.process.returncode} at start:\n{self.log()}"
                )
            if socket_path.exists() and socket_answers(socket_path):
                break
            time.sleep(0.02)
        else:
            raise AssertionError(
                f"daemon did not answer on {socket_path} in {timeout}s:\n{self.log()}"
            )
        root = self.args[self.args.index("--root") + 1] if "--root" in self.args else None
        while recovered and root is not None and daemon_recovering(root):
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise AssertionError(f"daemon's start-up recovery did not end:\n{self.log()}")
            time.sleep(0.01)

    def wait_exit(self, timeout: float = 10.0) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"daemon {self.pid} still running after {timeout}s:\n{self.log()}"
            ) from None

    def signal(self, signum: int) -> None:
        if self.process.poll() is None:
            os.kill(self.pid, signum)

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM and wait; returns the exit status."""
        self.signal(signal.SIGTERM)
        return self.wait_exit(timeout)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.process.wait(10)

    def close(self) -> None:
        if self.process.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()


@dataclass(frozen=True)
class VolumePaths:
    folder: Path

    @property
    def metadata(self) -> Path:
        return self.folder / "metadata.json"

    @property
    def upper(self) -> Path:
        return self.folder / "upper"

    @property
    def activemounts(self) -> Path:
        return self.folder / "activemounts"

    @property
    def workdir(self) -> Path:
        return self.folder / "workdir"

    @property
    def mountpoint(self) -> Path:
        return self.folder / "mountpoint"

    def records(self) -> dict[str, object]:
        return {
            entry.name: json.loads(Path(entry.path).read_bytes())
            for entry in os.scandir(self.activemounts)
        }

    def entries(self) -> set[str]:
        return set(os.listdir(self.folder))


class Workspace:
    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="dot-test-", dir="/tmp"))
        self.name = f"dot-test-{secrets.token_hex(4)}"
        self.root = self.dir / "root"
        self.socket = self.dir / "plugin.sock"
        self.logs = self.dir / "logs"
        self.logs.mkdir()
        self.base = self.dir / "base"
        self.base.mkdir()
        (self.base / "kept.txt").write_text("base kept\n")
        (self.base / "changed.txt").write_text("base original\n")
        (self.base / "deleted.txt").write_text("base deleted\n")
        (self.base / "sub").mkdir()
        (self.base / "sub" / "nested.txt").write_text("base nested\n")
        self.daemons: list[Daemon] = []

    def serve_args(
        self, *, name: str | None = None, root: Path | None = None, socket: Path | None = None
    ) -> list[str]:
        return [
            "serve",
            "--name", name or self.name,
            "--root", str(root or self.root),
            "--socket", str(socket or self.socket),
            "--log-level", "debug",
        ]  # fmt: skip

    def spawn(self, args: Sequence[str], env: Mapping[str, str] | None = None) -> Daemon:
        """Start a daemon process without waiting for it."""
        log_path = self.logs / f"daemon-{len(self.daemons)}.log"
        daemon = Daemon(args, clean_environment(env), log_path)
        self.daemons.append(daemon)
        return daemon

    def start(
        self,
        args: Sequence[str] | None = None,
        *,
        socket: Path | None = None,
        env: Mapping[str, str] | None = None,
        recovered: bool = True,
    ) -> Daemon:
        """Start a daemon and wait until its socket answers and, with `recovered`, its
        start-up recovery has finished."""
        daemon = self.spawn(args if args is not None else self.serve_args(), env)
        daemon.wait_ready(socket or self.socket, recovered=recovered)
        return daemon

    def command(self, *arguments: str) -> subprocess.CompletedProcess[str]:
        """The plugin's command line on this workspace's state root."""
        return subprocess.run(
            [sys.executable, "-m", "docker_on_top", *arguments, "--root", str(self.root)],
            cwd=REPO,
            env=clean_environment(),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    def client(self, socket_path: Path | None = None) -> PluginClient:
        return PluginClient(socket_path or self.socket, root=None if socket_path else self.root)

    def volume(self, name: str, root: Path | None = None) -> VolumePaths:
        return VolumePaths((root or self.root) / name)

    def state(self) -> dict[str, tuple[object, ...]]:
        """Snapshot of everything a daemon could touch here (the logs excepted)."""
        return snapshot(*sorted(p for p in self.dir.iterdir() if p != self.logs))

    def cleanup(self) -> None:
        try:
            for daemon in self.daemons:
                daemon.close()
        finally:
            unmount_all_under(self.dir)
            shutil.rmtree(self.dir, ignore_errors=True)


# --- fixtures --------------------------------------------------------------------------


@pytest.fixture
def ws() -> Iterator[Workspace]:
    if os.geteuid() != 0:
        pytest.fail("the protocol tests mount overlays and must run as root")
    workspace = Workspace()
    try:
        yield workspace
    finally:
        workspace.cleanup()


@pytest.fixture
def daemon(ws: Workspace) -> Daemon:
    return ws.start()


@pytest.fixture
def client(ws: Workspace, daemon: Daemon) -> PluginClient:
    return ws.client()
