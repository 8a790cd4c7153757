"""The request reader on partial input: the event loop feeds it whatever has arrived."""

from __future__ import annotations

import sys
from collections.abc import Iterable

import pytest

from docker_on_top.wire import (
    MAX_BODY_BYTES,
    MAX_HEAD_BYTES,
    MAX_HEADERS,
    MAX_LINE_BYTES,
    BadRequest,
    Request,
    RequestReader,
)

GET = (
    b"POST /VolumeDriver.Get?x=1 HTTP/1.1\r\nHost: plugin\r\nContent-Length: 13\r\n\r\n"
    b'{"Name": "v"}'
)
CHUNKED = (
    b"POST /VolumeDriver.Get HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
    b'5\r\n{"Nam\r\n8;ext=1\r\ne": "v"}\r\n0\r\nX-Trailer: t\r\n\r\n'
)
CHUNKED_HEAD = b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"


def parse(data: bytes, *, at_end: bool = False) -> Request | None:
    reader = RequestReader()
    reader.feed(data)
    if at_end:
        reader.end()
    return reader.next_request()


def fed(pieces: Iterable[bytes]) -> list[Request]:
    """Feed the pieces one by one, asking for requests after each, as the loop does."""
    reader = RequestReader()
    requests = []
    for piece in pieces:
        reader.feed(piece)
        while (request := reader.next_request()) is not None:
            requests.append(request)
    return requests


@pytest.mark.parametrize("request_bytes", [GET, CHUNKED, GET.replace(b"\r\n", b"\n")])
def test_any_split_gives_the_request_once_it_is_whole(request_bytes: bytes) -> None:
    for end in range(len(request_bytes)):
        assert parse(request_bytes[:end]) is None, request_bytes[:end]
    one_byte_at_a_time = fed(request_bytes[i : i + 1] for i in range(len(request_bytes)))
    for cut in range(len(request_bytes) + 1):
        assert fed([request_bytes[:cut], request_bytes[cut:]]) == one_byte_at_a_time
    (request,) = one_byte_at_a_time
    assert (request.method, request.path, request.body) == (
        "POST",
        "/VolumeDriver.Get",
        b'{"Name": "v"}',
    )
    assert request.keep_alive


def test_pipelined_requests_are_taken_one_at_a_time() -> None:
    reader = RequestReader()
    reader.feed(GET + CHUNKED + b"POST /VolumeDriver.List")
    first, second = reader.next_request(), reader.next_request()
    assert first is not None and second is not None
    assert reader.next_request() is None and not reader.idle
    reader.feed(b" HTTP/1.1\r\n\r\n")
    third = reader.next_request()
    assert third is not None and third.path == "/VolumeDriver.List" and reader.idle


@pytest.mark.parametrize(
    ("version", "connection", "keep_alive"),
    [
        ("HTTP/1.1", "", True),
        ("HTTP/1.1", "Connection: close\r\n", False),
        ("HTTP/1.1", "Connection: keep-alive, close\r\n", False),
        ("HTTP/1.1", "Connection: Keep-Alive\r\nConnection: Close\r\n", False),
        ("HTTP/1.1", "Connection: upgrade,keep-alive\r\n", True),
        ("HTTP/1.0", "", False),
        ("HTTP/1.0", "Connection: keep-alive\r\n", True),
        ("HTTP/1.0", "Connection: te, Keep-Alive\r\n", True),
        ("HTTP/1.0", "Connection: keep-alive, close\r\n", False),
    ],
)
def test_keep_alive_reads_the_connection_header_as_a_token_list(
    version: str, connection: str, keep_alive: bool
) -> None:
    request = parse(f"POST /Plugin.Activate {version}\r\n{connection}\r\n".encode())
    assert request is not None and request.keep_alive is keep_alive


def test_trailers_cut_by_the_end_of_the_stream_end_the_request() -> None:
    cut = CHUNKED[: CHUNKED.index(b"X-Trailer") + 4]
    assert parse(cut) is None
    request = parse(cut, at_end=True)
    assert request is not None and request.body == b'{"Name": "v"}'


def test_a_request_cut_by_the_end_of_the_stream_is_refused() -> None:
    assert parse(b"", at_end=True) is None
    with pytest.raises(BadRequest, match="cut short"):
        parse(GET[:-1], at_end=True)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"GARBAGE\r\n", "malformed request line"),
        (b"POST /x HTTP/2\r\n", "malformed request line"),
        (b"POST /x HTTP/1.1\r\nno colon\r\n", "malformed header line"),
        (b"POST /x HTTP/1.1\r\n" + b"A: b\r\n" * (MAX_HEADERS + 1), "too many header lines"),
        (b"POST /x HTTP/1.1\r\nContent-Length: ten\r\n\r\n", "invalid Content-Length"),
        (b"POST /x HTTP/1.1\r\nContent-Length: -1\r\n\r\n", "negative Content-Length"),
        (
            b"POST /x HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % (MAX_BODY_BYTES + 1),
            "over the",
        ),
        (CHUNKED_HEAD + b"zz\r\n", "invalid chunk size"),
        (CHUNKED_HEAD + b"2\r\nabc\r\n", "chunk longer than its size"),
    ],
)
def test_bad_requests_are_refused_as_soon_as_they_show(raw: bytes, message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        parse(raw)


@pytest.mark.parametrize("prefix", [b"", b"POST /x HTTP/1.1\r\n"])
def test_a_line_without_end_is_refused_once_it_is_too_long(prefix: bytes) -> None:
    assert parse(prefix + b"A" * (MAX_LINE_BYTES - 1)) is None
    with pytest.raises(BadRequest, match="too long"):
        parse(prefix + b"A" * MAX_LINE_BYTES)


def test_a_chunked_body_over_the_limit_is_refused_before_it_arrives() -> None:
    with pytest.raises(BadRequest, match="over the"):
        parse(CHUNKED_HEAD + b"%x\r\n" % (MAX_BODY_BYTES + 1))


LONG_LINE = b"X-Long: " + b"a" * (MAX_LINE_BYTES - 16) + b"\r\n"
LINES_OVER_THE_HEAD_LIMIT = MAX_HEAD_BYTES // len(LONG_LINE) + 1


@pytest.mark.parametrize("headers", range(LINES_OVER_THE_HEAD_LIMIT + 1))
def test_header_and_trailer_lines_are_capped_together(headers: int) -> None:
    """However the long lines are shared between headers and trailers, their bytes
    together are capped (each line is under the line limit, and there are few)."""
    trailers = LINES_OVER_THE_HEAD_LIMIT - headers
    assert LINES_OVER_THE_HEAD_LIMIT < MAX_HEADERS
    raw = (
        b"POST /x HTTP/1.1\r\n"
        + LONG_LINE * headers
        + b"Transfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\n"
        + LONG_LINE * trailers
        + b"\r\n"
    )
    with pytest.raises(BadRequest, match="header and trailer lines over the"):
        parse(raw)
    fewer = raw.replace(LONG_LINE, b"", 1)
    request = parse(fewer)
    assert request is not None and request.body == b"x"


def test_trailer_lines_count_with_the_header_lines() -> None:
    raw = CHUNKED_HEAD + b"0\r\n" + b"T: t\r\n" * MAX_HEADERS
    with pytest.raises(BadRequest, match="too many header lines"):
        parse(raw)


def test_100_continue_is_due_once_the_head_asks_for_it_and_before_the_body() -> None:
    head = b"POST /x HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n"
    reader = RequestReader()
    reader.feed(head[:-1])
    assert reader.next_request() is None and not reader.take_continue()
    reader.feed(head[-1:])
    assert reader.next_request() is None
    assert reader.take_continue() and not reader.take_continue()
    reader.feed(b"{}")
    request = reader.next_request()
    assert request is not None and request.body == b"{}"


@pytest.mark.parametrize(
    "raw",
    [
        # the body came with the head: nothing to wait for
        b"POST /x HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n{",
        # no body
        b"POST /x HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 0\r\n\r\n",
        # an HTTP/1.0 client gets no interim response (RFC 9110, 15.2)
        b"POST /x HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n",
        # no expectation
        b"POST /x HTTP/1.1\r\nContent-Length: 2\r\n\r\n",
    ],
)
def test_100_continue_is_not_due(raw: bytes) -> None:
    reader = RequestReader()
    reader.feed(raw)
    reader.next_request()
    assert not reader.take_continue()


def test_chunked_expect_gets_100_continue() -> None:
    reader = RequestReader()
    reader.feed(b"POST /x HTTP/1.1\r\nExpect: 100-Continue\r\nTransfer-Encoding: chunked\r\n\r\n")
    assert reader.next_request() is None and reader.take_continue()


def calls_to_read_in_one_byte_chunks(chunks: int) -> int:
    """Python and C calls made to read a chunked body sent in one-byte chunks, each one
    fed as it would arrive (a deterministic measure of the work: no timing)."""
    wire = CHUNKED_HEAD + b"1\r\nx\r\n" * chunks + b"0\r\n\r\n"
    reader = RequestReader()
    calls = 0

    def count(frame: object, event: str, arg: object) -> None:
        nonlocal calls
        if event in ("call", "c_call"):
            calls += 1

    requests = []
    sys.setprofile(count)
    try:
        for index in range(len(wire)):
            reader.feed(wire[index : index + 1])
            request = reader.next_request()
            if request is not None:
                requests.append(request)
    finally:
        sys.setprofile(None)
    assert [r.body for r in requests] == [b"x" * chunks]
    return calls


def test_reading_a_body_trickled_in_one_byte_chunks_costs_linear_work() -> None:
    """Every byte is looked at once: twice the chunks, twice the work (re-reading the
    body from its start at each arrival would make it four times)."""
    small, large = calls_to_read_in_one_byte_chunks(500), calls_to_read_in_one_byte_chunks(1000)
    assert large < 2.2 * small, (small, large)
