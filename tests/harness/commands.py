"""Running commands for the end-to-end tests: every call with a timeout, output kept
for the failure message; waiting for a condition; stopping a process the tests started
(by its PID, never by name); the mount table; installing a missing Debian package."""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

# Every docker call gets a timeout.  dockerd itself gives a plugin 2 minutes
# for Create and Mount, so a container start may legitimately take that long.
T_SHORT = 60
T_RUN = 180


class CommandError(AssertionError):
    pass


def sh(args, *, timeout=T_SHORT, check=True, input=None, env=None, cwd=None):
    """Runs a command (list of args), returns CompletedProcess with text output."""
    try:
        res = subprocess.run(
            [str(a) for a in args],
            input=input,
            capture_output=True,
            text=not isinstance(input, bytes),
            timeout=timeout,
            env=env,
            cwd=cwd,
        )
    except subprocess.TimeoutExpired as e:
        raise CommandError(
            f"timed out after {timeout}s: {shlex.join(map(str, args))}\n"
            f"stdout: {e.stdout!r}\nstderr: {e.stderr!r}"
        ) from None
    if isinstance(res.stdout, bytes):
        res.stdout = res.stdout.decode(errors="replace")
        res.stderr = res.stderr.decode(errors="replace")
    if check and res.returncode != 0:
        raise CommandError(describe(res))
    return res


def describe(res):
    return (
        f"command: {shlex.join(map(str, res.args))}\nexit code: {res.returncode}\n"
        f"stdout:\n{res.stdout}\nstderr:\n{res.stderr}"
    )


def tail(path, lines=200):
    try:
        text = Path(path).read_text(errors="replace")
    except OSError as e:
        return f"<cannot read {path}: {e}>"
    return "\n".join(text.splitlines()[-lines:])


def _unescape_mountinfo(s):
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s)


def mountinfo():
    """Mounts of our mount namespace: list of dicts (in mount order)."""
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        f = left.split()
        r = right.split()
        out.append(
            {
                "id": int(f[0]),
                "mountpoint": _unescape_mountinfo(f[4]),
                "fstype": r[0] if r else "",
                "source": _unescape_mountinfo(r[1]) if len(r) > 1 else "",
                "superopts": r[2] if len(r) > 2 else "",
            }
        )
    return out


def mounts_at(path):
    path = os.path.normpath(str(path))
    return [m for m in mountinfo() if m["mountpoint"] == path]


def mounts_under(path):
    prefix = os.path.normpath(str(path)) + "/"
    return [m for m in mountinfo() if m["mountpoint"].startswith(prefix)]


def unmount_all_under(path):
    """Unmounts everything below path (deepest and newest first). Returns leftovers."""
    for _ in range(20):
        left = mounts_under(path)
        if not left:
            return []
        left.sort(key=lambda m: (m["mountpoint"].count("/"), m["id"]), reverse=True)
        for m in left:
            r = sh(["umount", m["mountpoint"]], check=False, timeout=30)
            if r.returncode != 0:
                sh(["umount", "-l", m["mountpoint"]], check=False, timeout=30)
    return mounts_under(path)


def wait_until(pred, timeout, interval=0.1):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            return v
        time.sleep(interval)


def stop_pid(proc, timeout):
    """SIGTERM one process we started, wait, then SIGKILL. True if it obeyed SIGTERM."""
    if proc.poll() is not None:
        return True
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
        return True
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(30)
        return False


def require_root():
    if os.geteuid() != 0:
        pytest.fail("the e2e tests must run as root (they drive dockerd and mount overlays)")


def apt_install(packages, *, recommends=True):
    """Installs Debian packages; callers ask only for what is missing."""
    if not shutil.which("apt-get"):
        pytest.fail(f"missing tools and no apt-get to install {packages}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    sh(["apt-get", "update"], timeout=600, env=env)
    extra = [] if recommends else ["--no-install-recommends"]
    sh(["apt-get", "install", "-y", *extra, *packages], timeout=900, env=env)
