"""Layers through the real socket and the real command line (SPEC B12): several bases,
snapshot, clone with `from`, rollback, destroy, removal of shared layers, and export
since an older snapshot."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

from .conftest import PluginClient, Workspace


def content(client: PluginClient, name: str) -> dict[str, str]:
    mountpoint = Path(client.mount(name, "reader"))
    try:
        return {
            str(path.relative_to(mountpoint)): path.read_text()
            for path in sorted(mountpoint.rglob("*"))
            if path.is_file()
        }
    finally:
        client.unmount(name, "reader")


def change(client: PluginClient, name: str, files: dict[str, str]) -> None:
    mountpoint = Path(client.mount(name, "writer"))
    try:
        for relative, text in files.items():
            (mountpoint / relative).write_text(text)
    finally:
        client.unmount(name, "writer")


def test_create_takes_several_bases(ws: Workspace, client: PluginClient) -> None:
    upper_base = ws.dir / "upper-base"
    upper_base.mkdir()
    (upper_base / "kept.txt").write_text("from base.1\n")
    client.create("v", ws.base, **{"base.1": str(upper_base)})
    assert content(client, "v")["kept.txt"] == "from base.1\n"
    status = client.ok("/VolumeDriver.Get", {"Name": "v"})["Volume"]["Status"]  # type: ignore[index]
    assert status["Bases"] == [str(ws.base), str(upper_base)]  # type: ignore[index]
    error = client.err(
        "/VolumeDriver.Create", {"Name": "w", "Opts": {"base": str(ws.base), "base.2": "/x"}}
    )
    assert "no gaps" in error


def test_snapshot_clone_rollback_destroy_and_removal(ws: Workspace, client: PluginClient) -> None:
    client.create("golden", ws.base)
    change(client, "golden", {"prepared.txt": "once\n"})
    made = ws.command("snapshot", "golden@ready")
    assert made.returncode == 0, made.stderr
    assert made.stdout.strip() == "ready"

    client.ok("/VolumeDriver.Create", {"Name": "job", "Opts": {"from": "golden@ready"}})
    client.ok("/VolumeDriver.Create", {"Name": "job2", "Opts": {"from": "golden@ready"}})
    change(client, "job", {"prepared.txt": "changed by the job\n"})
    assert content(client, "job2")["prepared.txt"] == "once\n"
    assert content(client, "golden")["prepared.txt"] == "once\n"

    listed = ws.command("snapshots", "--json")
    assert listed.returncode == 0, listed.stderr
    (snapshot,) = json.loads(listed.stdout)
    assert (snapshot["Name"], snapshot["Volume"]) == ("ready", "golden")
    assert sorted(snapshot["UsedBy"]) == ["golden", "job", "job2"]

    change(client, "golden", {"later.txt": "later\n"})
    assert ws.command("snapshot", "golden@later").returncode == 0
    change(client, "golden", {"unsaved.txt": "x\n"})
    rolled = ws.command("rollback", "golden@ready")
    assert rolled.returncode == 0, rolled.stderr
    base_files = [str(p.relative_to(ws.base)) for p in ws.base.rglob("*") if p.is_file()]
    assert sorted(content(client, "golden")) == sorted([*base_files, "prepared.txt"])

    assert ws.command("destroy", "golden@ready").returncode == 0
    client.remove("golden")
    assert content(client, "job")["prepared.txt"] == "changed by the job\n"
    layers = ws.root / ".layers"
    assert len([n for n in os.listdir(layers) if not n.startswith(".")]) == 1
    client.remove("job")
    client.remove("job2")
    assert [n for n in os.listdir(layers) if not n.startswith(".")] == []


def test_a_layered_volume_is_not_in_the_go_format(ws: Workspace, client: PluginClient) -> None:
    client.create("v", ws.base)
    metadata = json.loads((ws.volume("v").metadata).read_text())
    assert metadata["BaseDirPath"] == str(ws.base)
    assert ws.command("snapshot", "v@s").returncode == 0
    metadata = json.loads((ws.volume("v").metadata).read_text())
    # The Go plugin unmarshals BaseDirPath into a string: a list makes it refuse to mount.
    assert metadata["BaseDirPath"] == [str(ws.base)]


def test_snapshot_commands_refuse_clearly(ws: Workspace, client: PluginClient) -> None:
    client.create("v", ws.base)
    client.mount("v", "c1")
    refused = ws.command("snapshot", "v@s")
    assert refused.returncode == 1 and "in use" in refused.stderr
    client.unmount("v", "c1")
    for arguments, message in [
        (("snapshot", "v@bad name"), "invalid snapshot name"),
        (("rollback", "v"), "name the snapshot"),
        (("rollback", "v@none"), "no snapshot none"),
        (("destroy", "missing@s"), "no such volume"),
    ]:
        refused = ws.command(*arguments)
        assert refused.returncode == 1, (arguments, refused)
        assert message in refused.stderr, (arguments, refused.stderr)
        assert "Traceback" not in refused.stderr


def test_export_since_an_older_snapshot_writes_one_layer(
    ws: Workspace, client: PluginClient
) -> None:
    client.create("v", ws.base)
    change(client, "v", {"one.txt": "1\n"})
    assert ws.command("snapshot", "v@one").returncode == 0
    change(client, "v", {"one.txt": "2\n", "two.txt": "2\n"})
    assert ws.command("snapshot", "v@two").returncode == 0
    mountpoint = Path(client.mount("v", "writer"))
    (mountpoint / "deleted.txt").unlink()
    (mountpoint / "own.txt").write_text("own\n")
    client.unmount("v", "writer")

    def exported(*arguments: str) -> dict[str, bytes]:
        target = ws.dir / "layer.tar"
        done = ws.command("export", *arguments, "-o", str(target))
        assert done.returncode == 0, done.stderr
        with tarfile.open(target) as layer:
            return {
                member.name: (layer.extractfile(member) or io.BytesIO()).read()
                for member in layer.getmembers()
            }

    assert exported("v", "--since", "one") == {
        ".wh.deleted.txt": b"",
        "one.txt": b"2\n",
        "own.txt": b"own\n",
        "two.txt": b"2\n",
    }
    assert exported("v@two", "--since", "one") == {"one.txt": b"2\n", "two.txt": b"2\n"}
    assert exported("v", "--since", "two") == exported("v")
    refused = ws.command("export", "v@one", "--since", "two", "-o", str(ws.dir / "x.tar"))
    assert refused.returncode == 1 and "not older" in refused.stderr
    assert not (ws.dir / "x.tar").exists()
