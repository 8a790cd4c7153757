"""A3 Create and B4: options, validation, the files written, nothing left on failure."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import PluginClient, Workspace


@pytest.fixture(scope="module")
def shared() -> Iterator[Workspace]:
    workspace = Workspace()
    try:
        workspace.start()
        yield workspace
    finally:
        workspace.cleanup()


@pytest.fixture
def ws(shared: Workspace) -> Iterator[Workspace]:
    """One daemon for the module (for speed); every test starts from an empty state root."""
    keep = {shared.root, shared.base, shared.logs, shared.socket}
    client = shared.client()
    assert client.names() == []
    yield shared
    for name in client.names():
        client.remove(name)
    assert list(shared.root.iterdir()) == []
    for path in set(shared.dir.iterdir()) - keep:
        shutil.rmtree(path)


@pytest.fixture
def client(ws: Workspace) -> PluginClient:
    return ws.client()


def create_error(ws: Workspace, client: PluginClient, name: str, options: object) -> str:
    """A refused Create: 500 + Err, and nothing at all changed on disk."""
    before, names = ws.state(), client.names()
    message = client.err("/VolumeDriver.Create", {"Name": name, "Opts": options})
    assert ws.state() == before, "a refused Create changed the state"
    assert client.names() == names
    return message


def test_create_unknown_option_is_named_in_the_error(ws: Workspace, client: PluginClient) -> None:
    message = create_error(ws, client, "v", {"base": str(ws.base), "sizelimit": "1G"})
    assert "sizelimit" in message


def test_create_without_base_is_refused(ws: Workspace, client: PluginClient) -> None:
    assert "base" in create_error(ws, client, "v", {})
    assert "base" in create_error(ws, client, "v", {"volatile": "true"})


@pytest.mark.parametrize("base", ["\\", "a/b", "relative", "./base", ""])
def test_create_relative_base_is_refused(ws: Workspace, client: PluginClient, base: str) -> None:
    # "a/b" also exists relative to the daemon's working directory... or not; either way
    # it is not absolute.
    message = create_error(ws, client, "v", {"base": base})
    assert "absolute" in message or "base" in message


def test_create_nonexistent_base_is_refused(ws: Workspace, client: PluginClient) -> None:
    message = create_error(ws, client, "v", {"base": str(ws.dir / "no-such-dir")})
    assert "exist" in message


def test_create_base_under_a_regular_file_is_refused(ws: Workspace, client: PluginClient) -> None:
    message = create_error(ws, client, "v", {"base": str(ws.base / "kept.txt" / "x")})
    assert "exist" in message or "directory" in message


def test_b4_create_base_that_is_a_regular_file_is_refused(
    ws: Workspace, client: PluginClient
) -> None:
    message = create_error(ws, client, "v", {"base": str(ws.base / "kept.txt")})
    assert "directory" in message


@pytest.mark.parametrize("folder", ["with,comma", "with:colon", "lowerdir=x,upperdir=:y"])
def test_b3_base_with_comma_or_colon_mounts_that_very_directory(
    ws: Workspace, client: PluginClient, folder: str
) -> None:
    """B3: this kernel (6.8+) takes each overlay path on its own (fsconfig lowerdir+)."""
    base = ws.dir / folder
    base.mkdir()
    (base / "odd.txt").write_text("odd base\n")
    client.create("v", base, volatile="true")
    mountpoint = Path(client.mount("v", "c1"))
    assert sorted(os.listdir(mountpoint)) == ["odd.txt"]
    (mountpoint / "new.txt").write_text("new\n")
    assert sorted(os.listdir(base)) == ["odd.txt"]
    assert sorted(os.listdir(ws.volume("v").upper)) == ["new.txt"]
    client.unmount("v", "c1")
    client.remove("v")


@pytest.mark.parametrize(
    ("word", "volatile"),
    [
        ("true", True), ("TRUE", True), ("True", True), ("yes", True), ("YeS", True),
        ("false", False), ("FALSE", False), ("no", False), ("No", False),
    ],
)  # fmt: skip
def test_create_volatile_words_case_insensitive(
    ws: Workspace, client: PluginClient, word: str, volatile: bool
) -> None:
    client.create("v", ws.base, volatile=word)
    metadata = json.loads(ws.volume("v").metadata.read_bytes())
    assert metadata["Volatile"] is volatile


def test_create_volatile_defaults_to_false(ws: Workspace, client: PluginClient) -> None:
    client.create("v", ws.base)
    assert json.loads(ws.volume("v").metadata.read_bytes())["Volatile"] is False


@pytest.mark.parametrize("word", ["1", "0", "on", "off", "", "truee", "y", " true"])
def test_create_volatile_other_words_are_refused(
    ws: Workspace, client: PluginClient, word: str
) -> None:
    message = create_error(ws, client, "v", {"base": str(ws.base), "volatile": word})
    assert "volatile" in message


def test_create_existing_volume_is_refused(ws: Workspace, client: PluginClient) -> None:
    client.create("v", ws.base)
    other = ws.dir / "other-base"
    other.mkdir()
    message = create_error(ws, client, "v", {"base": str(other), "volatile": "true"})
    assert "volume already exists" in message
    metadata = json.loads(ws.volume("v").metadata.read_bytes())
    assert metadata["BaseDirPath"] == str(ws.base)
    assert metadata["Volatile"] is False


def test_create_writes_metadata_upper_activemounts_only(
    ws: Workspace, client: PluginClient
) -> None:
    client.create("v", ws.base, volatile="yes")
    volume = ws.volume("v")
    metadata = json.loads(volume.metadata.read_bytes())
    assert metadata["BaseDirPath"] == str(ws.base)
    assert metadata["Volatile"] is True
    assert isinstance(metadata["CreatedAt"], str)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)",
                        metadata["CreatedAt"]), metadata["CreatedAt"]  # fmt: skip
    assert volume.upper.is_dir() and not any(volume.upper.iterdir())
    assert volume.activemounts.is_dir() and not any(volume.activemounts.iterdir())
    assert not volume.workdir.exists()
    assert not volume.mountpoint.exists()
    # No temporary files left behind either.
    assert volume.entries() == {"metadata.json", "upper", "activemounts"}
    assert set(p.name for p in ws.root.iterdir()) == {"v"}


@pytest.mark.parametrize("name", ["_x", "a*b", "-v", ".v", "v/w", "v w", "vé"])
def test_create_invalid_names_are_refused(ws: Workspace, client: PluginClient, name: str) -> None:
    message = create_error(ws, client, name, {"base": str(ws.base)})
    if "/" in name:
        assert "base" in message  # points the user at -o base=...


def test_create_failing_midway_leaves_nothing_behind() -> None:
    """A state root that runs out of inodes after the volume folder: nothing half-made stays."""
    ws = Workspace()  # its own daemon, on a tiny state root
    try:
        create_failing_midway(ws)
    finally:
        ws.cleanup()


def create_failing_midway(ws: Workspace) -> None:
    ws.root.mkdir()
    # tmpfs inodes: the root itself, then the volume folder and upper/ fit, activemounts/ not.
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "nr_inodes=3,size=1m", "dot-test", str(ws.root)],
        check=True,
    )
    ws.start()
    client = ws.client()
    before = ws.state()
    message = client.err("/VolumeDriver.Create", {"Name": "v", "Opts": {"base": str(ws.base)}})
    assert "internal error" in message
    assert ws.state() == before
    assert list(ws.root.iterdir()) == []
    assert client.names() == []
    # Once there is room again, the same Create works.
    subprocess.run(["mount", "-o", "remount,nr_inodes=100", str(ws.root)], check=True)
    client.create("v", ws.base)
    assert ws.volume("v").entries() == {"metadata.json", "upper", "activemounts"}


def test_concurrent_creates_of_one_name_make_exactly_one_volume(
    ws: Workspace, client: PluginClient
) -> None:
    bases = []
    for i in range(10):
        base = ws.dir / f"base{i}"
        base.mkdir()
        bases.append(base)
    barrier = threading.Barrier(len(bases))
    replies: dict[str, object] = {}

    def create(base: Path) -> None:
        barrier.wait()
        replies[str(base)] = client.call(
            "/VolumeDriver.Create", {"Name": "v", "Opts": {"base": str(base)}}
        )

    threads = [threading.Thread(target=create, args=(b,)) for b in bases]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(15)
    winners = [base for base, reply in replies.items() if reply.status == 200]  # type: ignore[attr-defined]
    assert len(winners) == 1, replies
    for base, reply in replies.items():
        if base not in winners:
            assert reply.status == 500 and "already exists" in reply.json["Err"]  # type: ignore[attr-defined]
    metadata = json.loads(ws.volume("v").metadata.read_bytes())
    assert metadata["BaseDirPath"] == winners[0]
    assert ws.volume("v").entries() == {"metadata.json", "upper", "activemounts"}


def test_create_name_of_255_bytes_works_256_is_refused(ws: Workspace, client: PluginClient) -> None:
    longest = "n" * 255
    client.create(longest, ws.base)
    assert client.mount(longest, "i" * 255) == f"{ws.root}/{longest}/mountpoint/"
    client.unmount(longest, "i" * 255)
    create_error(ws, client, "n" * 256, {"base": str(ws.base)})
