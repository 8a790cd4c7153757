"""The on-disk state of one volume (SPEC A2, B2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from docker_on_top.metadata import Metadata
from docker_on_top.volume import Volume, write_atomically


def test_metadata_written_by_the_go_plugin_is_read() -> None:
    metadata = Metadata.from_json(b'{"BaseDirPath":"/data","Volatile":true}')
    assert metadata == Metadata(base_dir="/data", volatile=True, created_at=None)


def test_metadata_keeps_the_go_keys_and_adds_created_at() -> None:
    document = json.loads(Metadata("/data", False, "2026-01-01T00:00:00Z").to_json())
    assert document == {
        "BaseDirPath": "/data",
        "Volatile": False,
        "CreatedAt": "2026-01-01T00:00:00Z",
    }


@pytest.mark.parametrize(
    "raw",
    [b"[]", b"{}", b'{"BaseDirPath": 5}', b'{"BaseDirPath": "/x", "Volatile": "yes"}', b"{"],
)
def test_malformed_metadata_is_refused(raw: bytes) -> None:
    with pytest.raises(ValueError):
        Metadata.from_json(raw)


def test_create_makes_the_tree_and_metadata(root: Path) -> None:
    root.mkdir()
    volume = Volume(root, "v")
    volume.create(Metadata("/data", False, "2026-01-01T00:00:00Z"))
    assert sorted(p.name for p in volume.folder.iterdir()) == [
        "activemounts",
        "metadata.json",
        "upper",
    ]
    assert volume.read_metadata().base_dir == "/data"


def test_create_of_an_existing_volume_changes_nothing(root: Path) -> None:
    root.mkdir()
    volume = Volume(root, "v")
    volume.create(Metadata("/data", False))
    (volume.upper / "change").write_text("kept")
    with pytest.raises(FileExistsError):
        volume.create(Metadata("/other", True))
    assert volume.read_metadata().base_dir == "/data"
    assert (volume.upper / "change").read_text() == "kept"


def test_failed_create_leaves_no_half_made_volume(root: Path) -> None:
    root.mkdir()
    volume = Volume(root, "v")
    # A directory in the way of the metadata file makes the final rename fail.
    (root / "v").mkdir()
    (root / "v" / "metadata.json").mkdir()
    (root / "v" / "metadata.json" / "x").touch()
    with pytest.raises(FileExistsError):
        volume.create(Metadata("/data", False))
    other = Volume(root, "w")
    (root / "w").mkdir()
    (root / "w" / "upper").touch()
    with pytest.raises(FileExistsError):
        other.create(Metadata("/data", False))
    assert (root / "w").exists()  # not ours: an existing folder is never removed


def test_failed_metadata_write_removes_what_create_made(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root.mkdir()
    volume = Volume(root, "v")

    def failing_write(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("docker_on_top.volume.write_atomically", failing_write)
    with pytest.raises(OSError):
        volume.create(Metadata("/data", False))
    assert not volume.folder.exists()


def test_atomic_write_replaces_content_and_leaves_no_staging_file(tmp_path: Path) -> None:
    target = tmp_path / "file"
    staging = tmp_path / ".file.tmp"
    target.write_text("old")
    write_atomically(target, b"new", staging, durable=True)
    assert target.read_text() == "new"
    assert not staging.exists()


def test_atomic_write_that_cannot_rename_keeps_old_content(tmp_path: Path) -> None:
    target = tmp_path / "folder"
    target.mkdir()
    (target / "inside").touch()
    staging = tmp_path / ".tmp"
    with pytest.raises(OSError):
        write_atomically(target, b"new", staging, durable=False)
    assert target.is_dir()
    assert not staging.exists()


def test_usage_records_count_in_the_go_format(root: Path) -> None:
    root.mkdir()
    volume = Volume(root, "v")
    volume.create(Metadata("/data", False))
    records = volume.records
    with records.lock():
        assert not records.in_use()
        assert records.count("abc") is None
        records.set("abc", 2)
        assert (Path(records.folder) / "abc").read_text() == '{"UsageCount":2}'
        assert records.count("abc") == 2
        assert records.in_use()
        assert records.ids() == ["abc"]
        records.remove("abc")
        assert not records.in_use()


@pytest.mark.parametrize("content", [b"", b"{", b'{"UsageCount": 0}', b'{"UsageCount": "1"}'])
def test_a_corrupt_usage_record_is_reported(root: Path, content: bytes) -> None:
    root.mkdir()
    volume = Volume(root, "v")
    volume.create(Metadata("/data", False))
    (Path(volume.records.folder) / "abc").write_bytes(content)
    with pytest.raises(ValueError):
        volume.records.count("abc")


@pytest.mark.parametrize("name", ["", "..", ".", "a/b", "_x", "a*b", "x" * 256])
def test_a_volume_object_refuses_names_that_leave_the_root(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError):
        Volume(tmp_path, name)
