"""Fixtures for driver and state tests: a temporary state root with real overlay mounts."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from docker_on_top.commands import VolumeCommands
from docker_on_top.doctor import Finding, doctor
from docker_on_top.driver import Driver
from docker_on_top.recovery import RecoveryReport, recover
from docker_on_top.store import VolumeStore

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
    driver = new_driver(root)
    recover_driver(driver)
    return driver


def new_driver(root: Path, **settings: float) -> Driver:
    return Driver(VolumeStore(root, **settings))  # type: ignore[arg-type]


def recover_driver(driver: Driver) -> RecoveryReport:
    return recover(driver.store, driver.releases)


def run_doctor(
    driver: Driver, name: str | None, users: dict[str, int] | None, *, fix: bool
) -> list[Finding]:
    return doctor(driver.store, driver.releases, name, users, fix=fix)


def commands_of(driver: Driver) -> VolumeCommands:
    """The command line's operations, on the driver's state and pending releases."""
    return VolumeCommands(driver.store, driver.releases)
