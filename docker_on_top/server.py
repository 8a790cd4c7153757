"""The plugin's socket server: HTTP/1.1 connections on a unix socket, kept by one
event-loop thread and a bounded pool of worker threads (workers.py). It moves bytes,
keeps time and hands out work; what a request means is the application's
(plugin_api.py), how bytes frame requests is wire's, the listening socket and its file
are listener.py's. It knows nothing of volumes or endpoints.

The loop thread accepts, reads, frames, sends, and times out every connection, and
answers itself the requests the application says cannot block (they only read state),
so those never wait for a thread, whatever the workers are doing. The others go to the
pool: at most MAX_WORKERS threads, one started when work finds none idle, each ending
after a while without work; work beyond that waits in the pool's queue while the loop
goes on serving. A worker answers the request, sends the reply itself (so all the
syscalls of a request, up to its reply, are on one thread; tests/faults counts on it),
and hands the connection back to the loop; the loop sends what did not fit in the
socket's buffer. While a worker has a connection, the loop does not read or write its
socket, but goes on listening to it: when the reply went out whole, the worker wakes
nobody, and the loop takes the connection back at its next wake-up (the client's next
request at the latest), so a request costs no re-registration of its socket, nor a
write to the wake-up pipe. Should the client send or hang up meanwhile, the loop stops
listening and looks for the connection's return every millisecond. The application may go on
working on the worker once it has replied (an Unmount's teardown, SPEC B11): the
connection is the loop's again meanwhile, and a stop waits for that work as for every
job of the pool.

Why a pool and not a thread per connection: a connection costs no thread (dockerd keeps
idle keep-alive connections, and MAX_CONNECTIONS clients may stall), a client that
stalls holds nothing but its buffer, and the timeouts and the make-room policy stay on
one thread that sees every connection. Why not the loop alone: a Mount can wait seconds
on a volume's lock, and the other requests must not wait behind it: the quick ones are
the loop's, and those for other volumes run on other workers while some are free
(MAX_WORKERS requests that wait on one volume's lock fill the pool; the rest queue).

A reply that never reaches its client (the client has gone, the send fails, the client
is cut before it has read it all) goes back to the application (`undelivered`), once,
on a worker: undoing a Mount may wait on its volume's lock.

PluginServer is somewhat over 250 lines: it is one state machine over every connection
(State), and its parts (accepting, reading, replying, timing out, making room) share
the loop's state; split into classes they would pass it back and forth.
"""

from __future__ import annotations

import logging
import os
import selectors
import socket
import time
from collections import deque
from collections.abc import Callable
from contextlib import suppress
from typing import Protocol

from .connections import Connection, State, longest_waiting, overdue
from .listener import Listener
from .wire import CONTINUE, BadRequest, Request, Response, encode_response
from .workers import Workers

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 512
# How often connections that wait too long on their client are looked for.
_SWEEP_INTERVAL_S = 5.0
# After an error reply, what the client still sends is read and dropped (this many
# reads at most, for connections.DRAIN_S), so that closing does not reset the connection
# before it has read the reply.
_DRAIN_READS = 64
# How often the loop looks for the return of a connection it stopped listening to while
# a worker had it (its client sent more, or hung up, meanwhile: rare).
_PARKED_POLL_S = 0.001
# Requests that may block run at once up to this many. Each request waiting on a volume's
# lock holds a worker, so this many can wait on one volume before requests for other
# volumes queue behind them (4 s each, the driver's bound on a lock wait); an idle
# worker costs nothing, it ends.
MAX_WORKERS = 64


Reply = Callable[[Response], None]


class Application(Protocol):
    """What the server needs of the protocol it serves (see plugin_api.PluginAPI).

    `answer` calls `reply` once with the response. A request that may block may go on
    after its reply, on the same thread (see above); one that cannot, may not.
    """

    def may_block(self, request: Request) -> bool: ...
    def answer(self, request: Request, reply: Reply) -> None: ...
    def refuse(self, reason: str) -> Response: ...
    def undelivered(self, request: Request, response: Response) -> None: ...


class PluginServer:
    def __init__(self, application: Application, listener: Listener) -> None:
        self._app = application
        self._listener: Listener | None = listener
        self._wake_read, self._wake_write = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._stop_requested = False
        self._workers = Workers(MAX_WORKERS)
        # Connections that workers hand back: whether their reply went out (all of it,
        # or the rest is in `unsent`), or not.
        self._handed_back: deque[tuple[Connection, bool]] = deque()
        # Only the loop thread touches these.
        self._selector = selectors.DefaultSelector()
        self._clients: set[Connection] = set()
        self._pending: deque[Connection] = deque()
        # Connections a worker has that the client sent to or hung up on: the loop stopped
        # listening to them and looks for their return every _PARKED_POLL_S.
        self._parked: set[Connection] = set()
        self._next_sweep = 0.0

    def request_stop(self) -> None:
        """Ask `serve` to stop; safe from a signal handler and from any thread."""
        self._stop_requested = True
        self._wake()

    def _wake(self) -> None:
        # Should the write fail, the loop still looks at its next sweep.
        with suppress(OSError):  # BlockingIOError: a wake-up is already pending
            os.write(self._wake_write, b"x")

    def serve(self) -> None:
        """Serve until `request_stop`; then finish the requests begun (those queued for a
        worker too) and return."""
        assert self._listener is not None, "serve() runs once"
        self._listener.socket.setblocking(False)
        self._selector.register(self._listener.socket, selectors.EVENT_READ)
        self._selector.register(self._wake_read, selectors.EVENT_READ)
        self._next_sweep = time.monotonic() + _SWEEP_INTERVAL_S
        try:
            self._run_loop()
        finally:
            self._workers.close()  # before the wake-up pipe goes: workers write to it
            self._selector.close()
            os.close(self._wake_read)
            os.close(self._wake_write)

    def _run_loop(self) -> None:
        try:
            while self._listener is not None or self._clients:
                timeout = max(0.0, self._next_sweep - time.monotonic())
                if self._parked:
                    timeout = min(timeout, _PARKED_POLL_S)
                ready = self._selector.select(timeout)
                # First the connections handed back: a client's next request may be
                # among the events, and its connection is then the loop's again; and the
                # requests they have pipelined, before the loop reads more from them (an
                # end of stream read first would end the connection before those).
                self._take_handed_back()
                self._take_pending_requests()
                for key, events in ready:
                    if self._listener is not None and key.fileobj is self._listener.socket:
                        self._accept()
                    elif key.data is None:  # the wake-up pipe
                        with suppress(BlockingIOError):
                            os.read(self._wake_read, 4096)
                    else:
                        self._on_ready(key.data, events)
                self._take_handed_back()
                self._take_pending_requests()
                if self._stop_requested and self._listener is not None:
                    self._stop_listening()
                now = time.monotonic()
                if now >= self._next_sweep:
                    self._cut_overdue(now)
                    self._next_sweep = now + _SWEEP_INTERVAL_S
        except BaseException:
            # A worker's connection stays with it: the worker ends before serve returns.
            for client in list(self._clients):
                if client.state is not State.ANSWERING:
                    self._close(client)
            if self._listener is not None:
                self._stop_listening()
            raise

    def _stop_listening(self) -> None:
        assert self._listener is not None
        self._selector.unregister(self._listener.socket)
        self._listener.close()
        self._listener = None
        idle = [c for c in self._clients if c.state in (State.IDLE, State.DRAINING)]
        for client in idle:
            self._close(client)
        if self._clients:
            log.info("finishing %d request(s) in flight", len(self._clients))

    # --- connections ------------------------------------------------------------------

    def _accept(self) -> None:
        assert self._listener is not None
        while True:
            try:
                sock, _ = self._listener.socket.accept()
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
            client = Connection(sock, time.monotonic())
            self._clients.add(client)
            self._selector.register(sock, selectors.EVENT_READ, client)

    def _make_room(self) -> bool:
        """Cut the connection that has waited longest on its client, idle ones first."""
        victim = longest_waiting(self._clients)
        if victim is None:
            return False
        self._close(victim)
        return True

    def _cut_overdue(self, now: float) -> None:
        for client in overdue(self._clients, now):
            self._close(client)

    def _close(self, client: Connection) -> None:
        """Close a connection the loop holds (never one a worker has)."""
        if client not in self._clients:
            return
        self._clients.discard(client)
        with suppress(KeyError, ValueError):
            self._selector.unregister(client.sock)
        client.sock.close()
        if client.unsent and client.answered is not None:
            request, response = client.answered
            self._workers.submit(lambda: self._app.undelivered(request, response))

    def _listen_for(self, client: Connection, events: int) -> None:
        if events == client.events:
            return
        if not events:
            self._selector.unregister(client.sock)
        elif not client.events:
            self._selector.register(client.sock, events, client)
        else:
            self._selector.modify(client.sock, events, client)
        client.events = events

    def _on_ready(self, client: Connection, events: int) -> None:
        if client not in self._clients:
            return  # closed since the select, as it was handed back
        if client.state is State.ANSWERING:
            # Most often the client's next request, sent as soon as it had the reply,
            # while the worker was handing the connection back: wait for that.
            if client.replying.locked():
                with client.replying:
                    pass
            self._take_handed_back()
            self._take_pending_requests()  # before an end of stream is read (see above)
            if client not in self._clients:
                return
        if client.state is State.ANSWERING:
            # The worker is still at work: stop listening (a level-triggered event would
            # come back at once) until it hands the connection back. It is not asked to
            # wake the loop for it: whether it must would then depend on when the client
            # sent, and the worker's calls would differ from run to run (tests/faults
            # counts them); the loop looks for it instead.
            self._listen_for(client, 0)
            self._parked.add(client)
        elif events & selectors.EVENT_WRITE:
            self._send(client)
        elif events & selectors.EVENT_READ:
            self._receive(client)

    def _receive(self, client: Connection) -> None:
        try:
            data = client.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError as error:
            log.debug("connection closed: %s", error)
            self._close(client)
            return
        if client.state is State.DRAINING:
            client.reads += 1
            if not data or client.reads >= _DRAIN_READS:
                self._close(client)
            return
        if not data:
            client.ended = True
            client.reader.end()
            if client.reader.idle:
                self._close(client)
                return
        else:
            client.reader.feed(data)
            if client.state is State.IDLE:
                client.state = State.RECEIVING
                client.since = time.monotonic()
        self._take_request(client)

    def _take_request(self, client: Connection) -> None:
        """Answer the next request of the client, once it is whole."""
        try:
            request = client.reader.next_request()
        except BadRequest as error:
            client.closing = client.refused = True
            response = self._app.refuse(str(error))
            self._reply(client, encode_response(response, keep_alive=False))
            return
        if request is None:
            if client.reader.take_continue():
                self._send_interim(client)
            return
        client.state = State.ANSWERING
        client.closing = client.ended or not request.keep_alive
        if self._app.may_block(request):
            # The loop goes on listening: a keep-alive connection's next request then
            # needs no new registration, nor the worker a wake-up of the loop.
            self._workers.submit(lambda: self._answer_on_worker(client, request))
            return
        self._app.answer(request, lambda response: self._reply_on_loop(client, request, response))

    def _reply_on_loop(self, client: Connection, request: Request, response: Response) -> None:
        client.answered = request, response
        self._reply(client, encode_response(response, keep_alive=request.keep_alive))

    def _send_interim(self, client: Connection) -> None:
        """`100 Continue`; what does not fit goes out in front of the reply."""
        try:
            sent = client.sock.send(CONTINUE)
        except BlockingIOError:
            sent = 0
        except OSError as error:
            log.debug("connection closed: %s", error)
            self._close(client)
            return
        client.unsent = memoryview(CONTINUE)[sent:]

    def _answer_on_worker(self, client: Connection, request: Request) -> None:
        """On a worker: answer and send, and hand the connection back to the loop; what the
        application does after its reply runs on here."""
        self._app.answer(request, lambda response: self._reply_on_worker(client, request, response))

    def _reply_on_worker(self, client: Connection, request: Request, response: Response) -> None:
        reply = bytes(client.unsent) + encode_response(response, keep_alive=request.keep_alive)
        failure = None
        with client.replying:
            try:
                sent = client.sock.send(reply)
            except BlockingIOError:
                sent = 0
            except OSError as error:
                failure = error
            else:
                client.unsent = memoryview(reply)[sent:]
                client.answered = request, response
                self._handed_back.append((client, True))
        if failure is not None:
            log.debug("connection closed before its reply: %s", failure)
            self._app.undelivered(request, response)
            self._handed_back.append((client, False))
        elif not (
            client.unsent
            or client.closing
            or self._stop_requested
            or not client.reader.idle  # pipelined requests, read already
        ):
            # All sent and the loop still listens: it takes the connection back at its
            # next wake-up, the client's next request at the latest.
            return
        self._wake()

    def _take_handed_back(self) -> None:
        while self._handed_back:
            client, delivering = self._handed_back.popleft()
            self._parked.discard(client)
            if not delivering:
                self._close(client)
                continue
            client.state = State.SENDING
            client.since = time.monotonic()
            self._send(client)

    def _reply(self, client: Connection, reply: bytes) -> None:
        if client not in self._clients:
            return
        client.unsent = memoryview(bytes(client.unsent) + reply if client.unsent else reply)
        client.state = State.SENDING
        client.since = time.monotonic()
        self._send(client)

    def _send(self, client: Connection) -> None:
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
        client.answered = None  # delivered
        self._listen_for(client, selectors.EVENT_READ)
        client.since = time.monotonic()
        if client.refused and not client.ended:
            with suppress(OSError):
                client.sock.shutdown(socket.SHUT_WR)
            client.state = State.DRAINING
        elif client.closing or self._stop_requested:
            self._close(client)
        elif not client.reader.idle:
            client.state = State.RECEIVING
            self._pending.append(client)  # pipelined: taken up by the loop, not recursively
        else:
            client.state = State.IDLE

    def _take_pending_requests(self) -> None:
        while self._pending:
            client = self._pending.popleft()
            if client in self._clients and client.state is State.RECEIVING:
                self._take_request(client)
