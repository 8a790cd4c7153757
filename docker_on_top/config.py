"""Settings from flags and environment variables, validated once at start."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

DEFAULT_NAME = "docker-on-top"
LOG_LEVELS = ("debug", "info", "warning", "error")
ENVIRONMENT = {
    "name": "DOCKER_ON_TOP_NAME",
    "root": "DOCKER_ON_TOP_ROOT",
    "socket": "DOCKER_ON_TOP_SOCKET",
    "log_level": "DOCKER_ON_TOP_LOG_LEVEL",
    "host_root": "DOCKER_ON_TOP_HOST_ROOT",
}
_DRIVER_NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]*")


class SettingsError(ValueError):
    """A setting has a value the daemon cannot run with."""


@dataclass(frozen=True)
class Settings:
    name: str
    root: Path
    socket: Path
    log_level: str
    # Where the host's root is mounted when the daemon runs in a container (a managed
    # plugin); None when it runs on the host itself.
    host_root: Path | None = None

    @classmethod
    def resolve(cls, flags: Mapping[str, str | None], environ: Mapping[str, str]) -> Settings:
        """A flag wins over its environment variable, which wins over the default."""

        def pick(key: str) -> str | None:
            flag = flags.get(key)
            return flag if flag is not None else environ.get(ENVIRONMENT[key]) or None

        name = pick("name") or DEFAULT_NAME
        if not _DRIVER_NAME.fullmatch(name):
            raise SettingsError(
                f"invalid driver name {name!r}: use letters, digits, '_', '.' and '-'"
            )
        root = Path(os.path.abspath(pick("root") or f"/var/lib/{name}"))
        # The state root's paths become overlay mount options, which ',' and ':' split.
        if {",", ":"} & set(str(root)):
            raise SettingsError(f"the state root {root} must not contain ',' or ':'")
        socket = Path(os.path.abspath(pick("socket") or f"/run/docker/plugins/{name}.sock"))
        log_level = (pick("log_level") or "info").lower()
        if log_level not in LOG_LEVELS:
            raise SettingsError(
                f"invalid log level {log_level!r}: choose one of {', '.join(LOG_LEVELS)}"
            )
        host_root = pick("host_root")
        if host_root is not None:
            if not host_root.startswith("/"):
                raise SettingsError(f"the host root {host_root!r} must be an absolute path")
            # Bases are found under it, and their paths become overlay mount options.
            if {",", ":"} & set(host_root):
                raise SettingsError(f"the host root {host_root} must not contain ',' or ':'")
        return cls(
            name=name,
            root=root,
            socket=socket,
            log_level=log_level,
            host_root=Path(os.path.normpath(host_root)) if host_root is not None else None,
        )
