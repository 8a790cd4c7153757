"""Debian roots for the host tests: another release's own python3, run with chroot.

A root is `debootstrap --variant=minbase` of one suite with the packages below, built
once and kept under /var/cache/docker-on-top in a folder named after a hash of what goes
into it (suite, mirror, packages, ROOT_FORMAT), so a changed list makes a new root and an
unchanged one is reused. A test never changes the cached root: `chroot_of` mounts a
throw-away overlay over it, with /proc, /sys, /dev and a /tmp on the host's filesystem
(the protocol tests mount overlays there, and an overlay's upper directory cannot be on
an overlay), and unmounts all of it afterwards, also when the test fails.
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..mounts import mounts_under, unmount_all_under
from ..protocol.conftest import PluginClient, socket_answers

REPO = Path(__file__).resolve().parents[2]
CACHE = Path("/var/cache/docker-on-top")
MIRROR = "http://deb.debian.org/debian"
# Suite and the python3 it ships: Debian 11, 12 and 13.
SUITES = {"bullseye": (3, 9), "bookworm": (3, 11), "trixie": (3, 13)}
# Where the unit and protocol suites run too: the oldest and newest Python the package
# supports (Debian 12's python3 runs the whole suite on the CI host).
TEST_SUITES = ("bullseye", "trixie")
# The interpreter with Debian's own pytest; e2fsprogs for chattr (not in trixie's
# minbase), and what the unit tests run: cp, tar, mount (minbase has them).
PACKAGES = ("python3", "python3-pytest", "e2fsprogs")
# Bumped when the way a root is made changes, so old caches are not reused.
ROOT_FORMAT = 1
# Where the checkout is copied inside a root.
SOURCE = "/src"
DEBOOTSTRAP_SCRIPTS = Path("/usr/share/debootstrap/scripts")
DEBOOTSTRAP_TIMEOUT_S = 900
RUN_TIMEOUT_S = 600
START_TIMEOUT_S = 20.0
# Not copied into a root: caches and build output of the host's runs.
_NOT_COPIED = shutil.ignore_patterns(
    ".git", "__pycache__", ".*_cache", ".hypothesis", "build", "dist", "*.egg-info"
)


def cached_root(suite: str) -> Path:
    """The cached root of `suite`, made with debootstrap if it is not there yet."""
    recipe = f"{ROOT_FORMAT} {suite} {MIRROR} {','.join(PACKAGES)}"
    key = hashlib.sha256(recipe.encode()).hexdigest()[:16]
    root = CACHE / f"debian-{suite}-{key}"
    if (root / ".complete").exists():
        return root
    partial = root.with_name(root.name + ".partial")
    # A debootstrap cut short leaves its /proc mounted in there.
    unmount_all_under(partial)
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    # An older debootstrap (Ubuntu 22.04's) may not know the suite yet; sid's script,
    # which every Debian suite's links to, makes it.
    script = [] if (DEBOOTSTRAP_SCRIPTS / suite).exists() else [str(DEBOOTSTRAP_SCRIPTS / "sid")]
    subprocess.run(
        ["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}",
         suite, str(partial), MIRROR, *script],
        check=True, timeout=DEBOOTSTRAP_TIMEOUT_S, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    # What apt downloaded is of no use once installed.
    shutil.rmtree(partial / "var" / "cache" / "apt" / "archives", ignore_errors=True)
    (partial / ".complete").write_text(recipe + "\n")
    shutil.rmtree(root, ignore_errors=True)
    partial.rename(root)
    return root


@dataclass(frozen=True)
class Chroot:
    """A throw-away view of a cached root: `path` is its `/` seen from the host."""

    path: Path
    tmp: Path  # the host folder mounted on its /tmp

    def host_path(self, inside: str) -> Path:
        return self.path / inside.lstrip("/")

    def run(
        self,
        command: Sequence[str],
        *,
        cwd: str = "/",
        env: Mapping[str, str] | None = None,
        timeout: float = RUN_TIMEOUT_S,
        check: bool = False,
    ) -> subprocess.CompletedProcess[str]:
        """`command` inside the root, with a plain environment, output captured."""
        return subprocess.run(
            ["chroot", str(self.path), "/usr/bin/env", "-C", cwd, "-i", *_environment(env),
             *command],
            capture_output=True, text=True, timeout=timeout, check=check,
        )  # fmt: skip

    def popen(
        self, command: Sequence[str], *, log: Path, cwd: str = "/"
    ) -> subprocess.Popen[bytes]:
        """`command` started inside the root, its output going to `log` (a host path)."""
        with open(log, "wb") as out:
            return subprocess.Popen(
                ["chroot", str(self.path), "/usr/bin/env", "-C", cwd, "-i", *_environment(None),
                 *command],
                stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip


class DaemonInRoot:
    """The daemon started inside a root by `command`, serving on `socket` (a path in the
    root), which the host's `client` reaches."""

    def __init__(self, root: Chroot, command: Sequence[str], socket: str, cwd: str = "/") -> None:
        self.log = root.tmp / "daemon.log"
        self.process = root.popen(command, log=self.log, cwd=cwd)
        self.client = PluginClient(root.host_path(socket))
        deadline = time.monotonic() + START_TIMEOUT_S
        while not socket_answers(self.client.socket_path):
            assert self.process.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.05)

    def stop(self) -> None:
        """SIGTERM; it must exit cleanly."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        assert self.process.wait(20) == 0, self.log.read_text()

    def close(self) -> None:
        """Killed, if a failed test left it running."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(20)


def _environment(extra: Mapping[str, str] | None) -> list[str]:
    variables = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "LANG": "C.UTF-8",
        "HOME": "/root",
    }
    variables.update(extra or {})
    return [f"{key}={value}" for key, value in variables.items()]


@contextlib.contextmanager
def chroot_of(suite: str, *, with_source: bool = True) -> Iterator[Chroot]:
    """An overlay over `suite`'s cached root with the kernel file systems mounted, and
    the checkout copied to SOURCE (when `with_source`); all unmounted afterwards."""
    lower = cached_root(suite)
    work = Path(tempfile.mkdtemp(prefix=f"dot-{suite}-", dir="/var/tmp"))
    merged, upper, overlay_work, tmp = (work / name for name in ("root", "upper", "work", "tmp"))
    for folder in (merged, upper, overlay_work, tmp):
        folder.mkdir()
    tmp.chmod(0o1777)
    try:
        _mount("overlay", "overlay", merged,
               f"lowerdir={lower},upperdir={upper},workdir={overlay_work}")  # fmt: skip
        # Private: what is mounted in the chroot stays out of the host's other mounts.
        subprocess.run(["mount", "--make-private", str(merged)], check=True)
        _mount("proc", "proc", merged / "proc")
        _mount("sysfs", "sysfs", merged / "sys")
        _bind(Path("/dev"), merged / "dev")
        _bind(tmp, merged / "tmp")
        if with_source:
            shutil.copytree(REPO, merged / SOURCE.lstrip("/"), ignore=_NOT_COPIED, symlinks=True)
        yield Chroot(merged, tmp)
    finally:
        # Whatever the tests inside mounted (under /tmp) goes first, the root last.
        unmount_all_under(merged)
        left = mounts_under(merged) + mounts_under(tmp)
        if not left:
            shutil.rmtree(work, ignore_errors=True)
        assert not left, f"still mounted after the chroot: {left}"


def _mount(kind: str, source: str, target: Path, options: str | None = None) -> None:
    command = ["mount", "-t", kind, source, str(target)]
    subprocess.run([*command, "-o", options] if options else command, check=True)


def _bind(source: Path, target: Path) -> None:
    subprocess.run(["mount", "--bind", str(source), str(target)], check=True)
    # A bind joins the peer group of its source: leave it, or mounts made below it in
    # the chroot would show in the host's /dev or /var/tmp too.
    subprocess.run(["mount", "--make-private", str(target)], check=True)
