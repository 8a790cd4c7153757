"""HTTP/1.1 framing for the plugin socket: a request parser that works on whatever bytes
have arrived so far, and the response encoder.

The parser caps what a client can make us buffer (line length, header count, body size),
so the event loop can read from any number of clients without trusting them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

CONTENT_TYPE = b"application/vnd.docker.plugins.v1.1+json"
MAX_BODY_BYTES = 1 << 20
MAX_LINE_BYTES = 8192
MAX_HEADERS = 100


class BadRequest(Exception):
    """The bytes received are not a request we accept; the message says why."""


@dataclass
class Request:
    method: str
    path: str
    body: bytes
    keep_alive: bool


def parse_request(data: bytes | bytearray, *, at_end: bool = False) -> tuple[Request, int] | None:
    """The request at the start of `data` and how many bytes it took, or None while it is
    incomplete. Raises BadRequest as soon as the bytes cannot begin a valid request.

    `at_end`: the client sends nothing more, which may end a chunked body's trailers.
    """
    lines = _Lines(data)
    request_line = lines.next("request line")
    if request_line is None:
        return None
    parts = request_line.decode("latin-1").split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise BadRequest("malformed request line")
    method, target, version = parts
    headers: dict[str, str] = {}
    for _ in range(MAX_HEADERS + 1):
        line = lines.next("header line")
        if line is None:
            return None
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
        body = _chunked_body(lines, at_end=at_end)
    else:
        body = _sized_body(lines, headers.get("content-length", "0"))
    if body is None:
        return None
    request = Request(method=method, path=target.split("?", 1)[0], body=body, keep_alive=keep_alive)
    return request, lines.position


class _Lines:
    """Reads lines and byte runs from a buffer that may end in the middle of either."""

    def __init__(self, data: bytes | bytearray) -> None:
        self.data = data
        self.position = 0

    def next(self, what: str) -> bytes | None:
        """The next line with its line end; None when its end has not arrived."""
        end = self.data.find(b"\n", self.position, self.position + MAX_LINE_BYTES)
        if end < 0:
            if len(self.data) - self.position >= MAX_LINE_BYTES:
                raise BadRequest(f"{what} too long")
            return None
        line = bytes(self.data[self.position : end + 1])
        self.position = end + 1
        return line

    def take(self, size: int) -> bytes | None:
        if len(self.data) - self.position < size:
            return None
        run = bytes(self.data[self.position : self.position + size])
        self.position += size
        return run


def _sized_body(lines: _Lines, length_text: str) -> bytes | None:
    try:
        length = int(length_text)
    except ValueError:
        raise BadRequest(f"invalid Content-Length {length_text!r}") from None
    if length < 0:
        raise BadRequest("negative Content-Length")
    if length > MAX_BODY_BYTES:
        raise BadRequest(f"request body of {length} bytes is over the {MAX_BODY_BYTES} limit")
    return lines.take(length)


def _chunked_body(lines: _Lines, *, at_end: bool) -> bytes | None:
    body = bytearray()
    while True:
        size_line = lines.next("chunk size line")
        if size_line is None:
            return None
        try:
            size = int(size_line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise BadRequest("invalid chunk size") from None
        if size < 0 or len(body) + size > MAX_BODY_BYTES:
            raise BadRequest(f"request body is over the {MAX_BODY_BYTES} limit")
        if size == 0:
            break
        chunk = lines.take(size)
        if chunk is None:
            return None
        end = lines.next("chunk end")
        if end is None:
            return None
        if end not in (b"\r\n", b"\n"):
            raise BadRequest("chunk longer than its size")
        body += chunk
    while True:  # trailers, not used by the protocol
        trailer = lines.next("trailer line")
        if trailer is None:
            return bytes(body) if at_end else None
        if trailer in (b"\r\n", b"\n"):
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
