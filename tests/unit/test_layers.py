"""Layers (SPEC B12, issue 17): several bases, snapshots, clones, rollback, destroy, on
real overlays through the driver and the command line's operations."""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import pytest

from docker_on_top.driver import Driver
from docker_on_top.errors import UserError
from docker_on_top.layers import MAX_LOWER_LAYERS, LayerInfo
from docker_on_top.snapshots import VolumeSnapshots
from docker_on_top.volume import ROLLBACK, SNAPSHOT

from ..mounts import mounts_under
from ..trees import apply_oci_layer, change_volume
from .conftest import commands_of, new_driver, recover_driver

ID = "c" * 64


def folder(driver: Driver, name: str) -> Path:
    return driver.store.root / name


def snapshots_of(driver: Driver) -> VolumeSnapshots:
    return VolumeSnapshots(driver.store, driver.releases)


def view(driver: Driver, name: str) -> dict[str, str]:
    """The volume's content as a container sees it: file path -> text."""
    mountpoint = Path(driver.mount(name, ID))
    try:
        return {
            str(path.relative_to(mountpoint)): path.read_text()
            for path in sorted(mountpoint.rglob("*"))
            if path.is_file()
        }
    finally:
        driver.unmount(name, ID)


def write(driver: Driver, name: str, files: dict[str, str | None]) -> None:
    """Change the volume as a container would: write files, delete those given None."""
    change_volume(driver, name, ID, files)


def metadata_of(driver: Driver, name: str) -> dict[str, object]:
    return json.loads((folder(driver, name) / "metadata.json").read_text())  # type: ignore[no-any-return]


def layer_ids(driver: Driver) -> list[str]:
    return driver.store.layers.ids()


@pytest.fixture
def bases(workspace: Path) -> list[Path]:
    made = []
    for index, files in enumerate(
        [
            {"a": "base a", "b": "base b", "only-base": "x"},
            {"b": "base.1 b", "c": "base.1 c"},
            {"c": "base.2 c"},
        ]
    ):
        base = workspace / f"base{index}"
        base.mkdir()
        for name, text in files.items():
            (base / name).write_text(text)
        made.append(base)
    return made


# --- several bases ----------------------------------------------------------------------


def test_higher_bases_hide_lower_ones(driver: Driver, bases: list[Path]) -> None:
    driver.create("v", {"base": str(bases[0]), "base.1": str(bases[1]), "base.2": str(bases[2])})
    assert view(driver, "v") == {"a": "base a", "b": "base.1 b", "c": "base.2 c", "only-base": "x"}
    write(driver, "v", {"c": "changed", "a": None})
    assert view(driver, "v") == {"b": "base.1 b", "c": "changed", "only-base": "x"}
    assert (bases[2] / "c").read_text() == "base.2 c" and (bases[0] / "a").exists()


def test_several_bases_are_not_the_go_format(driver: Driver, bases: list[Path]) -> None:
    driver.create("one", {"base": str(bases[0])})
    assert metadata_of(driver, "one")["BaseDirPath"] == str(bases[0])
    driver.create("two", {"base": str(bases[0]), "base.1": str(bases[1])})
    # The Go plugin cannot read a list there, so it refuses to mount the volume.
    assert metadata_of(driver, "two")["BaseDirPath"] == [str(bases[0]), str(bases[1])]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"base.1": "B1"}, "needs `base`"),
        ({"base": "B0", "base.2": "B2"}, "no gaps"),
        ({"base": "B0", "base.1": "B1", "base.3": "B2"}, "no gaps"),
        ({"base": "B0", "base.01": "B1"}, "invalid option"),
        ({"base": "B0", "base.1": "relative"}, "`base.1` must be an absolute path"),
        ({"base": "B0", "base.1": "/no/such/dir"}, "does not exist"),
        ({"base": "B0", "from": "x@y"}, "exclude each other"),
    ],
)
def test_bad_bases_are_refused(
    driver: Driver, bases: list[Path], options: dict[str, str], message: str
) -> None:
    real = {"B0": str(bases[0]), "B1": str(bases[1]), "B2": str(bases[2])}
    with pytest.raises(UserError, match=message):
        driver.create("v", {key: real.get(value, value) for key, value in options.items()})
    assert not folder(driver, "v").exists()


def test_bases_with_commas_and_colons_stack(driver: Driver, workspace: Path) -> None:
    odd = []
    for index, name in enumerate(["a,b", "c:d", "e,:f"]):
        base = workspace / name
        base.mkdir()
        (base / "f").write_text(str(index))
        (base / f"only{index}").touch()
        odd.append(base)
    driver.create("v", {"base": str(odd[0]), "base.1": str(odd[1]), "base.2": str(odd[2])})
    assert view(driver, "v") == {"f": "2", "only0": "", "only1": "", "only2": ""}


# --- snapshots --------------------------------------------------------------------------


def test_a_snapshot_freezes_the_changes_and_the_volume_goes_on_over_them(
    driver: Driver, base: Path
) -> None:
    driver.create("v", {"base": str(base)})
    write(driver, "v", {"new": "one", "a": None})
    assert snapshots_of(driver).snapshot("v", "first") == "first"
    assert os.listdir(folder(driver, "v") / "upper") == []
    assert view(driver, "v") == {"b": "456", "new": "one"}
    write(driver, "v", {"new": "two"})
    assert view(driver, "v") == {"b": "456", "new": "two"}
    assert [c.path for c in commands_of(driver).diff("v")] == ["/new"]
    metadata = metadata_of(driver, "v")
    assert metadata["BaseDirPath"] == [str(base)]
    assert [s["Name"] for s in metadata["Snapshots"]] == ["first"]  # type: ignore[index,union-attr]
    assert driver.get("v").status["Snapshots"] == ["first"]


def test_a_snapshot_without_a_name_is_named_after_the_time(driver: Driver, base: Path) -> None:
    driver.create("v", {"base": str(base)})
    first = snapshots_of(driver).snapshot("v")
    second = snapshots_of(driver).snapshot("v")
    assert first != second
    for name in (first, second):
        assert name[:8].isdigit() and "T" in name and "Z" in name


def test_a_snapshot_is_refused_while_the_volume_is_in_use(driver: Driver, base: Path) -> None:
    driver.create("v", {"base": str(base)})
    driver.mount("v", ID)
    with pytest.raises(UserError, match="in use"):
        snapshots_of(driver).snapshot("v", "s")
    driver.unmount("v", ID)
    assert layer_ids(driver) == []


@pytest.mark.parametrize("name", ["_x", "a b", "a/b", "", "é"])
def test_a_snapshot_name_follows_the_volume_name_rules(
    driver: Driver, base: Path, name: str
) -> None:
    from docker_on_top.store import parse_reference

    driver.create("v", {"base": str(base)})
    with pytest.raises(UserError, match="snapshot name"):
        parse_reference(f"v@{name}")


def test_a_snapshot_name_is_taken_once(driver: Driver, base: Path) -> None:
    driver.create("v", {"base": str(base)})
    snapshots_of(driver).snapshot("v", "s")
    with pytest.raises(UserError, match="already"):
        snapshots_of(driver).snapshot("v", "s")


def test_snapshots_past_overlayfs_limit_are_refused(driver: Driver, base: Path) -> None:
    driver.create("v", {"base": str(base)})
    metadata = metadata_of(driver, "v")
    metadata["BaseDirPath"] = [str(base)]
    metadata["Layers"] = [f"{i:016x}" for i in range(MAX_LOWER_LAYERS - 1)]
    (folder(driver, "v") / "metadata.json").write_text(json.dumps(metadata))
    with pytest.raises(UserError, match=f"at most {MAX_LOWER_LAYERS}"):
        snapshots_of(driver).snapshot("v", "s")


# --- clones -----------------------------------------------------------------------------


def test_a_clone_starts_as_the_snapshot_and_goes_its_own_way(driver: Driver, base: Path) -> None:
    driver.create("v", {"base": str(base)})
    write(driver, "v", {"new": "at s"})
    snapshots_of(driver).snapshot("v", "s")
    write(driver, "v", {"new": "after s"})
    driver.create("c", {"from": "v@s"})
    assert view(driver, "c") == {"a": "123", "b": "456", "new": "at s"}
    write(driver, "c", {"clone-only": "c"})
    assert view(driver, "v") == {"a": "123", "b": "456", "new": "after s"}
    assert metadata_of(driver, "c")["Origin"] == "v@s"
    assert driver.get("c").status["Origin"] == "v@s"


def test_a_clone_of_a_volume_snapshots_it_first(driver: Driver, base: Path) -> None:
    driver.create("v", {"base": str(base)})
    write(driver, "v", {"new": "now"})
    driver.create("c", {"from": "v", "volatile": "true"})
    assert view(driver, "c") == {"a": "123", "b": "456", "new": "now"}
    (snapshot,) = snapshots_of(driver).list("v")
    assert metadata_of(driver, "c")["Origin"] == f"v@{snapshot.name}"
    assert sorted(snapshot.used_by) == ["c", "v"]
    assert metadata_of(driver, "c")["Volatile"] is True


def test_a_clone_of_a_volume_in_use_is_refused(driver: Driver, base: Path) -> None:
    driver.create("v", {"base": str(base)})
    driver.mount("v", ID)
    with pytest.raises(UserError, match="in use"):
        driver.create("c", {"from": "v"})
    driver.unmount("v", ID)
    assert not folder(driver, "c").exists()


def test_a_clone_of_a_missing_snapshot_is_refused(driver: Driver, base: Path) -> None:
    driver.create("v", {"base": str(base)})
    with pytest.raises(UserError, match="no snapshot"):
        driver.create("c", {"from": "v@nope"})
    with pytest.raises(UserError, match="no such volume"):
        driver.create("c", {"from": "missing@s"})
    assert not folder(driver, "c").exists()


def test_a_clone_brings_several_bases_along(driver: Driver, bases: list[Path]) -> None:
    driver.create("v", {"base": str(bases[0]), "base.1": str(bases[1])})
    snapshots_of(driver).snapshot("v", "s")
    driver.create("c", {"from": "v@s"})
    assert view(driver, "c") == view(driver, "v")
    assert metadata_of(driver, "c")["BaseDirPath"] == [str(bases[0]), str(bases[1])]


def test_a_fifty_deep_clone_chain_still_mounts(driver: Driver, base: Path) -> None:
    driver.create("v0", {"base": str(base)})
    for depth in range(1, 51):
        write(driver, f"v{depth - 1}", {f"level{depth}": str(depth)})
        driver.create(f"v{depth}", {"from": f"v{depth - 1}"})
    content = view(driver, "v50")
    assert content == {"a": "123", "b": "456", **{f"level{d}": str(d) for d in range(1, 51)}}


def test_removing_the_origin_keeps_the_clone_and_the_last_user_frees_the_layers(
    driver: Driver, base: Path
) -> None:
    driver.create("v", {"base": str(base)})
    write(driver, "v", {"new": "kept"})
    driver.create("c", {"from": "v"})
    driver.remove("v")
    assert view(driver, "c") == {"a": "123", "b": "456", "new": "kept"}
    assert len(layer_ids(driver)) == 1
    driver.remove("c")
    assert layer_ids(driver) == []


# --- rollback, destroy, reset, commit ----------------------------------------------------


def test_rollback_throws_away_later_changes_and_snapshots(driver: Driver, base: Path) -> None:
    driver.create("v", {"base": str(base)})
    write(driver, "v", {"x": "1"})
    snapshots_of(driver).snapshot("v", "one")
    write(driver, "v", {"x": "2"})
    snapshots_of(driver).snapshot("v", "two")
    write(driver, "v", {"x": "3"})
    snapshots_of(driver).rollback("v", "one")
    assert view(driver, "v") == {"a": "123", "b": "456", "x": "1"}
    assert [s.name for s in snapshots_of(driver).list("v")] == ["one"]
    assert len(layer_ids(driver)) == 1


def test_rollback_keeps_a_later_layer_a_clone_uses(driver: Driver, base: Path) -> None:
    driver.create("v", {"base": str(base)})
    snapshots_of(driver).snapshot("v", "one")
    write(driver, "v", {"x": "2"})
    snapshots_of(driver).snapshot("v", "two")
    driver.create("c", {"from": "v@two"})
    snapshots_of(driver).rollback("v", "one")
    assert "x" not in view(driver, "v")
    assert view(driver, "c")["x"] == "2"
    assert len(layer_ids(driver)) == 2


def test_destroy_removes_the_name_and_keeps_the_layer_in_use(driver: Driver, base: Path) -> None:
    driver.create("v", {"base": str(base)})
    write(driver, "v", {"x": "1"})
    snapshots_of(driver).snapshot("v", "one")
    snapshots_of(driver).destroy("v", "one")
    assert snapshots_of(driver).list("v") == []
    assert view(driver, "v")["x"] == "1"
    assert len(layer_ids(driver)) == 1
    with pytest.raises(UserError, match="no snapshot"):
        snapshots_of(driver).destroy("v", "one")


def test_reset_keeps_the_layers(driver: Driver, base: Path) -> None:
    driver.create("v", {"base": str(base)})
    write(driver, "v", {"x": "1"})
    snapshots_of(driver).snapshot("v", "one")
    write(driver, "v", {"x": "2"})
    commands_of(driver).reset("v")
    assert view(driver, "v")["x"] == "1"


def test_commit_into_writes_the_whole_stack(
    driver: Driver, bases: list[Path], workspace: Path
) -> None:
    driver.create("v", {"base": str(bases[0]), "base.1": str(bases[1])})
    write(driver, "v", {"x": "1"})
    snapshots_of(driver).snapshot("v", "one")
    write(driver, "v", {"y": "2", "a": None})
    commands_of(driver).commit_into("v", workspace / "merged")
    merged = {p.name: p.read_text() for p in (workspace / "merged").iterdir()}
    assert merged == {"b": "base.1 b", "c": "base.1 c", "only-base": "x", "x": "1", "y": "2"}
    with pytest.raises(UserError, match="commit --into DIR"):
        commands_of(driver).commit_into_base("v")


def test_export_of_a_snapshot_is_the_layer_it_froze(driver: Driver, base: Path) -> None:
    driver.create("v", {"base": str(base)})
    write(driver, "v", {"x": "1", "a": None})
    snapshots_of(driver).snapshot("v", "one")
    write(driver, "v", {"y": "2"})
    out = io.BytesIO()
    commands_of(driver).export("v@one", out)
    out.seek(0)
    with tarfile.open(fileobj=out) as layer:
        assert sorted(layer.getnames()) == [".wh.a", "x"]
    out = io.BytesIO()
    commands_of(driver).export("v", out)
    out.seek(0)
    with tarfile.open(fileobj=out) as layer:
        assert layer.getnames() == ["y"]


def files_in(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): path.read_text()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def exported(driver: Driver, reference: str, since: str | None) -> bytes:
    out = io.BytesIO()
    commands_of(driver).export(reference, out, since=since)
    return out.getvalue()


def test_export_since_an_older_snapshot_is_one_layer_of_all_changed_since(
    driver: Driver, base: Path, workspace: Path
) -> None:
    driver.create("v", {"base": str(base)})
    write(driver, "v", {"kept": "1", "gone-later": "1", "dir/old": "1", "dir/sub/deep": "1"})
    snapshots_of(driver).snapshot("v", "one")
    write(driver, "v", {"kept": "2", "gone-later": None, "a": None, "new": "2"})
    mountpoint = Path(driver.mount("v", ID))
    shutil.rmtree(mountpoint / "dir")  # made again: an opaque directory in layer two
    (mountpoint / "dir").mkdir()
    (mountpoint / "dir" / "fresh").write_text("2")
    driver.unmount("v", ID)
    snapshots_of(driver).snapshot("v", "two")
    write(driver, "v", {"new": "3", "b": "changed", "made-then-gone": "3", "dir/more": "3"})
    write(driver, "v", {"made-then-gone": None})
    for name in ("one", "two"):
        driver.create(f"at-{name}", {"from": f"v@{name}"})
        commands_of(driver).commit_into(f"at-{name}", workspace / name)

    since_one = exported(driver, "v", "one")
    apply_oci_layer(since_one, workspace / "one")
    assert files_in(workspace / "one") == view(driver, "v")
    with tarfile.open(fileobj=io.BytesIO(since_one)) as tar:
        names = tar.getnames()
    assert {".wh.a", ".wh.gone-later", "dir/.wh..wh..opq", "dir/fresh", "dir/more"} <= set(names)
    assert "dir/old" not in names and "dir/sub/deep" not in names

    one_to_two = exported(driver, "v@two", "one")
    commands_of(driver).commit_into("at-one", workspace / "one-again")
    apply_oci_layer(one_to_two, workspace / "one-again")
    assert files_in(workspace / "one-again") == files_in(workspace / "two")
    # Since the last snapshot it is the export without --since.
    assert exported(driver, "v", "two") == exported(driver, "v", None)


def test_export_since_refuses_a_missing_or_later_snapshot(driver: Driver, base: Path) -> None:
    driver.create("v", {"base": str(base)})
    snapshots_of(driver).snapshot("v", "one")
    snapshots_of(driver).snapshot("v", "two")
    with pytest.raises(UserError, match="no snapshot three"):
        exported(driver, "v", "three")
    with pytest.raises(UserError, match="not older"):
        exported(driver, "v@one", "two")
    with pytest.raises(UserError, match="not older"):
        exported(driver, "v@one", "one")


# --- crashes ------------------------------------------------------------------------------


def test_a_snapshot_cut_short_before_its_metadata_is_undone(
    driver: Driver, base: Path, root: Path
) -> None:
    driver.create("v", {"base": str(base)})
    write(driver, "v", {"x": "mine"})
    volume = driver.store.volume("v")
    layer = driver.store.layers.new_id()
    volume.begin(SNAPSHOT, layer)
    with driver.store.layers.lock(None):
        driver.store.layers.freeze(layer, volume.upper, LayerInfo(layer, "v", "s", "t"))
    assert not volume.upper.exists()
    restarted = new_driver(root)
    recover_driver(restarted)
    assert view(restarted, "v")["x"] == "mine"
    assert layer_ids(restarted) == []
    assert not volume.intent(SNAPSHOT).exists()


def test_a_snapshot_cut_short_after_its_metadata_is_finished_at_the_next_mount(
    driver: Driver, base: Path
) -> None:
    driver.create("v", {"base": str(base)})
    write(driver, "v", {"x": "mine"})
    snapshots_of(driver).snapshot("v", "s")
    volume = driver.store.volume("v")
    (layer,) = layer_ids(driver)
    volume.begin(SNAPSHOT, layer)  # as if the crash came before the new upper was made
    volume.upper.rmdir()
    assert view(driver, "v")["x"] == "mine"
    assert volume.upper.is_dir() and not volume.intent(SNAPSHOT).exists()


def test_a_rollback_cut_short_is_finished_by_the_next_start(
    driver: Driver, base: Path, root: Path
) -> None:
    driver.create("v", {"base": str(base)})
    write(driver, "v", {"x": "1"})
    snapshots_of(driver).snapshot("v", "one")
    write(driver, "v", {"x": "2"})
    snapshots_of(driver).snapshot("v", "two")
    write(driver, "v", {"x": "3", "y": "3"})
    volume = driver.store.volume("v")
    (one, _) = driver.store.metadata(volume).layers
    volume.begin(ROLLBACK, one)  # as if the crash came once one change was thrown away
    (volume.upper / "y").unlink()
    restarted = new_driver(root)
    recover_driver(restarted)
    assert view(restarted, "v") == {"a": "123", "b": "456", "x": "1"}
    assert [s.name for s in snapshots_of(restarted).list("v")] == ["one"]
    assert layer_ids(restarted) == [one]
    assert not volume.intent(ROLLBACK).exists()


def test_start_up_removes_orphaned_layers(driver: Driver, base: Path, root: Path) -> None:
    driver.create("v", {"base": str(base)})
    snapshots_of(driver).snapshot("v", "s")
    orphan = driver.store.layers.folder / "0123456789abcdef" / "tree"
    orphan.mkdir(parents=True)
    recover_driver(new_driver(root))
    assert layer_ids(driver) == [
        json.loads((root / "v" / "metadata.json").read_text())["Layers"][0]
    ]


def test_no_layer_is_collected_while_a_volume_s_metadata_cannot_be_read(
    driver: Driver, base: Path, root: Path
) -> None:
    driver.create("v", {"base": str(base)})
    write(driver, "v", {"x": "1"})
    driver.create("c", {"from": "v"})
    (layer,) = driver.store.metadata(driver.store.volume("c")).layers
    metadata = folder(driver, "c") / "metadata.json"
    listed = metadata.read_bytes()
    metadata.write_bytes(listed[:20])  # damaged: which layers c uses cannot be told
    driver.remove("v")
    recover_driver(new_driver(root))
    assert layer in layer_ids(driver)
    metadata.write_bytes(listed)
    assert view(driver, "c")["x"] == "1"


def test_the_mount_stacks_layers_over_the_bases(driver: Driver, bases: list[Path]) -> None:
    driver.create("v", {"base": str(bases[0]), "base.1": str(bases[1])})
    snapshots_of(driver).snapshot("v", "s")
    mountpoint = Path(driver.mount("v", ID))
    try:
        assert [fs for _, fs in mounts_under(mountpoint)] == ["overlay"]
    finally:
        driver.unmount("v", ID)


def test_diff_since_an_older_snapshot_adds_up_the_later_layers(driver: Driver, base: Path) -> None:
    driver.create("v", {"base": str(base)})
    write(driver, "v", {"gone-later": "1", "kept": "1", "sub/x": "1"})
    snapshots_of(driver).snapshot("v", "one")
    write(driver, "v", {"gone-later": None, "kept": "2", "new": "2", "a": None})
    snapshots_of(driver).snapshot("v", "two")
    write(driver, "v", {"new": "3", "b": "changed", "a": "again", "made-then-gone": "3"})
    write(driver, "v", {"made-then-gone": None})
    since_one = [(c.kind, c.path) for c in commands_of(driver).diff("v", since="one")]
    assert since_one == [
        ("C", "/a"),
        ("C", "/b"),
        ("D", "/gone-later"),
        ("C", "/kept"),
        ("A", "/new"),
    ]
    since_two = [(c.kind, c.path) for c in commands_of(driver).diff("v", since="two")]
    assert since_two == [(c.kind, c.path) for c in commands_of(driver).diff("v")]
    assert ("A", "/a") in since_two
    with pytest.raises(UserError, match="no snapshot"):
        list(commands_of(driver).diff("v", since="three"))
