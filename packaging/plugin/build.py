#!/usr/bin/env python3
"""Builds docker-on-top as a managed Docker plugin: a folder with `config.json` and
`rootfs/`, then, with --install, `docker plugin create` and `docker plugin enable`.

The root filesystem is Debian's own Python and nothing else: the packages below,
fetched with `apt-get download` from the host's Debian sources and unpacked with
`dpkg-deb -x` (no maintainer scripts run, no other package comes along), then trimmed
of what the daemon can never use: 27 MB, built in about 7 s, where `debootstrap
--variant=minbase --include=python3` makes 173 MB (without apt's caches) in 40-60 s.
The result is kept in a cache folder keyed by the exact package files and this script,
so a rebuild only copies it. Needs root and a Debian 12 host (its apt sources name the
packages). docs/managed-plugin.md tells more.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPOSITORY = HERE.parents[1]
PYTHON = "python3.11"  # Debian 12's Python
# The interpreter, its standard library, the libraries those link to, and a shell for
# the entry point.
PACKAGES = (
    f"{PYTHON}-minimal",
    f"lib{PYTHON}-minimal",
    f"lib{PYTHON}-stdlib",
    "libc6",
    "libgcc-s1",
    "zlib1g",
    "libexpat1",
    "libffi8",  # ctypes: the daemon's mount and flock calls
    "dash",
)
# Never used by the daemon: documentation, iconv's converters, the test suite, pydoc's
# topics. Extension modules that cannot load here (their libraries are not in the
# rootfs) or that exist only to test CPython go too.
PRUNED = (
    "usr/share",
    "usr/lib/x86_64-linux-gnu/gconv",
    f"usr/lib/{PYTHON}/test",
    f"usr/lib/{PYTHON}/pydoc_data",
)
DEFAULT_CACHE = Path("/var/cache/docker-on-top/plugin-rootfs")
SITE_PACKAGES = Path("usr/lib/python3/dist-packages")
ENTRYPOINT = Path("usr/local/bin/docker-on-top-plugin")
# Run in the new rootfs: which extension modules cannot be imported there.
_UNLOADABLE = f"""
import importlib, pathlib
for path in sorted(pathlib.Path("/usr/lib/{PYTHON}/lib-dynload").glob("*.so")):
    name = path.name.split(".")[0]
    if name.startswith(("_test", "_xx", "xx", "_ctypes_test")):
        print(path.name)
        continue
    try:
        importlib.import_module(name)
    except ImportError:
        print(path.name)
"""


def run(*command: str | Path, cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        [str(part) for part in command],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(
            f"build.py: `{' '.join(map(str, command))}` failed ({done.returncode}):\n"
            f"{done.stdout}{done.stderr}"
        )
    return done.stdout


def package_files() -> str:
    """What `apt-get download` would fetch: URI, file name, size and hash of each package."""
    command = ("apt-get", "download", "--print-uris", *PACKAGES)
    found = subprocess.run(command, capture_output=True, text=True, check=False)
    if found.returncode != 0:  # a fresh machine has no package lists yet
        run("apt-get", "update", "-q")
        found = subprocess.run(command, capture_output=True, text=True, check=True)
    return found.stdout


def base_rootfs(cache: Path) -> Path:
    """The trimmed Debian rootfs, from the cache or built into it."""
    key = hashlib.sha256(package_files().encode() + Path(__file__).read_bytes()).hexdigest()
    cached = cache / key[:16] / "rootfs"
    if cached.is_dir():
        print(f"rootfs: cached in {cached}")
        return cached
    cache.mkdir(parents=True, exist_ok=True)
    # Built aside and renamed at the end: an interrupted build leaves no half rootfs.
    work = Path(tempfile.mkdtemp(prefix="building-", dir=cache))
    try:
        debs = work / "debs"
        debs.mkdir()
        os.chmod(work, 0o755)  # apt downloads as the _apt user where it can
        os.chmod(debs, 0o777)
        run("apt-get", "download", "-q", *PACKAGES, cwd=debs)
        rootfs = work / "rootfs"
        for deb in sorted(debs.glob("*.deb")):
            run("dpkg-deb", "-x", deb, rootfs)
        for pruned in PRUNED:
            shutil.rmtree(rootfs / pruned, ignore_errors=True)
        for name in run("chroot", rootfs, f"/usr/bin/{PYTHON}", "-c", _UNLOADABLE).split():
            (rootfs / f"usr/lib/{PYTHON}/lib-dynload" / name).unlink()
        (rootfs / "usr/bin/python3").symlink_to(PYTHON)
        try:
            cached.parent.mkdir()
        except FileExistsError:  # a build of the same packages, run meanwhile, finished first
            return cached
        rootfs.rename(cached)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    # Only the newest rootfs is kept: the cache stays as small as one.
    for entry in cache.iterdir():
        if entry != cached.parent and not entry.name.startswith("building-"):
            shutil.rmtree(entry, ignore_errors=True)
    print(f"rootfs: built into {cached}")
    return cached


def assemble(out: Path, cache: Path) -> None:
    """Write the plugin folder: config.json, and the rootfs with the package and entry point."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    rootfs = out / "rootfs"
    shutil.copytree(base_rootfs(cache), rootfs, symlinks=True)
    shutil.copytree(
        REPOSITORY / "docker_on_top",
        rootfs / SITE_PACKAGES / "docker_on_top",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    (rootfs / ENTRYPOINT).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(HERE / "entrypoint", rootfs / ENTRYPOINT)
    shutil.copy2(HERE / "config.json", out / "config.json")
    # Also compiles the modules the daemon imports, so that each start need not: in the
    # environment dockerd gives a plugin, not one that may forbid writing bytecode.
    version = run(
        "chroot",
        rootfs,
        "/usr/bin/python3",
        "-m",
        "docker_on_top",
        "--version",
        env={"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"},
    )
    size = run("du", "-sh", rootfs).split()[0]
    print(f"plugin: {out} ({version.strip()}, rootfs {size})")


def install(name: str, out: Path, replace: bool) -> None:
    exists = (
        subprocess.run(
            ["docker", "plugin", "inspect", name], capture_output=True, check=False
        ).returncode
        == 0
    )
    if exists and not replace:
        raise SystemExit(
            f"build.py: plugin {name} exists already. Removing it deletes its state root with "
            "every volume's changes; to do that, give --replace"
        )
    if exists:
        run("docker", "plugin", "rm", "--force", name)
    run("docker", "plugin", "create", name, out)
    run("docker", "plugin", "enable", name)
    print(f"plugin {name} created and enabled: docker volume create --driver {name} ...")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=REPOSITORY / "build" / "plugin", help="the plugin folder"
    )
    parser.add_argument(
        "--cache", type=Path, default=DEFAULT_CACHE, help=f"rootfs cache (default {DEFAULT_CACHE})"
    )
    parser.add_argument(
        "--install", metavar="NAME", help="then `docker plugin create NAME` and enable it"
    )
    parser.add_argument(
        "--replace", action="store_true", help="with --install: remove a plugin NAME first"
    )
    arguments = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("build.py: run as root (dpkg-deb, chroot and dockerd need it)")
    assemble(arguments.out.resolve(), arguments.cache)
    if arguments.install:
        install(arguments.install, arguments.out.resolve(), arguments.replace)
    return 0


if __name__ == "__main__":
    sys.exit(main())
