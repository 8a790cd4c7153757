"""HTTP/1.1 framing for the plugin socket, sans I/O: a request reader fed with whatever
bytes have arrived, and the response encoder. It never touches a socket (server.py
moves the bytes) and knows nothing of the plugin protocol (plugin_api.py).

The reader keeps its place between reads: every byte is looked at once, so a body
trickled in one-byte chunks costs linear time. It caps what a client can make us buffer
(line length; header and trailer lines together, by count and by size; body size), so
the event loop can read from any number of clients without trusting them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

MAX_BODY_BYTES = 1 << 20
MAX_LINE_BYTES = 8192
# Header lines and trailer lines of one request, together.
MAX_HEADERS = 100
MAX_HEAD_BYTES = 64 << 10
# The interim response to `Expect: 100-continue`, sent before the body is read.
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class BadRequest(Exception):
    """The bytes received are not a request we accept; the message says why."""


@dataclass
class Request:
    method: str
    path: str
    body: bytes
    keep_alive: bool


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    content_type: bytes


class _Phase(enum.Enum):
    REQUEST_LINE = "request line"
    HEADER = "header line"
    SIZED_BODY = "body"
    CHUNK_SIZE = "chunk size line"
    CHUNK_DATA = "chunk"
    CHUNK_END = "chunk end"
    TRAILER = "trailer line"


_LINE_ENDS = (b"\r\n", b"\n")
_NO_TOKENS: frozenset[str] = frozenset()


class RequestReader:
    """The requests of one connection, read from its bytes as they arrive.

    `feed` adds bytes, `end` says the client sends nothing more, and `next_request`
    parses as far as the bytes go: it returns the next whole request, or None while it
    is incomplete, and raises BadRequest as soon as the bytes cannot begin a valid one.
    Bytes past a request stay for the next call (pipelining).
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._scanned = 0  # bytes at the front of _buffer known to hold no line end
        self._ended = False
        self._new_request()

    def _new_request(self) -> None:
        self._phase = _Phase.REQUEST_LINE
        self._method = self._target = self._version = ""
        self._headers: dict[str, str] = {}
        self._head_lines = 0
        self._head_bytes = 0
        self._body = bytearray()
        self._left = 0  # bytes still to come of the sized body or of the current chunk
        self._continue_due = False

    @property
    def idle(self) -> bool:
        """Nothing of a next request has arrived."""
        return self._phase is _Phase.REQUEST_LINE and not self._buffer

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def end(self) -> None:
        self._ended = True

    def take_continue(self) -> bool:
        """Whether `100 Continue` is due now: the head of the request under way asked for
        it, its body has not begun to arrive, and it was not yet answered (once per
        request). A client that sent its body without waiting gets none."""
        due, self._continue_due = self._continue_due, False
        return due

    def next_request(self) -> Request | None:
        while True:
            phase = self._phase
            if phase is _Phase.SIZED_BODY or phase is _Phase.CHUNK_DATA:
                self._take_body_bytes()
                if self._left:
                    self._unless_cut_short()
                    return None
                if phase is _Phase.SIZED_BODY:
                    return self._finish()
                self._phase = _Phase.CHUNK_END
            elif phase is _Phase.HEADER or phase is _Phase.TRAILER:
                if not self._lines_to_blank():
                    if phase is _Phase.TRAILER and self._ended:
                        self._buffer.clear()  # the end of the stream ends the trailers
                        return self._finish()
                    self._unless_cut_short()
                    return None
                if phase is _Phase.TRAILER:
                    return self._finish()
                self._end_of_head()
            else:
                line = self._line()
                if line is None:
                    self._unless_cut_short()
                    return None
                if phase is _Phase.REQUEST_LINE:
                    self._request_line(line)
                elif phase is _Phase.CHUNK_SIZE:
                    self._chunk_size(line)
                elif line not in _LINE_ENDS:  # CHUNK_END
                    raise BadRequest("chunk longer than its size")
                else:
                    self._phase = _Phase.CHUNK_SIZE

    def _unless_cut_short(self) -> None:
        if self._ended and not self.idle:
            raise BadRequest("request cut short")

    def _line(self) -> bytes | None:
        """The next line with its line end; None when its end has not arrived."""
        buffer = self._buffer
        end = buffer.find(b"\n", self._scanned, MAX_LINE_BYTES)
        if end < 0:
            if len(buffer) >= MAX_LINE_BYTES:
                raise BadRequest(f"{self._phase.value} too long")
            self._scanned = len(buffer)
            return None
        line = bytes(buffer[: end + 1])
        del buffer[: end + 1]
        self._scanned = 0
        return line

    def _lines_to_blank(self) -> bool:
        """Reads header (or trailer) lines as far as they have arrived; True once the
        blank line that ends them is read. Trailers are counted, not kept: the protocol
        has no use for them. (The lines are taken here rather than with `_line`, and the
        buffer is cut once: a request's head is most of the work of a quick request.)"""
        headers = self._headers if self._phase is _Phase.HEADER else None
        buffer = self._buffer
        start = 0
        try:
            while True:
                end = buffer.find(b"\n", start + self._scanned, start + MAX_LINE_BYTES)
                if end < 0:
                    if len(buffer) - start >= MAX_LINE_BYTES:
                        raise BadRequest(f"{self._phase.value} too long")
                    self._scanned = len(buffer) - start
                    return False
                line = buffer[start : end + 1]
                start = end + 1
                self._scanned = 0
                if line == b"\r\n" or line == b"\n":
                    return True
                self._head_lines += 1
                self._head_bytes += len(line)
                if self._head_lines > MAX_HEADERS:
                    raise BadRequest("too many header lines")
                if self._head_bytes > MAX_HEAD_BYTES:
                    raise BadRequest(
                        f"header and trailer lines over the {MAX_HEAD_BYTES}-byte limit"
                    )
                if headers is None:
                    continue
                name, colon, value = line.decode("latin-1").partition(":")
                if not colon:
                    raise BadRequest("malformed header line")
                key = name.strip().lower()
                value = value.strip()
                # A field sent twice is one comma-separated list (RFC 9110, 5.3).
                headers[key] = f"{headers[key]}, {value}" if key in headers else value
        finally:
            del buffer[:start]

    def _take_body_bytes(self) -> None:
        run = min(self._left, len(self._buffer))
        self._body += self._buffer[:run]
        del self._buffer[:run]
        self._left -= run

    def _request_line(self, line: bytes) -> None:
        parts = line.decode("latin-1").split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise BadRequest("malformed request line")
        self._method, self._target, self._version = parts
        self._phase = _Phase.HEADER

    def _tokens(self, name: str) -> frozenset[str]:
        value = self._headers.get(name)
        if value is None:
            return _NO_TOKENS
        return frozenset(token.strip().lower() for token in value.split(","))

    def _end_of_head(self) -> None:
        if "chunked" in self._tokens("transfer-encoding"):
            self._phase = _Phase.CHUNK_SIZE
            wants_body = True
        else:
            self._left = _content_length(self._headers.get("content-length", "0"))
            self._phase = _Phase.SIZED_BODY
            wants_body = self._left > 0
        self._continue_due = (
            wants_body
            and not self._buffer
            and self._version == "HTTP/1.1"
            and self._headers.get("expect", "").lower() == "100-continue"
        )

    def _chunk_size(self, line: bytes) -> None:
        try:
            size = int(line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise BadRequest("invalid chunk size") from None
        if size < 0 or len(self._body) + size > MAX_BODY_BYTES:
            raise BadRequest(f"request body is over the {MAX_BODY_BYTES} limit")
        if size:
            self._left = size
            self._phase = _Phase.CHUNK_DATA
        else:
            self._phase = _Phase.TRAILER

    def _finish(self) -> Request:
        connection = self._tokens("connection")
        if self._version == "HTTP/1.1":
            keep_alive = "close" not in connection
        else:
            keep_alive = "keep-alive" in connection and "close" not in connection
        request = Request(
            method=self._method,
            path=self._target.split("?", 1)[0],
            body=bytes(self._body),
            keep_alive=keep_alive,
        )
        self._new_request()
        return request


def _content_length(text: str) -> int:
    try:
        length = int(text)
    except ValueError:
        raise BadRequest(f"invalid Content-Length {text!r}") from None
    if length < 0:
        raise BadRequest("negative Content-Length")
    if length > MAX_BODY_BYTES:
        raise BadRequest(f"request body of {length} bytes is over the {MAX_BODY_BYTES} limit")
    return length


def encode_response(response: Response, *, keep_alive: bool) -> bytes:
    reason = b"OK" if response.status == 200 else b"Internal Server Error"
    head = b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n" % (
        response.status,
        reason,
        response.content_type,
        len(response.body),
    )
    if not keep_alive:
        head += b"Connection: close\r\n"
    return head + b"\r\n" + response.body
