"""HTTP/1.1 framing through the real socket (issue 13, item 7): `100 Continue`, the
Connection header as a token list, header and trailer lines capped together, and a body
trickled in one-byte chunks."""

from __future__ import annotations

import socket
import threading

from docker_on_top.wire import MAX_HEAD_BYTES, MAX_LINE_BYTES

from .conftest import PluginClient, Workspace, http_request, parse_responses, raw_exchange

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
CHUNKED_GET = b"POST /VolumeDriver.Get HTTP/1.1\r\nHost: plugin\r\nTransfer-Encoding: chunked\r\n"


def receive(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, f"closed after {bytes(data)!r}"
        data += chunk
    return bytes(data)


def test_expect_100_continue_is_answered_before_the_body(
    ws: Workspace, client: PluginClient
) -> None:
    client.create("v", ws.base)
    body = b'{"Name": "v"}'
    head = http_request("/VolumeDriver.Get", body, extra="Expect: 100-continue\r\n")[: -len(body)]
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5.0)  # curl waits 1 s for it, then sends the body anyway
        sock.connect(str(ws.socket))
        sock.sendall(head)
        assert receive(sock, len(CONTINUE)) == CONTINUE
        sock.sendall(body)
        sock.shutdown(socket.SHUT_WR)
        data = bytearray()
        while chunk := sock.recv(65536):
            data += chunk
    (reply,) = parse_responses(bytes(data))
    assert reply.status == 200 and reply.json["Volume"]["Name"] == "v", str(reply)  # type: ignore[index]


def test_a_client_that_sends_its_body_at_once_gets_no_100_continue(
    ws: Workspace, client: PluginClient
) -> None:
    client.create("v", ws.base)
    request = http_request("/VolumeDriver.Get", b'{"Name": "v"}', extra="Expect: 100-continue\r\n")
    (reply,) = parse_responses(raw_exchange(ws.socket, request, half_close=True))
    assert reply.status == 200, str(reply)


def test_keep_alive_then_close_in_one_header_closes(ws: Workspace, client: PluginClient) -> None:
    request = http_request("/Plugin.Activate", b"", extra="Connection: keep-alive, close\r\n")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5.0)
        sock.connect(str(ws.socket))
        sock.sendall(request)
        data = bytearray()
        while chunk := sock.recv(65536):  # until the daemon closes
            data += chunk
    (reply,) = parse_responses(bytes(data))
    assert reply.status == 200 and reply.headers.get("connection") == "close", str(reply)


def test_header_and_trailer_lines_together_are_capped(ws: Workspace, client: PluginClient) -> None:
    """Trailers used to be unbounded: each line was under the line limit, and there
    could be any number of them (53 MiB were buffered)."""
    client.create("v", ws.base)
    line = b"X-Pad: " + b"p" * (MAX_LINE_BYTES - 16) + b"\r\n"
    lines = MAX_HEAD_BYTES // len(line) + 1
    body = b'{"Name": "v"}'
    stream = b"%x\r\n%s\r\n0\r\n" % (len(body), body)
    for headers, trailers in ((lines, 0), (lines // 2, lines - lines // 2), (0, lines)):
        request = CHUNKED_GET + line * headers + b"\r\n" + stream + line * trailers + b"\r\n"
        (reply,) = parse_responses(raw_exchange(ws.socket, request, half_close=True))
        assert reply.status == 500, (headers, trailers, str(reply))
        assert "header and trailer lines over the" in reply.json["Err"], str(reply)  # type: ignore[index]
    # One line fewer is served.
    request = CHUNKED_GET + line * (lines - 1) + b"\r\n" + stream + b"\r\n"
    (reply,) = parse_responses(raw_exchange(ws.socket, request, half_close=True))
    assert reply.status == 200, str(reply)
    client.alive()


def test_a_body_trickled_in_one_byte_chunks_is_served_and_holds_up_no_one(
    ws: Workspace, client: PluginClient
) -> None:
    client.create("v", ws.base)
    body = b'{"Name": "v"' + b" " * (64 << 10) + b"}"
    stream = b"".join(b"1\r\n%s\r\n" % body[i : i + 1] for i in range(len(body)))
    replies: list[bytes] = []
    sender = threading.Thread(
        target=lambda: replies.append(
            raw_exchange(
                ws.socket,
                CHUNKED_GET + b"\r\n" + stream + b"0\r\n\r\n",
                timeout=60,
                half_close=True,
            )
        )
    )
    sender.start()
    while sender.is_alive():  # meanwhile the daemon serves other clients
        client.alive()
        sender.join(0.05)
    (reply,) = parse_responses(replies[0])
    assert reply.status == 200 and reply.json["Volume"]["Name"] == "v", str(reply)  # type: ignore[index]
