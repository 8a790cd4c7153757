"""What dockerd says about running containers, through its API on a unix socket.

Used by `doctor` to tell stale usage records from real ones. Only reads; a dockerd
that does not answer is no error, just no information.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import socket
from collections import Counter
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_SOCKET = Path("/var/run/docker.sock")
# States in which a container holds its volumes mounted.
_HOLDING_STATES = frozenset({"running", "paused", "restarting"})


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(str(self._path))


def api_socket() -> Path:
    """The socket named by DOCKER_HOST when it is a unix:// address, else the default."""
    host = os.environ.get("DOCKER_HOST", "")
    return Path(host.removeprefix("unix://")) if host.startswith("unix://") else DEFAULT_SOCKET


def volume_users(
    driver_name: str, *, path: Path | None = None, timeout: float = 5.0
) -> Counter[str] | None:
    """How many live containers use each volume of `driver_name`; None when dockerd
    cannot be asked."""
    connection = _UnixConnection(path or api_socket(), timeout)
    try:
        connection.request("GET", "/containers/json?all=1")
        response = connection.getresponse()
        body = response.read()
        if response.status != 200:
            log.warning("dockerd answered %d to a container listing", response.status)
            return None
        containers = json.loads(body)
    except (OSError, ValueError, http.client.HTTPException) as error:
        log.info("dockerd cannot be asked which containers run: %s", error)
        return None
    finally:
        connection.close()
    users: Counter[str] = Counter()
    for container in containers if isinstance(containers, list) else []:
        if container.get("State") not in _HOLDING_STATES:
            continue
        for mount in container.get("Mounts") or []:
            if mount.get("Type") == "volume" and mount.get("Driver") == driver_name:
                users[mount.get("Name", "")] += 1
    return users
