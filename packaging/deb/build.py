#!/usr/bin/env python3
"""Builds dist/docker-on-top_VERSION_all.deb with dpkg-deb alone (no debhelper).

The package holds the daemon's Python package where the distribution's python3 finds it
(/usr/lib/python3/dist-packages/docker_on_top), the command /usr/bin/docker-on-top (a
launcher for that python3), the systemd units in /lib/systemd/system (socket
activation, the service running /usr/bin/docker-on-top serve, as install-systemd writes
them), and the maintainer scripts of this folder (see postinst, prerm, postrm).
It depends on python3 (>= 3.9) only: the daemon needs nothing but the standard library.
Runs on any host with python3 and dpkg-deb; needs no root.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPOSITORY = HERE.parents[1]
sys.path.insert(0, str(REPOSITORY))

from docker_on_top import __version__  # noqa: E402
from docker_on_top.systemd import units_running  # noqa: E402

PACKAGE = "docker-on-top"
COMMAND = Path("usr/bin/docker-on-top")
SITE_PACKAGES = Path("usr/lib/python3/dist-packages")
UNIT_DIR = Path("lib/systemd/system")
MAINTAINER_SCRIPTS = ("postinst", "prerm", "postrm")
# A plain entry point, as Debian's own Python packages have: no pip, no venv.
LAUNCHER = """\
#!/usr/bin/python3
# docker-on-top from the Debian package: the distribution's python3 finds the package
# in /usr/lib/python3/dist-packages.
import sys

from docker_on_top.cli import main

sys.exit(main())
"""
CONTROL = """\
Package: {package}
Version: {version}
Architecture: all
Maintainer: docker-on-top developers <docker-on-top@users.noreply.github.com>
Depends: python3 (>= 3.9), e2fsprogs
Section: admin
Priority: optional
Installed-Size: {installed_kib}
Description: Docker volume plugin: a copy-on-write view of a host directory
 Containers read the host files, change, add and delete anything, share those
 changes with each other, and the host directory itself never changes. Each
 volume is an overlayfs mount over the host directory; the changes live under
 /var/lib/docker-on-top. The daemon is socket-activated by systemd
 (docker-on-top.socket) and uses Python's standard library only.
"""


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)


def stage(staging: Path) -> None:
    """The package's tree, DEBIAN/ included, under `staging`."""
    source = REPOSITORY / "docker_on_top"
    target = staging / SITE_PACKAGES / "docker_on_top"
    for file in sorted(source.rglob("*")):
        relative = file.relative_to(source)
        if file.is_file() and "__pycache__" not in relative.parts:
            _write(target / relative, file.read_text())
    _write(staging / COMMAND, LAUNCHER, 0o755)
    for name, text in units_running([f"/{COMMAND}"]).items():
        _write(staging / UNIT_DIR / name, text)
    files = sorted(p for p in staging.rglob("*") if p.is_file())
    md5sums = "".join(
        f"{hashlib.md5(p.read_bytes()).hexdigest()}  {p.relative_to(staging)}\n" for p in files
    )
    installed_kib = sum((p.stat().st_size + 1023) // 1024 for p in files)
    control = staging / "DEBIAN"
    _write(control / "md5sums", md5sums)
    _write(
        control / "control",
        CONTROL.format(package=PACKAGE, version=__version__, installed_kib=installed_kib),
    )
    for script in MAINTAINER_SCRIPTS:
        _write(control / script, (HERE / script).read_text(), 0o755)
    for folder in [staging, *(p for p in staging.rglob("*") if p.is_dir())]:
        folder.chmod(0o755)


def build(out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    deb = out / f"{PACKAGE}_{__version__}_all.deb"
    with tempfile.TemporaryDirectory() as scratch:
        staging = Path(scratch) / "root"
        stage(staging)
        # Built aside and renamed: a failure leaves no half-written package.
        partial = out / f".{deb.name}.partial"
        subprocess.run(
            ["dpkg-deb", "--root-owner-group", "-Zxz", "--build", str(staging), str(partial)],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        partial.rename(deb)
    return deb


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPOSITORY / "dist", help="default: dist/")
    arguments = parser.parse_args()
    if shutil.which("dpkg-deb") is None:
        print("build.py: needs dpkg-deb (Debian's dpkg)", file=sys.stderr)
        return 1
    print(build(arguments.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
