"""Random requests, framings and garbage: the daemon answers each with 200 or 500 {"Err"},
never dies, never touches anything outside its root, and keeps its root valid.

One daemon serves the module; its state holds volume `v` (mounted for `c1`) and volatile
`w` at the start, and whatever valid requests the fuzzers happen to make on top.
`pytest --hypothesis-show-statistics` shows which endpoints answered what.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from ..protocol.conftest import http_request
from .conftest import FuzzTarget, check_reply, fuzz_settings, restore_volumes
from .strategies import (
    garbage,
    hostile_requests,
    http_messages,
    json_requests,
    odd_field_requests,
)

MAX_BODY_BYTES = 1 << 20
MAX_LINE_BYTES = 8192


@fuzz_settings(250)
@given(requests=st.lists(json_requests(), min_size=1, max_size=3))
def test_fuzzed_requests_are_each_answered_and_harm_nothing(
    fuzz: FuzzTarget, requests: list[tuple[str, bytes]]
) -> None:
    """Well-framed requests, pipelined on one keep-alive connection: one reply each
    (up to a request line or body over the limits, which ends the connection)."""
    messages = []
    expected = 0
    for endpoint, body in requests:
        body = fuzz.resolve(body)
        messages.append(http_request(endpoint, body))
        expected += 1
        if len(body) > MAX_BODY_BYTES or len(f"POST {endpoint} HTTP/1.1") >= MAX_LINE_BYTES:
            break
    exchange = fuzz.send(b"".join(messages))
    assert exchange.closed_by_daemon, "the daemon kept a half-closed connection open"
    assert len(exchange.replies) == expected, [str(r) for r in exchange.replies]
    for (endpoint, _), reply in zip(requests, exchange.replies):
        event(f"{endpoint[:30]} -> {reply.status}")
        check_reply(reply)
    for reply in exchange.replies[: expected - 1]:
        assert reply.headers.get("connection", "").lower() != "close", str(reply)
    fuzz.check()
    restore_volumes(fuzz)


@fuzz_settings(200)
@given(requests=st.lists(hostile_requests(), min_size=1, max_size=4))
def test_hostile_names_ids_and_bases_change_nothing_outside_the_root(
    fuzz: FuzzTarget, requests: list[tuple[str, bytes]]
) -> None:
    """SPEC B1 and A1: names and IDs like `..`, `../x`, absolute paths, NULs; bases aimed
    at the root, the sentinel, system folders; on existing volumes, one of which fails
    to mount (its base is gone)."""
    for endpoint, body in requests:
        exchange = fuzz.send(http_request(endpoint, fuzz.resolve(body)))
        assert exchange.closed_by_daemon, "the daemon kept a half-closed connection open"
        (reply,) = exchange.replies
        event(f"{endpoint} -> {reply.status}")
        check_reply(reply)
    fuzz.check()
    restore_volumes(fuzz)


@fuzz_settings(250)
@given(message=http_messages(), close_early=st.integers(0, 4).map(lambda n: n == 0))
def test_fuzzed_http_framing_is_refused_or_served_and_harms_nothing(
    fuzz: FuzzTarget, message: bytes, close_early: bool
) -> None:
    """Methods, versions, header lines, Content-Length right, wrong, missing or huge,
    chunked bodies good and bad, requests cut anywhere; clients that close early."""
    exchange = fuzz.send(fuzz.resolve(message), close_early=close_early)
    if not close_early:
        assert exchange.closed_by_daemon, "the daemon kept a half-closed connection open"
    for reply in exchange.replies:
        event(f"reply {reply.status}")
        check_reply(reply)
    fuzz.check()
    restore_volumes(fuzz)


@fuzz_settings(120)
@given(data=garbage, close_early=st.integers(0, 4).map(lambda n: n == 0))
def test_raw_garbage_is_refused_and_harms_nothing(
    fuzz: FuzzTarget, data: bytes, close_early: bool
) -> None:
    exchange = fuzz.send(data, close_early=close_early)
    if not close_early:
        assert exchange.closed_by_daemon, "the daemon kept a half-closed connection open"
    for reply in exchange.replies:
        check_reply(reply)
        assert reply.status == 500 or data.startswith(b"POST"), str(reply)
    fuzz.check()
    restore_volumes(fuzz)


def assert_anticipated(fuzz: FuzzTarget, endpoint: str, body: bytes) -> None:
    """SPEC A5: a user's mistake gets a short specific message. No request may end in the
    catch-all ("failed unexpectedly", a traceback in the log, "internal error:
    unexpected failure" to the user): that is an input the daemon did not foresee."""
    log_size = os.path.getsize(fuzz.daemon.log_path)
    exchange = fuzz.send(http_request(endpoint, fuzz.resolve(body)))
    with open(fuzz.daemon.log_path, "rb") as log:
        log.seek(log_size)
        new_log = log.read().decode(errors="replace")
    assert len(exchange.replies) == 1, f"{endpoint} {body[:300]!r} -> {exchange.replies}"
    (reply,) = exchange.replies
    check_reply(reply)
    assert b"unexpected failure" not in reply.body, f"{endpoint} {body[:300]!r} -> {reply}"
    assert "failed unexpectedly" not in new_log and "Traceback" not in new_log, (
        f"{endpoint} {body[:300]!r}:\n{new_log[-3000:]}"
    )


@fuzz_settings(250)
@given(request=st.one_of(odd_field_requests(), json_requests()))
def test_every_refusal_is_anticipated_not_an_unexpected_failure(
    fuzz: FuzzTarget, request: tuple[str, bytes]
) -> None:
    assert_anticipated(fuzz, *request)
    fuzz.check()
    restore_volumes(fuzz)


# Found by the test above; kept so that they are always tried.
FOUND_UNANTICIPATED = {
    "nul-in-base": ("/VolumeDriver.Create", b'{"Name": "n", "Opts": {"base": "@BASE@\\u0000"}}'),
    "surrogate-in-base": ("/VolumeDriver.Create", b'{"Name": "n", "Opts": {"base": "/\\ud800"}}'),
    "deep-json": ("/VolumeDriver.Get", b"[" * 1000 + b"]" * 1000),
}


@pytest.mark.parametrize("request_", FOUND_UNANTICIPATED.values(), ids=FOUND_UNANTICIPATED.keys())
def test_inputs_once_unanticipated_are_refused_as_user_errors(
    fuzz: FuzzTarget, request_: tuple[str, bytes]
) -> None:
    assert_anticipated(fuzz, *request_)
    fuzz.check()
    restore_volumes(fuzz)
