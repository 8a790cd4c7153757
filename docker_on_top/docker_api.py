"""dockerd's API on its unix socket: which containers run, which managed plugin owns a
state root, and a look-up of our driver.

Used by `doctor` to tell stale usage records from real ones, and at start-up to make
dockerd register the driver. Only reads; a dockerd that does not answer is no error,
just no information.
"""

from __future__ import annotations

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


def _get(path: Path, target: str, timeout: float) -> tuple[int, bytes]:
    """One GET over HTTP/1.0, so the answer is neither chunked nor kept alive.

    (http.client would load ssl, several MB, for nothing in a long-lived daemon.)
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
        connection.settimeout(timeout)
        connection.connect(str(path))
        connection.sendall(f"GET {target} HTTP/1.0\r\nHost: docker\r\n\r\n".encode())
        chunks = []
        while chunk := connection.recv(65536):
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].split()
    if len(status_line) < 2 or not status_line[1].isdigit():
        raise ValueError(f"not an HTTP answer: {head[:80]!r}")
    return int(status_line[1]), body


def api_socket() -> Path:
    """The socket named by DOCKER_HOST when it is a unix:// address, else the default."""
    host = os.environ.get("DOCKER_HOST", "")
    return Path(host.removeprefix("unix://")) if host.startswith("unix://") else DEFAULT_SOCKET


def volume_users(
    driver_name: str, *, path: Path | None = None, timeout: float = 5.0
) -> Counter[str] | None:
    """How many live containers use each volume of `driver_name`; None when dockerd
    cannot be asked."""
    try:
        status, body = _get(path or api_socket(), "/containers/json?all=1", timeout)
        if status != 200:
            log.warning("dockerd answered %d to a container listing", status)
            return None
        containers = json.loads(body)
    except (OSError, ValueError) as error:
        log.info("dockerd cannot be asked which containers run: %s", error)
        return None
    users: Counter[str] = Counter()
    for container in containers if isinstance(containers, list) else []:
        if container.get("State") not in _HOLDING_STATES:
            continue
        for mount in container.get("Mounts") or []:
            if mount.get("Type") == "volume" and mount.get("Driver") == driver_name:
                users[mount.get("Name", "")] += 1
    return users


def managed_plugin_of(root: Path, *, path: Path | None = None, timeout: float = 5.0) -> str | None:
    """The driver name (NAME:TAG) of the managed plugin whose state root is `root`, the
    propagated mount DATA_ROOT/plugins/ID/propagated-mount; None when `root` is not one
    or dockerd cannot tell."""
    if root.name != "propagated-mount" or root.parent.parent.name != "plugins":
        return None
    plugin_id = root.parent.name
    try:
        status, body = _get(path or api_socket(), "/plugins", timeout)
        plugins = json.loads(body) if status == 200 else []
    except (OSError, ValueError) as error:
        log.info("dockerd cannot be asked which plugin owns %s: %s", root, error)
        return None
    for plugin in plugins if isinstance(plugins, list) else []:
        if isinstance(plugin, dict) and plugin.get("Id") == plugin_id:
            name = plugin.get("Name")
            return name if isinstance(name, str) and name else None
    return None


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
        try:
            status, body = _get(path or api_socket(), f"/volumes?{query}", _LISTING_TIMEOUT_S)
        except (OSError, ValueError) as error:
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
        if status != 200:
            log.warning(
                "dockerd answered %d to a listing of driver %s's volumes: %s",
                status,
                driver_name,
                body[:200].decode(errors="replace"),
            )
            return False
        log.info("driver %s registered with dockerd", driver_name)
        return True
