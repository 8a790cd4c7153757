"""The tests' container image: the host's static busybox and its applets, as a root
file system tar for `docker import` (or `podman import`); no registry, no pull."""

from __future__ import annotations

import os
import shutil
import struct
import tarfile

from .commands import sh


def is_static_elf(path):
    """True when path is an ELF executable without a program interpreter."""
    try:
        with open(path, "rb") as f:
            hdr = f.read(64)
            if len(hdr) < 52 or hdr[:4] != b"\x7fELF":
                return False
            end = "<" if hdr[5] == 1 else ">"
            if hdr[4] == 2:
                phoff = struct.unpack_from(end + "Q", hdr, 0x20)[0]
                phentsize, phnum = struct.unpack_from(end + "HH", hdr, 0x36)
            else:
                phoff = struct.unpack_from(end + "I", hdr, 0x1C)[0]
                phentsize, phnum = struct.unpack_from(end + "HH", hdr, 0x2A)
            f.seek(phoff)
            ph = f.read(phentsize * phnum)
    except OSError:
        return False
    pt_interp = 3
    return all(
        struct.unpack_from(end + "I", ph, i * phentsize)[0] != pt_interp for i in range(phnum)
    )


def find_static_busybox():
    cands = [shutil.which("busybox"), "/bin/busybox", "/usr/bin/busybox"]
    for c in cands:
        if c and os.path.exists(c) and is_static_elf(os.path.realpath(c)):
            return os.path.realpath(c)
    return None


def write_busybox_rootfs(bb, tar_path):
    """A root filesystem tar of the static busybox `bb` and its applets, for `import`."""
    applets = sh([bb, "--list"]).stdout.split()
    with tarfile.open(tar_path, "w") as tar:
        for d in ("bin", "tmp", "etc", "proc", "sys", "dev"):
            ti = tarfile.TarInfo(d)
            ti.type = tarfile.DIRTYPE
            ti.mode = 0o1777 if d == "tmp" else 0o755
            tar.addfile(ti)
        tar.add(bb, arcname="bin/busybox")
        for a in applets:
            if a == "busybox" or "/" in a:
                continue
            ti = tarfile.TarInfo("bin/" + a)
            ti.type = tarfile.SYMTYPE
            ti.linkname = "busybox"
            tar.addfile(ti)
