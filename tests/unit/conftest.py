"""Fixtures for driver and state tests: a temporary state root with real overlay mounts."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from docker_on_top.driver import Driver

from ..mounts import unmount_all_under


@pytest.fixture
def workspace(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.fail("these tests mount overlays and must run as root")
    try:
        yield tmp_path
    finally:
        unmount_all_under(tmp_path)


@pytest.fixture
def root(workspace: Path) -> Path:
    return workspace / "root"


@pytest.fixture
def base(workspace: Path) -> Path:
    folder = workspace / "base"
    folder.mkdir()
    (folder / "a").write_text("123")
    (folder / "b").write_text("456")
    return folder


@pytest.fixture
def driver(root: Path) -> Driver:
    driver = Driver(root)
    driver.recover()
    return driver
