"""The protocol layer: Docker's volume plugin protocol, HTTP/1.1 on a unix socket.

It decodes each request, calls the driver, and encodes the reply; it knows nothing
about storage. Every failure is HTTP 500 with `{"Err": ...}` (Podman looks only at
the status code).

One thread runs an event loop over every connection: it accepts, reads, parses
(`wire`), answers the quick requests itself and hands the ones that may take a while
(Create, Remove, Mount, Unmount, List) to a few worker threads. A connection thus
costs no thread, a burst of connections no thread start-ups, and a client that stalls
holds nothing but its buffer.
"""

from __future__ import annotations

import enum
import json
import logging
import os
import selectors
import socket
import stat
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from pathlib import Path
from typing import Protocol

from .errors import InternalError, PluginError, UserError
from .wire import BadRequest, Request, encode_response, parse_request

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 512
# A client that stops sending in the middle of a request, or stops reading its reply,
# is dropped after this long.
REQUEST_TIMEOUT_S = 30.0
# dockerd keeps idle keep-alive connections without limit and a POST is not retried on
# a connection we close under it, so idle connections are kept long.
IDLE_TIMEOUT_S = 3600.0
# How often connections that wait too long on their client are looked for.
_SWEEP_INTERVAL_S = 5.0
# After an error reply, what the client still sends is read and dropped, briefly, so
# that closing does not reset the connection before it has read the reply.
_DRAIN_S = 1.0
_DRAIN_READS = 64
# Requests that may take a while. The loop thread answers them itself (handing them to
# another thread costs a wake-up on the way); if one takes longer than _TAKEOVER_S, a
# standby thread takes the loop over, so that a slow mount never holds up the other
# clients. At most MAX_THREADS threads answer requests at once.
_SLOW_ENDPOINTS = frozenset(
    {
        "/VolumeDriver.Create",
        "/VolumeDriver.Remove",
        "/VolumeDriver.Mount",
        "/VolumeDriver.Unmount",
        "/VolumeDriver.List",
    }
)
_TAKEOVER_S = 0.05
MAX_THREADS = 64
# How long after a slow request the standbys keep looking rather than sleep.
_WATCH_S = 10.0


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


class StartupError(Exception):
    """The server cannot start; the message says why and what to do."""


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


class _State(enum.Enum):
    IDLE = "idle"  # between requests
    RECEIVING = "receiving"  # part of a request has arrived
    ANSWERING = "answering"  # the request is being answered; never cut
    SENDING = "sending"  # the reply waits for the client to read it
    DRAINING = "draining"  # an error reply was sent; what follows is dropped


class _Client:
    """One connection and where it stands."""

    __slots__ = (
        "closing",
        "ended",
        "events",
        "reads",
        "received",
        "refused",
        "since",
        "sock",
        "state",
        "unsent",
    )

    def __init__(self, sock: socket.socket, now: float) -> None:
        self.sock = sock
        self.events = selectors.EVENT_READ  # what the selector waits for; 0 when unregistered
        self.received = bytearray()
        self.unsent = memoryview(b"")
        self.state = _State.IDLE
        # When it began to wait on its client (the basis of every timeout).
        self.since = now
        self.reads = 0  # while draining
        self.ended = False  # the client sends nothing more
        self.closing = False  # close once the reply is sent
        self.refused = False  # the reply is an error about the request itself

    def waits_on_client(self) -> bool:
        return self.state is not _State.ANSWERING


class _LoopTakenOver(Exception):
    """In a thread that took so long to answer a request that another took the loop over."""


class PluginServer:
    def __init__(self, driver: VolumeDriver, socket_path: Path) -> None:
        self.socket_path = socket_path
        self._routes = build_routes(driver)
        self._wake_read, self._wake_write = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._listener: socket.socket | None = None
        self._socket_inode = 0
        self._stop_requested = False
        # Only the loop thread touches these.
        self._selector = selectors.DefaultSelector()
        self._clients: set[_Client] = set()
        self._pending: deque[_Client] = deque()
        self._next_sweep = 0.0
        # Replies of requests whose thread lost the loop meanwhile, for the loop to finish.
        self._answers_lock = threading.Lock()
        self._answers: list[tuple[_Client, memoryview]] = []
        # Who holds the loop, under `_role`: the generation counts take-overs.
        self._role = threading.Condition(threading.Lock())
        self._generation = 0
        # The slow request the loop thread is answering: when it began, and whose it is.
        self._slow: tuple[float, _Client] | None = None
        self._standbys = 0
        self._sleepers = 0  # standbys that wait to be woken rather than look
        self._last_slow = -_WATCH_S  # when the last slow request began
        self._threads: set[threading.Thread] = set()  # besides the one that called serve
        self._done = False
        self._failure: BaseException | None = None

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
        self._stop_requested = True
        self._wake()

    def _wake(self) -> None:
        with suppress(BlockingIOError):  # a wake-up is already pending
            os.write(self._wake_write, b"x")

    def serve(self) -> None:
        """Serve until `request_stop`; then finish the requests begun and return."""
        assert self._listener is not None, "bind() first"
        self._listener.setblocking(False)
        self._selector.register(self._listener, selectors.EVENT_READ)
        self._selector.register(self._wake_read, selectors.EVENT_READ)
        self._next_sweep = time.monotonic() + _SWEEP_INTERVAL_S
        with self._role:
            self._spawn_standby()
        self._take_turns(holding=True)
        with self._role:
            threads = list(self._threads)
        for thread in threads:
            thread.join()
        self._selector.close()
        os.close(self._wake_read)
        os.close(self._wake_write)
        if self._failure is not None:
            raise self._failure

    def _take_turns(self, *, holding: bool) -> None:
        """Run the loop while holding it; after a take-over, stand by to take it back.
        The thread that called serve stays until serving is over; another ends when it
        is not needed as a standby."""
        main = holding
        while True:
            if not holding:
                taken_from = self._standby(main=main)
                if taken_from is None:
                    break
                # The client whose request goes on in the other thread stays out of the
                # loop until its reply comes back.
                self._listen_for(taken_from, 0)
            holding = False
            try:
                self._run_loop()
            except _LoopTakenOver:
                continue
            except BaseException as error:
                with self._role:
                    self._failure = self._failure or error
            with self._role:
                self._done = True
                self._role.notify_all()
            break
        if not main:
            with self._role:
                self._threads.discard(threading.current_thread())

    def _standby(self, *, main: bool) -> _Client | None:
        """Wait until the loop thread has spent too long on one request: the loop is this
        thread's now, and that request's client is returned. None: serving is over, or
        one standby too many waits.

        While slow requests come, a standby looks every _TAKEOVER_S rather than being
        woken for each: waking a thread costs more than many a request.
        """
        with self._role:
            self._standbys += 1
            try:
                while not self._done:
                    now = time.monotonic()
                    if self._slow is not None:
                        since, client = self._slow
                        left = since + _TAKEOVER_S - now
                        if left <= 0:
                            self._slow = None
                            self._generation += 1
                            return client
                        self._role.wait(left)
                    elif self._standbys > 1 and not main:
                        return None  # one standby is enough
                    elif now - self._last_slow < _WATCH_S:
                        self._role.wait(_TAKEOVER_S)
                    else:
                        self._sleepers += 1
                        try:
                            self._role.wait()
                        finally:
                            self._sleepers -= 1
                return None
            finally:
                self._standbys -= 1

    def _watch_slow_request(self) -> None:
        """Under `_role`, as a slow request begins: make sure a standby watches it."""
        self._last_slow = time.monotonic()
        if not self._standbys:
            self._spawn_standby()
        elif self._sleepers == self._standbys:
            self._role.notify()

    def _spawn_standby(self) -> None:
        if len(self._threads) < MAX_THREADS:
            thread = threading.Thread(
                target=self._take_turns, kwargs={"holding": False}, name="loop", daemon=True
            )
            self._threads.add(thread)
            thread.start()

    def _run_loop(self) -> None:
        """Serve until serving is over, or until another thread takes the loop over."""
        try:
            while self._listener is not None or self._clients:
                timeout = max(0.0, self._next_sweep - time.monotonic())
                for key, events in self._selector.select(timeout):
                    if key.fileobj is self._listener:
                        self._accept()
                    elif key.data is None:  # the wake-up pipe
                        with suppress(BlockingIOError):
                            os.read(self._wake_read, 4096)
                    else:
                        self._on_ready(key.data, events)
                self._send_answers()
                self._take_pending_requests()
                if self._stop_requested and self._listener is not None:
                    self._stop_listening()
                now = time.monotonic()
                if now >= self._next_sweep:
                    self._cut_overdue(now)
                    self._next_sweep = now + _SWEEP_INTERVAL_S
        except _LoopTakenOver:
            raise
        except BaseException:
            for client in list(self._clients):
                self._close(client)
            if self._listener is not None:
                self._stop_listening()
            raise

    def close(self) -> None:
        """Give up the socket without serving (a start that failed after `bind`)."""
        if self._listener is not None:
            self._listener.close()
            self._remove_own_socket()
        os.close(self._wake_read)
        os.close(self._wake_write)

    def _stop_listening(self) -> None:
        assert self._listener is not None
        self._selector.unregister(self._listener)
        self._listener.close()
        self._listener = None
        self._remove_own_socket()
        idle = [c for c in self._clients if c.state in (_State.IDLE, _State.DRAINING)]
        for client in idle:
            self._close(client)
        if self._clients:
            log.info("finishing %d request(s) in flight", len(self._clients))

    # --- connections ------------------------------------------------------------------

    def _accept(self) -> None:
        assert self._listener is not None
        while True:
            try:
                sock, _ = self._listener.accept()
            except BlockingIOError:
                return
            except OSError as error:
                log.warning("accept failed: %s", error)
                return
            if len(self._clients) >= MAX_CONNECTIONS and not self._make_room():
                log.warning("too many connections (%d); refusing one", MAX_CONNECTIONS)
                sock.close()
                continue
            sock.setblocking(False)
            client = _Client(sock, time.monotonic())
            self._clients.add(client)
            self._selector.register(sock, selectors.EVENT_READ, client)

    def _make_room(self) -> bool:
        """Cut the connection that has waited longest on its client, idle ones first."""
        for state in (_State.IDLE, _State.DRAINING, _State.RECEIVING, _State.SENDING):
            waiting = [client for client in self._clients if client.state is state]
            if waiting:
                self._close(min(waiting, key=lambda client: client.since))
                return True
        return False

    def _cut_overdue(self, now: float) -> None:
        for client in list(self._clients):
            if not client.waits_on_client():
                continue
            waited = now - client.since
            if client.state is _State.IDLE:
                overdue = waited > IDLE_TIMEOUT_S
            elif client.state is _State.DRAINING:
                overdue = waited > _DRAIN_S
            else:
                overdue = waited > REQUEST_TIMEOUT_S
                if overdue:
                    log.info(
                        "dropping a client that took over %.0f s %s",
                        REQUEST_TIMEOUT_S,
                        "to send its request"
                        if client.state is _State.RECEIVING
                        else "to read its reply",
                    )
            if overdue:
                self._close(client)

    def _close(self, client: _Client) -> None:
        if client not in self._clients:
            return
        self._clients.discard(client)
        with suppress(KeyError, ValueError):
            self._selector.unregister(client.sock)
        client.sock.close()

    def _listen_for(self, client: _Client, events: int) -> None:
        if events == client.events:
            return
        if not events:
            self._selector.unregister(client.sock)
        elif not client.events:
            self._selector.register(client.sock, events, client)
        else:
            self._selector.modify(client.sock, events, client)
        client.events = events

    def _on_ready(self, client: _Client, events: int) -> None:
        if events & selectors.EVENT_WRITE:
            self._send(client)
        elif events & selectors.EVENT_READ:
            self._receive(client)

    def _receive(self, client: _Client) -> None:
        try:
            data = client.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError as error:
            log.debug("connection closed: %s", error)
            self._close(client)
            return
        if client.state is _State.DRAINING:
            client.reads += 1
            if not data or client.reads >= _DRAIN_READS:
                self._close(client)
            return
        if not data:
            client.ended = True
            if not client.received:
                self._close(client)
                return
        else:
            client.received += data
            if client.state is _State.IDLE:
                client.state = _State.RECEIVING
                client.since = time.monotonic()
        self._take_request(client)

    def _take_request(self, client: _Client) -> None:
        """Answer the request at the start of what the client sent, once it is whole."""
        try:
            parsed = parse_request(client.received, at_end=client.ended)
            if parsed is None and client.ended:
                raise BadRequest("request cut short")
        except BadRequest as error:
            log.info("bad request on the socket: %s", error)
            client.received.clear()
            client.closing = client.refused = True
            self._reply(
                client, encode_response(500, {"Err": f"bad request: {error}"}, keep_alive=False)
            )
            return
        if parsed is None:
            return
        request, used = parsed
        del client.received[:used]
        client.state = _State.ANSWERING
        client.closing = client.ended or not request.keep_alive
        if request.path in _SLOW_ENDPOINTS:
            self._answer_slow(client, request)
        else:
            self._reply(client, self._answer_bytes(request))

    def _answer_bytes(self, request: Request) -> bytes:
        status, document = self.handle(request.method, request.path, request.body)
        return encode_response(status, document, keep_alive=request.keep_alive)

    def _answer_slow(self, client: _Client, request: Request) -> None:
        with self._role:
            generation = self._generation
            self._slow = (time.monotonic(), client)
            self._watch_slow_request()
        reply = self._answer_bytes(request)
        with self._role:
            taken_over = self._generation != generation
            if not taken_over:
                self._slow = None
        if not taken_over:
            self._reply(client, reply)
            return
        # The loop is another thread's now: send what fits at once, leave the rest to it.
        rest = memoryview(reply)
        with suppress(OSError):  # the loop's own attempt reports it
            rest = rest[client.sock.send(rest) :]
        with self._answers_lock:
            self._answers.append((client, rest))
        self._wake()
        raise _LoopTakenOver

    def _send_answers(self) -> None:
        with self._answers_lock:
            answers, self._answers = self._answers, []
        for client, rest in answers:
            self._reply(client, rest)

    def _reply(self, client: _Client, reply: bytes | memoryview) -> None:
        if client not in self._clients:
            return
        client.unsent = memoryview(reply)
        client.state = _State.SENDING
        client.since = time.monotonic()
        self._send(client)

    def _send(self, client: _Client) -> None:
        if client.unsent:
            try:
                sent = client.sock.send(client.unsent)
            except BlockingIOError:
                sent = 0
            except OSError as error:
                log.debug("connection closed: %s", error)
                self._close(client)
                return
            client.unsent = client.unsent[sent:]
            if client.unsent:
                if sent:
                    client.since = time.monotonic()
                self._listen_for(client, selectors.EVENT_WRITE)
                return
        self._listen_for(client, selectors.EVENT_READ)
        client.since = time.monotonic()
        if client.refused and not client.ended:
            with suppress(OSError):
                client.sock.shutdown(socket.SHUT_WR)
            client.state = _State.DRAINING
        elif client.closing or self._stop_requested:
            self._close(client)
        elif client.received:
            client.state = _State.RECEIVING
            self._pending.append(client)  # pipelined: taken up by the loop, not recursively
        else:
            client.state = _State.IDLE

    def _take_pending_requests(self) -> None:
        while self._pending:
            client = self._pending.popleft()
            if client in self._clients and client.state is _State.RECEIVING:
                self._take_request(client)

    def _remove_own_socket(self) -> None:
        # A second instance may have replaced our socket file meanwhile; leave theirs alone.
        if not self._socket_inode:
            return  # adopted, not ours
        try:
            if self.socket_path.stat().st_ino == self._socket_inode:
                self.socket_path.unlink()
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
