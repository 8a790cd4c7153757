"""The volume commands of the command line, on a temporary root with real overlays."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from docker_on_top.cli import main
from docker_on_top.driver import Driver
from docker_on_top.output import human_size

from ..trees import apply_oci_layer, below_root, snapshot, without_times

ID = "c" * 64


@pytest.fixture
def changed(driver: Driver, base: Path) -> Path:
    """A volume `v` whose container deleted a, changed b and added c; then unmounted."""
    (base / "d").mkdir()
    (base / "d" / "x").write_text("x")
    driver.create("v", {"base": str(base)})
    view = Path(driver.mount("v", ID))
    (view / "a").unlink()
    (view / "b").write_text("789")
    (view / "c").write_text("etc")
    driver.unmount("v", ID)
    return view


def run(root: Path, *argv: str) -> int:
    return main([*argv, "--root", str(root)])


def disk_usage(upper: Path) -> int:
    """What the changes `b` and `c` of the fixture take on disk (the whiteout `a` none)."""
    return sum(os.lstat(upper / name).st_blocks * 512 for name in ("a", "b", "c"))


def test_ls_shows_base_use_and_size(
    root: Path, base: Path, changed: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The size shown is the disk usage of the changes (issue 12: a sparse file of 1 TB
    showed as 1.1 TB)."""
    assert run(root, "ls") == 0
    header, row = capsys.readouterr().out.splitlines()
    assert header.split() == ["NAME", "BASE", "VOLATILE", "IN", "USE", "CHANGES"]
    assert row.split() == ["v", str(base), "no", "0", human_size(disk_usage(root / "v" / "upper"))]


def test_ls_json(root: Path, base: Path, changed: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(root, "ls", "--json") == 0
    (volume,) = json.loads(capsys.readouterr().out)
    assert volume["Name"] == "v"
    assert volume["Base"] == str(base)
    assert volume["Mounts"] == {}
    assert volume["ChangesBytes"] == disk_usage(root / "v" / "upper")
    assert volume["ChangesApparentBytes"] == 6


def test_inspect_shows_the_records_of_a_volume_in_use(
    root: Path, driver: Driver, changed: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    driver.mount("v", ID)
    assert run(root, "inspect", "v") == 0
    details = json.loads(capsys.readouterr().out)
    assert details["Mounts"] == {ID: 1}
    assert details["Mounted"] is True
    assert details["Mountpoint"] == str(root / "v" / "mountpoint")


def test_diff_lists_the_changes(
    root: Path, changed: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(root, "diff", "v") == 0
    assert capsys.readouterr().out.splitlines() == ["D /a", "C /b", "A /c"]
    assert run(root, "diff", "v", "--json") == 0
    assert json.loads(capsys.readouterr().out)[0] == {"Kind": "D", "Path": "/a"}


def test_export_to_a_file_applies_onto_the_base_as_the_merged_view(
    root: Path, driver: Driver, base: Path, changed: Path, workspace: Path
) -> None:
    layer = workspace / "layer.tar"
    assert run(root, "export", "v", "-o", str(layer)) == 0
    copy = workspace / "copy"
    subprocess.run(["cp", "-a", str(base), str(copy)], check=True)
    apply_oci_layer(layer.read_bytes(), copy)
    view = Path(driver.mount("v", ID))
    assert without_times(below_root(snapshot(copy))) == without_times(below_root(snapshot(view)))


def test_export_to_stdout_streams_a_tar(root: Path, changed: Path) -> None:
    exported = subprocess.run(
        [sys.executable, "-m", "docker_on_top", "export", "v", "--root", str(root)],
        capture_output=True,
        check=True,
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(exported)) as tar:
        assert sorted(tar.getnames()) == [".wh.a", "b", "c"]


def test_commit_into_a_new_folder_is_the_merged_view(
    root: Path, driver: Driver, changed: Path, workspace: Path
) -> None:
    target = workspace / "merged"
    assert run(root, "commit", "v", "--into", str(target)) == 0
    view = Path(driver.mount("v", ID))
    assert without_times(below_root(snapshot(target))) == without_times(below_root(snapshot(view)))


def test_commit_into_base_needs_confirmation(
    root: Path, base: Path, changed: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("y\n"))  # not a terminal: no question asked
    before = snapshot(base)
    assert run(root, "commit", "v", "--into-base") == 1
    assert snapshot(base) == before


def test_commit_into_base_applies_the_changes_and_empties_the_volume(
    root: Path, driver: Driver, base: Path, changed: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(root, "commit", "v", "--into-base", "--yes") == 0
    assert sorted(p.name for p in base.iterdir()) == ["b", "c", "d"]
    assert (base / "b").read_text() == "789"
    assert run(root, "diff", "v") == 0
    assert capsys.readouterr().out == ""


def test_reset_gives_back_the_base(root: Path, driver: Driver, base: Path, changed: Path) -> None:
    assert run(root, "reset", "v") == 0
    view = Path(driver.mount("v", ID))
    assert without_times(below_root(snapshot(view))) == without_times(below_root(snapshot(base)))


@pytest.mark.parametrize(
    "argv",
    [("reset", "v"), ("commit", "v", "--into-base", "--yes"), ("commit", "v", "--into", "/tmp/x")],
)
def test_changing_a_volume_in_use_is_refused(
    root: Path,
    driver: Driver,
    changed: Path,
    argv: tuple[str, ...],
    capsys: pytest.CaptureFixture[str],
) -> None:
    driver.mount("v", ID)
    assert run(root, *argv) == 1
    assert "in use" in capsys.readouterr().err
    assert (root / "v" / "upper" / "c").read_text() == "etc"


@pytest.mark.parametrize("command", ["inspect", "diff", "export", "reset"])
def test_a_missing_volume_is_a_clear_error(
    root: Path, driver: Driver, command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(root, command, "nope") == 1
    assert capsys.readouterr().err.strip() == "docker-on-top: nope: no such volume"


def test_commit_into_an_existing_folder_is_refused(
    root: Path, changed: Path, workspace: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(root, "commit", "v", "--into", str(workspace)) == 1
    assert "exists already" in capsys.readouterr().err


def test_a_bad_argument_exits_with_usage(root: Path) -> None:
    with pytest.raises(SystemExit) as raised:
        run(root, "commit", "v")
    assert raised.value.code == 2
