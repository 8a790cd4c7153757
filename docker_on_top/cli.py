"""The command line: its arguments, and each command's run: `serve` (the default; the
daemon itself is daemon.py), the commands that see and manage volumes' changes,
snapshots and size limits, and `install-systemd`. The volume commands work on the state
root directly, with or without a running daemon, through the same modules as the daemon,
and take the volume's lock to change it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from contextlib import suppress
from pathlib import Path

from . import __version__, docker_api, systemd
from .commands import Progress, VolumeCommands, VolumeDetails
from .config import ENVIRONMENT, LOG_LEVELS, Settings, SettingsError
from .daemon import serve, setup_logging
from .doctor import doctor
from .errors import PluginError, UserError
from .output import human_size, json_path, print_columns, quote, write
from .recovery import recover_for_command
from .snapshots import VolumeSnapshots
from .store import VolumeStore, parse_reference

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
    diff.add_argument(
        "--since", metavar="NAME", help="since this snapshot of the volume (default: its last)"
    )
    export = command(
        "export",
        "write a volume's changes since its last snapshot, or the layer VOLUME@NAME froze, "
        "as an OCI image-layer tar",
    )
    export.add_argument("volume", metavar="VOLUME[@NAME]")
    export.add_argument("-o", "--output", default="-", help="file to write, or - for stdout")
    export.add_argument(
        "--since",
        metavar="NAME",
        help="the changes since this older snapshot of the volume, as one layer",
    )
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
    snapshot = command(
        "snapshot",
        "freeze a volume's changes as a read-only layer (VOLUME@NAME; NAME defaults to the "
        "time) and print its name",
    )
    snapshot.add_argument("target", metavar="VOLUME[@NAME]")
    snapshots = command("snapshots", "list snapshots: name, volume, time, size, users")
    snapshots.add_argument("volume", nargs="?", help="only this volume's")
    snapshots.add_argument("--json", action="store_true", help="print JSON")
    rollback = command(
        "rollback", "throw away what a volume changed since a snapshot, later snapshots too"
    )
    rollback.add_argument("target", metavar="VOLUME@NAME")
    destroy = command("destroy", "remove a snapshot's name (its layer goes when unused)")
    destroy.add_argument("target", metavar="VOLUME@NAME")
    resize = command("resize", "change the size limit of a volume's changes (grow or shrink)")
    resize.add_argument("volume")
    resize.add_argument("size", help="bytes, with k, M, G or T (powers of 1024), e.g. 20G")
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


def _warn(volume: str, path: str, reason: str) -> None:
    print(f"docker-on-top: {volume}: {quote(path)}: {reason}", file=sys.stderr)


def _print_table(volumes: Sequence[VolumeDetails]) -> None:
    rows = [("NAME", "BASE", "VOLATILE", "IN USE", "CHANGES")]
    rows += [
        (
            v.name,
            quote(v.base),
            "yes" if v.volatile else "no",
            str(sum(v.mounts.values())),
            f"error: {v.error}"
            if v.error or v.changes_bytes is None
            else human_size(v.changes_bytes),
        )
        for v in volumes
    ]
    print_columns(rows)


def _terminal_progress(verb: str) -> Progress | None:
    if not sys.stderr.isatty():
        return None

    def show(entries: int) -> None:
        print(f"\r{verb} {entries} entries", end="", file=sys.stderr, flush=True)

    return show


def _export(commands: VolumeCommands, volume: str, output: str, since: str | None) -> None:
    def report(path: str, reason: str) -> None:
        _warn(volume, path, reason)

    if output == "-":
        if sys.stdout.isatty():
            raise SystemExit("docker-on-top: refusing to write a tar to a terminal; use -o FILE")
        commands.export(volume, sys.stdout.buffer, report, since=since)
        return
    # Written aside and renamed at the end: a failure, or a stop by a signal (see
    # run_command), leaves no half-written file.
    target = Path(output)
    partial = target.with_name(f".{target.name}.partial")
    try:
        with open(partial, "wb") as out:
            commands.export(volume, out, report, since=since)
        partial.rename(target)
    finally:
        with suppress(FileNotFoundError):
            partial.unlink()


def _confirm(question: str) -> bool:
    if not sys.stdin.isatty():
        return False
    answer = input(f"{question} [y/N] ")
    return answer.strip().lower() in ("y", "yes")


def _commit(commands: VolumeCommands, arguments: argparse.Namespace) -> int:
    if arguments.into is not None:
        commands.commit_into(
            arguments.volume, arguments.into.absolute(), _terminal_progress("copied")
        )
        return 0
    base = commands.details(arguments.volume).base
    if not arguments.yes and not _confirm(
        f"Apply the changes of volume {arguments.volume} onto {quote(base)}? This changes the base."
    ):
        print("docker-on-top: not confirmed; nothing changed (use --yes)", file=sys.stderr)
        return 1
    commands.commit_into_base(arguments.volume, _terminal_progress("applied"))
    return 0


# A command waits longer than a request for a volume's lock: nobody gives up on it, and
# what holds the lock is most often a request of a few milliseconds.
COMMAND_LOCK_TIMEOUT_S = 30.0


class _Stopped(BaseException):
    """A signal asked a volume command to stop: it unwinds, cleaning up on the way (a
    BaseException, as KeyboardInterrupt is, so that no handler of errors takes it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _stop(signum: int, _frame: object) -> None:
    raise _Stopped(signum)


_STOPPING_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
# As a shell reports a command killed by SIGPIPE.
_BROKEN_PIPE_STATUS = 128 + signal.SIGPIPE


def run_command(settings: Settings, arguments: argparse.Namespace) -> int:
    setup_logging("warning")
    store = VolumeStore(settings.root, settings.host_root, lock_timeout=COMMAND_LOCK_TIMEOUT_S)
    commands = VolumeCommands(store)
    if not settings.root.is_dir():
        print(f"docker-on-top: no state root at {settings.root}", file=sys.stderr)
        return 1
    recover_for_command(store)  # while a daemon still recovers the root
    runs: dict[str, Callable[[], int | None]] = {
        "ls": lambda: _ls(commands, arguments.json),
        "inspect": lambda: _inspect(commands, arguments.volume),
        "diff": lambda: _diff(commands, arguments.volume, arguments.json, arguments.since),
        "export": lambda: _export(commands, arguments.volume, arguments.output, arguments.since),
        "reset": lambda: commands.reset(arguments.volume),
        "commit": lambda: _commit(commands, arguments),
        "doctor": lambda: _doctor(commands, settings.name, arguments),
        "snapshot": lambda: write(_snapshot(store, arguments.target) + "\n"),
        "snapshots": lambda: _snapshots(store, arguments.volume, arguments.json),
        "rollback": lambda: VolumeSnapshots(store).rollback(*_named(arguments.target)),
        "destroy": lambda: VolumeSnapshots(store).destroy(*_named(arguments.target)),
        "resize": lambda: commands.resize(arguments.volume, arguments.size),
    }
    # Handlers can only be set from the main thread (not so when a test calls main).
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = {
        signum: signal.signal(signum, _stop) for signum in _STOPPING_SIGNALS if in_main_thread
    }
    try:
        status = runs[arguments.command]() or 0
        sys.stdout.flush()
        return status
    except PluginError as error:
        subject = getattr(arguments, "volume", None) or getattr(arguments, "target", None)
        print(f"docker-on-top: {subject + ': ' if subject else ''}{error}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader (e.g. `| head`) went away: end quietly, as other tools do. What is
        # still buffered would fail again at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return _BROKEN_PIPE_STATUS
    except _Stopped as stopped:
        return 128 + stopped.signum
    except KeyboardInterrupt:
        return 128 + signal.SIGINT
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _doctor(commands: VolumeCommands, driver_name: str, arguments: argparse.Namespace) -> int:
    # dockerd names a managed plugin's driver NAME:TAG in its containers' mounts.
    managed = docker_api.managed_plugin_of(commands.store.root)
    if managed is not None:
        print(f"docker-on-top: state root of managed plugin {managed}", file=sys.stderr)
        driver_name = managed
    users = docker_api.volume_users(driver_name)
    if users is None:
        print(
            "docker-on-top: dockerd does not answer; checking against the mount table only",
            file=sys.stderr,
        )
    findings = doctor(commands.store, commands.releases, arguments.volume, users, fix=arguments.fix)
    for finding in findings:
        print(f"{finding.volume}: {finding.problem}{' [fixed]' if finding.fixed else ''}")
    if not findings:
        print("no problem found")
    return 1 if any(not finding.fixed for finding in findings) else 0


def _snapshot(store: VolumeStore, target: str) -> str:
    volume, name = parse_reference(target)
    return VolumeSnapshots(store).snapshot(volume, name)


def _named(target: str) -> tuple[str, str]:
    volume, name = parse_reference(target)
    if name is None:
        raise UserError(f"name the snapshot: {target}@NAME")
    return volume, name


def _snapshots(store: VolumeStore, volume: str | None, as_json: bool) -> None:
    found = VolumeSnapshots(store).list(volume)
    if as_json:
        write(json.dumps([snapshot.to_json() for snapshot in found], indent=2) + "\n")
        return
    rows = [("VOLUME@NAME", "CREATED", "SIZE", "USED BY")]
    rows += [
        (
            f"{s.volume}@{quote(s.name)}",
            s.created_at,
            "?" if s.size_bytes is None else human_size(s.size_bytes),
            ", ".join(s.used_by),
        )
        for s in found
    ]
    print_columns(rows)


def _ls(commands: VolumeCommands, as_json: bool) -> int:
    """Every volume, also when some cannot be read (each says why on its own line);
    status 1 then."""
    volumes = list(commands.all_details())
    if as_json:
        write(json.dumps([v.to_json() for v in volumes], indent=2) + "\n")
    else:
        _print_table(volumes)
    return 1 if any(v.error for v in volumes) else 0


def _inspect(commands: VolumeCommands, volume: str) -> int:
    details = commands.details(volume)
    write(json.dumps(details.to_json(), indent=2) + "\n")
    return 1 if details.error else 0


def _diff(commands: VolumeCommands, volume: str, as_json: bool, since: str | None) -> None:
    """The changes as they are found, written as they come: memory stays small however
    many there are."""
    found = commands.diff(volume, since)
    if not as_json:
        for change in found:
            write(f"{change.kind} {quote(change.path)}\n")
        return
    separator = "\n"
    write("[")
    for change in found:
        write(separator + "  " + json.dumps({"Kind": change.kind, **json_path(change.path)}))
        separator = ",\n"
    write("\n]\n" if separator != "\n" else "]\n")


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
