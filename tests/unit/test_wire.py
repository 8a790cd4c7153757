"""The request parser on partial input: the event loop calls it with whatever has arrived."""

from __future__ import annotations

import pytest

from docker_on_top.wire import (
    MAX_BODY_BYTES,
    MAX_HEADERS,
    MAX_LINE_BYTES,
    BadRequest,
    parse_request,
)

GET = (
    b"POST /VolumeDriver.Get?x=1 HTTP/1.1\r\nHost: plugin\r\nContent-Length: 13\r\n\r\n"
    b'{"Name": "v"}'
)
CHUNKED = (
    b"POST /VolumeDriver.Get HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
    b'5\r\n{"Nam\r\n8;ext=1\r\ne": "v"}\r\n0\r\nX-Trailer: t\r\n\r\n'
)


@pytest.mark.parametrize("request_bytes", [GET, CHUNKED, GET.replace(b"\r\n", b"\n")])
def test_every_prefix_is_incomplete_and_the_whole_is_the_request(request_bytes: bytes) -> None:
    for end in range(len(request_bytes)):
        assert parse_request(request_bytes[:end]) is None, request_bytes[:end]
    parsed = parse_request(bytearray(request_bytes))
    assert parsed is not None
    request, used = parsed
    assert (request.method, request.path, request.body) == (
        "POST",
        "/VolumeDriver.Get",
        b'{"Name": "v"}',
    )
    assert request.keep_alive and used == len(request_bytes)


def test_pipelined_requests_are_taken_one_at_a_time() -> None:
    data = GET + CHUNKED + b"POST /VolumeDriver.List"
    first = parse_request(data)
    assert first is not None and first[1] == len(GET)
    second = parse_request(data[first[1] :])
    assert second is not None and second[1] == len(CHUNKED)
    assert parse_request(data[first[1] + second[1] :]) is None


@pytest.mark.parametrize(
    ("version", "connection", "keep_alive"),
    [
        ("HTTP/1.1", "", True),
        ("HTTP/1.1", "Connection: close\r\n", False),
        ("HTTP/1.0", "", False),
        ("HTTP/1.0", "Connection: keep-alive\r\n", True),
    ],
)
def test_keep_alive_follows_the_version_and_the_connection_header(
    version: str, connection: str, keep_alive: bool
) -> None:
    raw = f"POST /Plugin.Activate {version}\r\n{connection}\r\n".encode()
    parsed = parse_request(raw)
    assert parsed is not None and parsed[0].keep_alive is keep_alive


def test_trailers_cut_by_the_end_of_the_stream_end_the_request() -> None:
    cut = CHUNKED[: CHUNKED.index(b"X-Trailer") + 4]
    assert parse_request(cut) is None
    parsed = parse_request(cut, at_end=True)
    assert parsed is not None and parsed[0].body == b'{"Name": "v"}'


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
        (b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "invalid chunk size"),
        (
            b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabc\r\n",
            "chunk longer than its size",
        ),
    ],
)
def test_bad_requests_are_refused_as_soon_as_they_show(raw: bytes, message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        parse_request(raw)


@pytest.mark.parametrize("prefix", [b"", b"POST /x HTTP/1.1\r\n"])
def test_a_line_without_end_is_refused_once_it_is_too_long(prefix: bytes) -> None:
    assert parse_request(prefix + b"A" * (MAX_LINE_BYTES - 1)) is None
    with pytest.raises(BadRequest, match="too long"):
        parse_request(prefix + b"A" * MAX_LINE_BYTES)


def test_a_chunked_body_over_the_limit_is_refused_before_it_arrives() -> None:
    head = b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
    with pytest.raises(BadRequest, match="over the"):
        parse_request(head + b"%x\r\n" % (MAX_BODY_BYTES + 1))
