"""The command line: `docker-on-top [serve]` runs the daemon in the foreground."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence

from . import __version__
from .config import ENVIRONMENT, LOG_LEVELS, Settings, SettingsError
from .driver import Driver
from .errors import PluginError
from .server import PluginServer, StartupError

log = logging.getLogger("docker_on_top")


def _add_serve_options(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS: an option given before `serve` is not overwritten by the subcommand's default.
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="docker-on-top",
        description="Docker volume plugin: a copy-on-write overlay view of a host directory.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _add_serve_options(parser)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = commands.add_parser("serve", help="run the plugin daemon in the foreground (default)")
    _add_serve_options(serve)
    return parser


def setup_logging(level: str) -> None:
    logging.basicConfig(
        stream=sys.stderr,
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def serve(settings: Settings) -> int:
    setup_logging(settings.log_level)
    driver = Driver(settings.root)
    server = PluginServer(driver, settings.socket)
    try:
        # Bind first: a second instance must be refused before its recovery touches
        # the state of the first. Requests wait in the listen queue meanwhile.
        server.bind()
    except (StartupError, OSError) as error:
        log.error("cannot start: %s", error)
        return 1
    try:
        driver.recover()
    except (PluginError, OSError) as error:
        log.error("cannot start: %s", error)
        server.close()
        return 1
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: server.request_stop())
    log.info(
        "serving driver %s on %s (state root %s)", settings.name, settings.socket, settings.root
    )
    server.serve()
    log.info("stopped; volumes in use stay mounted")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    arguments = vars(build_parser().parse_args(argv))
    try:
        settings = Settings.resolve(arguments, os.environ)
    except SettingsError as error:
        print(f"docker-on-top: {error}", file=sys.stderr)
        return 2
    return serve(settings)
