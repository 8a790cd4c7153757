"""Installing the daemon as a systemd service with socket activation.

The units live in the package (`units/`, also shipped as packaging/systemd/); the
installed service gets its ExecStart pointed at this installation (the .deb's builder
points it at /usr/bin/docker-on-top with `units_running`).
"""

from __future__ import annotations

import os
import re
import site
import subprocess
import sys
import sysconfig
from importlib import resources
from pathlib import Path

from .config import DEFAULT_NAME, Settings

UNIT_NAMES = ("docker-on-top.socket", "docker-on-top.service")


def shipped_units() -> dict[str, str]:
    folder = resources.files(__package__) / "units"
    return {name: (folder / name).read_text() for name in UNIT_NAMES}


SYSTEMD_UNIT_DIR = Path("/etc/systemd/system")
# Exists only while systemd is the init system (sd_booted(3)).
SYSTEMD_RUNNING = Path("/run/systemd/system")
_SOCKET_UNIT = "docker-on-top.socket"


def _systemd_word(word: str, *, command_line: bool = True) -> str:
    """One word of a unit setting: specifiers (and, in a command line, variables)
    escaped, quoted when needed."""
    word = word.replace("%", "%%")
    if command_line:
        word = word.replace("$", "$$")
    if word and not re.search(r"[\s\"'\\;]", word):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _service_command() -> tuple[list[str], str | None]:
    """The command that runs this installation, and the PYTHONPATH it needs, if any."""
    script = Path(sys.argv[0])
    if script.name == "docker-on-top" and script.is_file():
        return [os.path.abspath(script)], None  # the entry point pip installed
    # `python -m docker_on_top`: this interpreter, and this package found without our cwd.
    package_parent = Path(__file__).resolve().parent.parent
    site_dirs = {Path(p).resolve() for p in site.getsitepackages()}
    site_dirs |= {Path(sysconfig.get_paths()[key]).resolve() for key in ("purelib", "platlib")}
    return [sys.executable, "-m", "docker_on_top"], (
        None if package_parent in site_dirs else str(package_parent)
    )


def units_to_install() -> dict[str, str]:
    """The units to install, the service's ExecStart running this installation."""
    return units_running(*_service_command())


def units_running(command: list[str], python_path: str | None = None) -> dict[str, str]:
    """The shipped units, the service's ExecStart running `command serve` (with
    PYTHONPATH=`python_path`, when given)."""
    service_lines = [f"ExecStart={' '.join(map(_systemd_word, [*command, 'serve']))}"]
    if python_path is not None:
        assignment = _systemd_word(f"PYTHONPATH={python_path}", command_line=False)
        service_lines.append(f"Environment={assignment}")
    units = shipped_units()
    units["docker-on-top.service"] = re.sub(
        r"^ExecStart=.*$",
        lambda _: "\n".join(service_lines),
        units["docker-on-top.service"],
        count=1,
        flags=re.MULTILINE,
    )
    return units


def _systemctl(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["systemctl", *arguments], capture_output=True, text=True, check=False)


def install(settings: Settings, prefix: Path | None, dry_run: bool) -> int:
    default = Settings.resolve({}, {})
    if (settings.name, settings.root, settings.socket) != (
        default.name,
        default.root,
        default.socket,
    ):
        print(
            "docker-on-top: install-systemd installs the default instance "
            f"(driver {DEFAULT_NAME}); for another, copy the units and add --name to ExecStart",
            file=sys.stderr,
        )
        return 2
    unit_dir = SYSTEMD_UNIT_DIR if prefix is None else prefix / SYSTEMD_UNIT_DIR.relative_to("/")
    units = units_to_install()
    for name, text in units.items():
        path = unit_dir / name
        if dry_run:
            print(f"would write {path}:\n{text}")
            continue
        try:
            unit_dir.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            path.chmod(0o644)
        except OSError as error:
            print(f"docker-on-top: cannot write {path}: {error}", file=sys.stderr)
            return 1
        print(f"wrote {path}")
    steps = [("daemon-reload",), ("enable", "--now", _SOCKET_UNIT)]
    by_hand = " && ".join(f"systemctl {' '.join(step)}" for step in steps)
    if prefix is not None:
        print(f"not enabled (--prefix); on the target system: {by_hand}")
        return 0
    if not SYSTEMD_RUNNING.is_dir():
        print(
            f"systemd is not running here (no {SYSTEMD_RUNNING}), so nothing was enabled; "
            f"where it runs: {by_hand}"
        )
        return 0
    for step in steps:
        if dry_run:
            print(f"would run systemctl {' '.join(step)}")
            continue
        result = _systemctl(*step)
        if result.returncode != 0:
            problem = result.stderr.strip() or f"exit code {result.returncode}"
            print(f"docker-on-top: systemctl {' '.join(step)} failed: {problem}", file=sys.stderr)
            return 1
        print(f"ran systemctl {' '.join(step)}")
    if not dry_run:
        print(f"{_SOCKET_UNIT} is listening; the daemon starts on the first request")
    return 0
