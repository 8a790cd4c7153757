"""One client connection of the plugin's socket server and where it stands, and the
policy for connections that wait on their client: which are overdue, and which to cut
to make room for a new one. The server's loop thread (server.py) owns them; a worker
answering a connection touches only `unsent` and `answered`, while it holds `replying`."""

from __future__ import annotations

import enum
import logging
import selectors
import socket
import threading
from collections.abc import Iterable

from .wire import Request, RequestReader, Response

log = logging.getLogger(__name__)

# A client that stops sending in the middle of a request, or stops reading its reply,
# is dropped after this long.
REQUEST_TIMEOUT_S = 30.0
# dockerd keeps idle keep-alive connections without limit and a POST is not retried on
# a connection we close under it, so idle connections are kept long.
IDLE_TIMEOUT_S = 3600.0
# How long what a client sends after an error reply is read and dropped.
DRAIN_S = 1.0


class State(enum.Enum):
    IDLE = "idle"  # between requests
    RECEIVING = "receiving"  # part of a request has arrived
    ANSWERING = "answering"  # the request is being answered; never cut
    SENDING = "sending"  # the reply waits for the client to read it
    DRAINING = "draining"  # an error reply was sent; what follows is dropped


class Connection:
    """One connection and where it stands."""

    __slots__ = (
        "answered",
        "closing",
        "ended",
        "events",
        "reader",
        "reads",
        "refused",
        "replying",
        "since",
        "sock",
        "state",
        "unsent",
    )

    def __init__(self, sock: socket.socket, now: float) -> None:
        self.sock = sock
        self.events = selectors.EVENT_READ  # what the selector waits for; 0 when unregistered
        self.reader = RequestReader()
        self.unsent = memoryview(b"")
        # The request and response whose reply is in `unsent`, for `undelivered`.
        self.answered: tuple[Request, Response] | None = None
        self.state = State.IDLE
        # When it began to wait on its client (the basis of every timeout).
        self.since = now
        self.reads = 0  # while draining
        self.ended = False  # the client sends nothing more
        self.closing = False  # close once the reply is sent
        self.refused = False  # the reply is an error about the request itself
        # Held by a worker from the sending of its reply to the handing back.
        self.replying = threading.Lock()

    def waits_on_client(self) -> bool:
        return self.state is not State.ANSWERING


def overdue(connections: Iterable[Connection], now: float) -> list[Connection]:
    """The connections that have waited on their client longer than their state allows."""
    found = []
    for connection in connections:
        if not connection.waits_on_client():
            continue
        waited = now - connection.since
        if connection.state is State.IDLE:
            late = waited > IDLE_TIMEOUT_S
        elif connection.state is State.DRAINING:
            late = waited > DRAIN_S
        else:
            late = waited > REQUEST_TIMEOUT_S
            if late:
                log.info(
                    "dropping a client that took over %.0f s %s",
                    REQUEST_TIMEOUT_S,
                    "to send its request"
                    if connection.state is State.RECEIVING
                    else "to read its reply",
                )
        if late:
            found.append(connection)
    return found


def longest_waiting(connections: Iterable[Connection]) -> Connection | None:
    """The connection to cut to make room: the one that has waited longest on its
    client, idle ones first, then draining, receiving, sending; never one answering."""
    every = list(connections)
    for state in (State.IDLE, State.DRAINING, State.RECEIVING, State.SENDING):
        waiting = [connection for connection in every if connection.state is state]
        if waiting:
            return min(waiting, key=lambda connection: connection.since)
    return None
