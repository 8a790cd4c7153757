"""The fault harness: strace on the real daemon, the scenarios, and the state checks.

How a fault reaches exactly one step of one request
---------------------------------------------------
The daemon answers every request that changes state (Create, Mount, Unmount, Remove) on
one worker thread, from its first syscall to the sending of its reply (server.py), and
strace counts `when=N` per syscall *and per thread* ("Accounting of syscalls that are
subject to injection is done per syscall and per tracee", strace(1)). So the harness

1. waits until every thread of the idle daemon sleeps: the loop's in epoll_wait, the
   workers' waiting for work, each past the last syscall of the request it served,
2. attaches `strace -f -p PID` to it, with the injection, and waits until the kernel
   shows strace as the tracer of every thread (/proc/PID/task/*/status, TracerPid),
3. sends the one request under test on a new connection.

The counting starts at the attach, and until the request arrives the loop only waits in
epoll_wait; accepting and reading the connection, and handing the request to a worker,
are not in the traced set, so the counts are those of the request, all on one thread
(a worker started for it is traced from its first syscall). Once the reply is sent
(sendto), the worker may write a byte to the loop's wake-up pipe (when the reply did not
go out whole, or the connection closes; server.py); strace counts it like any write, so
it stays among the calls, marked `wake_up`: no error is injected there.
The last Unmount of a volume goes on after that on the same worker: its teardown
(umount2, the folders' removal) runs after the reply, under the volume's lock (SPEC
B11). Every call after the reply is marked `after_reply`: a kill there comes after a
reply of success, and an error there can no longer fail the request. The daemon is
settled (`wait_settled`) when every thread sleeps and it holds no lock (/proc/locks):
a teardown holds the volume's lock from before the reply to its end.
`inject=SYSCALL:signal=KILL:when=N` kills the whole daemon on entering the N-th
SYSCALL of the request, before it runs (the kernel skips a syscall when a fatal signal
is pending at syscall entry). `inject=SYSCALL:error=E:when=N` makes it fail with E
without running it.

The steps are not guessed: a clean run of the same scenario, traced the same way,
lists the request's syscalls in order (`clean_trace`; a directory walk's calls sorted,
so that the test ids are the same in every run), and each injected run writes its
own trace too, which must show the named occurrence of the named syscall as the
injected one, after the clean run's calls in the clean run's order, so a test can never
pass by injecting into something other than the step it names. The order may only differ
inside a directory walk (calls relative to a directory fd, as shutil.rmtree makes): its
order follows name hashes, and overlayfs names its scratch files in workdir/ after inode
numbers, so the same clean-up can visit its entries in another order from run to run;
there the counts are compared.

Sized volumes (`Scenario.size`) trace more: the loop devices' ioctls, the filesystem
mounts, the image's sizing, and the poll with which the daemon waits for mkfs.ext4 (a
kill there leaves mkfs.ext4 running on, orphaned). strace detaches from a child at its
execve, so no injection reaches mkfs.ext4 itself, and the child's calls before it are
not the request's. The loop makes an ioctl on each connection it accepts, so these
requests go on a connection accepted before strace attaches (`connect_ahead`). What
the request reads in /sys/block depends on how many loop devices exist, which other
processes can change between the clean and the injected run; they seldom do.
After the fault, once the volume is unused, no loop device is backed by a file under
the state root and nothing is mounted there; a made image passes e2fsck.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import http.client
import json
import os
import re
import signal
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from docker_on_top import kernel, sizelimit
from docker_on_top.server import MAX_WORKERS
from docker_on_top.sizelimit import parse_size

from ..protocol.conftest import (
    Daemon,
    PluginClient,
    Reply,
    UnixHTTPConnection,
    Workspace,
    mounts_at,
    mounts_under,
    snapshot,
)

# Every syscall through which the daemon changes the state root or answers the client.
# mkdirat and renameat2 are not used today (Python calls mkdir and rename), but a change
# of the code that starts using them is then still covered; so are the calls that change
# an owner or a mode (a snapshot gives the new upper its frozen one's).
TRACED = (
    "mkdir",
    "mkdirat",
    "openat",
    "write",
    "rename",
    "renameat2",
    "fsync",
    "fdatasync",
    "mount",
    "umount2",
    "unlink",
    "unlinkat",
    "rmdir",
    "flock",
    "sendto",
    "chmod",
    "fchmod",
    "fchmodat",
    "chown",
    "fchown",
    "fchownat",
)
# A sized volume also attaches loop devices (ioctl), mounts filesystems of its own (the
# new mount API too), sizes its image and waits (poll) for mkfs.ext4 to make it: traced
# in the scenarios of sized volumes only, so that the other scenarios' steps stay as
# they were. execve marks the child processes (mkfs.ext4), whose calls are not the
# request's: strace detaches from them there (-b execve).
SIZED_TRACED = (
    "ftruncate",
    "fallocate",
    "ioctl",
    "fsopen",
    "fsconfig",
    "fsmount",
    "move_mount",
    "poll",
    "execve",
)
SIZE = "16M"
# What a syscall failure test injects into, and with which errors.
FAILING = ("mkdir", "mount", "umount2", "rename", "openat", "write")
ERRNOS = ("EIO", "ENOSPC", "EBUSY", "EPERM", "EACCES")
INTERNAL_PREFIX = "docker-on-top internal error:"
VOLUME = "v"

FULL = os.environ.get("DOT_FAULTS_FULL") == "1"
ATTACH_TIMEOUT_S = 10.0
CALL_TIMEOUT_S = 20.0


def daemon_env() -> dict[str, str]:
    """DOT_DAEMON_SOURCE runs the daemon from another copy of the package (a folder that
    holds docker_on_top/), for instance a deliberately broken one in /tmp. PYTHONSAFEPATH
    keeps the harness's working directory (this checkout) from shadowing it."""
    source = os.environ.get("DOT_DAEMON_SOURCE")
    if not source:
        return {}
    if not (Path(source) / "docker_on_top" / "__init__.py").is_file():
        raise RuntimeError(f"DOT_DAEMON_SOURCE={source} holds no docker_on_top package")
    return {"PYTHONPATH": str(Path(source).resolve()), "PYTHONSAFEPATH": "1"}


# --- one traced syscall --------------------------------------------------------------------

_LINE = re.compile(r"^(?P<tid>\d+)\s+(?P<name>[a-z0-9_]+)\((?P<rest>.*)$")


@dataclass(frozen=True)
class Call:
    """One syscall of the request, as strace printed it."""

    position: int  # 1-based, among the traced syscalls of the request
    name: str
    occurrence: int  # 1-based, among the request's calls of this syscall: strace's when=
    text: str
    wake_up: bool = False  # the worker's write to the loop's wake-up pipe
    after_reply: bool = False  # made once the reply was sent (an Unmount's teardown)

    @property
    def mutating(self) -> bool:
        """Whether it can change what a crash leaves behind on disk or in the mount table.

        fsync only matters for power loss, which a killed process is not; a write to
        fd 2 is the log, one to the wake-up pipe only wakes the loop; an openat without
        O_CREAT only reads.
        """
        if self.name in ("flock", "fsync", "fdatasync", "sendto") or self.wake_up:
            return False
        # Of the ioctls only binding a loop device changes anything (finding a free one
        # does not); a filesystem context or a detached mount goes with the process. A
        # poll waits for mkfs.ext4, which writes the image meanwhile: a kill there
        # leaves it running on, orphaned, and so counts as a step.
        if self.name == "ioctl":
            return "LOOP_" in self.text and "LOOP_CTL_GET_FREE" not in self.text
        if self.name in ("fsopen", "fsconfig", "fsmount"):
            return False
        if self.name == "openat":
            return "O_CREAT" in self.text
        if self.name == "write":
            return not self.text.startswith("write(2,")
        return True

    @property
    def shown(self) -> str:
        """The call without its result in the clean run."""
        return self.text.rsplit(" = ", 1)[0][:200]

    @property
    def label(self) -> str:
        return f"{self.position:02d}-{self.name}#{self.occurrence}"


def parse_trace(
    path: Path, wake_up_fds: frozenset[int], traced: tuple[str, ...] = TRACED
) -> tuple[list[Call], bool]:
    """The traced calls of the request, and whether the daemon was killed; writes to the
    loop's wake-up pipe (`wake_up_fds`) are marked. The calls of a child process (one
    that calls execve) before it runs its program are not the request's; of the polls
    that wait for its output only the first is a step: how many more follow depends on
    whether its two pipes close together."""
    calls: list[Call] = []
    seen: dict[str, int] = {}
    killed = False
    replied = False
    tids: set[int] = set()
    lines = path.read_text(errors="replace").splitlines()
    children = {
        int(match["tid"])
        for match in map(_LINE.match, lines)
        if match is not None and match["name"] == "execve"
    }
    child_started = False
    for line in lines:
        if "+++ killed by SIGKILL" in line:
            killed = True
            continue
        match = _LINE.match(line)
        if match is not None and int(match["tid"]) in children:
            child_started = True
            continue
        if match is None or match["name"] not in traced:
            continue  # "<... resumed>", "+++ exited", signals
        if match["name"] == "poll":
            if not child_started:
                continue
            child_started = False
        tids.add(int(match["tid"]))
        seen[match["name"]] = seen.get(match["name"], 0) + 1
        calls.append(
            Call(
                len(calls) + 1,
                match["name"],
                seen[match["name"]],
                f"{match['name']}({match['rest']}",
                wake_up=match["name"] == "write"
                and int(match["rest"].split(",", 1)[0]) in wake_up_fds,
                after_reply=replied,
            )
        )
        replied = replied or match["name"] == "sendto"
    if len(tids) > 1:
        raise AssertionError(f"the request was served on more than one thread: {sorted(tids)}")
    return calls, killed


# --- strace attached to the running daemon ---------------------------------------------------


def _in_directory_walk(call: Call) -> bool:
    """A call relative to a directory fd: part of a walk, whose order may vary."""
    return re.match(r"[a-z0-9]+\(\d+, ", call.text) is not None


def same_calls_as_clean_run(calls: list[Call], clean: tuple[Call, ...], context: str) -> None:
    """The injected run (up to its injected call, the last one) took the clean run's path.

    Outside directory walks the calls come in the clean run's order; inside them the
    order may vary (see the module's docstring), so there only the counts are compared.
    """
    straight = [c.name for c in calls if not _in_directory_walk(c)]
    clean_straight = [c.name for c in clean if not _in_directory_walk(c)]
    problems = []
    if straight != clean_straight[: len(straight)]:
        problems.append("the calls outside directory walks differ")
    if Counter(c.name for c in calls) - Counter(c.name for c in clean):
        problems.append("it made calls the clean run did not make")
    assert not problems, (
        f"{context}: the request took another path than the clean run ({'; '.join(problems)}):\n"
        + "\n".join(c.shown for c in calls)
        + "\n--- clean run:\n"
        + "\n".join(c.shown for c in clean)
    )


def threads_of(pid: int) -> set[int]:
    return {int(tid) for tid in os.listdir(f"/proc/{pid}/task")}


# The event loop's thread and the workers (server.MAX_WORKERS at most).
MOST_THREADS = 1 + MAX_WORKERS


def wait_settled(pid: int, timeout: float = ATTACH_TIMEOUT_S) -> None:
    """Wait until every thread of the daemon sleeps and it holds no lock (no request is
    being served, no teardown runs after its reply)."""
    deadline = time.monotonic() + timeout
    while _holds_locks(pid) or not all(_sleeps(pid, tid) for tid in threads_of(pid)):
        if time.monotonic() > deadline:
            raise AssertionError(f"daemon {pid} keeps threads busy: {sorted(threads_of(pid))}")
        time.sleep(0.005)
    threads = threads_of(pid)
    assert len(threads) <= MOST_THREADS, f"daemon {pid} has {len(threads)} threads"


def wait_idle_threads(pid: int, timeout: float = ATTACH_TIMEOUT_S) -> None:
    """Wait until the loop's is the daemon's only thread: the workers have ended, as they
    do after workers.WORKER_IDLE_S without work."""
    deadline = time.monotonic() + timeout
    while len(threads_of(pid)) > 1:
        if time.monotonic() > deadline:
            raise AssertionError(f"daemon {pid} keeps threads {sorted(threads_of(pid))}")
        time.sleep(0.05)


def _holds_locks(pid: int) -> bool:
    """Whether the process holds a flock (a volume's lock): /proc/locks names its PID."""
    with open("/proc/locks") as locks:
        return any(line.split()[4] == str(pid) for line in locks if " FLOCK " in line)


def _sleeps(pid: int, tid: int) -> bool:
    try:
        stat_line = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
    except FileNotFoundError:
        return True  # ended
    return stat_line.rsplit(")", 1)[1].split()[0] == "S"


def wake_up_fds(pid: int) -> frozenset[int]:
    """The daemon's pipes: the loop's wake-up pipe (its log is a file)."""
    fds = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("pipe:"):
                fds.add(int(fd))
    return frozenset(fds)


def _tracer_of(pid: int, tid: int) -> int | None:
    """The PID of the thread's tracer, 0 if none; None if the thread has ended."""
    try:
        status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
    except FileNotFoundError:
        return None
    for line in status.splitlines():
        if line.startswith("TracerPid:"):
            return int(line.split()[1])
    return 0


class Strace:
    """strace attached to a running daemon; stop() detaches it, by its PID only."""

    def __init__(
        self,
        daemon_pid: int,
        injections: list[str],
        output: Path,
        traced: tuple[str, ...] = TRACED,
    ) -> None:
        wait_settled(daemon_pid)
        self.daemon_pid = daemon_pid
        self.wake_up_fds = wake_up_fds(daemon_pid)
        self.output = output
        self.traced = traced
        command = ["strace", "-f", "-q", "-p", str(daemon_pid), "-o", str(output)]
        if "execve" in traced:
            command += ["-b", "execve"]  # an injection must never reach a child's program
        command += ["-e", "trace=" + ",".join(traced)]
        for injection in injections:
            command += ["-e", f"inject={injection}"]
        self.command = command
        self._stderr = open(output.with_suffix(".stderr"), "wb")  # noqa: SIM115
        self.process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=self._stderr, stderr=self._stderr
        )
        deadline = time.monotonic() + ATTACH_TIMEOUT_S
        while not all(
            _tracer_of(daemon_pid, tid) in (self.process.pid, None)
            for tid in threads_of(daemon_pid)
        ):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(
                    f"strace did not attach: {command}\n"
                    + output.with_suffix(".stderr").read_text(errors="replace")
                )
            time.sleep(0.002)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # strace detaches and exits
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._stderr.close()

    def calls(self) -> tuple[list[Call], bool]:
        return parse_trace(self.output, self.wake_up_fds, self.traced)


# --- scenarios ------------------------------------------------------------------------------

CREATE = "/VolumeDriver.Create"
MOUNT = "/VolumeDriver.Mount"
UNMOUNT = "/VolumeDriver.Unmount"
REMOVE = "/VolumeDriver.Remove"


@dataclass(frozen=True)
class Scenario:
    """One request on a volume in a known state.

    `users` are the mount IDs (with their counts) that use the volume before the
    request: containers that keep running. The volume always holds changes made through
    its mount before the request (except for Create). A `size` makes it a sized volume
    (an ext4 image, or a tmpfs when volatile).
    """

    name: str
    endpoint: str
    mount_id: str | None = None
    volatile: bool = False
    users: Mapping[str, int] = field(default_factory=dict)
    in_default: bool = True  # also in the representative (default) run
    size: str | None = None
    # For the layered scenarios (tests/faults/layered.py): the volume the request names,
    # a Create's options (in place of `base`), and the set-up in place of set_up's.
    volume: str = VOLUME
    create_options: Mapping[str, str] | None = None
    prepare: Callable[[Workspace, PluginClient], object] | None = None

    @property
    def traced(self) -> tuple[str, ...]:
        return TRACED if self.size is None else TRACED + SIZED_TRACED

    def options(self) -> dict[str, str]:
        """The Create options besides the base."""
        options = {"volatile": "true"} if self.volatile else {}
        if self.size is not None:
            options["size"] = self.size
        return options

    @property
    def operation(self) -> str:
        return self.endpoint.rsplit(".", 1)[1]

    def body(self, ws: Workspace) -> dict[str, object]:
        if self.create_options is not None:
            return {"Name": self.volume, "Opts": dict(self.create_options)}
        if self.prepare is not None:
            return {"Name": self.volume}
        if self.endpoint == CREATE:
            return {"Name": VOLUME, "Opts": {"base": str(ws.base), **self.options()}}
        if self.mount_id is None:
            return {"Name": VOLUME}
        return {"Name": VOLUME, "ID": self.mount_id}

    def records_after(self) -> dict[str, int]:
        """The records once the request has succeeded."""
        after = dict(self.users)
        if self.endpoint == MOUNT:
            assert self.mount_id is not None
            after[self.mount_id] = after.get(self.mount_id, 0) + 1
        elif self.endpoint == UNMOUNT:
            assert self.mount_id is not None
            after[self.mount_id] -= 1
            if not after[self.mount_id]:
                del after[self.mount_id]
        return after

    def live_users(self, *, succeeded: bool) -> dict[str, int]:
        """The containers still running after the request: an Unmount's container is gone
        whatever the answer; a Mount's container runs only when the Mount succeeded."""
        if self.endpoint == UNMOUNT or (self.endpoint == MOUNT and succeeded):
            return self.records_after()
        return dict(self.users)

    @property
    def keeps_changes(self) -> bool:
        return not self.volatile and self.endpoint != REMOVE


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("create", CREATE),
        Scenario("create-volatile", CREATE, volatile=True, in_default=False),
        Scenario("mount-first", MOUNT, "c1"),
        Scenario("mount-first-volatile", MOUNT, "c1", volatile=True),
        Scenario("mount-second", MOUNT, "c2", users={"c1": 1}),
        Scenario("mount-same-id", MOUNT, "c1", users={"c1": 1}),
        Scenario("unmount-count", UNMOUNT, "c1", users={"c1": 2}),
        Scenario("unmount-not-last", UNMOUNT, "c2", users={"c1": 1, "c2": 1}),
        Scenario("unmount-last", UNMOUNT, "c1", users={"c1": 1}),
        Scenario("unmount-last-volatile", UNMOUNT, "c1", volatile=True, users={"c1": 1}),
        Scenario("remove", REMOVE),
        Scenario("remove-in-use", REMOVE, users={"c1": 1}),
        Scenario("create-sized", CREATE, size=SIZE),
        Scenario("create-volatile-sized", CREATE, volatile=True, size=SIZE, in_default=False),
        Scenario("mount-first-sized", MOUNT, "c1", size=SIZE),
        Scenario("mount-first-volatile-sized", MOUNT, "c1", volatile=True, size=SIZE),
        Scenario("mount-second-sized", MOUNT, "c2", users={"c1": 1}, size=SIZE, in_default=False),
        Scenario("unmount-last-sized", UNMOUNT, "c1", users={"c1": 1}, size=SIZE),
        Scenario(
            "unmount-last-volatile-sized", UNMOUNT, "c1", volatile=True, users={"c1": 1}, size=SIZE
        ),
        Scenario("remove-sized", REMOVE, size=SIZE),
        Scenario("remove-in-use-sized", REMOVE, users={"c1": 1}, size=SIZE),
    )
}


def write_changes(mountpoint: Path) -> None:
    """Changes of every kind a container makes: add, change, delete (a whiteout), mkdir."""
    (mountpoint / "added.txt").write_text("added through the mount\n")
    (mountpoint / "changed.txt").write_text("changed through the mount\n")
    (mountpoint / "deleted.txt").unlink()
    (mountpoint / "newdir").mkdir()
    (mountpoint / "newdir" / "inner.txt").write_text("inner\n")


def set_up(scenario: Scenario, ws: Workspace, client: PluginClient) -> None:
    """Bring the volume into the scenario's state, through the daemon."""
    if scenario.prepare is not None:
        scenario.prepare(ws, client)
        return
    if scenario.endpoint == CREATE:
        return
    client.create(VOLUME, ws.base, **scenario.options())
    mountpoint = Path(client.mount(VOLUME, "setup"))
    write_changes(mountpoint)
    for mount_id, count in scenario.users.items():
        for _ in range(count):
            client.mount(VOLUME, mount_id)
    client.unmount(VOLUME, "setup")


def send(
    client: PluginClient,
    endpoint: str,
    body: object,
    connection: UnixHTTPConnection | None = None,
) -> Reply | None:
    """The request under test (on `connection`, else a new one); None when the daemon
    died before answering."""
    try:
        return client.call(endpoint, body, connection=connection)
    except (OSError, http.client.HTTPException):
        return None
    finally:
        if connection is not None:
            connection.close()


def connect_ahead(
    scenario: Scenario, client: PluginClient, daemon_pid: int
) -> UnixHTTPConnection | None:
    """For a scenario that traces ioctl: a connection the daemon has accepted already, to
    send the request on once strace is attached. The loop makes an ioctl (FIONBIO) on
    each connection it accepts, and strace counts `when=` per thread: the loop's would
    be the first ioctl, killed by `when=1` before the request even starts. None for the
    other scenarios: their requests go on a new connection, as before."""
    if "ioctl" not in scenario.traced:
        return None
    accepted = _sockets_of(daemon_pid)
    connection = client.connection()
    connection.connect()
    deadline = time.monotonic() + ATTACH_TIMEOUT_S
    while not _sockets_of(daemon_pid) - accepted:
        if time.monotonic() > deadline:
            connection.close()
            raise AssertionError(f"daemon {daemon_pid} does not accept the connection")
        time.sleep(0.002)
    return connection  # Strace waits until the loop sleeps again, past its ioctl


def _sockets_of(pid: int) -> set[str]:
    found = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            if link.startswith("socket:"):
                found.add(link)
    return found


@dataclass(frozen=True)
class CleanTrace:
    scenario: Scenario
    calls: tuple[Call, ...]

    def counts(self) -> dict[str, int]:
        """How often each syscall is called, but poll: how often it polls varies (see
        parse_trace), so there is no call past its last to kill at."""
        counts: dict[str, int] = {}
        for call in self.calls:
            if call.name != "poll":
                counts[call.name] = counts.get(call.name, 0) + 1
        return counts

    def crash_points(self) -> list[Call]:
        return crash_points(self.calls)


def crash_points(
    calls: tuple[Call, ...], *, from_first_change: bool = False, thin_walks: bool = False
) -> list[Call]:
    """Every step (full run), or one step per distinct state a crash can leave: a kill
    before each call that changes the disk or the mount table, and one right after the
    last such call (a kill before a read, a log line or a lock leaves the same state as
    the kill before the next change). `from_first_change`: the full run too starts at
    the first change (the calls before it are a process's start-up, which changes
    nothing). `thin_walks`: outside the full run, of the changes that follow each other
    in a directory walk only the first and the last (a kill between them leaves the
    same kind of state: a tree partly removed)."""
    # No fault goes into the write to the wake-up pipe (see the module's docstring).
    calls = tuple(call for call in calls if not call.wake_up)
    changing = [index for index, call in enumerate(calls) if call.mutating]
    if FULL:
        return list(calls[changing[0] :] if from_first_change and changing else calls)
    if not changing:
        return list(calls[:1])
    points = [calls[index] for index in changing]
    if thin_walks:
        walking = [_in_directory_walk(call) for call in points]
        points = [
            call
            for index, call in enumerate(points)
            if not (0 < index < len(points) - 1 and all(walking[index - 1 : index + 2]))
        ]
    if changing[-1] + 1 < len(calls):
        points.append(calls[changing[-1] + 1])
    return points


def canonical_order(calls: list[Call]) -> tuple[Call, ...]:
    """The calls with each directory walk sorted by (syscall, occurrence), renumbered.

    A walk's order varies from run to run (see the module's docstring); sorting it gives
    every run the same test ids, which pytest -p xdist and --last-failed rely on.
    """
    ordered: list[Call] = []
    walk: list[Call] = []
    for call in [*calls, None]:
        if call is not None and _in_directory_walk(call):
            walk.append(call)
            continue
        ordered += sorted(walk, key=lambda c: (c.name, c.occurrence))
        walk = []
        if call is not None:
            ordered.append(call)
    return tuple(
        Call(position, c.name, c.occurrence, c.text, c.wake_up, c.after_reply)
        for position, c in enumerate(ordered, 1)
    )


def fresh_daemon(ws: Workspace) -> Daemon:
    return ws.start(env=daemon_env())


@functools.cache
def clean_trace(name: str) -> CleanTrace:
    """Run the scenario once without faults, traced exactly like the injected runs."""
    return traced_cleanly(SCENARIOS[name])


_CLEAN_TRACES: dict[str, CleanTrace] = {}


def clean_trace_of(scenario: Scenario) -> CleanTrace:
    """clean_trace for a scenario of another list (tests/faults/layered.py), by name."""
    if scenario.name not in _CLEAN_TRACES:
        _CLEAN_TRACES[scenario.name] = traced_cleanly(scenario)
    return _CLEAN_TRACES[scenario.name]


def traced_cleanly(scenario: Scenario) -> CleanTrace:
    name = scenario.name
    ws = Workspace()
    strace: Strace | None = None
    try:
        daemon = fresh_daemon(ws)
        client = ws.client()
        set_up(scenario, ws, client)
        connection = connect_ahead(scenario, client, daemon.pid)
        strace = Strace(daemon.pid, [], ws.logs / "clean.trace", scenario.traced)
        reply = send(ws.client(), scenario.endpoint, scenario.body(ws), connection)
        wait_settled(daemon.pid)
        strace.stop()
        if reply is None or reply.status != 200:
            raise AssertionError(f"clean run of {name} failed: {reply}\n{daemon.log()}")
        calls, killed = strace.calls()
        if killed or not calls:
            raise AssertionError(f"clean run of {name} traced nothing: {strace.command}")
        return CleanTrace(scenario, canonical_order(calls))
    finally:
        if strace is not None:
            strace.stop()
        ws.cleanup()


# --- one kill ---------------------------------------------------------------------------------

Attach = Callable[[int, list[str], tuple[str, ...]], Strace]  # strace on a daemon (conftest.Tracer)


def killed_where_named(
    calls: list[Call], killed: bool, call: Call, clean: tuple[Call, ...], trace: Path, context: str
) -> None:
    """The traced process died of the kill on entering `call`, the named occurrence of
    its syscall, having taken the clean run's path up to there."""
    assert killed, trace.read_text()
    assert calls and calls[-1].name == call.name, "\n".join(c.shown for c in calls)
    assert calls[-1].occurrence == call.occurrence, "\n".join(c.shown for c in calls)
    same_calls_as_clean_run(calls, clean, context)


def request_killed_at(
    daemon: Daemon, attach: Attach, trace: CleanTrace, call: Call, ws: Workspace
) -> None:
    """Send the scenario's request with a kill on entering `call`; the daemon must die
    there."""
    scenario = trace.scenario
    client = ws.client()
    connection = connect_ahead(scenario, client, daemon.pid)
    injection = f"{call.name}:signal=KILL:when={call.occurrence}"
    strace = attach(daemon.pid, [injection], scenario.traced)
    reply = send(client, scenario.endpoint, scenario.body(ws), connection)
    try:
        status: int | None = daemon.process.wait(
            1 if reply is not None and not call.after_reply else 10
        )
    except subprocess.TimeoutExpired:
        status = None
    strace.stop()
    if call.after_reply:
        # An Unmount's teardown (SPEC B11): the reply of success comes first.
        assert reply is not None and reply.status == 200 and status == -9, (
            f"the injection at {call.label} ({call.shown}), after the reply, was not "
            f"reached or the reply did not come first: reply {reply}, exit status {status}"
            f"\n{daemon.log()}"
        )
    else:
        assert reply is None and status == -9, (
            f"the injection at {call.label} ({call.shown}) was not reached: reply {reply}, "
            f"exit status {status}\n{daemon.log()}"
        )
    calls, killed = strace.calls()
    killed_where_named(
        calls, killed, call, trace.calls, strace.output, f"{scenario.name}-{call.label}"
    )


def request_completes(daemon: Daemon, attach: Attach, trace: CleanTrace, ws: Workspace) -> None:
    """Send the request with a kill one call past the clean run's count of every
    syscall: it must complete, with the clean run's calls."""
    scenario = trace.scenario
    injections = [f"{name}:signal=KILL:when={n + 1}" for name, n in trace.counts().items()]
    client = ws.client()
    connection = connect_ahead(scenario, client, daemon.pid)
    strace = attach(daemon.pid, injections, scenario.traced)
    reply = send(client, scenario.endpoint, scenario.body(ws), connection)
    assert reply is not None and reply.status == 200, (
        f"{scenario.name}: with a kill one call past the clean count of every syscall "
        f"the request must complete: {reply}\n{daemon.log()}"
    )
    wait_settled(daemon.pid)
    strace.stop()
    calls, killed = strace.calls()
    assert not killed
    assert len(calls) == len(trace.calls)
    same_calls_as_clean_run(calls, trace.calls, scenario.name)


# --- checks -------------------------------------------------------------------------------


def read_records(folder: Path) -> dict[str, int]:
    """activemounts/ as {ID: count}; every record must be a complete {"UsageCount": N}."""
    records = {}
    for entry in sorted(os.listdir(folder / "activemounts")):
        raw = (folder / "activemounts" / entry).read_bytes()
        document = json.loads(raw)  # a truncated record fails here
        assert isinstance(document, dict) and set(document) == {"UsageCount"}, (entry, raw)
        count = document["UsageCount"]
        assert isinstance(count, int) and count >= 1, (entry, raw)
        records[entry] = count
    return records


def volume_folders(root: Path) -> list[Path]:
    """What the daemon lists as volumes: folders whose name is a valid volume name."""
    if not root.exists():
        return []
    return sorted(
        p for p in root.iterdir() if p.is_dir() and re.fullmatch(r"[a-zA-Z0-9][\w.-]*", p.name)
    )


def invariant_violations(root: Path) -> list[str]:
    """A2: a record in <vol>/activemounts/ means the overlay is mounted at <vol>/mountpoint
    (per the mount table) with that volume's upper/; and every state file is whole (B2)."""
    problems = []
    for folder in volume_folders(root):
        metadata = folder / "metadata.json"
        if metadata.exists():
            try:
                document = json.loads(metadata.read_bytes())
                assert isinstance(document, dict)
                bases = document["BaseDirPath"]
                # A list (bottom base first) for a layered volume (metadata.py).
                assert isinstance(bases, str) or (
                    isinstance(bases, list) and bases and all(isinstance(b, str) for b in bases)
                )
            except (ValueError, KeyError, AssertionError) as error:
                problems.append(f"{metadata} is not whole: {error!r} {metadata.read_bytes()!r}")
        if not (folder / "activemounts").is_dir():
            continue
        try:
            records = read_records(folder)
        except (ValueError, AssertionError) as error:
            problems.append(f"{folder}/activemounts holds a broken record: {error!r}")
            continue
        if not records:
            continue
        uppers = (f"upperdir={folder / 'upper'}", f"upperdir={folder / 'limit' / 'upper'}")
        overlays = [
            m
            for m in mounts_at(folder / "mountpoint")
            if m.fstype == "overlay" and any(upper in m.super_options for upper in uppers)
        ]
        if not overlays:
            problems.append(
                f"{folder.name}: records {records} but no overlay of its upper/ is mounted on "
                f"{folder / 'mountpoint'} (mount table there: {mounts_at(folder / 'mountpoint')})"
            )
        if size_limit_of(folder) is not None and not any(
            m.fstype in ("ext4", "tmpfs") for m in mounts_at(folder / "limit")
        ):
            problems.append(
                f"{folder.name}: records {records} but its storage is not mounted on "
                f"{folder / 'limit'}: its changes go to the host's disk, past the limit"
            )
    return problems


def assert_invariant(root: Path, context: str) -> None:
    problems = invariant_violations(root)
    assert not problems, f"{context}: the invariant does not hold:\n" + "\n".join(problems)


# Names a volume folder may hold when nobody uses it: the state, plus the staging files a
# crash may leave (they are never read, and the next atomic write replaces them).
CLEAN_ENTRIES = {"metadata.json", "upper", "activemounts"}
STAGING = {".activemount.tmp", ".metadata.json.tmp", ".unreleased.json.tmp"}
# A sized volume keeps its changes in its image (none on disk when volatile), and what
# its storage held at its last unmount.
SIZED_ENTRIES = {"metadata.json", "activemounts"}
SIZED_OPTIONAL = {"usage.json", ".usage.json.tmp"}


def size_limit_of(folder: Path) -> int | None:
    """The volume's SizeLimit, per its metadata.json; None for a volume without one."""
    try:
        document = json.loads((folder / "metadata.json").read_bytes())
    except (OSError, ValueError):
        return None
    limit = document.get("SizeLimit") if isinstance(document, dict) else None
    return limit if isinstance(limit, int) else None


def clean_entries(folder: Path) -> tuple[set[str], set[str]]:
    """The names an unused volume's folder must hold, and those it may hold besides."""
    if size_limit_of(folder) is None:
        return CLEAN_ENTRIES, STAGING
    volatile = json.loads((folder / "metadata.json").read_bytes()).get("Volatile") is True
    return SIZED_ENTRIES | (set() if volatile else {"size.img"}), STAGING | SIZED_OPTIONAL


def loop_backing_files() -> list[str]:
    """What every attached loop device is backed by, as the kernel names it."""
    found = []
    for device in Path("/sys/block").glob("loop*"):
        with contextlib.suppress(OSError):
            found.append((device / "loop" / "backing_file").read_text().strip())
    return found


def loop_devices_under(root: Path) -> list[str]:
    """The backing files of the loop devices attached to files under `root`."""
    top = os.path.realpath(root) + "/"
    return [backing for backing in loop_backing_files() if backing.startswith(top)]


def own_changes(folder: Path, scenario: Scenario) -> dict[str, tuple[object, ...]]:
    """The volume's changes as a snapshot. A sized volume's are in its storage, read on
    limit/ while it is mounted, else in its image mounted aside for the while (keyed
    relative to the upper, so that both compare)."""
    if scenario.size is None:
        return snapshot(folder / "upper")
    if mounts_at(folder / "limit"):
        return _relative_snapshot(folder / "limit" / "upper")
    image = folder / "size.img"
    if scenario.volatile or not image.exists():
        return {}
    with image_mounted_aside(image) as top:
        return _relative_snapshot(top / "upper")


def _relative_snapshot(top: Path) -> dict[str, tuple[object, ...]]:
    return {os.path.relpath(path, top): found for path, found in snapshot(top).items()}


@contextlib.contextmanager
def image_mounted_aside(image: Path) -> Iterator[Path]:
    """The image's filesystem, mounted on a folder of its own while the block runs."""
    aside = Path(tempfile.mkdtemp(prefix="image-aside-"))
    try:
        sizelimit.mount_image(image, aside)
        try:
            yield aside
        finally:
            kernel.unmount(aside)
    finally:
        aside.rmdir()


def check_image(image: Path, context: str) -> None:
    """A made image holds a sound filesystem (e2fsck finds nothing to repair)."""
    checked = subprocess.run(
        ["e2fsck", "-f", "-n", str(image)], capture_output=True, text=True, check=False
    )
    assert checked.returncode == 0, f"{context}: {image} is damaged:\n{checked.stdout}"


@dataclass
class Expectation:
    """What the checks compare against, taken before the request under test."""

    scenario: Scenario
    upper: dict[str, tuple[object, ...]]
    base: dict[str, tuple[object, ...]]

    @classmethod
    def take(cls, scenario: Scenario, ws: Workspace) -> Expectation:
        folder = ws.root / VOLUME
        upper = own_changes(folder, scenario) if folder.exists() else {}
        return cls(scenario, upper, snapshot(ws.base))


def check_content(
    mountpoint: Path, expectation: Expectation, ws: Workspace, *, first_user: bool
) -> None:
    """What a container sees: the base, plus the changes unless a volatile volume was just
    mounted by its first user (which discards them)."""
    assert (mountpoint / "kept.txt").read_text() == "base kept\n"
    assert (mountpoint / "sub" / "nested.txt").read_text() == "base nested\n"
    scenario = expectation.scenario
    if scenario.endpoint == CREATE:
        assert sorted(os.listdir(mountpoint)) == sorted(os.listdir(ws.base))
    elif scenario.keeps_changes:
        assert (mountpoint / "added.txt").read_text() == "added through the mount\n"
        assert (mountpoint / "changed.txt").read_text() == "changed through the mount\n"
        assert not (mountpoint / "deleted.txt").exists()
        assert (mountpoint / "newdir" / "inner.txt").read_text() == "inner\n"
    elif scenario.volatile and first_user:
        assert sorted(os.listdir(mountpoint)) == sorted(os.listdir(ws.base)), (
            f"a volatile volume kept its changes at its first mount: {os.listdir(mountpoint)}"
        )
        assert (mountpoint / "changed.txt").read_text() == "base original\n"


def mount_and_check(
    ws: Workspace, client: PluginClient, expectation: Expectation, mount_id: str, context: str
) -> None:
    folder = ws.root / VOLUME
    first_user = not read_records(folder)
    mountpoint = Path(client.mount(VOLUME, mount_id))
    assert mountpoint == folder / "mountpoint", mountpoint
    assert_invariant(ws.root, f"{context}, {mount_id} mounted")
    check_content(mountpoint, expectation, ws, first_user=first_user)


def check_usable_and_release(
    ws: Workspace,
    client: PluginClient,
    expectation: Expectation,
    *,
    live: Mapping[str, int],
    may_leak: Mapping[str, int],
    context: str,
) -> None:
    """The volume mounts and unmounts normally, keeps what it must, and ends clean.

    `live` are the containers still running; once they (and the probe) are gone, only
    the records in `may_leak` may remain (a count that a crash between writing the
    record and answering dockerd leaves behind: nobody will ever send its Unmount).
    Then one more container comes and goes: a regular volume still shows its changes,
    a volatile one none.
    """
    folder = ws.root / VOLUME
    mount_and_check(ws, client, expectation, "probe", context)
    client.unmount(VOLUME, "probe")
    assert_invariant(ws.root, f"{context}, probe unmounted")
    records = read_records(folder)
    for mount_id, count in live.items():
        assert records.get(mount_id, 0) >= count, (
            f"{context}: running container {mount_id} (count {count}) lost its record: {records}"
        )
        for _ in range(count):
            client.unmount(VOLUME, mount_id)
    left = read_records(folder)
    for mount_id, count in left.items():
        assert count <= may_leak.get(mount_id, 0), (
            f"{context}: after every container stopped, record {mount_id}={count} remains "
            f"(allowed: {dict(may_leak)}); the volume stays mounted for nobody"
        )
        for _ in range(count):
            client.unmount(VOLUME, mount_id)
    assert_clean(ws, context)
    mount_and_check(ws, client, expectation, "last", context)
    client.unmount(VOLUME, "last")
    assert_clean(ws, context)
    scenario = expectation.scenario
    if scenario.endpoint != CREATE and scenario.keeps_changes:
        assert own_changes(folder, scenario) == expectation.upper, f"{context}: changes lost"
    elif scenario.size is not None:
        assert set(own_changes(folder, scenario)) <= {"."}, f"{context}: changes left"
    elif scenario.volatile or scenario.endpoint == CREATE:
        assert os.listdir(folder / "upper") == [], f"{context}: changes left in upper/"
    assert snapshot(ws.base) == expectation.base, f"{context}: the base changed"


def assert_clean(ws: Workspace, context: str) -> None:
    """Nobody uses the volume: no record, no mount, only the state and staging files."""
    folder = ws.root / VOLUME
    assert read_records(folder) == {}, f"{context}: {read_records(folder)}"
    assert mounts_at(folder / "mountpoint") == [], f"{context}: still mounted for nobody"
    entries = set(os.listdir(folder))
    required, optional = clean_entries(folder)
    assert required <= entries <= required | optional, f"{context}: {sorted(entries)}"
    assert mounts_under(ws.root) == [], f"{context}: mounted for nobody: {mounts_under(ws.root)}"
    assert loop_devices_under(ws.root) == [], (
        f"{context}: loop devices stay attached for nobody: {loop_devices_under(ws.root)}"
    )


def warned_about(log: str, folder: Path) -> bool:
    return any(" WARNING " in line and str(folder) in line for line in log.splitlines())


def no_tracebacks(daemon: Daemon, context: str) -> None:
    log = daemon.log()
    assert "Traceback" not in log, f"{context}: the daemon hit an unexpected exception:\n{log}"


@contextlib.contextmanager
def log_on_failure(daemon: Daemon, what: str) -> Iterator[None]:
    """A failed check shows the daemon's log (its own file, not captured by pytest)."""
    try:
        yield
    except AssertionError as failure:
        raise AssertionError(f"{failure}\n--- log of {what}:\n{daemon.log()}") from None


def strerror_of(name: str) -> str:
    return os.strerror(getattr(errno, name))


def unmounted_like_a_reboot(root: Path) -> None:
    """What a reboot does to the state root: every mount under it is gone."""
    for entry in sorted(mounts_under(root), key=lambda m: len(m.mount_point), reverse=True):
        subprocess.run(["umount", entry.mount_point], check=True)
    assert mounts_under(root) == []


# --- what must hold after a fault -------------------------------------------------------------

CRASHED = "crashed"  # the daemon was killed in the middle of the request, then restarted
FAILED = "failed"  # the request answered HTTP 500
SUCCEEDED = "succeeded"  # the request answered HTTP 200


def verify_after_fault(
    ws: Workspace,
    client: PluginClient,
    expectation: Expectation,
    *,
    outcome: str,
    log: str,
    context: str,
) -> None:
    """The state is safe, nothing of value is lost, and the volume works again.

    For a crash, `client` talks to the restarted daemon and `log` is its log.
    """
    scenario = expectation.scenario
    folder = ws.root / VOLUME
    assert_invariant(ws.root, context)
    if scenario.endpoint == CREATE:
        if folder.exists():
            assert (folder / "metadata.json").exists(), (
                f"{context}: a half-made volume is visible: {sorted(os.listdir(folder))}"
            )
            assert outcome != FAILED, (
                f"{context}: Create answered an error but the volume exists "
                f"({sorted(os.listdir(folder))}); a retry gets 'volume already exists'"
            )
            document = json.loads((folder / "metadata.json").read_bytes())
            if scenario.size is None:
                assert document["BaseDirPath"] == str(ws.base)
            else:
                assert document["BaseDirPath"] == [str(ws.base)]
                assert document["SizeLimit"] == parse_size(scenario.size)
                if not scenario.volatile:
                    check_image(folder / "size.img", context)
            assert document["Volatile"] is scenario.volatile
            assert VOLUME in client.names()
        else:
            assert outcome != SUCCEEDED, f"{context}: Create succeeded but there is no volume"
            assert VOLUME not in client.names()
            client.ok(CREATE, scenario.body(ws))  # the retry dockerd's user makes
        check_usable_and_release(ws, client, expectation, live={}, may_leak={}, context=context)
        return

    if scenario.endpoint == REMOVE:
        if folder.exists():
            assert outcome != SUCCEEDED, f"{context}: Remove succeeded but {folder} is there"
            if not (folder / "metadata.json").exists():
                if outcome == CRASHED:
                    assert warned_about(log, folder), (
                        f"{context}: {folder} has no metadata.json and the restart neither "
                        f"removed it nor warned about it:\n{log}"
                    )
            else:
                missing = clean_entries(folder)[0] - {"metadata.json"} - set(os.listdir(folder))
                assert not missing, (
                    f"{context}: a half-removed volume is visible (List shows it) but lacks "
                    f"{sorted(missing)}, so it cannot mount: {sorted(os.listdir(folder))}"
                )
                mountpoint = Path(client.mount(VOLUME, "probe"))
                assert (mountpoint / "kept.txt").read_text() == "base kept\n"
                client.unmount(VOLUME, "probe")
                assert_invariant(ws.root, f"{context}, probe")
        client.ok(REMOVE, {"Name": VOLUME})  # the retry; a no-op when it is gone
        assert not folder.exists(), f"{context}: {sorted(os.listdir(folder))}"
        assert mounts_under(ws.root) == [], f"{context}: {mounts_under(ws.root)}"
        assert loop_devices_under(ws.root) == [], f"{context}: {loop_devices_under(ws.root)}"
        assert VOLUME not in client.names()
        assert snapshot(ws.base) == expectation.base, f"{context}: the base changed"
        return

    # Mount and Unmount never remove a volume.
    required = clean_entries(folder)[0]
    assert set(os.listdir(folder)) >= required, f"{context}: {sorted(os.listdir(folder))}"
    records = read_records(folder)
    before, after = dict(scenario.users), scenario.records_after()
    if outcome == SUCCEEDED:
        assert records == after, f"{context}: records {records}, expected {after}"
    elif outcome == FAILED and scenario.endpoint == MOUNT:
        assert records == before, f"{context}: a failed Mount changed the records: {records}"
    else:
        assert records in (before, after), (
            f"{context}: records {records} are neither the old {before} nor the new {after}"
        )
    succeeded = outcome == SUCCEEDED
    if outcome == FAILED and scenario.endpoint == MOUNT:
        assert scenario.mount_id is not None
        client.mount(VOLUME, scenario.mount_id)  # dockerd's next try
        succeeded = True
    # A crash between the record and the answer leaks the request's own count: dockerd
    # never sends an Unmount for a Mount that failed, nor again for one that failed.
    may_leak = {scenario.mount_id: 1} if outcome == CRASHED and scenario.mount_id else {}
    check_usable_and_release(
        ws,
        client,
        expectation,
        live=scenario.live_users(succeeded=succeeded),
        may_leak=may_leak,
        context=context,
    )
