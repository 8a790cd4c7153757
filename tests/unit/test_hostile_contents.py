"""What a container writes into its volume is hostile: it must never reach the host.

Each test plays the container's part on a real overlay (issue 12): setuid files, symlinks
swapped in while a command walks, FIFOs and devices, trees deeper than PATH_MAX, names
that forge output, sparse files of a terabyte.
"""

from __future__ import annotations

import io
import json
import logging
import os
import resource
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from docker_on_top.cli import main
from docker_on_top.driver import Driver

from ..mounts import unmount_all_under

NOBODY = 65534


@pytest.fixture
def workspace(tmp_path: Path) -> Iterator[Path]:
    """The workspace of the other fixtures on a tmpfs of its own: trees 5,000 deep are
    made there fifty times faster than on ext4, and go away with it."""
    if os.geteuid() != 0:
        pytest.fail("these tests mount overlays and must run as root")
    subprocess.run(["mount", "-t", "tmpfs", "dot-hostile", str(tmp_path)], check=True)
    try:
        yield tmp_path
    finally:
        unmount_all_under(tmp_path)


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


# --- helpers for the tests below ----------------------------------------------------------

ID = "c" * 64
SECRET = "host-secret-file"


@pytest.fixture
def volume(driver: Driver, base: Path) -> Path:
    """A volume `v`, made and unmounted; returns its upper directory."""
    driver.create("v", {"base": str(base)})
    return driver.root / "v" / "upper"


def run(root: Path, *argv: str) -> int:
    return main([*argv, "--root", str(root)])


def run_cli(root: Path, *argv: str, **options: Any) -> subprocess.CompletedProcess[bytes]:
    """The command line in a process of its own, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "docker_on_top", *argv, "--root", str(root)],
        capture_output=True,
        cwd=REPO,
        **options,
    )


REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def outside(workspace: Path) -> Path:
    """A host folder that no command may ever read through a volume."""
    folder = workspace / "outside"
    folder.mkdir()
    (folder / SECRET).write_bytes(b"s" * 1_000_000)
    return folder


def layer_names(layer: bytes) -> list[str]:
    with tarfile.open(fileobj=io.BytesIO(layer)) as tar:
        return tar.getnames()


# --- 2. a directory swapped for a symlink is never followed -------------------------------


class SwappedAfterListing:
    """os.scandir that, once it has listed `directory`, lets `swap` run: the container
    acting right after a command read the listing (deterministic, unlike a real race)."""

    def __init__(self, directory: Path, swap: Callable[[], None]) -> None:
        self._directory = str(directory)
        self._swap: Callable[[], None] | None = swap
        self._scandir = os.scandir

    def __call__(self, target: Any = ".") -> Any:
        listed = list(self._scandir(target))
        where = os.readlink(f"/proc/self/fd/{target}") if isinstance(target, int) else target
        if self._swap is not None and os.fsdecode(where).rstrip("/") == self._directory:
            swap, self._swap = self._swap, None
            swap()
        return _Listing(listed)


class _Listing(list):  # type: ignore[type-arg]
    def __enter__(self) -> _Listing:
        return self

    def __exit__(self, *_: object) -> None:
        pass


def symlink_in_place_of(directory: Path, target: Path) -> Callable[[], None]:
    def swap() -> None:
        directory.rename(directory.with_name(directory.name + ".away"))
        directory.symlink_to(target)

    return swap


@pytest.mark.parametrize("command", ["diff", "export", "inspect"])
def test_a_directory_swapped_for_a_symlink_after_the_listing_is_not_followed(
    root: Path,
    volume: Path,
    outside: Path,
    command: str,
    monkeypatch: pytest.MonkeyPatch,
    capfdbinary: pytest.CaptureFixture[bytes],
    workspace: Path,
) -> None:
    (volume / "a").mkdir()
    (volume / "z").mkdir()
    (volume / "z" / "inner").write_text("inner")
    # When diff and inspect have listed the upper root, export the folder before `z`
    # (it reads every entry of a directory before the content of its subdirectories).
    listed_last = volume / "a" if command == "export" else volume
    monkeypatch.setattr(
        os, "scandir", SwappedAfterListing(listed_last, symlink_in_place_of(volume / "z", outside))
    )
    layer = workspace / "layer.tar"
    argv = {
        "diff": ["diff", "v"],
        "export": ["export", "v", "-o", str(layer)],
        "inspect": ["inspect", "v"],
    }
    assert run(root, *argv[command]) == 0
    out = capfdbinary.readouterr().out
    assert SECRET.encode() not in out
    if command == "export":
        assert SECRET not in str(layer_names(layer.read_bytes()))
    if command == "inspect":
        assert json.loads(out)["ChangesApparentBytes"] < 1_000_000


def test_a_container_swapping_a_directory_for_a_symlink_meanwhile_leaks_nothing(
    root: Path,
    driver: Driver,
    volume: Path,
    outside: Path,
    workspace: Path,
    capfdbinary: pytest.CaptureFixture[bytes],
) -> None:
    """The real race, through a mounted volume: a container keeps putting `z -> outside`
    in place of `z/` while diff, export and inspect run."""
    view = Path(driver.mount("v", ID))
    (view / "z").mkdir()
    for number in range(50):
        (view / "z" / f"inner{number}").write_text("inner")
    swapper = subprocess.Popen(
        ["sh", "-c", f"while :; do mv z z.away; ln -s {outside} z; rm z; mv z.away z; done"],
        cwd=view,
    )
    layer = workspace / "layer.tar"
    try:
        for _ in range(40):
            run(root, "diff", "v", "--json")
            assert SECRET.encode() not in capfdbinary.readouterr().out
            run(root, "export", "v", "-o", str(layer))
            if layer.exists():
                assert SECRET not in str(layer_names(layer.read_bytes()))
            run(root, "inspect", "v")
            size = json.loads(capfdbinary.readouterr().out)["ChangesApparentBytes"]
            assert size is None or size < 1_000_000
    finally:
        swapper.kill()
        swapper.wait()


# --- 3. export opens only what fstat showed to be a regular file ---------------------------


def test_a_file_swapped_for_a_fifo_is_exported_as_a_fifo_never_read(
    root: Path, volume: Path, monkeypatch: pytest.MonkeyPatch, workspace: Path
) -> None:
    (volume / "f").write_text("file")

    def swap() -> None:
        (volume / "f").unlink()
        os.mkfifo(volume / "f")

    monkeypatch.setattr(os, "scandir", SwappedAfterListing(volume, swap))
    done = threading.Event()
    layer = workspace / "layer.tar"

    def export() -> None:
        run(root, "export", "v", "-o", str(layer))
        done.set()

    # In a thread: the old code blocked forever opening the FIFO.
    threading.Thread(target=export, daemon=True).start()
    if not done.wait(30):
        os.close(os.open(volume / "f", os.O_WRONLY | os.O_NONBLOCK))  # let it go
        pytest.fail("export blocked on a FIFO")
    with tarfile.open(layer) as tar:
        assert tar.getmember("f").isfifo()


def test_a_file_swapped_for_a_device_is_exported_as_a_device_never_opened(
    root: Path, volume: Path, monkeypatch: pytest.MonkeyPatch, workspace: Path
) -> None:
    (volume / "f").write_text("file")

    def swap() -> None:
        (volume / "f").unlink()
        os.mknod(volume / "f", stat.S_IFCHR | 0o600, os.makedev(1, 5))  # /dev/zero

    monkeypatch.setattr(os, "scandir", SwappedAfterListing(volume, swap))
    layer = workspace / "layer.tar"
    assert run(root, "export", "v", "-o", str(layer)) == 0
    with tarfile.open(layer) as tar:
        member = tar.getmember("f")
    assert member.ischr()
    assert (member.devmajor, member.devminor) == (1, 5)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_an_export_stopped_by_a_signal_leaves_no_partial_file(
    root: Path, volume: Path, workspace: Path, signum: int
) -> None:
    (volume / "data").write_bytes(os.urandom(4_000_000))
    target = workspace / "layer.tar"
    partial = workspace / ".layer.tar.partial"
    # The partial file as a FIFO: an output that takes as long as the test wants.
    os.mkfifo(partial)
    exporting = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "docker_on_top",
            "export",
            "v",
            "-o",
            str(target),
            "--root",
            str(root),
        ],
        cwd=REPO,
        stderr=subprocess.PIPE,
    )
    with open(partial, "rb") as reader:
        assert len(reader.read(100)) == 100
        exporting.send_signal(signum)
        status = exporting.wait(30)
    assert status == 128 + signum
    assert exporting.stderr is not None and exporting.stderr.read() == b""
    assert sorted(os.listdir(workspace)) == ["base", "root"]


# --- 4. any depth, with a bounded number of descriptors ------------------------------------


@pytest.fixture
def few_descriptors() -> Iterator[None]:
    """The default limit of open files: a walk holding one per level would run out."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def make_deep(top: Path, depth: int) -> None:
    """`depth` nested folders `d` in `top`, with the file `leaf` at the bottom; made by
    descriptors (the paths get longer than PATH_MAX)."""
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir("d", dir_fd=fd)
            child = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
        leaf = os.open("leaf", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(leaf, b"at the bottom\n")
        os.close(leaf)
    finally:
        os.close(fd)


def depth_of(top: Path) -> int:
    """How many nested folders `d` there are in `top`, with the file `leaf` at the bottom."""
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    depth = 0
    try:
        while "d" in os.listdir(fd):
            child = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
            depth += 1
        assert os.listdir(fd) == ["leaf"]
    finally:
        os.close(fd)
    return depth


DEPTHS = [1500, 5000]


@pytest.fixture(params=DEPTHS, ids=lambda depth: f"{depth}-deep")
def deep(request: pytest.FixtureRequest, volume: Path, few_descriptors: None) -> int:
    """The volume `v` with a tree that deep in its changes."""
    depth: int = request.param
    make_deep(volume, depth)
    return depth


def expected_deep_diff(depth: int) -> list[str]:
    return [f"A {'/d' * level}" for level in range(1, depth + 1)] + [f"A {'/d' * depth}/leaf"]


def test_diff_of_a_deep_tree(
    root: Path, deep: int, capfdbinary: pytest.CaptureFixture[bytes]
) -> None:
    assert run(root, "diff", "v") == 0
    assert capfdbinary.readouterr().out.decode().splitlines() == expected_deep_diff(deep)


def test_export_of_a_deep_tree(root: Path, deep: int, workspace: Path) -> None:
    layer = workspace / "layer.tar"
    assert run(root, "export", "v", "-o", str(layer)) == 0
    names = layer_names(layer.read_bytes())
    assert names == [p.removeprefix("A /") for p in expected_deep_diff(deep)]


def test_size_of_a_deep_tree(
    root: Path, deep: int, capfdbinary: pytest.CaptureFixture[bytes]
) -> None:
    assert run(root, "ls", "--json") == 0
    (listed,) = json.loads(capfdbinary.readouterr().out)
    assert listed["ChangesApparentBytes"] == len("at the bottom\n")
    assert run(root, "inspect", "v") == 0
    assert json.loads(capfdbinary.readouterr().out)["ChangesApparentBytes"] == len(
        "at the bottom\n"
    )


def test_reset_of_a_deep_tree(root: Path, deep: int, volume: Path) -> None:
    assert run(root, "reset", "v") == 0
    assert os.listdir(volume) == []


def test_commit_into_of_a_deep_tree(root: Path, deep: int, workspace: Path) -> None:
    assert run(root, "commit", "v", "--into", str(workspace / "merged")) == 0
    assert depth_of(workspace / "merged") == deep
    assert sorted(os.listdir(workspace)) == ["base", "merged", "root"]


def test_commit_into_base_of_a_deep_tree(
    root: Path, deep: int, workspace: Path, volume: Path
) -> None:
    assert run(root, "commit", "v", "--into-base", "--yes") == 0
    assert depth_of(workspace / "base") == deep
    assert os.listdir(volume) == []


def test_remove_of_a_deep_tree(driver: Driver, root: Path, deep: int) -> None:
    driver.remove("v")
    assert os.listdir(root) == []


def test_a_volatile_volume_discards_a_deep_tree_at_its_next_mount(
    driver: Driver, base: Path, deep: int, volume: Path
) -> None:
    # Volatile from now on: metadata.json as another Create would have written it.
    metadata = driver.root / "v" / "metadata.json"
    metadata.write_text(json.dumps({"BaseDirPath": str(base), "Volatile": True}))
    view = Path(driver.mount("v", ID))
    assert os.listdir(volume) == []
    assert sorted(os.listdir(view)) == ["a", "b"]
    driver.unmount("v", ID)


def test_start_up_finishes_removing_a_deep_leftover(
    root: Path, driver: Driver, few_descriptors: None, caplog: pytest.LogCaptureFixture
) -> None:
    leftover = root / ".removed.0123456789abcdef"
    (leftover / "upper").mkdir(parents=True)
    make_deep(leftover / "upper", 5000)
    Driver(root).recover()
    assert os.listdir(root) == []


def test_start_up_goes_on_past_a_leftover_it_cannot_remove(
    root: Path, base: Path, driver: Driver, caplog: pytest.LogCaptureFixture
) -> None:
    driver.create("v", {"base": str(base)})
    leftover = root / ".removed.0123456789abcdef"
    leftover.mkdir()
    (leftover / "stuck").mkdir()
    subprocess.run(["chattr", "+i", str(leftover / "stuck")], check=True)
    try:
        with caplog.at_level(logging.WARNING, logger="docker_on_top"):
            report = Driver(root).recover()
        assert report.clean == ["v"]
        assert any("cannot finish removing" in r.getMessage() for r in caplog.records)
    finally:
        subprocess.run(["chattr", "-i", str(leftover / "stuck")], check=True)
