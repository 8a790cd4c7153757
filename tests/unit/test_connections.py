"""The server's policy for connections that wait on their client (connections.py): which
are overdue in each state, and which one goes to make room."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator

import pytest

from docker_on_top.connections import (
    DRAIN_S,
    IDLE_TIMEOUT_S,
    REQUEST_TIMEOUT_S,
    Connection,
    State,
    longest_waiting,
    overdue,
)

# Makes a connection in a state, waiting on its client since a time.
Make = Callable[[State, float], Connection]


@pytest.fixture
def make() -> Iterator[Make]:
    sockets: list[socket.socket] = []

    def connection(state: State, since: float) -> Connection:
        ours, theirs = socket.socketpair()
        sockets.extend((ours, theirs))
        made = Connection(ours, since)
        made.state = state
        return made

    yield connection
    for each in sockets:
        each.close()


def test_each_state_has_its_own_timeout_and_an_answered_one_none(make: Make) -> None:
    now = 10_000.0
    idle_late = make(State.IDLE, now - IDLE_TIMEOUT_S - 1)
    idle_in_time = make(State.IDLE, now - REQUEST_TIMEOUT_S - 1)
    draining_late = make(State.DRAINING, now - DRAIN_S - 0.1)
    receiving_late = make(State.RECEIVING, now - REQUEST_TIMEOUT_S - 1)
    sending_in_time = make(State.SENDING, now - REQUEST_TIMEOUT_S + 1)
    answering = make(State.ANSWERING, 0.0)
    everyone = [idle_late, idle_in_time, draining_late, receiving_late, sending_in_time, answering]
    assert overdue(everyone, now) == [idle_late, draining_late, receiving_late]


def test_room_is_made_by_cutting_idle_ones_first_the_oldest_of_them(make: Make) -> None:
    sending = make(State.SENDING, 1.0)
    newer_idle = make(State.IDLE, 50.0)
    older_idle = make(State.IDLE, 20.0)
    assert longest_waiting([sending, newer_idle, older_idle]) is older_idle
    assert longest_waiting([sending]) is sending
    assert longest_waiting([make(State.ANSWERING, 0.0)]) is None
