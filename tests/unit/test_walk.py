"""Walks by directory descriptor (docker_on_top.walk), on real folders and mounts."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from docker_on_top.walk import Cursor, MovedWhileWalked, remove_tree

from ..mounts import unmount_all_under


def test_coming_back_up_to_another_directory_fails_the_walk(tmp_path: Path) -> None:
    """A container moved the folder being read elsewhere: going up through '..' would
    lead somewhere the walk never was."""
    (tmp_path / "a" / "b" / "c").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    with Cursor.open(tmp_path) as cursor:
        assert cursor.down("a") is not None
        assert cursor.down("b") is not None
        (tmp_path / "a" / "b").rename(tmp_path / "elsewhere" / "b")
        with pytest.raises(MovedWhileWalked, match="a/b was moved while it was being read"):
            cursor.up()


def test_going_down_a_symlink_is_refused(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    (tmp_path / "file").write_text("x")
    with Cursor.open(tmp_path) as cursor:
        assert cursor.down("link") is None
        assert cursor.down("file") is None
        assert cursor.down("gone") is None
        assert cursor.depth == 0


def test_removal_never_goes_onto_another_filesystem(tmp_path: Path) -> None:
    (tmp_path / "doomed" / "mounted").mkdir(parents=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "dot-walk", str(tmp_path / "doomed" / "mounted")], check=True
    )
    try:
        (tmp_path / "doomed" / "mounted" / "precious").write_text("keep")
        with pytest.raises(OSError, match="mount point"):
            remove_tree(tmp_path / "doomed")
        assert (tmp_path / "doomed" / "mounted" / "precious").read_text() == "keep"
        with pytest.raises(OSError, match="mount point"):
            remove_tree(tmp_path / "doomed" / "mounted")
        assert (tmp_path / "doomed" / "mounted" / "precious").read_text() == "keep"
    finally:
        unmount_all_under(tmp_path)
    remove_tree(tmp_path / "doomed")
    assert os.listdir(tmp_path) == []


def test_remove_tree_of_what_is_absent_or_not_a_folder(tmp_path: Path) -> None:
    remove_tree(tmp_path / "absent")
    (tmp_path / "file").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path)
    remove_tree(tmp_path / "file")
    remove_tree(tmp_path / "link")
    assert os.listdir(tmp_path) == []
