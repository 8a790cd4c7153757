"""The socket server with a fake application (no driver, no mounts): work that follows a
reply on its worker (SPEC B11's teardown) leaves the client with its reply and the
connection to the loop, and a stop waits for it."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from pathlib import Path

from docker_on_top.listener import Listener
from docker_on_top.server import PluginServer
from docker_on_top.wire import Request, Response

OK = Response(200, b"{}", b"application/json")


class AppWithWorkAfterItsReply:
    """/slow replies, then works until `release` is set; /quick only replies."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.work_done = threading.Event()

    def may_block(self, request: Request) -> bool:
        return request.path == "/slow"

    def answer(self, request: Request, reply: Callable[[Response], None]) -> None:
        reply(OK)
        if request.path == "/slow":
            self.release.wait(30)
            self.work_done.set()

    def refuse(self, reason: str) -> Response:
        return Response(500, b"{}", b"application/json")

    def undelivered(self, request: Request, response: Response) -> None:
        pass


def request(path: str) -> bytes:
    return f"POST {path} HTTP/1.1\r\nHost: plugin\r\nContent-Length: 2\r\n\r\n{{}}".encode()


def read_reply(sock: socket.socket) -> bytes:
    received = b""
    while not received.endswith(b"\r\n\r\n{}"):
        chunk = sock.recv(4096)
        assert chunk, received
        received += chunk
    return received


def test_work_after_a_reply_runs_on_its_worker_and_a_stop_waits_for_it(tmp_path: Path) -> None:
    app = AppWithWorkAfterItsReply()
    server = PluginServer(app, Listener.bind(tmp_path / "plugin.sock"))
    serving = threading.Thread(target=server.serve)
    serving.start()
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.settimeout(10)
    try:
        client.connect(str(tmp_path / "plugin.sock"))
        client.sendall(request("/slow"))
        assert read_reply(client).startswith(b"HTTP/1.1 200 ")
        assert not app.work_done.is_set()  # the reply came while the work goes on
        # The connection is the loop's again: its next request is answered meanwhile.
        client.sendall(request("/quick"))
        assert read_reply(client).startswith(b"HTTP/1.1 200 ")
        assert not app.work_done.is_set()
        server.request_stop()
        serving.join(0.5)
        assert serving.is_alive(), "serve() returned with work of a request under way"
    finally:
        app.release.set()
        client.close()
        serving.join(10)
    assert app.work_done.is_set()
    assert not serving.is_alive()
