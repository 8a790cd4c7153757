"""The start-up registration of the driver with dockerd (moby 32480), against a fake API."""

from __future__ import annotations

import http.server
import json
import socketserver
import threading
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from docker_on_top.docker_api import register_driver


class _FakeDockerd(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def __init__(self, path: Path, status: int) -> None:
        self.requests: list[str] = []
        self.status = status
        super().__init__(str(path), _Handler)


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _FakeDockerd

    def do_GET(self) -> None:
        self.server.requests.append(self.path)
        body = b'{"Volumes":[],"Warnings":null}' if self.server.status == 200 else b"{}"
        self.send_response(self.server.status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass

    def address_string(self) -> str:  # a unix socket has no client address
        return "dockerd-client"


@contextmanager
def fake_dockerd(path: Path, status: int = 200) -> Iterator[_FakeDockerd]:
    server = _FakeDockerd(path, status)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def test_the_driver_is_looked_up_by_listing_its_volumes(tmp_path: Path) -> None:
    with fake_dockerd(tmp_path / "docker.sock") as dockerd:
        assert register_driver("dot", path=tmp_path / "docker.sock", patience=5)
    [request] = dockerd.requests
    url = urllib.parse.urlsplit(request)
    assert url.path == "/volumes"
    filters = urllib.parse.parse_qs(url.query)["filters"]
    assert [json.loads(f) for f in filters] == [{"driver": ["dot"]}]


def test_a_dockerd_that_starts_later_is_waited_for(tmp_path: Path) -> None:
    path = tmp_path / "docker.sock"
    result: list[bool] = []
    waiting = threading.Thread(
        target=lambda: result.append(register_driver("dot", path=path, patience=30, pause=0.05))
    )
    waiting.start()
    time.sleep(0.3)
    with fake_dockerd(path) as dockerd:
        waiting.join(30)
    assert result == [True]
    assert len(dockerd.requests) == 1


def test_waiting_for_dockerd_is_bounded(tmp_path: Path) -> None:
    started = time.monotonic()
    assert not register_driver("dot", path=tmp_path / "none.sock", patience=0.5, pause=0.1)
    assert time.monotonic() - started < 5


def test_a_refusal_is_not_retried(tmp_path: Path) -> None:
    with fake_dockerd(tmp_path / "docker.sock", status=500) as dockerd:
        assert not register_driver("dot", path=tmp_path / "docker.sock", patience=5, pause=0.05)
    assert len(dockerd.requests) == 1
