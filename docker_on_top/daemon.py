"""The daemon: logging set up for a terminal, the journal or dockerd's log, the socket
bound (or taken from systemd), start-up recovery begun (the rest of it and the start-up
checks in the background), and the server run until SIGTERM or SIGINT.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading

from . import docker_api
from .config import Settings
from .doctor import doctor
from .driver import Driver
from .errors import PluginError
from .listener import Listener, StartupError
from .plugin_api import PluginAPI
from .recovery import StartupRecovery
from .releases import PendingReleases
from .server import PluginServer
from .store import VolumeStore

log = logging.getLogger("docker_on_top")


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


def setup_logging(level: str, *, timestamps: bool = True) -> None:
    """Log to stderr; `timestamps` off where the reader adds its own (dockerd's log of a
    managed plugin). Under journald, its levels and timestamps."""
    handler = logging.StreamHandler(sys.stderr)
    if _stderr_is_journal():
        handler.setFormatter(_JournalFormatter("%(name)s: %(message)s"))
    else:
        when = "%(asctime)s " if timestamps else ""
        handler.setFormatter(logging.Formatter(f"{when}%(levelname)s %(name)s: %(message)s"))
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
    # A managed plugin (host root set) logs into dockerd's log, which stamps each line.
    setup_logging(settings.log_level, timestamps=settings.host_root is None)
    store = VolumeStore(settings.root, settings.host_root)
    releases = PendingReleases()
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
    recovery = StartupRecovery(store, releases)
    try:
        recovery.begin()
    except OSError as error:
        log.error("cannot start: %s", error)
        listener.close()
        return 1
    server = PluginServer(PluginAPI(Driver(store, releases)), listener)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: server.request_stop())
    failed = threading.Event()
    # In the background: dockerd may itself be waiting for this plugin to answer, and
    # each volume is recovered before its first use anyway.
    threading.Thread(
        target=_start_up, args=(recovery, server, failed, settings), name="start-up", daemon=True
    ).start()
    log.info(
        "serving driver %s on %s (state root %s)", settings.name, settings.socket, settings.root
    )
    server.serve()
    if failed.is_set():
        return 1
    log.info("stopped; volumes in use stay mounted")
    return 0


def _start_up(
    recovery: StartupRecovery, server: PluginServer, failed: threading.Event, settings: Settings
) -> None:
    """The recovery of the volumes no request has needed yet (a volume it cannot
    recover stops the daemon, as at the start: SPEC A4), then the start-up checks."""
    try:
        recovery.run()
    except (PluginError, OSError) as error:
        recovery.end()
        log.error("cannot start: %s", error)
        failed.set()
        server.request_stop()
        return
    log.info("start-up recovery finished")
    _start_up_checks(recovery.store, recovery.releases, settings)


def _start_up_checks(store: VolumeStore, releases: PendingReleases, settings: Settings) -> None:
    try:
        _report_stuck_volumes(store, releases, settings.name)
    except Exception:
        # The registration below matters more than the report (Swarm needs it).
        log.exception("the start-up check of the volumes failed")
    # Only a socket where dockerd discovers legacy plugins can be registered; a managed
    # plugin (host root set) is registered by dockerd itself when it is enabled.
    if settings.host_root is None and settings.socket.parent == docker_api.PLUGIN_DIR:
        docker_api.register_driver(settings.name)


def _report_stuck_volumes(store: VolumeStore, releases: PendingReleases, driver_name: str) -> None:
    try:
        findings = doctor(store, releases, None, docker_api.volume_users(driver_name), fix=False)
    except PluginError as error:
        log.warning("start-up check of the volumes failed: %s", error)
        return
    for finding in findings:
        log.warning(
            "volume %s: %s (see `docker-on-top doctor --fix`)", finding.volume, finding.problem
        )


# --- volume commands ------------------------------------------------------------------
