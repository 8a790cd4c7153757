"""What a container writes into its volume is hostile: it must never reach the host.

Each test plays the container's part on a real overlay (issue 12): setuid files, symlinks
swapped in while a command walks, FIFOs and devices, trees deeper than PATH_MAX, names
that forge output, sparse files of a terabyte.
"""

from __future__ import annotations

import base64
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

from docker_on_top import changes
from docker_on_top.cli import main
from docker_on_top.driver import Driver

from ..mounts import unmount_all_under
from .conftest import new_driver, recover_driver

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


# Interpreters without tarfile's extraction filters (Debian 11's 3.9.2, Debian 12's
# 3.11.2) extract as fully trusted anyway; newer ones warn unless told.
TRUSTED: dict[str, str] = (
    {"filter": "fully_trusted"} if hasattr(tarfile, "fully_trusted_filter") else {}
)


@pytest.fixture
def open_workspace() -> Iterator[Path]:
    """A workspace that every user may traverse (pytest's tmp_path is 0700 and would
    hide the state root from other users whatever its own mode)."""
    folder = Path(tempfile.mkdtemp(prefix="dot-hostile-", dir="/var/tmp"))
    if os.statvfs(folder).f_flag & os.ST_NOSUID or _on_overlayfs(folder):
        folder.rmdir()
        # tests/hosts runs these suites in a root that is itself an overlay, and an
        # overlay's upper cannot be on one; a nosuid /var/tmp would hide the defect.
        pytest.skip("/var/tmp is nosuid or an overlay here: no setuid file can be shown")
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        unmount_all_under(folder)
        shutil.rmtree(folder)


def _on_overlayfs(path: Path) -> bool:
    device = os.stat(path).st_dev
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[2] == f"{os.major(device)}:{os.minor(device)}":
            return fields[fields.index("-") + 1] == "overlay"
    return False


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
    driver = new_driver(root)
    recover_driver(driver)
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
    driver = new_driver(root)
    recover_driver(driver)
    driver.create("v", {"base": str(base)})
    driver.create("w", {"base": str(base)})
    for folder in (root, root / "v", root / "w"):
        folder.chmod(0o755)
    (root / "v" / "upper" / "x").write_text("x")
    with caplog.at_level(logging.INFO, logger="docker_on_top"):
        recover_driver(new_driver(root))
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
    return driver.store.root / "v" / "upper"


def run(root: Path, *argv: str) -> int:
    return main([*argv, "--root", str(root)])


def run_cli(root: Path, *argv: str, **options: Any) -> subprocess.CompletedProcess[bytes]:
    """The command line in a process of its own, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "docker_on_top", *argv, "--root", str(root)],
        **{"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "cwd": REPO, **options},
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


def test_a_snapshots_copy_of_an_upper_never_follows_a_directory_swapped_for_a_symlink(
    workspace: Path, outside: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sized volume's snapshot copies its upper out of the image (changes.copy_upper)."""
    upper = workspace / "upper"
    (upper / "z").mkdir(parents=True)
    (upper / "z" / "inner").write_text("inner")
    monkeypatch.setattr(
        os, "scandir", SwappedAfterListing(upper, symlink_in_place_of(upper / "z", outside))
    )
    changes.copy_upper(upper, workspace / "layer")
    assert os.readlink(workspace / "layer" / "z") == str(outside)
    copied = [str(path) for path in (workspace / "layer").rglob("*")]
    assert not any(SECRET in path for path in copied), copied


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
    metadata = driver.store.root / "v" / "metadata.json"
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
    recover_driver(new_driver(root))
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
            report = recover_driver(new_driver(root))
        assert report.clean == ["v"]
        assert any("cannot finish removing" in r.getMessage() for r in caplog.records)
    finally:
        subprocess.run(["chattr", "-i", str(leftover / "stuck")], check=True)


# --- 5. ls and inspect list every volume, and say which could not be read ----------------


def test_ls_lists_every_volume_and_says_which_could_not_be_read(
    root: Path,
    driver: Driver,
    base: Path,
    volume: Path,
    outside: Path,
    capfdbinary: pytest.CaptureFixture[bytes],
) -> None:
    driver.create("w", {"base": str(base)})
    # A walk that fails: an upper that is not a directory of its own.
    upper = root / "w" / "upper"
    upper.rmdir()
    upper.symlink_to(outside)
    assert run(root, "ls") == 1
    _, v_row, w_row = capfdbinary.readouterr().out.decode().splitlines()
    assert v_row.split()[0] == "v"
    assert w_row.split()[0] == "w"
    assert "error: failed to read the volume's changes" in w_row
    assert run(root, "ls", "--json") == 1
    v, w = json.loads(capfdbinary.readouterr().out)
    assert "Error" not in v
    assert v["ChangesBytes"] == 0
    assert w["ChangesBytes"] is None
    assert "failed to read the volume's changes" in w["Error"]
    assert run(root, "inspect", "w") == 1
    assert "Error" in json.loads(capfdbinary.readouterr().out)


def test_ls_lists_the_other_volumes_beside_one_whose_metadata_is_unreadable(
    root: Path, driver: Driver, base: Path, volume: Path, capfdbinary: pytest.CaptureFixture[bytes]
) -> None:
    driver.create("w", {"base": str(base)})
    (root / "w" / "metadata.json").write_text("{not json")
    assert run(root, "ls", "--json") == 1
    v, w = json.loads(capfdbinary.readouterr().out)
    assert (v["Name"], "Error" in v) == ("v", False)
    assert w["Name"] == "w"
    assert "metadata" in w["Error"]


def test_ls_lists_every_volume_while_a_mounted_one_changes(
    root: Path,
    driver: Driver,
    base: Path,
    volume: Path,
    capfdbinary: pytest.CaptureFixture[bytes],
) -> None:
    """Issue 12: `ls` listed nothing, 2 times in 8, while a container wrote its volume."""
    driver.create("w", {"base": str(base)})
    view = Path(driver.mount("v", ID))
    churn = subprocess.Popen(
        ["sh", "-c", "while :; do mkdir -p x/y; touch x/y/f x/g h; rm -rf x h; done"], cwd=view
    )
    try:
        for _ in range(100):
            run(root, "ls", "--json")
            listed = json.loads(capfdbinary.readouterr().out)
            assert [volume["Name"] for volume in listed] == ["v", "w"]
    finally:
        churn.kill()
        churn.wait()


# --- 6. names cannot forge diff's output, nor crash it under any locale ------------------


def test_plain_diff_quotes_what_could_forge_a_line(
    root: Path, volume: Path, capfdbinary: pytest.CaptureFixture[bytes]
) -> None:
    forged = volume / "evil\nD " / "etc"
    forged.mkdir(parents=True)
    (forged / "passwd").write_text("x")
    (volume / os.fsdecode(b"\xff\xfe")).write_text("x")
    (volume / "back\\slash\ttab").write_text("x")
    assert run(root, "diff", "v") == 0
    assert capfdbinary.readouterr().out.decode().splitlines() == [
        "A /back\\\\slash\\ttab",
        "A /evil\\nD ",
        "A /evil\\nD /etc",
        "A /evil\\nD /etc/passwd",
        "A /\\xff\\xfe",
    ]


def test_diff_json_keeps_names_lossless(
    root: Path, volume: Path, capfdbinary: pytest.CaptureFixture[bytes]
) -> None:
    (volume / os.fsdecode(b"\xff\xfe")).write_text("x")
    (volume / "caf\u00e9\n").write_text("x")
    assert run(root, "diff", "v", "--json") == 0
    out = capfdbinary.readouterr().out
    assert out.isascii()
    assert json.loads(out) == [
        {"Kind": "A", "Path": "/caf\u00e9\n"},
        {
            "Kind": "A",
            "Path": "/\ufffd\ufffd",
            "PathBytes": base64.b64encode(b"/\xff\xfe").decode(),
        },
    ]


@pytest.fixture(scope="session")
def locales(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder for LOCPATH with en_US.UTF-8, where Python's stdout is strict UTF-8 (in
    C and C.UTF-8 it escapes surrogates by itself)."""
    folder = tmp_path_factory.mktemp("locales")
    made = subprocess.run(
        ["localedef", "-i", "en_US", "-f", "UTF-8", str(folder / "en_US.UTF-8")], check=False
    )
    if made.returncode != 0:
        # A minimal root (tests/hosts) has no locale sources to build it from.
        pytest.skip("localedef cannot build en_US.UTF-8 here")
    return folder


@pytest.mark.parametrize("locale", ["en_US.UTF-8", "C.UTF-8", "C"])
@pytest.mark.parametrize(
    "argv", [("diff", "v"), ("diff", "v", "--json"), ("ls",), ("ls", "--json"), ("inspect", "v")]
)
def test_no_locale_crashes_a_command(
    root: Path, volume: Path, locales: Path, locale: str, argv: tuple[str, ...]
) -> None:
    (volume / os.fsdecode(b"\xff\xfe")).write_text("x")
    environment = {"PATH": os.environ["PATH"], "LOCPATH": str(locales), "LC_ALL": locale}
    ran = run_cli(root, *argv, env=environment)
    assert (ran.returncode, ran.stderr) == (0, b"")
    assert ran.stdout


# --- 7. what an image layer cannot carry is left out, and said ---------------------------


def test_export_leaves_out_what_a_layer_cannot_carry_and_says_so(
    root: Path, volume: Path, workspace: Path
) -> None:
    (volume / ".wh.foo").write_text("a container's file")
    (volume / "kept").write_text("kept")
    os.setxattr(volume / "kept", "user.a=b", b"value")
    os.setxattr(volume / "kept", "user.plain", b"value")
    layer = workspace / "layer.tar"
    ran = run_cli(root, "export", "v", "-o", str(layer))
    assert ran.returncode == 0
    assert ran.stderr.decode().splitlines() == [
        "docker-on-top: v: /.wh.foo: not exported: in an image layer a name starting with .wh."
        " means a deletion",
        "docker-on-top: v: /kept: xattr user.a=b not exported: a PAX record cannot hold a name"
        " with '='",
    ]
    with tarfile.open(layer) as tar:
        assert tar.getnames() == ["kept"]
        assert tar.getmember("kept").pax_headers == {"SCHILY.xattr.user.plain": "value"}


# --- 8. sparse files: measured, exported and copied by their data --------------------------

TERABYTE = 1 << 40
# Where the data of the sparse file lies, and what it is.
SPARSE_DATA = {0: b"head", 1 << 30: b"middle", TERABYTE - 5: b"tail"}


def make_sparse(path: Path, size: int, data: dict[int, bytes]) -> None:
    with open(path, "wb") as file:
        file.truncate(size)
        for offset, content in data.items():
            file.seek(offset)
            file.write(content)


def assert_sparse_copy(path: Path, size: int, data: dict[int, bytes]) -> None:
    st = os.stat(path)
    assert st.st_size == size
    assert st.st_blocks * 512 < 1_000_000
    with open(path, "rb") as file:
        for offset, content in data.items():
            file.seek(offset)
            assert file.read(len(content)) == content
        file.seek(size // 2)
        assert file.read(4096) == bytes(4096)


def test_changes_size_is_disk_usage_beside_the_apparent_size(
    root: Path, volume: Path, capfdbinary: pytest.CaptureFixture[bytes]
) -> None:
    make_sparse(volume / "sparse", TERABYTE, SPARSE_DATA)
    assert run(root, "inspect", "v") == 0
    details = json.loads(capfdbinary.readouterr().out)
    assert details["ChangesBytes"] == os.stat(volume / "sparse").st_blocks * 512
    assert details["ChangesBytes"] < 1_000_000
    assert details["ChangesApparentBytes"] == TERABYTE


def test_export_writes_a_sparse_file_as_sparse(root: Path, volume: Path, workspace: Path) -> None:
    make_sparse(volume / "sparse", TERABYTE, SPARSE_DATA)
    layer = workspace / "layer.tar"
    assert run(root, "export", "v", "-o", str(layer)) == 0
    assert layer.stat().st_size < 1_000_000
    with tarfile.open(layer) as tar:
        (member,) = tar.getmembers()
        assert (member.name, member.size) == ("sparse", TERABYTE)
        by_tarfile = workspace / "by-tarfile"
        tar.extract(member, by_tarfile, **TRUSTED)
    assert_sparse_copy(by_tarfile / "sparse", TERABYTE, SPARSE_DATA)
    by_gnu_tar = workspace / "by-gnu-tar"
    by_gnu_tar.mkdir()
    subprocess.run(["tar", "-xSf", str(layer)], cwd=by_gnu_tar, check=True)
    assert_sparse_copy(by_gnu_tar / "sparse", TERABYTE, SPARSE_DATA)


@pytest.mark.parametrize(
    "data",
    [{4096 * 3: b"x" * 10_000}, {0: b"a" * 5000, 1_000_000: b"b"}, {}],
    ids=["holes-around", "ending-in-a-hole", "only-a-hole"],
)
def test_sparse_entries_give_back_the_same_bytes(
    root: Path, volume: Path, workspace: Path, data: dict[int, bytes]
) -> None:
    make_sparse(volume / "sparse", 5_000_000, data)
    (volume / "dir").mkdir()
    make_sparse(volume / "dir" / ("long" * 40), 3_000_000, {2_000_000: b"deep"})
    expected = {name: (volume / name).read_bytes() for name in ("sparse", f"dir/{'long' * 40}")}
    layer = workspace / "layer.tar"
    assert run(root, "export", "v", "-o", str(layer)) == 0
    by_tarfile = workspace / "by-tarfile"
    with tarfile.open(layer) as tar:
        tar.extractall(by_tarfile, **TRUSTED)
    by_gnu_tar = workspace / "by-gnu-tar"
    by_gnu_tar.mkdir()
    subprocess.run(["tar", "-xSf", str(layer)], cwd=by_gnu_tar, check=True)
    for copy in (by_tarfile, by_gnu_tar):
        assert {name: (copy / name).read_bytes() for name in expected} == expected


def test_commit_keeps_the_holes(root: Path, volume: Path, workspace: Path, base: Path) -> None:
    make_sparse(volume / "sparse", TERABYTE, SPARSE_DATA)
    assert run(root, "commit", "v", "--into", str(workspace / "merged")) == 0
    assert_sparse_copy(workspace / "merged" / "sparse", TERABYTE, SPARSE_DATA)
    assert run(root, "commit", "v", "--into-base", "--yes") == 0
    assert_sparse_copy(base / "sparse", TERABYTE, SPARSE_DATA)


# --- 9. a reader that goes away ends a command quietly -------------------------------------


@pytest.mark.parametrize(
    "argv", [("export", "v"), ("diff", "v"), ("diff", "v", "--json"), ("ls",), ("inspect", "v")]
)
def test_a_closed_output_ends_a_command_quietly(
    root: Path, volume: Path, argv: tuple[str, ...]
) -> None:
    (volume / "data").write_bytes(os.urandom(1_000_000))
    for number in range(2000):
        (volume / f"file{number}").touch()
    read_end, write_end = os.pipe()
    os.close(read_end)  # as `| head` does once it has read enough
    try:
        ran = run_cli(root, *argv, stdout=write_end, stderr=subprocess.PIPE)
    finally:
        os.close(write_end)
    assert ran.returncode in (0, 128 + signal.SIGPIPE)
    assert ran.stderr == b""
