"""A volume's changes read from a real overlay upper directory (docker_on_top.changes)."""

from __future__ import annotations

import errno
import gc
import io
import os
import shutil
import stat
import subprocess
import tarfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from docker_on_top import changes, kernel
from docker_on_top.changes import (
    Change,
    apply_to_base,
    changes_size,
    diff,
    export_layer,
    merge_into,
    reset,
)

from ..mounts import mounts_under
from ..trees import Node, apply_oci_layer, below_root, snapshot, without_times


def hard_link_groups(root: Path) -> set[frozenset[str]]:
    """The names that share an inode, for every inode with more than one name in `root`."""
    names: dict[tuple[int, int], set[str]] = {}
    for folder, directories, files in os.walk(root):
        for name in directories + files:
            path = Path(folder, name)
            st = os.lstat(path)
            if not stat.S_ISDIR(st.st_mode):
                key = (st.st_dev, st.st_ino)
                names.setdefault(key, set()).add(str(path.relative_to(root)))
    return {frozenset(group) for group in names.values() if len(group) > 1}


@dataclass
class Volume:
    base: Path
    upper: Path
    work: Path
    mountpoint: Path

    def mount(self) -> None:
        kernel.mount_overlay(
            source="dot-test",
            lowers=[self.base],
            upper=self.upper,
            work=self.work,
            target=self.mountpoint,
            volatile=False,
        )

    def unmount(self) -> None:
        # As the driver does: the workdir goes with the mount (and with it the link that
        # the kernel keeps to its shared whiteout).
        kernel.unmount(self.mountpoint)
        shutil.rmtree(self.work)
        self.work.mkdir()


@pytest.fixture
def volume(workspace: Path) -> Iterator[Volume]:
    """A populated base under a mounted overlay; unmounted in teardown whatever happens."""
    volume = Volume(*(workspace / name for name in ("base", "upper", "work", "mnt")))
    for folder in (volume.base, volume.upper, volume.work, volume.mountpoint):
        folder.mkdir()
    populate_base(volume.base)
    volume.mount()
    try:
        yield volume
    finally:
        if kernel.is_mount_point(volume.mountpoint):
            kernel.unmount(volume.mountpoint, flags=kernel.MNT_DETACH)


def populate_base(base: Path) -> None:
    for name in ("keep.txt", "change.txt", "delete.txt", "chmod.txt", "chown.txt", "xattr.txt"):
        (base / name).write_text(f"base {name}\n")
    for name in ("linkbase", "renamed_file"):
        (base / name).write_text(f"base {name}\n")
    (base / "pair1").write_text("linked in the base, untouched\n")
    os.link(base / "pair1", base / "pair2")
    (base / "split1").write_text("linked in the base, one name changed\n")
    os.link(base / "split1", base / "split2")
    (base / "dir" / "sub").mkdir(parents=True)
    (base / "dir" / "inner.txt").write_text("inner\n")
    (base / "dir" / "sub" / "deep.txt").write_text("deep\n")
    (base / "remade" / "sub").mkdir(parents=True)
    for name in ("old1", "old2", "sub/x"):
        (base / "remade" / name).write_text(f"base remade/{name}\n")
    (base / "renamed_dir").mkdir()
    (base / "renamed_dir" / "f").write_text("moved with its directory\n")
    (base / "link").symlink_to("keep.txt")
    os.mkfifo(base / "fifo")


def make_changes(mnt: Path) -> None:
    """Changes of every kind, made through the mountpoint as a container would."""
    with (mnt / "change.txt").open("a") as file:
        file.write("changed\n")
    (mnt / "delete.txt").unlink()
    os.chmod(mnt / "chmod.txt", 0o600)
    os.chown(mnt / "chown.txt", 1234, 5678)
    os.setxattr(mnt / "xattr.txt", "user.note", b"hello")
    (mnt / "new.txt").write_text("new\n")
    os.setxattr(mnt / "new.txt", "user.note", b"\xffnot utf-8")
    (mnt / "newdir" / "nested").mkdir(parents=True)
    (mnt / "newdir" / "nested" / "file").write_text("nested\n")
    shutil.rmtree(mnt / "dir" / "sub")
    # A base directory deleted and made again: the new one is opaque.
    shutil.rmtree(mnt / "remade")
    (mnt / "remade").mkdir()
    (mnt / "remade" / "old1").write_text("a new old1\n")
    (mnt / "remade" / "fresh").write_text("fresh\n")
    # Without redirect_dir the kernel refuses to rename a base directory; mv copies instead.
    with pytest.raises(OSError) as refused:
        os.rename(mnt / "renamed_dir", mnt / "new_dir")
    assert refused.value.errno == errno.EXDEV
    shutil.copytree(mnt / "renamed_dir", mnt / "new_dir", symlinks=True)
    shutil.rmtree(mnt / "renamed_dir")
    # A file rename is a copy-up plus a whiteout; a directory only in upper renames freely.
    os.rename(mnt / "renamed_file", mnt / "moved_file")
    (mnt / "scratch").mkdir()
    (mnt / "scratch" / "note").write_text("note\n")
    os.rename(mnt / "scratch", mnt / "kept_scratch")
    (mnt / "hard1").write_text("two names\n")
    os.link(mnt / "hard1", mnt / "hard2")
    os.link(mnt / "linkbase", mnt / "linkbase2")
    with (mnt / "split1").open("a") as file:
        file.write("changed\n")
    (mnt / "newlink").symlink_to("new.txt")
    (mnt / "link").unlink()
    (mnt / "link").symlink_to("change.txt")
    os.mkfifo(mnt / "newfifo")
    os.mknod(mnt / "newchr", stat.S_IFCHR | 0o600, os.makedev(1, 3))


EXPECTED_DIFF = [
    Change("C", "/change.txt"),
    Change("C", "/chmod.txt"),
    Change("C", "/chown.txt"),
    Change("D", "/delete.txt"),
    Change("C", "/dir"),
    Change("D", "/dir/sub"),
    Change("A", "/hard1"),
    Change("A", "/hard2"),
    Change("A", "/kept_scratch"),
    Change("A", "/kept_scratch/note"),
    Change("C", "/link"),
    Change("C", "/linkbase"),
    Change("A", "/linkbase2"),
    Change("A", "/moved_file"),
    Change("A", "/new.txt"),
    Change("A", "/new_dir"),
    Change("A", "/new_dir/f"),
    Change("A", "/newchr"),
    Change("A", "/newdir"),
    Change("A", "/newdir/nested"),
    Change("A", "/newdir/nested/file"),
    Change("A", "/newfifo"),
    Change("A", "/newlink"),
    Change("C", "/remade"),
    Change("A", "/remade/fresh"),
    Change("C", "/remade/old1"),
    Change("D", "/remade/old2"),
    Change("D", "/remade/sub"),
    Change("D", "/renamed_dir"),
    Change("D", "/renamed_file"),
    Change("C", "/split1"),
    Change("C", "/xattr.txt"),
]


@dataclass
class Changed:
    volume: Volume
    # The merged view as the containers saw it, taken before unmounting.
    merged: dict[str, Node]
    merged_links: set[frozenset[str]]


@pytest.fixture
def changed(volume: Volume) -> Changed:
    make_changes(volume.mountpoint)
    merged = snapshot(volume.mountpoint)
    merged_links = hard_link_groups(volume.mountpoint)
    volume.unmount()
    return Changed(volume, merged, merged_links)


def overlay_xattrs(tree: dict[str, Node]) -> list[str]:
    return [
        f"{relative}: {name}"
        for relative, node in tree.items()
        for name in node.xattrs
        if name.startswith(("trusted.overlay.", "user.overlay."))
    ]


def test_the_upper_holds_what_the_kernel_wrote(changed: Changed) -> None:
    upper = changed.volume.upper
    whiteout = os.lstat(upper / "delete.txt")
    assert stat.S_ISCHR(whiteout.st_mode)
    assert whiteout.st_rdev == 0
    assert os.getxattr(upper / "remade", "trusted.overlay.opaque") == b"y"
    assert stat.S_ISCHR(os.lstat(upper / "renamed_dir").st_mode)
    assert "trusted.overlay.opaque" not in os.listxattr(upper / "new_dir")


@pytest.mark.parametrize("listing_bytes", [0, 1 << 40], ids=["lookups", "listings"])
def test_diff_lists_every_kind_of_change(
    changed: Changed, listing_bytes: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same changes whether diff looks each upper name up in the base directories or
    lists them (it picks by their sizes; here every one is looked up, or listed)."""
    monkeypatch.setattr(changes, "_BASE_LISTING_BYTES_PER_UPPER_ENTRY", listing_bytes)
    assert diff(changed.volume.upper, changed.volume.base) == EXPECTED_DIFF


def test_diff_looks_names_up_rather_than_list_a_huge_base_directory(
    volume: Volume, monkeypatch: pytest.MonkeyPatch
) -> None:
    volume.unmount()
    huge = volume.base / "huge"
    huge.mkdir()
    for number in range(5000):
        (huge / f"file{number:05d}").touch()
    volume.mount()
    mnt = volume.mountpoint / "huge"
    (mnt / "file00001").write_text("changed\n")
    (mnt / "file00002").unlink()
    (mnt / "new").mkdir()
    volume.unmount()
    listed: list[str] = []
    scandir = os.scandir

    def spy(path: str) -> Iterator[os.DirEntry[str]]:
        listed.append(str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", spy)
    assert diff(volume.upper, volume.base) == [
        Change("C", "/huge"),
        Change("C", "/huge/file00001"),
        Change("D", "/huge/file00002"),
        Change("A", "/huge/new"),
    ]
    assert str(huge) not in listed
    assert str(volume.upper / "huge") in listed


def test_xattr_whiteouts_count_in_a_directory_marked_x(volume: Volume, workspace: Path) -> None:
    """Zero-size files with trusted.overlay.whiteout, which other tools may write: the
    documented format marks their directory with trusted.overlay.opaque = "x"."""
    volume.unmount()
    marked = volume.upper / "dir"
    marked.mkdir()
    os.setxattr(marked, "trusted.overlay.opaque", b"x")
    (marked / "inner.txt").touch()
    os.setxattr(marked / "inner.txt", "trusted.overlay.whiteout", b"")
    volume.mount()
    assert not os.path.lexists(volume.mountpoint / "dir" / "inner.txt")
    volume.unmount()
    # A read-only overlay with the upper as a lower layer, as an exported layer is used:
    # there the kernel hides the name from listings too.
    merge_into(volume.upper, [volume.base], workspace / "merged")
    assert sorted(os.listdir(workspace / "merged" / "dir")) == ["sub"]
    # Unmarked, it is the empty file that it is.
    (volume.upper / "keep.txt").touch()
    os.setxattr(volume.upper / "keep.txt", "trusted.overlay.whiteout", b"")
    assert diff(volume.upper, volume.base) == [
        Change("C", "/dir"),
        Change("D", "/dir/inner.txt"),
        Change("C", "/keep.txt"),
    ]
    with tarfile.open(fileobj=io.BytesIO(export_through_a_pipe(volume.upper))) as tar:
        members = {member.name: member for member in tar.getmembers()}
    assert sorted(members) == ["dir", "dir/.wh.inner.txt", "keep.txt"]
    assert members["keep.txt"].isreg()
    assert members["keep.txt"].pax_headers == {}
    apply_to_base(volume.upper, volume.base)
    assert sorted(os.listdir(volume.base / "dir")) == ["sub"]
    assert (volume.base / "keep.txt").read_bytes() == b""


def test_diff_leaves_the_garbage_collector_as_it_was(changed: Changed) -> None:
    """diff pauses the cyclic collector while it runs (see _cyclic_gc_paused)."""
    volume = changed.volume
    assert gc.isenabled()
    assert diff(volume.upper, volume.base) == EXPECTED_DIFF
    assert gc.isenabled()
    gc.disable()
    try:
        diff(volume.upper, volume.base)
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_diff_of_an_untouched_volume_is_empty(volume: Volume) -> None:
    volume.unmount()
    assert diff(volume.upper, volume.base) == []
    assert changes_size(volume.upper) == 0


def test_a_whiteout_with_nothing_below_it_is_no_change(changed: Changed) -> None:
    (changed.volume.base / "delete.txt").unlink()
    assert Change("D", "/delete.txt") not in diff(changed.volume.upper, changed.volume.base)


def test_user_overlay_xattrs_are_plain_data_for_the_kernel(volume: Volume) -> None:
    """The volumes mount without `userxattr`: a container may set user.overlay.opaque, and
    the kernel still shows the base entries below it, so nothing here may hide them."""
    mnt = volume.mountpoint
    os.setxattr(mnt / "dir", "user.overlay.opaque", b"y")
    assert sorted(os.listdir(mnt / "dir")) == ["inner.txt", "sub"]
    volume.unmount()
    assert diff(volume.upper, volume.base) == [Change("C", "/dir")]
    apply_to_base(volume.upper, volume.base)
    assert sorted(os.listdir(volume.base / "dir")) == ["inner.txt", "sub"]
    assert "user.overlay.opaque" not in os.listxattr(volume.base / "dir")


def export_through_a_pipe(upper: Path) -> bytes:
    """export_layer's output read from a pipe, which cannot seek (as with stdout)."""
    read_fd, write_fd = os.pipe()
    failure: list[BaseException] = []

    def write() -> None:
        with open(write_fd, "wb") as out:
            try:
                export_layer(upper, out)
            except BaseException as error:
                failure.append(error)

    writer = threading.Thread(target=write)
    writer.start()
    with open(read_fd, "rb") as source:
        layer = source.read()
    writer.join()
    assert failure == []
    return layer


def test_export_layer_is_an_oci_layer(changed: Changed) -> None:
    layer = export_through_a_pipe(changed.volume.upper)
    with tarfile.open(fileobj=io.BytesIO(layer)) as tar:
        members = {member.name: member for member in tar.getmembers()}
    assert not [name for name in members if name.startswith(("/", "./"))]
    # Whiteouts (one inode shared by the kernel) become plain empty files, never links.
    for whiteout in (".wh.delete.txt", ".wh.renamed_dir", ".wh.renamed_file", "dir/.wh.sub"):
        assert members[whiteout].isreg()
        assert members[whiteout].size == 0
    assert members["remade"].isdir()
    assert members["remade/.wh..wh..opq"].isreg()
    assert "remade/.wh.old2" not in members
    assert members["hard1"].isreg()
    assert members["hard2"].islnk()
    assert members["hard2"].linkname == "hard1"
    assert members["linkbase2"].islnk()
    assert members["linkbase2"].linkname == "linkbase"
    assert members["xattr.txt"].pax_headers["SCHILY.xattr.user.note"] == "hello"
    note = members["new.txt"].pax_headers["SCHILY.xattr.user.note"]
    assert note.encode("utf-8", "surrogateescape") == b"\xffnot utf-8"
    assert members["newlink"].issym()
    assert members["newlink"].linkname == "new.txt"
    assert members["newfifo"].isfifo()
    assert members["newchr"].ischr()
    assert (members["newchr"].devmajor, members["newchr"].devminor) == (1, 3)
    assert (members["chown.txt"].uid, members["chown.txt"].gid) == (1234, 5678)
    assert members["chmod.txt"].mode == 0o600
    assert members["change.txt"].size == len(b"base change.txt\nchanged\n")
    for member in members.values():
        assert not [
            key
            for key in member.pax_headers
            if key.startswith(("SCHILY.xattr.trusted.overlay.", "SCHILY.xattr.user.overlay."))
        ]
    # Nothing but changes: untouched base entries are not in the layer.
    assert "keep.txt" not in members
    assert "dir/inner.txt" not in members


def test_export_applied_onto_the_base_gives_the_merged_view(
    changed: Changed, workspace: Path
) -> None:
    copy = workspace / "copy"
    subprocess.run(["cp", "-a", str(changed.volume.base), str(copy)], check=True)
    apply_oci_layer(export_through_a_pipe(changed.volume.upper), copy)
    # The layer has no root entry and whole-second mtimes: compare the rest.
    assert below_root(snapshot(copy, times=False)) == without_times(below_root(changed.merged))
    assert hard_link_groups(copy) == changed.merged_links


def test_export_keeps_what_a_ustar_header_cannot_hold(workspace: Path) -> None:
    """Long names and link targets, ids and times out of the ustar fields' range, names and
    xattr values that are not UTF-8, a file of several read chunks: pax records carry
    them, and both tarfile and GNU tar read them back."""
    upper = workspace / "upper"
    deep = upper / ("d" * 120) / ("e" * 120)
    deep.mkdir(parents=True)
    (deep / ("f" * 200)).write_text("long path\n")
    # Files come before subdirectories: the deep name links to the first, long one.
    os.link(deep / ("f" * 200), upper / ("g" * 150))
    (upper / "target").symlink_to("t" * 150)
    (upper / "ids").write_text("ids\n")
    os.chown(upper / "ids", 3_000_000, 2**32 - 2)
    (upper / "old").write_text("1969\n")
    os.utime(upper / "old", (0, -100))
    (upper / os.fsdecode(b"not utf-8 \xff")).write_text("bytes\n")
    os.setxattr(upper / "ids", "user.binary", b"\xff\x00\n=")
    (upper / "big").write_bytes(os.urandom(3 * changes._CHUNK + 5))
    (upper / "plain").write_text("plain\n")
    expected = without_times(below_root(snapshot(upper)))
    layer = export_through_a_pipe(upper)
    with tarfile.open(fileobj=io.BytesIO(layer)) as tar:
        members = {member.name: member for member in tar.getmembers()}
    assert members["plain"].pax_headers == {}
    assert members[f"{'d' * 120}/{'e' * 120}/{'f' * 200}"].linkname == "g" * 150
    assert members["old"].mtime == -100
    by_tarfile = workspace / "by-tarfile"
    by_tarfile.mkdir()
    apply_oci_layer(layer, by_tarfile)
    by_gnu_tar = workspace / "by-gnu-tar"
    by_gnu_tar.mkdir()
    extracted = subprocess.run(
        ["tar", "--xattrs", "--xattrs-include=*", "--numeric-owner", "-xpf", "-"],
        input=layer,
        cwd=by_gnu_tar,
        capture_output=True,
        check=True,
    )
    assert b"Ignoring" not in extracted.stderr
    for copy in (by_tarfile, by_gnu_tar):
        assert without_times(below_root(snapshot(copy))) == expected
        assert os.lstat(copy / "old").st_mtime == -100
        assert hard_link_groups(copy) == hard_link_groups(upper)


def test_export_writes_in_chunks_of_bounded_size(
    changed: Changed, monkeypatch: pytest.MonkeyPatch
) -> None:
    upper = changed.volume.upper
    (upper / "large").write_bytes(os.urandom(50_000))
    whole = io.BytesIO()
    export_layer(upper, whole)
    monkeypatch.setattr(changes, "_CHUNK", 4096)
    sizes: list[int] = []

    class Recorder(io.BytesIO):
        def write(self, data: bytes) -> int:  # type: ignore[override]
            sizes.append(len(data))
            return super().write(data)

    chunked = Recorder()
    export_layer(upper, chunked)
    assert chunked.getvalue() == whole.getvalue()
    assert len(sizes) > 10
    assert max(sizes) < 2 * 4096


def test_export_refuses_a_name_that_a_layer_reads_as_a_whiteout(volume: Volume) -> None:
    (volume.mountpoint / ".wh.keep.txt").write_text("just a file\n")
    volume.unmount()
    assert diff(volume.upper, volume.base) == [Change("A", "/.wh.keep.txt")]
    with pytest.raises(ValueError, match=r"\.wh\.keep\.txt"):
        export_layer(volume.upper, io.BytesIO())


def test_merge_into_copies_the_merged_view(changed: Changed, workspace: Path) -> None:
    target = workspace / "out" / "merged"
    target.parent.mkdir()
    reports: list[int] = []
    merge_into(changed.volume.upper, [changed.volume.base], target, progress=reports.append)
    merged = snapshot(target)
    assert merged == changed.merged
    assert overlay_xattrs(merged) == []
    assert hard_link_groups(target) == changed.merged_links
    assert reports == [len(changed.merged) - 1]
    assert os.listdir(target.parent) == ["merged"]
    assert mounts_under(workspace) == []


def test_merge_into_an_existing_target_refuses_and_leaves_it_alone(
    changed: Changed, workspace: Path
) -> None:
    target = workspace / "taken"
    target.mkdir()
    (target / "mine").write_text("mine\n")
    before = snapshot(target)
    with pytest.raises(FileExistsError):
        merge_into(changed.volume.upper, [changed.volume.base], target)
    assert snapshot(target) == before
    assert sorted(os.listdir(workspace)) == ["base", "mnt", "taken", "upper", "work"]


def test_a_failed_merge_leaves_nothing_behind(changed: Changed, workspace: Path) -> None:
    target = workspace / "out" / "merged"
    target.parent.mkdir()

    def interrupt(count: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        merge_into(changed.volume.upper, [changed.volume.base], target, progress=interrupt)
    assert os.listdir(target.parent) == []
    assert mounts_under(workspace) == []


def test_merge_into_a_layer_refuses(changed: Changed) -> None:
    with pytest.raises(ValueError):
        merge_into(changed.volume.upper, [changed.volume.base], changed.volume.base / "copy")
    assert not (changed.volume.base / "copy").exists()


def test_merge_progress_comes_every_so_many_entries(
    volume: Volume, workspace: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every 10 rather than every 1000 entries: creating files is slow on some disks.
    monkeypatch.setattr(changes, "_PROGRESS_EVERY", 10)
    many = volume.mountpoint / "many"
    many.mkdir()
    for index in range(25):
        (many / str(index)).touch()
    volume.unmount()
    reports: list[int] = []
    merge_into(volume.upper, [volume.base], workspace / "merged", progress=reports.append)
    total = len(snapshot(workspace / "merged")) - 1
    assert reports == [*range(10, total + 1, 10), total]
    assert total % 10 != 0


def test_apply_to_base_then_reset_gives_the_merged_view(changed: Changed) -> None:
    volume = changed.volume
    upper_mode = os.lstat(volume.upper)
    applied = [change for change in EXPECTED_DIFF if change.kind != "D"]
    reports: list[int] = []
    apply_to_base(volume.upper, volume.base, progress=reports.append)
    reset(volume.upper)
    assert os.listdir(volume.upper) == []
    after = os.lstat(volume.upper)
    assert (after.st_mode, after.st_uid, after.st_gid) == (
        upper_mode.st_mode,
        upper_mode.st_uid,
        upper_mode.st_gid,
    )
    assert reports == [len(applied)]
    assert below_root(snapshot(volume.base)) == below_root(changed.merged)
    assert overlay_xattrs(snapshot(volume.base)) == []
    # The hard link that the container's write broke stays broken in the base.
    assert hard_link_groups(volume.base) == changed.merged_links
    assert (volume.base / "split2").read_text() == "linked in the base, one name changed\n"
    volume.mount()
    assert below_root(snapshot(volume.mountpoint)) == below_root(changed.merged)


def test_reset_gives_back_the_base_view(changed: Changed) -> None:
    volume = changed.volume
    reset(volume.upper)
    assert diff(volume.upper, volume.base) == []
    assert changes_size(volume.upper) == 0
    volume.mount()
    assert below_root(snapshot(volume.mountpoint)) == below_root(snapshot(volume.base))


def test_changes_size_counts_regular_files_once_per_inode(volume: Volume) -> None:
    mnt = volume.mountpoint
    (mnt / "big").write_bytes(b"x" * 10_000)
    os.link(mnt / "big", mnt / "big2")
    with (mnt / "change.txt").open("a") as file:
        file.write("more\n")
    (mnt / "delete.txt").unlink()
    (mnt / "newdir").mkdir()
    (mnt / "newlink").symlink_to("big")
    volume.unmount()
    assert changes_size(volume.upper) == 10_000 + len("base change.txt\nmore\n")


def test_apply_to_base_never_writes_through_a_base_symlink(volume: Volume, workspace: Path) -> None:
    outside = workspace / "outside"
    outside.mkdir()
    volume.unmount()
    (volume.base / "escape").symlink_to(outside)
    volume.mount()
    (volume.mountpoint / "escape").unlink()
    (volume.mountpoint / "escape").mkdir()
    (volume.mountpoint / "escape" / "f").write_text("inside the volume\n")
    volume.unmount()
    assert [c for c in diff(volume.upper, volume.base) if "escape" in c.path] == [
        Change("C", "/escape"),
        Change("A", "/escape/f"),
    ]
    apply_to_base(volume.upper, volume.base)
    assert os.listdir(outside) == []
    assert not (volume.base / "escape").is_symlink()
    assert (volume.base / "escape" / "f").read_text() == "inside the volume\n"


def test_merge_into_with_a_backslash_in_the_base_path(workspace: Path) -> None:
    base = workspace / "odd\\base"
    upper = workspace / "upper"
    for folder in (base, upper):
        folder.mkdir()
    (base / "file").write_text("from the odd base\n")
    (upper / "added").write_text("added\n")
    merge_into(upper, [base], workspace / "merged")
    assert sorted(os.listdir(workspace / "merged")) == ["added", "file"]
