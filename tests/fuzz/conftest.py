"""Protocol fuzzing: hypothesis against one real daemon process per test module.

The harness of the protocol tests is reused (workspace under /tmp, private driver name
and state root, HTTP over the unix socket, teardown by PID that unmounts and deletes
everything, also when a test fails). Next to the state root lies a sentinel tree, the
bait for every path escape the fuzzers try:

    <ws>/root/       the daemon's state root: only valid volume folders, ever
    <ws>/sentinel/   must never change (names and IDs aim at it, absolute and relative)
    <ws>/base/       a base directory: must never change either
    <ws>/plugin.sock, <ws>/logs/

After every example `FuzzTarget.check` asserts the properties that must hold whatever
was sent: the daemon process lives and answers /Plugin.Activate; nothing outside its
root changed (the sentinel and base trees, the workspace listing, what is not a socket
in /run/docker/plugins); the root holds only valid volume folders, each mounted exactly
while its records say it is in use. Then `restore_volumes` brings back the volumes the
examples start from. The state persists from one example to the next, so once broken
it stays broken and Hypothesis shrinks to an innocent example: a failed check also
names the requests sent since the last check that passed.

Environment knobs:

* ``DOT_FUZZ_EXAMPLES``: examples per fuzz test (runs, for the state machine) instead
  of the defaults sized for about a minute in all. Failures print the falsifying
  example and a ``@reproduce_failure`` blob; ``pytest --hypothesis-seed=N`` fixes the
  seed.
* ``DOT_FUZZ_SLOW=1``: also run the tests that take long (a request trickled over 40 s).
* ``DOT_DAEMON_SOURCE``: run the daemon from another copy of the package (see
  tests/load/conftest.py), for instance a deliberately broken one in /tmp.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from ..load.conftest import daemon_env
from ..protocol.conftest import (
    CONTENT_TYPE,
    Daemon,
    PluginClient,
    Reply,
    Workspace,
    mounts_at,
    mounts_under,
    parse_responses,
    snapshot,
)

PLUGINS_DIR = Path("/run/docker/plugins")
VOLUME_NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]*")
REQUIRED_ENTRIES = {"metadata.json", "upper", "activemounts"}
MOUNT_ENTRIES = {"workdir", "mountpoint"}


def fuzz_settings(default_examples: int, **overrides: object) -> settings:
    examples = int(os.environ.get("DOT_FUZZ_EXAMPLES") or default_examples)
    options: dict[str, object] = {
        "max_examples": examples,
        "deadline": None,
        # No example database in the checkout; a failure prints its reproduce blob.
        "database": None,
        "print_blob": True,
        "suppress_health_check": [
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
            HealthCheck.large_base_example,
        ],
    }
    options.update(overrides)
    return settings(**options)  # type: ignore[arg-type]


def plugins_listing() -> dict[str, tuple[int, int]]:
    """/run/docker/plugins, but for sockets: other test runs and plugins on the host
    start and stop theirs there at any time (even under the default name), while the
    daemon under test serves in its workspace and makes no socket anywhere else."""
    try:
        entries = list(os.scandir(PLUGINS_DIR))
    except FileNotFoundError:
        return {}
    listing = {}
    for entry in entries:
        with contextlib.suppress(FileNotFoundError):
            st = entry.stat(follow_symlinks=False)
            if not stat.S_ISSOCK(st.st_mode):
                listing[entry.name] = (st.st_ino, st.st_mode)
    return listing


def directory_listing(path: Path) -> dict[str, tuple[int, int]]:
    return {
        e.name: (e.stat(follow_symlinks=False).st_ino, e.stat(follow_symlinks=False).st_mode)
        for e in os.scandir(path)
    }


def check_root(root: Path) -> dict[str, dict[str, int]]:
    """The root holds only valid volume folders, each mounted exactly while in use.

    Returns the records: volume name -> mount ID -> usage count."""
    found = {}
    for entry in os.scandir(root):
        name = entry.name
        where = f"{root}/{name!r}"
        assert VOLUME_NAME.fullmatch(name) and len(os.fsencode(name)) <= 255, (
            f"{where}: not a valid volume name"
        )
        assert entry.is_dir(follow_symlinks=False), f"{where}: not a directory"
        folder = Path(entry.path)
        entries = set(os.listdir(folder))
        assert REQUIRED_ENTRIES <= entries <= REQUIRED_ENTRIES | MOUNT_ENTRIES, (
            f"{where}: holds {sorted(entries)}"
        )
        metadata = json.loads((folder / "metadata.json").read_bytes())
        assert isinstance(metadata, dict), f"{where}: metadata {metadata!r}"
        base = metadata.get("BaseDirPath")
        assert isinstance(base, str) and base.startswith("/"), f"{where}: metadata {metadata!r}"
        assert isinstance(metadata.get("Volatile"), bool), f"{where}: metadata {metadata!r}"
        for sub in ("upper", "activemounts"):
            assert stat.S_ISDIR(os.lstat(folder / sub).st_mode), f"{where}/{sub}: not a directory"
        records = {}
        for record in os.scandir(folder / "activemounts"):
            assert VOLUME_NAME.fullmatch(record.name), f"{where}: record {record.name!r}"
            assert record.is_file(follow_symlinks=False), f"{where}: record {record.name!r}"
            document = json.loads(Path(record.path).read_bytes())
            assert isinstance(document, dict) and set(document) == {"UsageCount"}, (
                f"{where}: record {record.name!r} holds {document!r}"
            )
            count = document["UsageCount"]
            assert isinstance(count, int) and not isinstance(count, bool) and count >= 1, (
                f"{where}: record {record.name!r} holds {document!r}"
            )
            records[record.name] = count
        mounts = mounts_at(folder / "mountpoint")
        if records:
            assert [m.fstype for m in mounts] == ["overlay"], (
                f"{where}: in use ({records}) but mounted: {mounts}"
            )
            assert entries == REQUIRED_ENTRIES | MOUNT_ENTRIES, f"{where}: holds {sorted(entries)}"
        else:
            assert mounts == [], f"{where}: not in use but mounted: {mounts}"
            assert entries == REQUIRED_ENTRIES, f"{where}: not in use, holds {sorted(entries)}"
        found[name] = records
    return found


@dataclass
class Exchange:
    replies: list[Reply]
    closed_by_daemon: bool
    seconds: float


# How long a request left behind by a client that closed early may take to finish.
SETTLE_S = 3.0


@dataclass(repr=False)
class FuzzTarget:
    ws: Workspace
    daemon: Daemon
    client: PluginClient
    sentinel: Path
    outside: dict[str, tuple[object, ...]] = field(default_factory=dict)
    # What was sent since the last check that passed, and what was sent before the first
    # that failed: the state persists from example to example, so once broken it stays
    # broken and Hypothesis shrinks to an innocent example. The culprit is reported.
    sent: list[bytes] = field(default_factory=list)
    culprit: list[bytes] | None = None
    ws_listing: dict[str, tuple[int, int]] = field(default_factory=dict)
    plugins: dict[str, tuple[int, int]] = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"FuzzTarget({self.ws.dir})"

    def _repr_pretty_(self, printer: object, cycle: bool) -> None:
        printer.text(repr(self))  # type: ignore[attr-defined]

    def baseline(self) -> None:
        self.outside = snapshot(self.sentinel, self.ws.base)
        self.ws_listing = directory_listing(self.ws.dir)
        self.plugins = plugins_listing()

    def placeholders(self) -> dict[bytes, bytes]:
        return {
            b"@SENTINEL@": os.fsencode(self.sentinel),
            b"@BASE@": os.fsencode(self.ws.base),
            b"@ROOT@": os.fsencode(self.ws.root),
            b"@WS@": os.fsencode(self.ws.dir),
        }

    def resolve(self, data: bytes) -> bytes:
        """Put the workspace's real paths in place of the strategies' placeholders."""
        for placeholder, path in self.placeholders().items():
            data = data.replace(placeholder, path)
        return data

    def send(self, data: bytes, *, close_early: bool = False, timeout: float = 10.0) -> Exchange:
        """Send raw bytes and read until the daemon closes. With `close_early`, close
        right after sending, reading nothing; else half-close (the daemon sees the end
        of the request stream) and read."""
        self.sent.append(data[:1000])
        started = time.monotonic()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        received = bytearray()
        closed = False
        try:
            sock.connect(str(self.ws.socket))
            try:
                sock.sendall(data)
                if close_early:
                    return Exchange([], False, time.monotonic() - started)
                sock.shutdown(socket.SHUT_WR)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the daemon may refuse and close before reading it all
            while True:
                try:
                    chunk = sock.recv(65536)
                except ConnectionResetError:
                    closed = True
                    break
                except TimeoutError:
                    break
                if not chunk:
                    closed = True
                    break
                received += chunk
        finally:
            sock.close()
        return Exchange(parse_responses(bytes(received)), closed, time.monotonic() - started)

    def check(self) -> dict[str, dict[str, int]]:
        """The properties that hold whatever was sent; returns the records (see check_root).

        A client that closed early may have left a request still being served (a Mount
        between mounting the overlay and writing its record; a Remove that renames the
        folder away while the check reads it, which then finds a file gone), so a failed
        check is repeated for a moment: only a state that lasts once the daemon is done
        fails.
        """
        deadline = time.monotonic() + SETTLE_S
        try:
            while True:
                try:
                    records = self._check()
                    break
                except (AssertionError, FileNotFoundError):
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
        except (AssertionError, FileNotFoundError) as error:
            if self.culprit is None:
                self.culprit = list(self.sent)
            raise AssertionError(
                f"{error}\n\nThe first failed check came after these requests (the ones "
                f"before it passed): {self.culprit!r}"
            ) from error
        self.sent.clear()
        return records

    def _check(self) -> dict[str, dict[str, int]]:
        process = self.daemon.process
        assert process.poll() is None, f"the daemon died ({process.returncode}):\n{self.log_tail()}"
        self.client.alive()
        assert snapshot(self.sentinel, self.ws.base) == self.outside, "outside the root changed"
        assert directory_listing(self.ws.dir) == self.ws_listing, (
            f"the root's parent changed: {sorted(os.listdir(self.ws.dir))}"
        )
        assert plugins_listing() == self.plugins, f"{PLUGINS_DIR} changed"
        records = check_root(self.ws.root)
        stray = [
            m
            for m in mounts_under(self.ws.dir)
            if Path(m.mount_point).name != "mountpoint"
            or Path(m.mount_point).parent.parent != self.ws.root
        ]
        assert stray == [], f"mounts that are no volume's: {stray}"
        return records

    def log_tail(self, size: int = 6000) -> str:
        return self.daemon.log()[-size:]


def check_reply(reply: Reply) -> None:
    """Any reply at all: HTTP 200 with a JSON object, or 500 with exactly {"Err": ...}."""
    assert reply.status in (200, 500), str(reply)
    assert reply.content_type == CONTENT_TYPE, str(reply)
    assert reply.headers.get("content-length") == str(len(reply.body)), str(reply)
    document = json.loads(reply.body)
    assert isinstance(document, dict), str(reply)
    if reply.status == 500:
        assert set(document) == {"Err"}, str(reply)
        assert isinstance(document["Err"], str) and document["Err"].strip(), str(reply)
    else:
        assert "Err" not in document, str(reply)


def make_sentinel(path: Path) -> None:
    """Files named like what the fuzzers aim at, so an escape lands here."""
    (path / "x").mkdir(parents=True)
    (path / "x" / "bait.txt").write_text("must survive\n")
    (path / "keep.txt").write_text("sentinel\n")
    (path / "etc").mkdir()
    (path / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    for name in ("activemounts", "upper", "workdir", "mountpoint", "v", "w"):
        (path / name).mkdir()
    (path / "v" / "metadata.json").write_text('{"BaseDirPath": "/", "Volatile": false}')
    os.symlink("../root", path / "to-root")


@contextlib.contextmanager
def fuzz_target() -> Iterator[FuzzTarget]:
    if os.geteuid() != 0:
        pytest.fail("the fuzz tests mount overlays and must run as root")
    ws = Workspace()
    try:
        sentinel = ws.dir / "sentinel"
        make_sentinel(sentinel)
        daemon = ws.start(env=daemon_env(ws))
        target = FuzzTarget(ws, daemon, ws.client(), sentinel)
        target.baseline()
        yield target
    finally:
        ws.cleanup()


def restore_volumes(target: FuzzTarget) -> None:
    """Bring back what the examples of a module start from (a fuzzed Remove, Unmount or
    Create may have changed it): volume `v` mounted (for `c1` at first), volatile `w`,
    and `gone`, whose base was removed after its creation, so that its Mounts fail."""
    client, ws = target.client, target.ws
    if not ws.volume("v").folder.exists():
        client.create("v", ws.base)
    if not ws.volume("v").records():
        client.mount("v", "c1")
    if not ws.volume("w").folder.exists():
        client.create("w", ws.base, volatile="true")
    if not ws.volume("gone").folder.exists():
        (target.sentinel / "gone").mkdir()
        try:
            client.create("gone", target.sentinel / "gone")
        finally:
            (target.sentinel / "gone").rmdir()


@pytest.fixture(scope="module")
def fuzz() -> Iterator[FuzzTarget]:
    """A daemon for a module of examples; see `restore_volumes`, which each example
    calls after its check."""
    with fuzz_target() as target:
        restore_volumes(target)
        target.baseline()
        target.check()
        yield target
