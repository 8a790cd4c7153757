"""The plugin's listening socket: binding it on its path (replacing a stale socket file
left by a crash, refusing while another instance answers there), taking one passed by
systemd, and removing the file at the end when it is ours. It knows nothing of the
connections accepted on it (server.py)."""

from __future__ import annotations

import logging
import os
import socket
import stat
from pathlib import Path

log = logging.getLogger(__name__)


class StartupError(Exception):
    """The server cannot start; the message says why and what to do."""


class Listener:
    """A listening unix stream socket, and the file it made, if any."""

    def __init__(self, sock: socket.socket, path: Path | None, inode: int) -> None:
        self.socket = sock
        self._path = path  # None: adopted, its file belongs to its maker
        self._inode = inode

    @classmethod
    def bind(cls, path: Path) -> Listener:
        """Create the listening socket, replacing a stale socket file left by a crash."""
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            mode = path.lstat().st_mode
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISSOCK(mode):
                raise StartupError(f"{path} exists and is not a socket; move it away first")
            if _socket_answers(path):
                raise StartupError(
                    f"another plugin instance is already serving on {path}; stop it first, "
                    "or give this one another --name or --socket"
                )
            log.warning("replacing the stale socket %s left by an earlier run", path)
            path.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(path))
            os.chmod(path, 0o660)
            if os.geteuid() == 0:
                os.chown(path, 0, 0)
            sock.listen(128)
        except OSError:
            sock.close()
            raise
        return cls(sock, path, path.stat().st_ino)

    @classmethod
    def adopt(cls, sock: socket.socket) -> Listener:
        """Serve on a listening socket made by someone else (systemd socket activation).

        Its file belongs to its maker: it is never removed here.
        """
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            raise StartupError("the inherited socket is not a unix stream socket")
        return cls(sock, None, 0)

    def close(self) -> None:
        self.socket.close()
        if self._path is None:
            return
        # A second instance may have replaced our socket file meanwhile; leave theirs alone.
        try:
            if self._path.stat().st_ino == self._inode:
                self._path.unlink()
        except FileNotFoundError:
            pass


def _socket_answers(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2.0)
    try:
        probe.connect(str(path))
    except OSError:
        return False
    finally:
        probe.close()
    return True
