"""Load tests: one real daemon process, many concurrent clients, real overlay mounts.

The harness of the protocol tests is reused (workspace under /tmp, private driver name
and state root, HTTP over the unix socket, teardown by PID that unmounts and deletes
everything, also when a test fails).

Environment knobs:

* ``DOT_LOAD_SEED``: the random seed of the load test (printed at its start), to replay
  a failure with the same choices of calls.
* ``DOT_LOAD_CALLS``: how many calls the load test makes in all.
* ``DOT_DAEMON_SOURCE``: run the daemon from another copy of the package (a folder
  holding ``docker_on_top/``), for instance a deliberately broken one in /tmp, to see
  the tests fail. It becomes the daemon's PYTHONPATH, with PYTHONSAFEPATH=1 so that the
  harness's working directory (this checkout) does not shadow it.

The daemon's DOCKER_HOST points at a socket that does not exist: its start-up check
must not ask a dockerd that happens to run on the host about our volumes, whose users
are test clients, not containers.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ..protocol import conftest as protocol_fixtures
from ..protocol.conftest import Daemon, PluginClient, Workspace

# The same temporary workspace as the protocol tests.
ws = protocol_fixtures.ws


def daemon_env(ws: Workspace) -> dict[str, str]:
    env = {"DOCKER_HOST": f"unix://{ws.dir / 'no-dockerd.sock'}"}
    source = os.environ.get("DOT_DAEMON_SOURCE")
    if source:
        if not (Path(source) / "docker_on_top" / "__init__.py").is_file():
            raise pytest.UsageError(f"DOT_DAEMON_SOURCE={source} holds no docker_on_top package")
        env.update(PYTHONPATH=str(Path(source).resolve()), PYTHONSAFEPATH="1")
    return env


def proc_status(pid: int) -> dict[str, int]:
    """The numeric fields of /proc/PID/status (sizes in KiB)."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        words = value.split()
        if words and words[0].isdigit():
            fields[name] = int(words[0])
    return fields


@pytest.fixture
def daemon(ws: Workspace) -> Daemon:
    return ws.start(env=daemon_env(ws))


@pytest.fixture
def client(ws: Workspace, daemon: Daemon) -> PluginClient:
    return ws.client()
