"""The command line: the daemon (`serve`, the default), commands to see and manage
a volume's changes, and `install-systemd`. The volume commands work on the state root
directly, with or without a running daemon, through the same driver, and take the
volume's lock to change it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable, Sequence
from contextlib import suppress
from pathlib import Path

from . import __version__, docker_api, systemd
from .config import ENVIRONMENT, LOG_LEVELS, Settings, SettingsError
from .driver import Driver, Progress, VolumeDetails
from .errors import PluginError
from .listener import Listener, StartupError
from .plugin_api import PluginAPI
from .server import PluginServer

log = logging.getLogger("docker_on_top")


def _add_location_options(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS: an option given before the subcommand is not overwritten by its default.
    parser.add_argument(
        "--name",
        default=argparse.SUPPRESS,
        help=f"driver name (default docker-on-top; env {ENVIRONMENT['name']})",
    )
    parser.add_argument(
        "--root",
        default=argparse.SUPPRESS,
        help=f"state root (default /var/lib/NAME; env {ENVIRONMENT['root']})",
    )


def _add_serve_options(parser: argparse.ArgumentParser) -> None:
    _add_location_options(parser)
    parser.add_argument(
        "--socket",
        default=argparse.SUPPRESS,
        help=f"socket path (default /run/docker/plugins/NAME.sock; env {ENVIRONMENT['socket']})",
    )
    parser.add_argument(
        "--log-level",
        dest="log_level",
        default=argparse.SUPPRESS,
        choices=LOG_LEVELS,
        help=f"debug, info, warning or error (default info; env {ENVIRONMENT['log_level']})",
    )
    parser.add_argument(
        "--host-root",
        dest="host_root",
        default=argparse.SUPPRESS,
        help=(
            "where the host's / is mounted when running as a managed plugin; bases are "
            f"looked up under it (default: none; env {ENVIRONMENT['host_root']})"
        ),
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="docker-on-top",
        description="Docker volume plugin: a copy-on-write overlay view of a host directory.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _add_serve_options(parser)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, summary: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=summary, description=summary)
        _add_location_options(sub)
        return sub

    serve = commands.add_parser("serve", help="run the plugin daemon in the foreground (default)")
    _add_serve_options(serve)
    ls = command("ls", "list the volumes with their base, use and size of changes")
    ls.add_argument("--json", action="store_true", help="print JSON")
    inspect = command("inspect", "print everything known about a volume, as JSON")
    inspect.add_argument("volume")
    diff = command(
        "diff", "list a volume's changes against its base (A added, C changed, D deleted)"
    )
    diff.add_argument("volume")
    diff.add_argument("--json", action="store_true", help="print JSON")
    export = command("export", "write a volume's changes as an OCI image-layer tar")
    export.add_argument("volume")
    export.add_argument("-o", "--output", default="-", help="file to write, or - for stdout")
    reset = command("reset", "throw all of a volume's changes away")
    reset.add_argument("volume")
    commit = command("commit", "write a volume's merged content somewhere, or onto its base")
    commit.add_argument("volume")
    target = commit.add_mutually_exclusive_group(required=True)
    target.add_argument("--into", metavar="DIR", type=Path, help="a new folder to create")
    target.add_argument(
        "--into-base", action="store_true", help="apply the changes onto the base itself"
    )
    commit.add_argument("--yes", action="store_true", help="do not ask before changing the base")
    doctor = command(
        "doctor", "find volumes whose records disagree with the mount table or with dockerd"
    )
    doctor.add_argument("volume", nargs="?", help="only this volume")
    doctor.add_argument("--fix", action="store_true", help="release what no live container can own")
    install = commands.add_parser(
        "install-systemd",
        help="install and enable the systemd units (socket activation)",
        description=(
            "Write docker-on-top.socket and docker-on-top.service into /etc/systemd/system, "
            "with ExecStart running this installation, then `systemctl daemon-reload` and "
            "`systemctl enable --now docker-on-top.socket` when systemd runs."
        ),
    )
    install.add_argument(
        "--prefix",
        type=Path,
        help="write under PREFIX/etc/systemd/system instead and run no systemctl (packaging)",
    )
    install.add_argument(
        "--dry-run",
        action="store_true",
        help="print the units and what would be done; change nothing",
    )
    return parser


_JOURNAL_PRIORITIES = {"DEBUG": 7, "INFO": 6, "WARNING": 4, "ERROR": 3, "CRITICAL": 2}


class _JournalFormatter(logging.Formatter):
    """journald adds its own timestamps and reads the level from a `<N>` prefix."""

    def format(self, record: logging.LogRecord) -> str:
        priority = _JOURNAL_PRIORITIES.get(record.levelname, 6)
        return "\n".join(f"<{priority}>{line}" for line in super().format(record).splitlines())


def _stderr_is_journal() -> bool:
    # systemd sets JOURNAL_STREAM to the device:inode of the stream it connects to.
    expected = os.environ.get("JOURNAL_STREAM", "")
    try:
        found = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return expected == f"{found.st_dev}:{found.st_ino}"


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if _stderr_is_journal():
        handler.setFormatter(_JournalFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler])


_SD_LISTEN_FDS_START = 3


def _inherited_socket() -> socket.socket | None:
    """The listening socket systemd passed (LISTEN_FDS/LISTEN_PID), if any."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return None
    count = int(os.environ.get("LISTEN_FDS", "0") or 0)
    for variable in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(variable, None)  # not for our children
    if count < 1:
        return None
    if count > 1:
        log.warning("systemd passed %d sockets; serving on the first only", count)
    return socket.socket(fileno=_SD_LISTEN_FDS_START)


def serve(settings: Settings) -> int:
    setup_logging(settings.log_level)
    driver = Driver(settings.root, settings.host_root)
    try:
        # Bind first: a second instance must be refused before its recovery touches
        # the state of the first. Requests wait in the listen queue meanwhile.
        inherited = _inherited_socket()
        if inherited is None:
            listener = Listener.bind(settings.socket)
        else:
            listener = Listener.adopt(inherited)
            log.info("serving on the socket passed by systemd")
    except (StartupError, OSError) as error:
        log.error("cannot start: %s", error)
        return 1
    try:
        driver.recover()
    except (PluginError, OSError) as error:
        log.error("cannot start: %s", error)
        listener.close()
        return 1
    server = PluginServer(PluginAPI(driver), listener)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: server.request_stop())
    # In the background: dockerd may itself be waiting for this plugin to answer.
    threading.Thread(target=_start_up_checks, args=(driver, settings), daemon=True).start()
    log.info(
        "serving driver %s on %s (state root %s)", settings.name, settings.socket, settings.root
    )
    server.serve()
    log.info("stopped; volumes in use stay mounted")
    return 0


def _start_up_checks(driver: Driver, settings: Settings) -> None:
    _report_stuck_volumes(driver, settings.name)
    # Only a socket where dockerd discovers legacy plugins can be registered; a managed
    # plugin (host root set) is registered by dockerd itself when it is enabled.
    if settings.host_root is None and settings.socket.parent == docker_api.PLUGIN_DIR:
        docker_api.register_driver(settings.name)


def _report_stuck_volumes(driver: Driver, driver_name: str) -> None:
    try:
        findings = driver.doctor(None, docker_api.volume_users(driver_name), fix=False)
    except PluginError as error:
        log.warning("start-up check of the volumes failed: %s", error)
        return
    for finding in findings:
        log.warning(
            "volume %s: %s (see `docker-on-top doctor --fix`)", finding.volume, finding.problem
        )


# --- volume commands ------------------------------------------------------------------


def _human_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1000
    raise AssertionError("unreachable")


def _print_table(volumes: Sequence[VolumeDetails]) -> None:
    rows = [("NAME", "BASE", "VOLATILE", "IN USE", "CHANGES")]
    rows += [
        (
            v.name,
            v.base,
            "yes" if v.volatile else "no",
            str(sum(v.mounts.values())),
            _human_size(v.changes_bytes),
        )
        for v in volumes
    ]
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]) - 1)]
    for row in rows:
        print("   ".join(cell.ljust(width) for cell, width in zip(row, widths)), row[-1])


def _terminal_progress(verb: str) -> Progress | None:
    if not sys.stderr.isatty():
        return None

    def show(entries: int) -> None:
        print(f"\r{verb} {entries} entries", end="", file=sys.stderr, flush=True)

    return show


def _export(driver: Driver, volume: str, output: str) -> None:
    if output == "-":
        if sys.stdout.isatty():
            raise SystemExit("docker-on-top: refusing to write a tar to a terminal; use -o FILE")
        driver.export(volume, sys.stdout.buffer)
        return
    # Written aside and renamed at the end: a failure leaves no half-written file.
    target = Path(output)
    partial = target.with_name(f".{target.name}.partial")
    try:
        with open(partial, "wb") as out:
            driver.export(volume, out)
        partial.rename(target)
    finally:
        with suppress(FileNotFoundError):
            partial.unlink()


def _confirm(question: str) -> bool:
    if not sys.stdin.isatty():
        return False
    answer = input(f"{question} [y/N] ")
    return answer.strip().lower() in ("y", "yes")


def _commit(driver: Driver, arguments: argparse.Namespace) -> int:
    if arguments.into is not None:
        driver.commit_into(
            arguments.volume, arguments.into.absolute(), _terminal_progress("copied")
        )
        return 0
    base = driver.details(arguments.volume).base
    if not arguments.yes and not _confirm(
        f"Apply the changes of volume {arguments.volume} onto {base}? This changes the base."
    ):
        print("docker-on-top: not confirmed; nothing changed (use --yes)", file=sys.stderr)
        return 1
    driver.commit_into_base(arguments.volume, _terminal_progress("applied"))
    return 0


def run_command(settings: Settings, arguments: argparse.Namespace) -> int:
    setup_logging("warning")
    driver = Driver(settings.root, settings.host_root)
    if not settings.root.is_dir():
        print(f"docker-on-top: no state root at {settings.root}", file=sys.stderr)
        return 1
    commands: dict[str, Callable[[], int | None]] = {
        "ls": lambda: _ls(driver, arguments.json),
        "inspect": lambda: print(json.dumps(driver.details(arguments.volume).to_json(), indent=2)),
        "diff": lambda: _diff(driver, arguments.volume, arguments.json),
        "export": lambda: _export(driver, arguments.volume, arguments.output),
        "reset": lambda: driver.reset(arguments.volume),
        "commit": lambda: _commit(driver, arguments),
        "doctor": lambda: _doctor(driver, settings.name, arguments),
    }
    try:
        return commands[arguments.command]() or 0
    except PluginError as error:
        subject = getattr(arguments, "volume", None)
        print(f"docker-on-top: {subject + ': ' if subject else ''}{error}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader (e.g. `| head`) went away; say nothing more.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _doctor(driver: Driver, driver_name: str, arguments: argparse.Namespace) -> int:
    users = docker_api.volume_users(driver_name)
    if users is None:
        print(
            "docker-on-top: dockerd does not answer; checking against the mount table only",
            file=sys.stderr,
        )
    findings = driver.doctor(arguments.volume, users, fix=arguments.fix)
    for finding in findings:
        print(f"{finding.volume}: {finding.problem}{' [fixed]' if finding.fixed else ''}")
    if not findings:
        print("no problem found")
    return 1 if any(not finding.fixed for finding in findings) else 0


def _ls(driver: Driver, as_json: bool) -> None:
    volumes = driver.all_details()
    if as_json:
        print(json.dumps([v.to_json() for v in volumes], indent=2))
    else:
        _print_table(volumes)


def _diff(driver: Driver, volume: str, as_json: bool) -> None:
    found = driver.diff(volume)
    if as_json:
        print(json.dumps([{"Kind": c.kind, "Path": c.path} for c in found], indent=2))
    else:
        for change in found:
            print(change.kind, change.path)


def main(argv: Sequence[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    try:
        settings = Settings.resolve(vars(arguments), os.environ)
    except SettingsError as error:
        print(f"docker-on-top: {error}", file=sys.stderr)
        return 2
    if arguments.command in (None, "serve"):
        return serve(settings)
    if arguments.command == "install-systemd":
        return systemd.install(settings, arguments.prefix, arguments.dry_run)
    return run_command(settings, arguments)
