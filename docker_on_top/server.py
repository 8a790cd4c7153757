"""The protocol layer: Docker's volume plugin protocol, HTTP/1.1 on a unix socket.

It decodes each request, calls the driver, and encodes the reply; it knows nothing
about storage. Every failure is HTTP 500 with `{"Err": ...}` (Podman looks only at
the status code). A small HTTP reader of our own keeps the per-request cost low and
caps what a client can make us buffer.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import selectors
import socket
import stat
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Protocol

from .errors import InternalError, PluginError, UserError

log = logging.getLogger(__name__)

CONTENT_TYPE = b"application/vnd.docker.plugins.v1.1+json"
MAX_BODY_BYTES = 1 << 20
MAX_LINE_BYTES = 8192
MAX_HEADERS = 100
MAX_CONNECTIONS = 512
# A client that stops sending in the middle of a request is dropped after this long.
REQUEST_TIMEOUT_S = 30.0
# dockerd keeps idle keep-alive connections without limit and a POST is not retried on
# a connection we close under it, so idle connections are kept long.
IDLE_TIMEOUT_S = 3600.0
# How often requests that arrive too slowly are looked for.
_SWEEP_INTERVAL_S = 5.0
# A thread whose connection closed waits this long to serve the next one, as up to
# SPARE_WORKERS threads do: handing a connection over costs a fraction of a new thread.
SPARE_WORKERS = 8
SPARE_WORKER_WAIT_S = 10.0


class Mountable(Protocol):
    """The volume information the protocol layer encodes."""

    @property
    def name(self) -> str: ...
    @property
    def mountpoint(self) -> str: ...
    @property
    def created_at(self) -> str: ...
    @property
    def status(self) -> Mapping[str, object]: ...


class VolumeDriver(Protocol):
    """What the protocol layer needs of a driver (see driver.Driver)."""

    def capabilities(self) -> str: ...
    def create(self, name: str, options: Mapping[str, str]) -> None: ...
    def get(self, name: str) -> Mountable: ...
    def remove(self, name: str) -> None: ...
    def path(self, name: str) -> str: ...
    def mount(self, name: str, mount_id: str) -> str: ...
    def unmount(self, name: str, mount_id: str) -> None: ...
    def list_volumes(self) -> Sequence[Mountable]: ...


class BadRequest(Exception):
    """The bytes on the connection are not an HTTP request we can answer on it."""


class StartupError(Exception):
    """The server cannot start; the message says why and what to do."""


@dataclass
class Request:
    method: str
    path: str
    body: bytes
    keep_alive: bool


def _volume_json(volume: Mountable) -> dict[str, object]:
    document: dict[str, object] = {"Name": volume.name}
    if volume.mountpoint:
        document["Mountpoint"] = volume.mountpoint
    if volume.created_at:
        document["CreatedAt"] = volume.created_at
    if volume.status:
        document["Status"] = volume.status
    return document


def _string_field(body: Mapping[str, object], key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str):
        raise UserError(f"invalid request: {key} must be a string")
    return value


def _options_field(body: Mapping[str, object]) -> dict[str, str]:
    options = body.get("Opts")
    if options is None:
        return {}
    if not isinstance(options, dict) or not all(isinstance(v, str) for v in options.values()):
        raise UserError("invalid request: Opts must be an object of string values")
    return options


Handler = Callable[[Mapping[str, object]], dict[str, object]]


def build_routes(driver: VolumeDriver) -> dict[str, Handler]:
    def create(body: Mapping[str, object]) -> dict[str, object]:
        driver.create(_string_field(body, "Name"), _options_field(body))
        return {}

    def remove(body: Mapping[str, object]) -> dict[str, object]:
        driver.remove(_string_field(body, "Name"))
        return {}

    def unmount(body: Mapping[str, object]) -> dict[str, object]:
        driver.unmount(_string_field(body, "Name"), _string_field(body, "ID"))
        return {}

    return {
        "/Plugin.Activate": lambda _: {"Implements": ["VolumeDriver"]},
        "/VolumeDriver.Capabilities": lambda _: {"Capabilities": {"Scope": driver.capabilities()}},
        "/VolumeDriver.Create": create,
        "/VolumeDriver.List": lambda _: {
            "Volumes": [_volume_json(v) for v in driver.list_volumes()]
        },
        "/VolumeDriver.Get": lambda body: {
            "Volume": _volume_json(driver.get(_string_field(body, "Name")))
        },
        "/VolumeDriver.Remove": remove,
        "/VolumeDriver.Path": lambda body: {"Mountpoint": driver.path(_string_field(body, "Name"))},
        "/VolumeDriver.Mount": lambda body: {
            "Mountpoint": driver.mount(_string_field(body, "Name"), _string_field(body, "ID"))
        },
        "/VolumeDriver.Unmount": unmount,
    }


# Requests that dockerd may send with an empty body.
_EMPTY_BODY_OK = frozenset({"/Plugin.Activate", "/VolumeDriver.Capabilities", "/VolumeDriver.List"})


def read_request(stream: BinaryIO) -> Request | None:
    """Read one request; None at a clean end of stream before any byte of it."""
    line = stream.readline(MAX_LINE_BYTES + 1)
    if not line:
        return None
    if len(line) > MAX_LINE_BYTES or not line.endswith(b"\n"):
        raise BadRequest("request line too long or cut short")
    parts = line.decode("latin-1").split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise BadRequest("malformed request line")
    method, target, version = parts
    headers: dict[str, str] = {}
    for _ in range(MAX_HEADERS + 1):
        line = stream.readline(MAX_LINE_BYTES + 1)
        if len(line) > MAX_LINE_BYTES or not line.endswith(b"\n"):
            raise BadRequest("header line too long or cut short")
        if line in (b"\r\n", b"\n"):
            break
        name, colon, value = line.decode("latin-1").partition(":")
        if not colon:
            raise BadRequest("malformed header line")
        headers[name.strip().lower()] = value.strip()
    else:
        raise BadRequest("too many header lines")
    connection = headers.get("connection", "").lower()
    keep_alive = connection != "close" if version == "HTTP/1.1" else connection == "keep-alive"
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = _read_chunked(stream)
    else:
        body = _read_sized(stream, headers.get("content-length", "0"))
    return Request(method=method, path=target.split("?", 1)[0], body=body, keep_alive=keep_alive)


def _read_sized(stream: BinaryIO, length_text: str) -> bytes:
    try:
        length = int(length_text)
    except ValueError:
        raise BadRequest(f"invalid Content-Length {length_text!r}") from None
    if length < 0:
        raise BadRequest("negative Content-Length")
    if length > MAX_BODY_BYTES:
        raise BadRequest(f"request body of {length} bytes is over the {MAX_BODY_BYTES} limit")
    body = stream.read(length)
    if len(body) != length:
        raise BadRequest("request body cut short")
    return body


def _read_chunked(stream: BinaryIO) -> bytes:
    body = bytearray()
    while True:
        size_line = stream.readline(MAX_LINE_BYTES + 1)
        if not size_line.endswith(b"\n"):
            raise BadRequest("chunk size line too long or cut short")
        try:
            size = int(size_line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise BadRequest("invalid chunk size") from None
        if size < 0 or len(body) + size > MAX_BODY_BYTES:
            raise BadRequest(f"request body is over the {MAX_BODY_BYTES} limit")
        if size == 0:
            break
        chunk = stream.read(size)
        if len(chunk) != size or stream.readline(3) not in (b"\r\n", b"\n"):
            raise BadRequest("chunk cut short")
        body += chunk
    while stream.readline(MAX_LINE_BYTES + 1) not in (b"\r\n", b"\n", b""):
        pass  # trailers are not used by the protocol
    return bytes(body)


def encode_response(status: int, document: Mapping[str, object], *, keep_alive: bool) -> bytes:
    body = json.dumps(document).encode()
    reason = b"OK" if status == 200 else b"Internal Server Error"
    head = b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n" % (
        status,
        reason,
        CONTENT_TYPE,
        len(body),
    )
    if not keep_alive:
        head += b"Connection: close\r\n"
    return head + b"\r\n" + body


@dataclass
class _Connections:
    """Open client connections, and which of them wait on their client.

    A connection is idle (between requests), receiving (a request has begun to
    arrive), or busy (its request is being answered). Idle and receiving ones wait on
    the client and may be cut: to make room for a new client at the cap, or because a
    request takes too long to arrive. Busy ones are never cut. All under `lock`.
    """

    lock: threading.Lock = field(default_factory=threading.Lock)
    idle: dict[socket.socket, float] = field(default_factory=dict)
    receiving: dict[socket.socket, float] = field(default_factory=dict)
    open: int = 0
    # Every thread that serves connections, and how many of them wait for one.
    threads: set[threading.Thread] = field(default_factory=set)
    spare: int = 0
    handover: queue.SimpleQueue[socket.socket | None] = field(default_factory=queue.SimpleQueue)
    stopping: bool = False

    def make_room(self) -> bool:
        """Cut the connection that has waited longest on its client, idle ones first."""
        for waiting in (self.idle, self.receiving):
            if waiting:
                _cut(min(waiting, key=waiting.__getitem__))
                return True
        return False

    def cut_overdue(self, now: float) -> None:
        """Cut requests that take too long to arrive, however slowly they trickle in."""
        for connection, since in list(self.receiving.items()):
            if now - since > REQUEST_TIMEOUT_S:
                log.info("dropping a client whose request took over %.0f s", REQUEST_TIMEOUT_S)
                _cut(connection)


def _cut(connection: socket.socket) -> None:
    # Wakes the connection's thread, which then closes it and forgets it.
    with suppress(OSError):
        connection.shutdown(socket.SHUT_RDWR)


class PluginServer:
    def __init__(self, driver: VolumeDriver, socket_path: Path) -> None:
        self.socket_path = socket_path
        self._routes = build_routes(driver)
        self._connections = _Connections()
        self._wake_read, self._wake_write = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._listener: socket.socket | None = None
        self._socket_inode = 0

    # --- handling one request (no I/O of its own: usable without a socket) ---------

    def handle(self, method: str, path: str, body: bytes) -> tuple[int, dict[str, object]]:
        if log.isEnabledFor(logging.DEBUG):
            log.debug("request %s %s", path, body[:2048].decode("utf-8", "replace"))
        try:
            route = self._routes.get(path)
            if route is None:
                raise UserError(f"unknown endpoint {path}")
            if method != "POST":
                raise UserError(f"{path} takes POST, not {method}")
            return 200, route(self._decode(path, body))
        except UserError as error:
            log.info("%s refused: %s", path, error)
            return 500, {"Err": str(error)}
        except PluginError as error:
            log.error("%s failed: %s", path, error)
            return 500, {"Err": str(error)}
        except Exception as error:
            log.exception("%s failed unexpectedly", path)
            return 500, {"Err": str(InternalError("unexpected failure", error))}

    @staticmethod
    def _decode(path: str, body: bytes) -> Mapping[str, object]:
        if not body.strip():
            if path in _EMPTY_BODY_OK:
                return {}
            raise UserError(f"invalid request: {path} needs a JSON body")
        try:
            document = json.loads(body)
        except (ValueError, UnicodeDecodeError) as error:
            raise UserError(f"invalid request: the body is not JSON ({error})") from None
        except RecursionError:
            raise UserError("invalid request: the JSON body is nested too deeply") from None
        if document is None and path in _EMPTY_BODY_OK:
            return {}
        if not isinstance(document, dict):
            raise UserError("invalid request: the body must be a JSON object")
        return document

    # --- the socket ----------------------------------------------------------------

    def bind(self) -> None:
        """Create the listening socket, replacing a stale socket file left by a crash."""
        path = self.socket_path
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
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(str(path))
            os.chmod(path, 0o660)
            if os.geteuid() == 0:
                os.chown(path, 0, 0)
            listener.listen(128)
        except OSError:
            listener.close()
            raise
        self._socket_inode = path.stat().st_ino
        self._listener = listener

    def adopt(self, listener: socket.socket) -> None:
        """Serve on a listening socket made by someone else (systemd socket activation).

        Its file belongs to its maker: it is never removed here.
        """
        if listener.family != socket.AF_UNIX or listener.type != socket.SOCK_STREAM:
            raise StartupError("the inherited socket is not a unix stream socket")
        self._listener = listener

    def request_stop(self) -> None:
        """Ask `serve` to stop; safe from a signal handler and from any thread."""
        with suppress(BlockingIOError):  # a wake-up is already pending
            os.write(self._wake_write, b"x")

    def serve(self) -> None:
        """Serve until `request_stop`; then finish the requests in flight and return."""
        assert self._listener is not None, "bind() first"
        listener = self._listener
        selector = selectors.DefaultSelector()
        selector.register(listener, selectors.EVENT_READ)
        selector.register(self._wake_read, selectors.EVENT_READ)
        try:
            while True:
                events = selector.select(timeout=_SWEEP_INTERVAL_S)
                if any(key.fileobj == self._wake_read for key, _ in events):
                    break
                if events:
                    self._accept(listener)
                with self._connections.lock:
                    self._connections.cut_overdue(time.monotonic())
        finally:
            selector.close()
            self._shut_down(listener)

    def _accept(self, listener: socket.socket) -> None:
        try:
            connection, _ = listener.accept()
        except OSError as error:
            log.warning("accept failed: %s", error)
            return
        connections = self._connections
        with connections.lock:
            if connections.open >= MAX_CONNECTIONS and not connections.make_room():
                log.warning("too many requests in flight (%d); refusing one", MAX_CONNECTIONS)
                connection.close()
                return
            connections.open += 1
            connections.idle[connection] = time.monotonic()
            if connections.spare:
                connections.spare -= 1
                connections.handover.put(connection)
                return
            thread = threading.Thread(target=self._work, args=(connection,), name="connection")
            connections.threads.add(thread)
        thread.start()

    def _work(self, first: socket.socket) -> None:
        connection: socket.socket | None = first
        try:
            while connection is not None:
                self._serve_connection(connection)
                connection = self._next_connection()
        finally:
            with self._connections.lock:
                self._connections.threads.discard(threading.current_thread())

    def _next_connection(self) -> socket.socket | None:
        """Wait as a spare thread for a connection; None to end the thread."""
        connections = self._connections
        with connections.lock:
            if connections.stopping or connections.spare >= SPARE_WORKERS:
                return None
            connections.spare += 1
        try:
            return connections.handover.get(timeout=SPARE_WORKER_WAIT_S)
        except queue.Empty:
            with connections.lock:
                # `_accept` may have counted on this thread just as the wait ended.
                try:
                    return connections.handover.get_nowait()
                except queue.Empty:
                    connections.spare -= 1
                    return None

    def _serve_connection(self, connection: socket.socket) -> None:
        connections = self._connections
        stream = connection.makefile("rb")
        try:
            while True:
                connection.settimeout(IDLE_TIMEOUT_S)
                if not stream.peek(1):
                    return
                # From its first byte on, a request is in flight: a stop lets it finish.
                with connections.lock:
                    if connections.stopping or connections.idle.pop(connection, None) is None:
                        return  # cut meanwhile
                    connections.receiving[connection] = time.monotonic()
                connection.settimeout(REQUEST_TIMEOUT_S)
                try:
                    request = read_request(stream)
                except BadRequest as error:
                    log.info("bad request on the socket: %s", error)
                    connection.sendall(
                        encode_response(500, {"Err": f"bad request: {error}"}, keep_alive=False)
                    )
                    _discard_unread(connection)
                    return
                with connections.lock:
                    if connections.receiving.pop(connection, None) is None:
                        return  # cut meanwhile
                if request is None:
                    return
                status, document = self.handle(request.method, request.path, request.body)
                connection.sendall(encode_response(status, document, keep_alive=request.keep_alive))
                with connections.lock:
                    if connections.stopping or not request.keep_alive:
                        return
                    connections.idle[connection] = time.monotonic()
        except (OSError, ValueError) as error:
            log.debug("connection closed: %s", error)
        finally:
            with connections.lock:
                connections.idle.pop(connection, None)
                connections.receiving.pop(connection, None)
                connections.open -= 1
            stream.close()
            connection.close()

    def close(self) -> None:
        """Give up the socket without serving (a start that failed after `bind`)."""
        if self._listener is not None:
            self._shut_down(self._listener)

    def _shut_down(self, listener: socket.socket) -> None:
        listener.close()
        self._remove_own_socket()
        connections = self._connections
        with connections.lock:
            connections.stopping = True
            for connection in connections.idle:
                _cut(connection)
            for _ in range(connections.spare):
                connections.handover.put(None)
            connections.spare = 0
            busy = list(connections.threads)
        if busy:
            log.info("finishing %d connection(s) in flight", len(busy))
        for thread in busy:
            while thread.is_alive():
                thread.join(_SWEEP_INTERVAL_S)
                with connections.lock:
                    connections.cut_overdue(time.monotonic())
        os.close(self._wake_read)
        os.close(self._wake_write)

    def _remove_own_socket(self) -> None:
        # A second instance may have replaced our socket file meanwhile; leave theirs alone.
        if not self._socket_inode:
            return  # adopted, not ours
        try:
            if self.socket_path.stat().st_ino == self._socket_inode:
                self.socket_path.unlink()
        except FileNotFoundError:
            pass


def _discard_unread(connection: socket.socket) -> None:
    """Read and drop what the client still sends, briefly, so closing does not reset
    the connection before it has read our error reply."""
    connection.shutdown(socket.SHUT_WR)
    connection.settimeout(1.0)
    for _ in range(64):
        if not connection.recv(65536):
            return


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
