"""What each request means (SPEC A3, A4, B1, B4), on a temporary root with real overlays."""

from __future__ import annotations

import json
import os
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from docker_on_top import kernel
from docker_on_top.driver import Driver
from docker_on_top.errors import BusyError, InternalError, UserError

from ..mounts import lock_is_free, mounts_under
from .conftest import commands_of, new_driver, recover_driver, run_doctor

ID_A = "a" * 64
ID_B = "b" * 64


def make_volume(driver: Driver, base: Path, name: str = "v", *, volatile: bool = False) -> Path:
    driver.create(name, {"base": str(base), "volatile": "true" if volatile else "false"})
    return driver.store.root / name


def mounted(folder: Path) -> bool:
    return [fs for _, fs in mounts_under(folder / "mountpoint")] == ["overlay"]


def records(folder: Path) -> dict[str, int]:
    return {
        record.name: json.loads(record.read_text())["UsageCount"]
        for record in (folder / "activemounts").iterdir()
    }


@contextmanager
def immutable(path: Path) -> Iterator[None]:
    subprocess.run(["chattr", "+i", str(path)], check=True)
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


# --- Create ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["_x", "a*b", "", ".", "..", "-a", "a b", "é"])
def test_create_refuses_an_invalid_name(driver: Driver, base: Path, name: str) -> None:
    with pytest.raises(UserError, match="volume name"):
        driver.create(name, {"base": str(base)})
    assert list(driver.store.root.iterdir()) == []


def test_create_refuses_a_name_with_a_slash_pointing_at_base(driver: Driver, base: Path) -> None:
    with pytest.raises(UserError, match="-o base="):
        driver.create("a/b", {"base": str(base)})


def test_create_refuses_a_name_too_long_for_a_file(driver: Driver, base: Path) -> None:
    with pytest.raises(UserError, match="too long"):
        driver.create("x" * 256, {"base": str(base)})


def test_create_names_an_unknown_option(driver: Driver, base: Path) -> None:
    with pytest.raises(UserError, match="'quota'"):
        driver.create("v", {"base": str(base), "quota": "1G"})


def test_create_requires_base(driver: Driver) -> None:
    with pytest.raises(UserError, match="`base` option must be provided"):
        driver.create("v", {})


@pytest.mark.parametrize("bad_base", ["\\", "a/b", "relative", ""])
def test_create_requires_an_absolute_base(driver: Driver, bad_base: str) -> None:
    with pytest.raises(UserError, match="absolute"):
        driver.create("v", {"base": bad_base})


def test_create_refuses_a_missing_base(driver: Driver, workspace: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        driver.create("v", {"base": str(workspace / "missing")})


def test_create_refuses_a_base_that_is_a_file(driver: Driver, base: Path) -> None:
    with pytest.raises(UserError, match="not a directory"):
        driver.create("v", {"base": str(base / "a")})


@pytest.mark.parametrize("separator", [",", ":"])
def test_create_refuses_a_base_with_overlay_separators_on_a_kernel_before_6_8(
    driver: Driver, workspace: Path, separator: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A3's original refusal stays where overlayfs has no `lowerdir+` (SPEC B3)."""
    monkeypatch.setattr(kernel, "takes_any_overlay_path", lambda: False)
    odd = workspace / f"odd{separator}dir"
    odd.mkdir()
    with pytest.raises(UserError, match="commas and/or colons"):
        driver.create("v", {"base": str(odd)})


@pytest.mark.parametrize("separator", [",", ":"])
def test_create_takes_a_base_with_overlay_separators_where_the_kernel_can(
    driver: Driver, workspace: Path, separator: str
) -> None:
    odd = workspace / f"odd{separator}dir"
    odd.mkdir()
    (odd / "f").write_text("odd")
    driver.create("v", {"base": str(odd)})
    mountpoint = Path(driver.mount("v", ID_A))
    assert (mountpoint / "f").read_text() == "odd"
    driver.unmount("v", ID_A)


def test_create_refuses_a_base_inside_the_state_root(driver: Driver) -> None:
    (driver.store.root / "elsewhere").mkdir()
    with pytest.raises(UserError, match="inside the plugin's state root"):
        driver.create("v", {"base": str(driver.store.root / "elsewhere")})


def test_create_refuses_a_base_that_holds_the_state_root(driver: Driver, workspace: Path) -> None:
    with pytest.raises(UserError, match="contains the plugin's state root"):
        driver.create("v", {"base": str(workspace)})


def test_create_tells_the_state_root_from_its_neighbours_and_sees_through_links(
    driver: Driver, workspace: Path
) -> None:
    root = driver.store.root
    neighbour = root.with_name(root.name + "2")  # the root's path is a prefix of its own
    neighbour.mkdir()
    driver.create("beside", {"base": str(neighbour)})
    (root / "inside").mkdir()
    (workspace / "link").symlink_to(root / "inside")
    with pytest.raises(UserError, match="inside the plugin's state root"):
        driver.create("linked", {"base": str(workspace / "link")})
    with pytest.raises(UserError, match="contains the plugin's state root"):
        driver.create("everything", {"base": "/"})


@pytest.mark.parametrize(
    ("word", "volatile"),
    [("true", True), ("YES", True), ("False", False), ("no", False)],
)
def test_create_reads_volatile_words(driver: Driver, base: Path, word: str, volatile: bool) -> None:
    driver.create("v", {"base": str(base), "volatile": word})
    document = json.loads((driver.store.root / "v" / "metadata.json").read_text())
    assert document["BaseDirPath"] == str(base)
    assert document["Volatile"] is volatile


def test_create_refuses_another_volatile_word(driver: Driver, base: Path) -> None:
    with pytest.raises(UserError, match="'true', 'false', 'yes', or 'no'"):
        driver.create("v", {"base": str(base), "volatile": "maybe"})
    assert not (driver.store.root / "v").exists()


def test_create_of_an_existing_volume_is_refused(driver: Driver, base: Path) -> None:
    make_volume(driver, base)
    with pytest.raises(UserError, match="volume already exists"):
        make_volume(driver, base)


# --- Get, List, Path -----------------------------------------------------------------


def test_get_of_a_missing_volume_says_no_such_volume(driver: Driver) -> None:
    with pytest.raises(UserError, match="no such volume"):
        driver.get("missing")


def test_get_answers_even_when_metadata_is_unreadable(driver: Driver, base: Path) -> None:
    folder = make_volume(driver, base)
    (folder / "metadata.json").write_text("{")
    info = driver.get("v")
    assert (info.name, info.mountpoint, info.created_at) == ("v", "", "")


def test_list_shows_only_volume_folders(driver: Driver, base: Path) -> None:
    make_volume(driver, base, "one")
    make_volume(driver, base, "two")
    (driver.store.root / ".hidden").mkdir()
    (driver.store.root / "file").touch()
    assert [info.name for info in driver.list_volumes()] == ["one", "two"]


def test_list_reports_the_mountpoint_of_a_root_reached_through_a_symlink(
    workspace: Path, base: Path
) -> None:
    # List looks the mountpoint up in the mount table, which holds resolved paths.
    (workspace / "real root").mkdir()
    (workspace / "link").symlink_to(workspace / "real root")
    driver = new_driver(workspace / "link")
    recover_driver(driver)
    make_volume(driver, base)
    driver.mount("v", ID_A)
    try:
        assert driver.list_volumes()[0].mountpoint == f"{workspace}/link/v/mountpoint/"
    finally:
        driver.unmount("v", ID_A)
    assert driver.list_volumes()[0].mountpoint == ""


def test_mountpoint_is_reported_only_while_in_use(driver: Driver, base: Path) -> None:
    folder = make_volume(driver, base)
    assert driver.get("v").mountpoint == ""
    driver.mount("v", ID_A)
    assert driver.get("v").mountpoint == f"{folder}/mountpoint/"
    assert driver.list_volumes()[0].mountpoint == f"{folder}/mountpoint/"
    driver.unmount("v", ID_A)
    assert driver.get("v").mountpoint == ""


def test_created_at_of_a_go_volume_is_its_metadata_time(driver: Driver, base: Path) -> None:
    folder = make_volume(driver, base)
    (folder / "metadata.json").write_text(json.dumps({"BaseDirPath": str(base), "Volatile": False}))
    os.utime(folder / "metadata.json", (1700000000, 1700000000))
    assert driver.get("v").created_at == "2023-11-14T22:13:20Z"


def test_path_is_the_mountpoint(driver: Driver, base: Path) -> None:
    folder = make_volume(driver, base)
    assert driver.path("v") == f"{folder}/mountpoint/"
    with pytest.raises(UserError, match="no such volume"):
        driver.path("missing")


# --- Mount and Unmount -----------------------------------------------------------------


def test_first_mount_mounts_the_overlay_and_records_the_id(driver: Driver, base: Path) -> None:
    folder = make_volume(driver, base)
    assert driver.mount("v", ID_A) == f"{folder}/mountpoint/"
    assert mounted(folder)
    assert records(folder) == {ID_A: 1}
    assert (folder / "mountpoint" / "a").read_text() == "123"


def test_changes_land_in_upper_and_never_in_base(driver: Driver, base: Path) -> None:
    folder = make_volume(driver, base)
    driver.mount("v", ID_A)
    view = folder / "mountpoint"
    (view / "a").unlink()
    (view / "b").write_text("789")
    (view / "c").write_text("etc")
    driver.unmount("v", ID_A)
    assert sorted(p.name for p in base.iterdir()) == ["a", "b"]
    assert (base / "b").read_text() == "456"
    assert (folder / "upper" / "c").read_text() == "etc"


def test_same_id_twice_needs_two_unmounts(driver: Driver, base: Path) -> None:
    folder = make_volume(driver, base)
    driver.mount("v", ID_A)
    driver.mount("v", ID_A)
    assert records(folder) == {ID_A: 2}
    driver.unmount("v", ID_A)
    assert records(folder) == {ID_A: 1}
    assert mounted(folder)
    driver.unmount("v", ID_A)
    assert records(folder) == {}
    assert not mounted(folder)


def test_last_unmount_removes_mountpoint_and_workdir(driver: Driver, base: Path) -> None:
    folder = make_volume(driver, base)
    driver.mount("v", ID_A)
    driver.mount("v", ID_B)
    driver.unmount("v", ID_A)
    assert mounted(folder)
    driver.unmount("v", ID_B)
    assert not mounted(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["activemounts", "metadata.json", "upper"]


def test_b11_the_last_unmount_replies_with_its_record_gone_before_the_teardown(
    driver: Driver, base: Path
) -> None:
    folder = make_volume(driver, base)
    driver.mount("v", ID_A)
    seen: list[tuple[dict[str, int], bool, bool]] = []

    def at_reply() -> None:
        seen.append((records(folder), mounted(folder), lock_is_free(folder / "activemounts")))

    driver.unmount("v", ID_A, at_reply)
    assert seen == [({}, True, False)]  # record gone, overlay still mounted, lock held
    assert not mounted(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["activemounts", "metadata.json", "upper"]


def test_b11_an_unmount_that_is_not_the_last_replies_once_done(driver: Driver, base: Path) -> None:
    folder = make_volume(driver, base)
    driver.mount("v", ID_A)
    driver.mount("v", ID_B)
    replies: list[None] = []
    driver.unmount("v", ID_A, lambda: replies.append(None))
    assert replies == []  # nothing follows: its caller replies when it returns
    assert records(folder) == {ID_B: 1} and mounted(folder)


def test_b11_a_teardown_failing_after_the_reply_is_logged_and_leaves_a_stray_mount(
    driver: Driver, base: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = make_volume(driver, base)
    driver.mount("v", ID_A)
    replies: list[None] = []
    with immutable(folder):  # its mountpoint/ cannot be removed
        driver.unmount("v", ID_A, lambda: replies.append(None))
    assert replies == [None]
    assert records(folder) == {}
    assert "its teardown after the Unmount failed" in caplog.text
    assert "Operation not permitted" in caplog.text
    # The next Mount takes what the teardown left.
    driver.mount("v", ID_B)
    assert mounted(folder) and records(folder) == {ID_B: 1}
    driver.unmount("v", ID_B)
    assert sorted(p.name for p in folder.iterdir()) == ["activemounts", "metadata.json", "upper"]


def test_regular_volume_keeps_changes_between_users(driver: Driver, base: Path) -> None:
    folder = make_volume(driver, base)
    driver.mount("v", ID_A)
    (folder / "mountpoint" / "c").write_text("kept")
    driver.unmount("v", ID_A)
    driver.mount("v", ID_B)
    assert (folder / "mountpoint" / "c").read_text() == "kept"


def test_volatile_volume_discards_changes_when_next_mounted(driver: Driver, base: Path) -> None:
    folder = make_volume(driver, base, volatile=True)
    driver.mount("v", ID_A)
    (folder / "mountpoint" / "c").write_text("gone")
    (folder / "mountpoint" / "a").unlink()
    # A second user while the first is active shares the changes.
    driver.mount("v", ID_B)
    assert (folder / "mountpoint" / "c").read_text() == "gone"
    driver.unmount("v", ID_A)
    driver.unmount("v", ID_B)
    driver.mount("v", ID_A)
    assert not (folder / "mountpoint" / "c").exists()
    assert (folder / "mountpoint" / "a").read_text() == "123"


def test_mount_of_a_missing_volume_says_no_such_volume(driver: Driver) -> None:
    with pytest.raises(UserError, match="no such volume"):
        driver.mount("missing", ID_A)
    with pytest.raises(UserError, match="no such volume"):
        driver.unmount("missing", ID_A)


@pytest.mark.parametrize("mount_id", ["", ".", "..", "../x", "a/b", "x" * 256, "a\0b"])
def test_mount_ids_that_would_leave_the_folder_are_refused(
    driver: Driver, base: Path, mount_id: str
) -> None:
    folder = make_volume(driver, base)
    with pytest.raises(UserError, match="mount ID"):
        driver.mount("v", mount_id)
    with pytest.raises(UserError, match="mount ID"):
        driver.unmount("v", mount_id)
    assert not mounted(folder)
    assert records(folder) == {}
    assert sorted(p.name for p in driver.store.root.iterdir()) == ["v"]


def test_mount_with_the_base_gone_says_so_and_leaves_nothing(driver: Driver, base: Path) -> None:
    folder = make_volume(driver, base)
    subprocess.run(["rm", "-r", str(base)], check=True)
    with pytest.raises(UserError, match="does the base directory"):
        driver.mount("v", ID_A)
    assert not mounted(folder)
    assert records(folder) == {}
    assert not (folder / "mountpoint").exists()
    assert not (folder / "workdir").exists()


def test_mount_that_cannot_record_is_undone(driver: Driver, base: Path) -> None:
    folder = make_volume(driver, base)
    with immutable(folder / "activemounts"), pytest.raises(InternalError):
        driver.mount("v", ID_A)
    assert not mounted(folder)
    assert records(folder) == {}
    assert sorted(p.name for p in folder.iterdir()) == ["activemounts", "metadata.json", "upper"]
    driver.mount("v", ID_A)
    assert mounted(folder)


@pytest.mark.parametrize("volatile", [False, True])
def test_a_release_that_failed_is_retried_before_the_next_mount(
    driver: Driver, base: Path, volatile: bool
) -> None:
    folder = make_volume(driver, base, volatile=volatile)
    driver.mount("v", ID_A)
    (folder / "mountpoint" / "c").write_text("change")
    with immutable(folder / "activemounts" / ID_A):
        with pytest.raises(InternalError, match="usage records"):
            driver.unmount("v", ID_A)
        assert mounted(folder)
        # While the stale record cannot be released, a mount would hand out a
        # volume whose records lie: it is refused.
        with pytest.raises(InternalError, match="could not be released"):
            driver.mount("v", ID_B)
    driver.mount("v", ID_B)
    assert records(folder) == {ID_B: 1}
    assert (folder / "mountpoint" / "c").exists() is not volatile
    driver.unmount("v", ID_B)
    assert not mounted(folder)


def overlays_on(folder: Path) -> list[str]:
    return [fs for _, fs in mounts_under(folder / "mountpoint")]


def test_a_busy_overlay_stays_mounted_and_is_reused_never_doubled(
    driver: Driver, base: Path
) -> None:
    """Issue 13.5: two overlays on one upper are undefined; a busy one is kept instead."""
    folder = make_volume(driver, base)
    driver.mount("v", ID_A)
    (folder / "mountpoint" / "c").write_text("kept")
    with open(folder / "mountpoint" / "b") as held:
        driver.unmount("v", ID_A)
        assert records(folder) == {}
        assert overlays_on(folder) == ["overlay"]
        assert (folder / "workdir").is_dir()
        driver.mount("v", ID_B)
        assert overlays_on(folder) == ["overlay"]
        (folder / "mountpoint" / "d").write_text("new")
        assert held.read() == "456"
    assert (folder / "upper" / "d").read_text() == "new"
    assert (folder / "mountpoint" / "c").read_text() == "kept"
    driver.unmount("v", ID_B)
    assert not mounted(folder)
    assert not (folder / "workdir").exists()


def test_a_volatile_volume_held_on_the_host_refuses_to_mount(driver: Driver, base: Path) -> None:
    folder = make_volume(driver, base, volatile=True)
    driver.mount("v", ID_A)
    (folder / "mountpoint" / "c").write_text("to be discarded")
    with open(folder / "mountpoint" / "b"):
        driver.unmount("v", ID_A)
        with pytest.raises(UserError, match="holds files open"):
            driver.mount("v", ID_B)
        assert records(folder) == {}
        assert overlays_on(folder) == ["overlay"]
    driver.mount("v", ID_B)
    assert overlays_on(folder) == ["overlay"]
    assert not (folder / "mountpoint" / "c").exists()


def test_reset_refuses_while_a_stray_overlay_is_held(driver: Driver, base: Path) -> None:
    folder = make_volume(driver, base)
    driver.mount("v", ID_A)
    (folder / "mountpoint" / "c").write_text("kept")
    with open(folder / "mountpoint" / "b"):
        driver.unmount("v", ID_A)
        with pytest.raises(UserError, match="holds files open"):
            commands_of(driver).reset("v")
    assert (folder / "upper" / "c").read_text() == "kept"
    commands_of(driver).reset("v")
    assert not (folder / "upper" / "c").exists()
    assert not mounted(folder)


def test_records_without_an_overlay_get_it_mounted_again(driver: Driver, base: Path) -> None:
    folder = make_volume(driver, base, volatile=True)
    driver.mount("v", ID_A)
    (folder / "mountpoint" / "c").write_text("in use")
    subprocess.run(["umount", str(folder / "mountpoint")], check=True)
    driver.mount("v", ID_B)
    assert mounted(folder)
    assert (folder / "mountpoint" / "c").read_text() == "in use"


def test_a_stray_overlay_with_no_user_is_replaced(driver: Driver, base: Path) -> None:
    folder = make_volume(driver, base, volatile=True)
    driver.mount("v", ID_A)
    (folder / "mountpoint" / "c").write_text("gone")
    (folder / "activemounts" / ID_A).unlink()
    driver.mount("v", ID_B)
    assert [fs for _, fs in mounts_under(folder / "mountpoint")] == ["overlay"]
    assert not (folder / "mountpoint" / "c").exists()


def test_unmount_without_a_record_counts_as_one_use(driver: Driver, base: Path) -> None:
    folder = make_volume(driver, base)
    driver.mount("v", ID_A)
    driver.unmount("v", ID_B)
    assert mounted(folder)
    assert records(folder) == {ID_A: 1}


def test_concurrent_mounts_make_one_overlay(driver: Driver, base: Path) -> None:
    folder = make_volume(driver, base)
    ids = [f"{n:064x}" for n in range(40)]
    errors: list[BaseException] = []

    def run(action: str) -> None:
        def call(mount_id: str) -> None:
            try:
                getattr(driver, action)("v", mount_id)
            except BaseException as error:
                errors.append(error)

        threads = [threading.Thread(target=call, args=(i,)) for i in ids]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    run("mount")
    assert errors == []
    assert [fs for _, fs in mounts_under(folder / "mountpoint")] == ["overlay"]
    assert records(folder) == dict.fromkeys(ids, 1)
    run("unmount")
    assert errors == []
    assert mounts_under(folder) == []
    assert records(folder) == {}


# --- Remove ------------------------------------------------------------------------


def test_remove_of_a_missing_volume_succeeds(driver: Driver) -> None:
    driver.remove("missing")


def test_remove_deletes_the_whole_folder(driver: Driver, base: Path) -> None:
    folder = make_volume(driver, base)
    driver.mount("v", ID_A)
    (folder / "mountpoint" / "c").write_text("x")
    driver.unmount("v", ID_A)
    driver.remove("v")
    assert not folder.exists()
    assert sorted(p.name for p in base.iterdir()) == ["a", "b"]


def test_remove_detaches_a_stray_mount_first(driver: Driver, base: Path) -> None:
    folder = make_volume(driver, base)
    driver.mount("v", ID_A)
    (folder / "activemounts" / ID_A).unlink()
    driver.remove("v")
    assert not folder.exists()
    assert mounts_under(folder) == []
    assert sorted(p.name for p in base.iterdir()) == ["a", "b"]


# --- Start-up recovery ---------------------------------------------------------------


def test_recovery_leaves_a_clean_volume_alone(root: Path, base: Path) -> None:
    first = new_driver(root)
    recover_driver(first)
    make_volume(first, base)
    report = recover_driver(new_driver(root))
    assert report.clean == ["v"]


def test_recovery_resets_records_left_by_a_reboot(root: Path, base: Path) -> None:
    first = new_driver(root)
    recover_driver(first)
    folder = make_volume(first, base)
    first.mount("v", ID_A)
    (folder / "mountpoint" / "c").write_text("kept")
    subprocess.run(["umount", str(folder / "mountpoint")], check=True)
    second = new_driver(root)
    assert recover_driver(second).cleaned == ["v"]
    assert records(folder) == {}
    assert not (folder / "workdir").exists()
    second.mount("v", ID_B)
    assert (folder / "mountpoint" / "c").read_text() == "kept"


def test_recovery_leaves_a_volume_still_mounted(root: Path, base: Path) -> None:
    first = new_driver(root)
    recover_driver(first)
    folder = make_volume(first, base)
    first.mount("v", ID_A)
    second = new_driver(root)
    assert recover_driver(second).still_mounted == ["v"]
    assert mounted(folder)
    assert records(folder) == {ID_A: 1}
    second.unmount("v", ID_A)
    assert not mounted(folder)


def test_recovery_removes_a_volume_whose_create_was_cut_short(root: Path) -> None:
    (root / "half" / "upper").mkdir(parents=True)
    (root / "half" / "activemounts").mkdir()
    assert recover_driver(new_driver(root)).half_made == ["half"]
    assert not (root / "half").exists()


def test_recovery_keeps_a_folder_without_metadata_that_holds_changes(root: Path) -> None:
    (root / "odd" / "upper").mkdir(parents=True)
    (root / "odd" / "upper" / "precious").touch()
    recover_driver(new_driver(root))
    assert (root / "odd" / "upper" / "precious").exists()


def test_recovery_stops_on_a_state_it_cannot_understand(root: Path, base: Path) -> None:
    first = new_driver(root)
    recover_driver(first)
    folder = make_volume(first, base)
    (folder / "mountpoint").mkdir()
    (folder / "mountpoint" / "stray").touch()
    with pytest.raises(InternalError, match="cannot recover volume v"):
        recover_driver(new_driver(root))


def test_get_reports_the_status_docker_volume_inspect_shows(driver: Driver, base: Path) -> None:
    make_volume(driver, base, volatile=True)
    assert driver.get("v").status == {
        "Base": str(base),
        "Volatile": True,
        "Mounted": False,
        "ActiveMounts": 0,
    }
    driver.mount("v", ID_A)
    driver.mount("v", ID_A)
    driver.mount("v", ID_B)
    status = driver.get("v").status
    assert (status["Mounted"], status["ActiveMounts"]) == (True, 3)
    assert driver.list_volumes()[0].status == {}


def test_a_failed_release_survives_a_restart(root: Path, base: Path) -> None:
    first = new_driver(root)
    recover_driver(first)
    folder = make_volume(first, base, volatile=True)
    first.mount("v", ID_A)
    (folder / "mountpoint" / "c").write_text("gone")
    with immutable(folder / "activemounts" / ID_A), pytest.raises(InternalError):
        first.unmount("v", ID_A)
    assert json.loads((folder / "unreleased.json").read_text()) == {ID_A: 1}
    second = new_driver(root)
    assert recover_driver(second).still_mounted == ["v"]
    second.mount("v", ID_B)
    assert records(folder) == {ID_B: 1}
    assert not (folder / "mountpoint" / "c").exists()
    assert not (folder / "unreleased.json").exists()


# --- doctor ---------------------------------------------------------------------------


def test_doctor_finds_nothing_wrong_with_a_healthy_volume(driver: Driver, base: Path) -> None:
    make_volume(driver, base)
    driver.mount("v", ID_A)
    assert run_doctor(driver, None, {"v": 1}, fix=True) == []
    assert run_doctor(driver, None, None, fix=True) == []


def test_doctor_releases_records_no_live_container_owns(driver: Driver, base: Path) -> None:
    folder = make_volume(driver, base, volatile=True)
    driver.mount("v", ID_A)
    (folder / "mountpoint" / "c").write_text("stuck")
    (finding,) = run_doctor(driver, None, {}, fix=False)
    assert "no live container" in finding.problem
    assert not finding.fixed
    assert mounted(folder)
    (finding,) = run_doctor(driver, "v", {"other": 2}, fix=True)
    assert finding.fixed
    assert records(folder) == {}
    assert not mounted(folder)
    driver.mount("v", ID_B)
    assert not (folder / "mountpoint" / "c").exists()


def test_doctor_never_releases_a_volume_a_live_container_uses(driver: Driver, base: Path) -> None:
    folder = make_volume(driver, base)
    driver.mount("v", ID_A)
    driver.mount("v", ID_B)
    (finding,) = run_doctor(driver, None, {"v": 1}, fix=True)
    assert "some may be stale" in finding.problem
    assert not finding.fixed
    assert records(folder) == {ID_A: 1, ID_B: 1}
    assert mounted(folder)


def test_doctor_detaches_an_overlay_without_records(driver: Driver, base: Path) -> None:
    folder = make_volume(driver, base)
    driver.mount("v", ID_A)
    (folder / "activemounts" / ID_A).unlink()
    (finding,) = run_doctor(driver, None, None, fix=True)
    assert "no record" in finding.problem
    assert finding.fixed
    assert mounts_under(folder) == []


def test_doctor_reports_records_without_an_overlay(driver: Driver, base: Path) -> None:
    folder = make_volume(driver, base)
    driver.mount("v", ID_A)
    subprocess.run(["umount", str(folder / "mountpoint")], check=True)
    (finding,) = run_doctor(driver, None, None, fix=True)
    assert "no overlay is mounted" in finding.problem
    assert not finding.fixed


def test_doctor_of_a_missing_volume_says_so(driver: Driver) -> None:
    with pytest.raises(UserError, match="no such volume"):
        run_doctor(driver, "missing", None, fix=False)


def test_doctor_leaves_podman_records_to_podman(driver: Driver, base: Path) -> None:
    from docker_on_top.doctor import PODMAN_MOUNT_ID

    folder = make_volume(driver, base)
    driver.mount("v", PODMAN_MOUNT_ID)
    driver.mount("v", ID_A)
    (finding,) = run_doctor(driver, None, {}, fix=True)
    assert finding.fixed
    assert records(folder) == {PODMAN_MOUNT_ID: 1}
    assert mounted(folder)
    assert run_doctor(driver, None, {}, fix=True) == []


def test_a_long_holder_names_itself_to_those_that_give_up(
    driver: Driver, base: Path, tmp_path: Path
) -> None:
    """Issue 13.1: a waiter that gives up says what holds the volume."""
    make_volume(driver, base)
    impatient = new_driver(driver.store.root, lock_timeout=0.2)
    seen: list[str] = []

    def meanwhile(_: int) -> None:
        with pytest.raises(BusyError) as refused:
            impatient.mount("v", ID_A)
        seen.append(str(refused.value))

    commands_of(driver).commit_into("v", tmp_path / "merged", meanwhile)
    assert seen and "busy: a commit (pid" in seen[0], seen
    assert not (driver.store.root / "v" / "busy.json").exists()
    assert impatient.mount("v", ID_A)
