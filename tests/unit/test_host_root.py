"""Bases under another root (the managed plugin sees the host's / at a host root)."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest

from docker_on_top.config import Settings, SettingsError
from docker_on_top.driver import Driver
from docker_on_top.errors import UserError
from docker_on_top.kernel import resolve_in_root

from ..mounts import mounts_under
from .conftest import commands_of, new_driver, recover_driver

ID = "a" * 64


@pytest.fixture
def host(tmp_path: Path) -> Path:
    """A small host tree: /srv/data with a file, and links to it of every kind."""
    host = tmp_path / "host"
    (host / "srv" / "data").mkdir(parents=True)
    (host / "srv" / "data" / "a").write_text("123")
    (host / "link-absolute").symlink_to("/srv/data")
    (host / "srv" / "link-relative").symlink_to("data")
    (host / "srv" / "link-up").symlink_to("../../../srv/data")
    (host / "loop").symlink_to("loop")
    return host


@pytest.mark.parametrize(
    "path",
    [
        "/srv/data",
        "/srv//./data/",
        "/link-absolute",
        "/srv/link-relative",
        "/srv/link-up",
        "/../../srv/data",
        "/srv/data/../data",
    ],
)
def test_paths_resolve_inside_the_root(host: Path, path: str) -> None:
    assert resolve_in_root(host, path) == host / "srv" / "data"


def test_a_missing_component_is_kept(host: Path) -> None:
    assert resolve_in_root(host, "/link-absolute/missing/x") == host / "srv/data/missing/x"


def test_a_symlink_loop_is_an_error(host: Path) -> None:
    with pytest.raises(OSError) as raised:
        resolve_in_root(host, "/loop")
    assert raised.value.errno == errno.ELOOP


def test_the_host_root_setting(tmp_path: Path) -> None:
    flags = {"root": str(tmp_path / "root")}
    assert Settings.resolve(flags, {}).host_root is None
    assert Settings.resolve(flags, {"DOCKER_ON_TOP_HOST_ROOT": "/host/"}).host_root == Path("/host")
    assert Settings.resolve({**flags, "host_root": "/h"}, {}).host_root == Path("/h")
    for bad in ("host", "/ho,st", "/ho:st"):
        with pytest.raises(SettingsError):
            Settings.resolve({**flags, "host_root": bad}, {})


@pytest.fixture
def managed(workspace: Path, host: Path) -> Driver:
    driver = new_driver(workspace / "root", host_root=host)
    recover_driver(driver)
    return driver


def test_a_base_is_found_under_the_host_root_and_stored_as_given(
    managed: Driver, host: Path
) -> None:
    managed.create("v", {"base": "/link-absolute"})
    metadata = json.loads((managed.store.root / "v" / "metadata.json").read_text())
    assert metadata["BaseDirPath"] == "/link-absolute"
    assert managed.get("v").status["Base"] == "/link-absolute"

    mountpoint = Path(managed.mount("v", ID))
    assert (mountpoint / "a").read_text() == "123"
    assert [fs for _, fs in mounts_under(mountpoint)] == ["overlay"]
    (mountpoint / "b").write_text("new")
    managed.unmount("v", ID)
    assert sorted(p.name for p in (host / "srv" / "data").iterdir()) == ["a"]
    assert [(c.kind, c.path) for c in commands_of(managed).diff("v")] == [("A", "/b")]


def test_a_base_missing_under_the_host_root_is_refused(managed: Driver, host: Path) -> None:
    # It exists in this process's own root, not under the host root.
    with pytest.raises(UserError, match="does not exist"):
        managed.create("v", {"base": str(host)})
