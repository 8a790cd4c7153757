"""dockerd's API on its unix socket: which containers run, and a look-up of our driver.

Used by `doctor` to tell stale usage records from real ones, and at start-up to make
dockerd register the driver. Only reads; a dockerd that does not answer is no error,
just no information.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import socket
import time
import urllib.parse
from collections import Counter
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_SOCKET = Path("/var/run/docker.sock")
# Where dockerd looks for the socket files of legacy (not managed) plugins.
PLUGIN_DIR = Path("/run/docker/plugins")
# dockerd answers a volume listing only after asking every legacy plugin, and waits
# for a dead one for a while, so one attempt may take long.
_LISTING_TIMEOUT_S = 120.0
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


def register_driver(
    driver_name: str, *, path: Path | None = None, patience: float = 300.0, pause: float = 2.0
) -> bool:
    """Make dockerd look the driver up, as its first use would, without creating a volume.

    dockerd counts a legacy plugin's driver among its volume drivers, and Swarm places
    tasks that need it on this node, only once something has looked the driver up
    (moby 32480). Listing the driver's volumes does. dockerd may not be up yet (at
    boot it may start after this plugin), so connecting is retried every `pause`
    seconds for at most `patience` seconds. True once dockerd has answered.
    """
    query = urllib.parse.urlencode({"filters": json.dumps({"driver": [driver_name]})})
    deadline = time.monotonic() + patience
    while True:
        connection = _UnixConnection(path or api_socket(), _LISTING_TIMEOUT_S)
        try:
            connection.request("GET", f"/volumes?{query}")
            response = connection.getresponse()
            body = response.read()
        except (OSError, http.client.HTTPException) as error:
            if time.monotonic() + pause > deadline:
                log.info(
                    "driver %s not registered with dockerd, which did not answer (%s); "
                    "only Swarm needs it: see moby issue 32480",
                    driver_name,
                    error,
                )
                return False
            time.sleep(pause)
            continue
        finally:
            connection.close()
        if response.status != 200:
            log.warning(
                "dockerd answered %d to a listing of driver %s's volumes: %s",
                response.status,
                driver_name,
                body[:200].decode(errors="replace"),
            )
            return False
        log.info("driver %s registered with dockerd", driver_name)
        return True
