"""Snapshots of whole folder trees, a volume changed as a container changes it, and an
OCI layer applier, for comparing views."""

from __future__ import annotations

import io
import os
import shutil
import stat
import tarfile
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple, Protocol


class Node(NamedTuple):
    """What a tree holds at one path."""

    kind: int
    mode: int
    uid: int
    gid: int
    # Content, symlink target or device number.
    detail: object
    xattrs: dict[str, bytes]
    mtime_ns: int | None


def snapshot(root: Path, *, times: bool = True) -> dict[str, Node]:
    """Every entry of `root` ("" for the root itself), symlinks never followed."""
    found: dict[str, Node] = {}
    pending = [""]
    while pending:
        relative = pending.pop()
        path = root / relative
        st = os.lstat(path)
        detail: object = None
        if stat.S_ISREG(st.st_mode):
            detail = path.read_bytes()
        elif stat.S_ISLNK(st.st_mode):
            detail = os.readlink(path)
        elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            detail = st.st_rdev
        elif stat.S_ISDIR(st.st_mode):
            pending.extend(f"{relative}/{name}".lstrip("/") for name in os.listdir(path))
        xattrs = {
            name: os.getxattr(path, name, follow_symlinks=False)
            for name in os.listxattr(path, follow_symlinks=False)
        }
        found[relative] = Node(
            stat.S_IFMT(st.st_mode),
            stat.S_IMODE(st.st_mode),
            st.st_uid,
            st.st_gid,
            detail,
            xattrs,
            st.st_mtime_ns if times else None,
        )
    return found


def below_root(tree: dict[str, Node]) -> dict[str, Node]:
    return {relative: node for relative, node in tree.items() if relative}


def without_times(tree: dict[str, Node]) -> dict[str, Node]:
    return {relative: node._replace(mtime_ns=None) for relative, node in tree.items()}


def apply_oci_layer(layer: bytes, root: Path) -> None:
    """Apply an image layer the way the OCI image spec says, for checking export_layer.

    Whiteouts apply to what is below the layer only, wherever they are in the tar, so they
    are all applied first; every other entry replaces what is at its path, except that a
    directory merges into a directory.
    """
    with tarfile.open(fileobj=io.BytesIO(layer)) as tar:
        members = tar.getmembers()
        for member in members:
            parent, _, name = member.name.rpartition("/")
            if name == ".wh..wh..opq":
                if (root / parent).is_dir():
                    for child in (root / parent).iterdir():
                        remove(child)
            elif name.startswith(".wh."):
                remove(root / parent / name.removeprefix(".wh."))
        for member in members:
            if member.name.rpartition("/")[2].startswith(".wh."):
                continue
            target = root / member.name
            if not (member.isdir() and target.is_dir() and not target.is_symlink()):
                remove(target)
            # Interpreters without extraction filters (Debian 11's 3.9.2, Debian 12's
            # 3.11.2) extract everything as it is, which is what fully_trusted asks.
            trust = {"filter": "fully_trusted"} if hasattr(tarfile, "fully_trusted_filter") else {}
            tar.extract(member, root, numeric_owner=True, **trust)
            for key, value in member.pax_headers.items():
                if key.startswith("SCHILY.xattr."):
                    os.setxattr(
                        target,
                        key.removeprefix("SCHILY.xattr."),
                        value.encode("utf-8", "surrogateescape"),
                        follow_symlinks=False,
                    )


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.is_symlink() or path.exists():
        path.unlink()


class Mounter(Protocol):
    """What mounts volumes: the driver, or a client of the daemon."""

    def mount(self, name: str, mount_id: str) -> str: ...

    def unmount(self, name: str, mount_id: str) -> None: ...


def change_volume(
    volumes: Mounter, name: str, mount_id: str, files: Mapping[str, str | None]
) -> None:
    """Change a volume as a container does, through a mount of it: write text files
    (their folders made as needed), delete those given None."""
    mountpoint = Path(volumes.mount(name, mount_id))
    try:
        for relative, text in files.items():
            path = mountpoint / relative
            if text is None:
                path.unlink()
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
    finally:
        volumes.unmount(name, mount_id)
