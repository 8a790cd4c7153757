"""What a container writes into its volume is hostile: it must never reach the host.

Each test plays the container's part on a real overlay (issue 12): setuid files, symlinks
swapped in while a command walks, FIFOs and devices, trees deeper than PATH_MAX, names
that forge output, sparse files of a terabyte.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from docker_on_top.driver import Driver

from ..mounts import unmount_all_under

NOBODY = 65534


@pytest.fixture
def open_workspace() -> Iterator[Path]:
    """A workspace that every user may traverse (pytest's tmp_path is 0700 and would
    hide the state root from other users whatever its own mode)."""
    folder = Path(tempfile.mkdtemp(prefix="dot-hostile-", dir="/var/tmp"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        unmount_all_under(folder)
        shutil.rmtree(folder)


def run_as_nobody(*argv: str) -> str | None:
    """What a command run by a host user without privilege prints; None when it fails
    or cannot even start. (Not `setpriv`, which looks the program up while still root.)"""
    try:
        ran = subprocess.run(
            argv, user=NOBODY, group=NOBODY, extra_groups=[], capture_output=True, text=True
        )
    except PermissionError:
        return None
    return ran.stdout if ran.returncode == 0 else None


# --- 1. a setuid file in upper/ is no way to root for host users ----------------------


def test_host_users_cannot_run_a_setuid_file_of_a_volume(open_workspace: Path) -> None:
    root = open_workspace / "root"
    base = open_workspace / "base"
    base.mkdir()
    driver = Driver(root)
    driver.recover()
    driver.create("v", {"base": str(base)})
    view = Path(driver.mount("v", "c" * 64))
    # What a container with default capabilities can do through its volume.
    shutil.copy("/usr/bin/id", view / "id")
    os.chmod(view / "id", 0o4755)
    driver.unmount("v", "c" * 64)
    setuid_copy = root / "v" / "upper" / "id"
    assert os.stat(setuid_copy).st_mode & stat.S_ISUID
    assert run_as_nobody(str(setuid_copy), "-u") is None
    for folder in (root, root / "v"):
        assert stat.S_IMODE(os.stat(folder).st_mode) & 0o077 == 0


def test_start_up_makes_an_open_root_and_volume_folders_private(
    open_workspace: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """As the Go plugin leaves them: every folder 0755."""
    root = open_workspace / "root"
    base = open_workspace / "base"
    base.mkdir()
    driver = Driver(root)
    driver.recover()
    driver.create("v", {"base": str(base)})
    driver.create("w", {"base": str(base)})
    for folder in (root, root / "v", root / "w"):
        folder.chmod(0o755)
    (root / "v" / "upper" / "x").write_text("x")
    with caplog.at_level(logging.INFO, logger="docker_on_top"):
        Driver(root).recover()
    for folder in (root, root / "v", root / "w"):
        assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
    assert run_as_nobody("cat", str(root / "v" / "upper" / "x")) is None
    tightened = [r for r in caplog.records if "access of other users" in r.getMessage()]
    assert len(tightened) == 1
    assert "3 folder(s)" in tightened[0].getMessage()
    # The upper root is the root of the containers' view: its mode is theirs, kept.
    assert stat.S_IMODE(os.stat(root / "v" / "upper").st_mode) == 0o755
