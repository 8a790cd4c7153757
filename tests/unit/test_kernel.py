"""The kernel interface on real mounts (SPEC B7, B8)."""

from __future__ import annotations

import ctypes
import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from docker_on_top import kernel

from ..mounts import mounts_under

REPO = Path(__file__).resolve().parents[2]


def test_overlay_options_pin_off_features_that_forbid_changing_the_base() -> None:
    options = kernel.overlay_options(
        lowers=[Path("/l")], upper=Path("/u"), work=Path("/w"), volatile=False
    ).split(",")
    assert options[:3] == ["lowerdir=/l", "upperdir=/u", "workdir=/w"]
    for pinned in ("index=off", "metacopy=off", "redirect_dir=off", "xino=off"):
        assert pinned in options
    assert "volatile" not in options


def test_volatile_overlay_options_skip_syncs() -> None:
    options = kernel.overlay_options(
        lowers=[Path("/l")], upper=Path("/u"), work=Path("/w"), volatile=True
    )
    assert options.split(",")[-1] == "volatile"


def test_overlay_options_refuse_separators_in_paths() -> None:
    with pytest.raises(ValueError):
        kernel.overlay_options(
            lowers=[Path("/a,b")], upper=Path("/u"), work=Path("/w"), volatile=False
        )


def make_layers(workspace: Path) -> tuple[Path, Path, Path, Path]:
    layers = tuple(workspace / name for name in ("lower", "upper", "work", "target"))
    for layer in layers:
        layer.mkdir()
    (layers[0] / "file").write_text("from the base")
    return layers  # type: ignore[return-value]


@pytest.mark.parametrize("volatile", [False, True])
def test_mount_and_unmount_an_overlay(workspace: Path, volatile: bool) -> None:
    lower, upper, work, target = make_layers(workspace)
    kernel.mount_overlay(
        source="test", lowers=[lower], upper=upper, work=work, target=target, volatile=volatile
    )
    assert kernel.is_mount_point(target)
    assert mounts_under(target) == [(str(target), "overlay")]
    assert (target / "file").read_text() == "from the base"
    (target / "new").write_text("change")
    assert (upper / "new").read_text() == "change"
    assert not (lower / "new").exists()
    kernel.unmount(target)
    assert not kernel.is_mount_point(target)
    assert mounts_under(target) == []


def test_paths_with_backslashes_mount_those_very_paths(workspace: Path) -> None:
    layers = [workspace / f"odd\\{name}" for name in ("lower", "upper", "work", "target")]
    for layer in layers:
        layer.mkdir()
    lower, upper, work, target = layers
    (lower / "file").write_text("from the odd base")
    kernel.mount_overlay(
        source="test", lowers=[lower], upper=upper, work=work, target=target, volatile=False
    )
    try:
        assert (target / "file").read_text() == "from the odd base"
        (target / "new").touch()
        assert (upper / "new").exists()
    finally:
        kernel.unmount(target)


def test_mount_with_a_missing_lower_says_enoent(workspace: Path) -> None:
    _, upper, work, target = make_layers(workspace)
    with pytest.raises(OSError) as raised:
        kernel.mount_overlay(
            source="test",
            lowers=[workspace / "missing"],
            upper=upper,
            work=work,
            target=target,
            volatile=False,
        )
    assert raised.value.errno == errno.ENOENT


def test_mount_filesystem_mounts_with_its_flags_and_remounts(workspace: Path) -> None:
    target = workspace / "t"
    target.mkdir()
    kernel.mount_filesystem(
        "tmpfs", "test", target, kernel.MS_NOSUID | kernel.MS_NODEV, "size=1m,mode=0700"
    )
    try:
        assert os.statvfs(target).f_flag & (os.ST_NOSUID | os.ST_NODEV) == (
            os.ST_NOSUID | os.ST_NODEV
        )
        assert os.stat(target).st_mode & 0o777 == 0o700
        kernel.mount_filesystem("tmpfs", "test", target, kernel.MS_REMOUNT, "size=2m")
        figures = os.statvfs(target)
        assert figures.f_blocks * figures.f_frsize == 2 << 20
        assert figures.f_flag & (os.ST_NOSUID | os.ST_NODEV) == 0
    finally:
        kernel.unmount(target)


def test_unmount_of_something_not_mounted_fails(workspace: Path) -> None:
    with pytest.raises(OSError) as raised:
        kernel.unmount(workspace)
    assert raised.value.errno == errno.EINVAL


@pytest.mark.parametrize("name", ["plain", "with space", "tab\there", "back\\slash"])
def test_mount_points_lists_mounted_paths_with_odd_characters(workspace: Path, name: str) -> None:
    lower, upper, work, _ = make_layers(workspace)
    target = workspace / name
    target.mkdir()
    assert str(target) not in kernel.mount_points()
    kernel.mount_overlay(
        source="test", lowers=[lower], upper=upper, work=work, target=target, volatile=False
    )
    try:
        assert str(target) in kernel.mount_points()
    finally:
        kernel.unmount(target)
    assert str(target) not in kernel.mount_points()


def test_is_mount_point_of_a_missing_path_is_false(workspace: Path) -> None:
    assert not kernel.is_mount_point(workspace / "missing")


def test_directory_lock_excludes_a_second_holder(workspace: Path) -> None:
    import fcntl
    import os

    with kernel.DirectoryLock(workspace):
        fd = os.open(workspace, os.O_RDONLY | os.O_DIRECTORY)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
    fd = os.open(workspace, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)


def _rename_cases(tmp_path: Path) -> None:
    """rename_noreplace moves what is absent and refuses, untouched, what would replace."""
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "inside").write_text("d")
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("f")
    (tmp_path / "other").write_text("o")
    for source, target in (("dir", "empty"), ("file", "other"), ("file", "empty")):
        with pytest.raises(OSError) as refused:
            kernel.rename_noreplace(tmp_path / source, tmp_path / target)
        assert refused.value.errno == errno.EEXIST
    assert (tmp_path / "other").read_text() == "o"
    assert list((tmp_path / "empty").iterdir()) == []
    kernel.rename_noreplace(tmp_path / "dir", tmp_path / "moved-dir")
    kernel.rename_noreplace(tmp_path / "file", tmp_path / "moved-file")
    assert (tmp_path / "moved-dir" / "inside").read_text() == "d"
    assert (tmp_path / "moved-file").read_text() == "f"
    assert not (tmp_path / "dir").exists() and not (tmp_path / "file").exists()


def test_rename_noreplace_never_replaces(tmp_path: Path) -> None:
    _rename_cases(tmp_path)


def test_rename_noreplace_without_renameat2_in_libc(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 13.9: an older libc has no renameat2."""
    monkeypatch.setattr(kernel, "_renameat2", lambda: None)
    _rename_cases(tmp_path)


def test_rename_noreplace_on_a_filesystem_that_answers_einval(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 13.9: some filesystems answer EINVAL to RENAME_NOREPLACE."""

    def refusing(*_: object) -> int:
        ctypes.set_errno(errno.EINVAL)
        return -1

    monkeypatch.setattr(kernel, "_renameat2", lambda: refusing)
    _rename_cases(tmp_path)


def test_importing_the_kernel_module_looks_up_no_optional_syscall() -> None:
    """Issue 13.9: renameat2 is looked up lazily, so the package imports on any libc."""
    probe = "import docker_on_top.kernel as k, sys; sys.exit(k._renameat2.cache_info().currsize)"
    assert subprocess.run([sys.executable, "-c", probe], cwd=REPO, check=False).returncode == 0


def test_this_kernel_takes_overlay_layers_one_by_one() -> None:
    """SPEC B3 needs Linux 6.8+; the machines this project is tested on have it."""
    assert kernel.takes_any_overlay_path()


@pytest.mark.parametrize("odd", ["comma,in", "colon:in", "both,:\\back"])
def test_paths_with_commas_and_colons_mount_those_very_paths(workspace: Path, odd: str) -> None:
    """SPEC B3: through the new mount API the paths are never joined into one string."""
    lower, upper, work, target = (workspace / f"{odd}-{n}" for n in ("l", "u", "w", "t"))
    for folder in (lower, upper, work, target):
        folder.mkdir()
    (lower / "file").write_text("odd base")
    kernel.mount_overlay(
        source="test", lowers=[lower], upper=upper, work=work, target=target, volatile=True
    )
    try:
        assert (target / "file").read_text() == "odd base"
        (target / "new").touch()
        assert (upper / "new").exists()
        device = os.stat(target).st_dev
        (entry,) = [
            line
            for line in Path("/proc/self/mountinfo").read_text().splitlines()
            if line.split()[2] == f"{os.major(device)}:{os.minor(device)}"
        ]
        assert "volatile" in entry.split(" - ")[1]
    finally:
        kernel.unmount(target)


@pytest.mark.parametrize("count", [3, 120])
def test_several_lower_layers_stack_topmost_first(workspace: Path, count: int) -> None:
    """Past one page of options (120 long paths) the layers go one by one."""
    lowers = []
    for index in range(count):
        layer = workspace / f"layer-{index:03d}-{'x' * 40}"
        layer.mkdir()
        (layer / "file").write_text(f"layer {index}")
        (layer / f"only-{index}").touch()
        lowers.append(layer)
    target = workspace / "view"
    target.mkdir()
    kernel.mount_read_only_overlay(lowers, target)
    try:
        assert (target / "file").read_text() == "layer 0"
        assert sorted(p.name for p in target.iterdir()) == sorted(
            ["file", *(f"only-{i}" for i in range(count))]
        )
        with pytest.raises(OSError):
            (target / "new").touch()
    finally:
        kernel.unmount(target)


def test_a_failed_mount_by_parts_says_what_the_kernel_said(workspace: Path) -> None:
    _, upper, work, target = make_layers(workspace)
    with pytest.raises(OSError) as raised:
        kernel.mount_overlay(
            source="test",
            lowers=[workspace / "missing,dir"],
            upper=upper,
            work=work,
            target=target,
        )
    assert raised.value.errno == errno.ENOENT
    assert "missing,dir" in str(raised.value)
