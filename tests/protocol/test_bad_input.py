"""Bad input changes nothing and the daemon keeps serving; B1 (IDs), slow and keep-alive clients.

One daemon serves the whole module (for speed). Its state holds a volume `v`, mounted
for ID `c1`, and a volume `w`, not mounted; `<ws>/x/` is bait for path escapes. Every
test snapshots the whole workspace before and after.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from .conftest import (
    CONTENT_TYPE,
    ENDPOINTS_WITH_BODY,
    PluginClient,
    Reply,
    Workspace,
    http_request,
    mounts_at,
    parse_responses,
    raw_exchange,
)


@pytest.fixture(scope="module")
def shared() -> Iterator[Workspace]:
    ws = Workspace()
    try:
        ws.start()
        client = ws.client()
        client.create("v", ws.base)
        client.mount("v", "c1")
        (ws.volume("v").mountpoint / "written.txt").write_text("through the overlay\n")
        client.create("w", ws.base, volatile="true")
        (ws.dir / "x").mkdir()
        (ws.dir / "x" / "bait.txt").write_text("must survive\n")
        yield ws
    finally:
        ws.cleanup()


@pytest.fixture
def ws(shared: Workspace) -> Iterator[Workspace]:
    """The shared workspace; checks that the test left its state exactly as it found it."""
    client = shared.client()
    before = shared.state()
    assert client.names() == ["v", "w"]
    yield shared
    assert shared.state() == before, "bad input changed the state"
    client.alive()
    assert client.names() == ["v", "w"]
    assert len(mounts_at(shared.volume("v").mountpoint)) == 1
    assert shared.volume("v").records() == {"c1": {"UsageCount": 1}}
    assert not mounts_at(shared.volume("w").mountpoint)
    # Both volumes still work: a bad request must not leave the daemon unable to serve them.
    for name in ("v", "w"):
        client.mount(name, "probe")
        client.unmount(name, "probe")
    assert shared.state() == before


@pytest.fixture
def client(ws: Workspace) -> PluginClient:
    return ws.client()


def assert_error_reply(reply: Reply) -> None:
    assert reply.status == 500, str(reply)
    assert reply.content_type == CONTENT_TYPE, str(reply)
    document = reply.json
    assert isinstance(document, dict) and isinstance(document.get("Err"), str), str(reply)
    assert document["Err"], str(reply)


def refused(
    ws: Workspace, client: PluginClient, endpoint: str, body: object = None, **kwargs: object
) -> None:
    """One bad request: an error reply, and the state exactly as before."""
    before = ws.state()
    reply = client.call(endpoint, body, **kwargs)  # type: ignore[arg-type]
    assert reply.status == 500, f"{endpoint} {body!r} {kwargs} -> {reply}"
    assert_error_reply(reply)
    assert ws.state() == before, f"{endpoint} {body!r} {kwargs} changed the state"


# --- bodies ------------------------------------------------------------------------------

BAD_JSON = [
    b"{",
    b"{'Name': 'w'}",
    b'{"Name": "w",}',
    b'{"Name": "w"} trailing',
    b"Name=w",
    b"\xff\xfe\x00\x01",
    b'{"Name": "w\xff"}',
]


@pytest.mark.parametrize("body", BAD_JSON, ids=range(len(BAD_JSON)))
def test_bad_json_is_refused(ws: Workspace, client: PluginClient, body: bytes) -> None:
    for endpoint in ENDPOINTS_WITH_BODY:
        refused(ws, client, endpoint, raw=body)


@pytest.mark.parametrize("body", [b"{", b"[]", b"42"])
def test_bad_json_to_bodiless_endpoints_changes_nothing(
    ws: Workspace, client: PluginClient, body: bytes
) -> None:
    for endpoint in ("/Plugin.Activate", "/VolumeDriver.List", "/VolumeDriver.Capabilities"):
        before = ws.state()
        reply = client.call(endpoint, raw=body)
        assert reply.status in (200, 500) and reply.content_type == CONTENT_TYPE, str(reply)
        assert ws.state() == before, endpoint


NOT_OBJECTS = [b"[]", b'[{"Name": "w"}]', b'"w"', b"42", b"true", b"null"]


@pytest.mark.parametrize("body", NOT_OBJECTS)
def test_json_that_is_not_an_object_is_refused(
    ws: Workspace, client: PluginClient, body: bytes
) -> None:
    for endpoint in ENDPOINTS_WITH_BODY:
        refused(ws, client, endpoint, raw=body)


WRONG_TYPES = [
    ("/VolumeDriver.Create", {"Name": 5, "Opts": {"base": "BASE"}}),
    ("/VolumeDriver.Create", {"Name": None, "Opts": {"base": "BASE"}}),
    ("/VolumeDriver.Create", {"Name": ["n"], "Opts": {"base": "BASE"}}),
    ("/VolumeDriver.Create", {"Name": {"n": 1}, "Opts": {"base": "BASE"}}),
    ("/VolumeDriver.Create", {"Name": "n", "Opts": "base=BASE"}),
    ("/VolumeDriver.Create", {"Name": "n", "Opts": ["base", "BASE"]}),
    ("/VolumeDriver.Create", {"Name": "n", "Opts": {"base": 5}}),
    ("/VolumeDriver.Create", {"Name": "n", "Opts": {"base": None}}),
    ("/VolumeDriver.Create", {"Name": "n", "Opts": {"base": ["BASE"]}}),
    ("/VolumeDriver.Create", {"Name": "n", "Opts": {"base": "BASE", "volatile": True}}),
    ("/VolumeDriver.Get", {"Name": 5}),
    ("/VolumeDriver.Get", {"Name": None}),
    ("/VolumeDriver.Path", {"Name": True}),
    ("/VolumeDriver.Remove", {"Name": 5}),
    ("/VolumeDriver.Remove", {"Name": None}),
    ("/VolumeDriver.Remove", {"Name": ["w"]}),
    ("/VolumeDriver.Mount", {"Name": "w", "ID": None}),
    ("/VolumeDriver.Mount", {"Name": "w", "ID": 5}),
    ("/VolumeDriver.Mount", {"Name": "w", "ID": ["c2"]}),
    ("/VolumeDriver.Mount", {"Name": 5, "ID": "c2"}),
    ("/VolumeDriver.Unmount", {"Name": "v", "ID": None}),
    ("/VolumeDriver.Unmount", {"Name": "v", "ID": 1}),
    ("/VolumeDriver.Unmount", {"Name": ["v"], "ID": "c1"}),
]


@pytest.mark.parametrize(("endpoint", "body"), WRONG_TYPES, ids=range(len(WRONG_TYPES)))
def test_wrong_types_are_refused(
    ws: Workspace, client: PluginClient, endpoint: str, body: dict[str, object]
) -> None:
    body = json.loads(json.dumps(body).replace('"BASE"', json.dumps(str(ws.base))))
    refused(ws, client, endpoint, body)


MISSING_FIELDS = [
    ("/VolumeDriver.Create", {}),
    ("/VolumeDriver.Create", {"Opts": {"base": "BASE"}}),
    ("/VolumeDriver.Get", {}),
    ("/VolumeDriver.Path", {}),
    ("/VolumeDriver.Remove", {}),
    ("/VolumeDriver.Mount", {}),
    ("/VolumeDriver.Mount", {"Name": "w"}),
    ("/VolumeDriver.Mount", {"ID": "c2"}),
    ("/VolumeDriver.Unmount", {}),
    ("/VolumeDriver.Unmount", {"Name": "v"}),
    ("/VolumeDriver.Unmount", {"ID": "c1"}),
]


@pytest.mark.parametrize(("endpoint", "body"), MISSING_FIELDS, ids=range(len(MISSING_FIELDS)))
def test_missing_fields_are_refused(
    ws: Workspace, client: PluginClient, endpoint: str, body: dict[str, object]
) -> None:
    body = json.loads(json.dumps(body).replace('"BASE"', json.dumps(str(ws.base))))
    refused(ws, client, endpoint, body)


def test_empty_body_is_refused_where_a_body_is_needed(ws: Workspace, client: PluginClient) -> None:
    for endpoint in ENDPOINTS_WITH_BODY:
        refused(ws, client, endpoint, raw=b"")


@pytest.mark.parametrize(
    "endpoint",
    [
        "/VolumeDriver.Foo",
        "/",
        "/Plugin.Activate/x",
        "/volumedriver.remove",
        "/VolumeDriver.Remove/../VolumeDriver.Remove",
        "/VolumeDriver.Remove/",
        "//VolumeDriver.Remove",
    ],
)
def test_unknown_endpoint_is_refused(ws: Workspace, client: PluginClient, endpoint: str) -> None:
    refused(ws, client, endpoint, {"Name": "w"})


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH"])
def test_method_other_than_post_is_refused(
    ws: Workspace, client: PluginClient, method: str
) -> None:
    for endpoint in ["/VolumeDriver.Remove", "/Plugin.Activate"]:
        refused(ws, client, endpoint, {"Name": "w"}, method=method)


# --- names and IDs (A1, B1) --------------------------------------------------------------

BAD_NAMES = ["..", "../x", "a/b", "", ".", "n" * 300, "a\x00b", "w\x00", "w\n", "./w", "w/",
             "w/.", "../root/w", "x/../w"]  # fmt: skip
NAME_BODIES = {
    "/VolumeDriver.Create": lambda name, ws: {"Name": name, "Opts": {"base": str(ws.base)}},
    "/VolumeDriver.Get": lambda name, ws: {"Name": name},
    "/VolumeDriver.Path": lambda name, ws: {"Name": name},
    "/VolumeDriver.Remove": lambda name, ws: {"Name": name},
    "/VolumeDriver.Mount": lambda name, ws: {"Name": name, "ID": "c2"},
    "/VolumeDriver.Unmount": lambda name, ws: {"Name": name, "ID": "c1"},
}


@pytest.mark.parametrize("name", BAD_NAMES, ids=[repr(n)[:20] for n in BAD_NAMES])
def test_bad_volume_names_are_refused(ws: Workspace, client: PluginClient, name: str) -> None:
    for endpoint, body in NAME_BODIES.items():
        refused(ws, client, endpoint, body(name, ws))


BAD_IDS = ["..", "../x", "../../x", "a/b", "", ".", "i" * 300, "a\x00b", "c1\x00", "c1\n", "./c1",
           "c1/", "../activemounts/c1", "/tmp/x"]  # fmt: skip


@pytest.mark.parametrize("mount_id", BAD_IDS, ids=[repr(i)[:20] for i in BAD_IDS])
def test_b1_bad_mount_ids_are_refused(ws: Workspace, client: PluginClient, mount_id: str) -> None:
    # w is not mounted, v is mounted for c1.
    for volume in ("w", "v"):
        for endpoint in ("/VolumeDriver.Mount", "/VolumeDriver.Unmount"):
            refused(ws, client, endpoint, {"Name": volume, "ID": mount_id})


# --- malformed HTTP ----------------------------------------------------------------------

MEBI = 1 << 20


def test_oversized_content_length_is_refused_without_reading(ws: Workspace) -> None:
    started = time.monotonic()
    request = http_request("/VolumeDriver.Remove", b"")
    request = request.replace(b"Content-Length: 0", b"Content-Length: %d" % (2 * MEBI))
    data = raw_exchange(ws.socket, request)
    assert time.monotonic() - started < 3, "the daemon waited for a body it must refuse"
    (reply,) = parse_responses(data)
    assert_error_reply(reply)


def test_oversized_body_actually_sent_is_refused(ws: Workspace) -> None:
    body = b'{"Name": "w", "Pad": "' + b"p" * (2 * MEBI) + b'"}'
    data = raw_exchange(ws.socket, http_request("/VolumeDriver.Remove", body))
    (reply,) = parse_responses(data)
    assert_error_reply(reply)


def test_oversized_chunked_body_is_refused(ws: Workspace) -> None:
    head = (b"POST /VolumeDriver.Remove HTTP/1.1\r\nHost: plugin\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")  # fmt: skip
    chunk = b"p" * 65536
    body = b'{"Name": "w", "Pad": "'
    stream = b"%x\r\n%s\r\n" % (len(body), body)
    stream += (b"%x\r\n%s\r\n" % (len(chunk), chunk)) * 32 + b'2\r\n"}\r\n0\r\n\r\n'
    (reply,) = parse_responses(raw_exchange(ws.socket, head + stream))
    assert_error_reply(reply)


def test_body_just_under_the_limit_is_served(ws: Workspace, client: PluginClient) -> None:
    body = b'{"Name": "w"' + b" " * (MEBI - 100) + b"}"
    reply = client.call("/VolumeDriver.Get", raw=body)
    assert reply.status == 200 and reply.json["Volume"]["Name"] == "w", str(reply)  # type: ignore[index]


MALFORMED = {
    "garbage": b"HELLO\r\n\r\n",
    "no-version": b"POST /VolumeDriver.Remove\r\n\r\n",
    "http2-preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    "negative-length": b"POST /VolumeDriver.Remove HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
    "text-length": b"POST /VolumeDriver.Remove HTTP/1.1\r\nContent-Length: five\r\n\r\n",
    "bad-chunk": b"POST /VolumeDriver.Remove HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    "header-no-colon": b"POST /VolumeDriver.Remove HTTP/1.1\r\nJunk\r\n\r\n",
    "long-line": b"POST /" + b"a" * 20000 + b" HTTP/1.1\r\n\r\n",
    "long-header": b"POST /VolumeDriver.Remove HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n",
    "many-headers": b"POST /VolumeDriver.Remove HTTP/1.1\r\n" + b"X: y\r\n" * 500 + b"\r\n",
    "nul-bytes": b"\x00" * 100 + b"\r\n\r\n",
}


@pytest.mark.parametrize("data", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_http_is_refused(ws: Workspace, data: bytes) -> None:
    replies = parse_responses(raw_exchange(ws.socket, data, half_close=True))
    assert len(replies) == 1, replies
    assert replies[0].status >= 400, str(replies[0])


@pytest.mark.parametrize("cut", [10, 40, -5])
def test_request_cut_short_by_the_client_changes_nothing(ws: Workspace, cut: int) -> None:
    request = http_request("/VolumeDriver.Remove", b'{"Name": "w"}')
    replies = parse_responses(raw_exchange(ws.socket, request[:cut], half_close=True))
    assert len(replies) == 1, replies
    assert replies[0].status >= 400, str(replies[0])


def test_client_closing_before_reading_the_reply_is_harmless(ws: Workspace) -> None:
    for _ in range(5):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(ws.socket))
        sock.sendall(http_request("/VolumeDriver.List", b""))
        sock.close()


# --- slow and persistent clients ---------------------------------------------------------

STALLS = {
    "request-line": b"POST /VolumeDriver.Remo",
    "headers": b"POST /VolumeDriver.Remove HTTP/1.1\r\nContent-Length: 12\r\n",
    "body": b'POST /VolumeDriver.Remove HTTP/1.1\r\nContent-Length: 13\r\n\r\n{"Name"',
}


@pytest.mark.parametrize("partial", STALLS.values(), ids=STALLS.keys())
def test_stalled_client_does_not_block_others(ws: Workspace, partial: bytes) -> None:
    stalled = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(3)]
    try:
        for sock in stalled:
            sock.connect(str(ws.socket))
            sock.sendall(partial)
        time.sleep(0.1)
        answered: list[float] = []
        errors: list[BaseException] = []

        def normal_request() -> None:
            started = time.monotonic()
            try:
                PluginClient(ws.socket, timeout=5).ok("/VolumeDriver.Get", {"Name": "v"})
                answered.append(time.monotonic() - started)
            except BaseException as error:
                errors.append(error)

        threads = [threading.Thread(target=normal_request) for _ in range(20)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        assert not errors, errors
        assert len(answered) == 20
        assert max(answered) < 2.0, answered
    finally:
        for sock in stalled:
            sock.close()


def test_keep_alive_connection_carries_several_requests(
    ws: Workspace, client: PluginClient
) -> None:
    connection = client.connection()
    try:
        calls = [
            ("/Plugin.Activate", None),
            ("/VolumeDriver.Capabilities", None),
            ("/VolumeDriver.Create", {"Name": "k", "Opts": {"base": str(ws.base)}}),
            ("/VolumeDriver.Get", {"Name": "k"}),
            ("/VolumeDriver.Get", {"Name": "nope"}),  # a failure does not end the connection
            ("/VolumeDriver.Mount", {"Name": "k", "ID": "k1"}),
            ("/VolumeDriver.Path", {"Name": "k"}),
            ("/VolumeDriver.Unmount", {"Name": "k", "ID": "k1"}),
            ("/VolumeDriver.Remove", {"Name": "k"}),
            ("/VolumeDriver.List", None),
        ]
        first_socket = None
        for endpoint, body in calls:
            reply = (client.call(endpoint, connection=connection) if body is None
                     else client.call(endpoint, body, connection=connection))  # fmt: skip
            assert reply.status == (500 if body == {"Name": "nope"} else 200), (endpoint, reply)
            assert reply.headers.get("connection", "").lower() != "close", str(reply)
            first_socket = first_socket or connection.sock
            assert connection.sock is first_socket, "the connection was not kept alive"
    finally:
        connection.close()


def pipelined(*requests: tuple[str, bytes]) -> bytes:
    """The (endpoint, body) requests, one after another in one write."""
    return b"".join(http_request(endpoint, body) for endpoint, body in requests)


def test_pipelined_requests_on_one_connection_are_all_answered(ws: Workspace) -> None:
    data = pipelined(
        ("/Plugin.Activate", b""),
        ("/VolumeDriver.Get", b'{"Name": "v"}'),
        ("/VolumeDriver.Get", b'{"Name": "nope"}'),
        ("/VolumeDriver.List", b""),
    )
    replies = parse_responses(raw_exchange(ws.socket, data, half_close=True, timeout=3))
    assert [r.status for r in replies] == [200, 200, 500, 200]
    assert replies[1].json["Volume"]["Name"] == "v"  # type: ignore[index]


def test_pipelined_requests_for_workers_then_the_end_of_stream_are_all_answered(
    ws: Workspace,
) -> None:
    """Requests that go to workers (Create, Remove), pipelined, then a half-close: the
    end of the stream may be read while a worker answers; every request is answered
    before the connection ends (the loop listens on while a worker has the connection).
    Repeated: the end of the stream is read at a different moment each time."""
    data = pipelined(
        ("/VolumeDriver.Create", b"{}"),
        ("/VolumeDriver.Remove", b'{"Name": "absent"}'),
        ("/VolumeDriver.Create", b"{}"),
        ("/Plugin.Activate", b""),
    )
    for _ in range(40):
        replies = parse_responses(raw_exchange(ws.socket, data, half_close=True, timeout=3))
        assert [r.status for r in replies] == [500, 200, 500, 200]


def test_clients_gone_while_workers_answer_them_leave_the_daemon_serving(
    ws: Workspace, client: PluginClient
) -> None:
    """Clients that pipeline requests for workers and hang up without reading: a reply
    that cannot be sent hands its connection back closed, while the loop may still hold
    an event of that socket from the same wait. The hang-ups come at a different moment
    of the work each round."""
    data = http_request("/VolumeDriver.Remove", b'{"Name": "absent"}') * 3000
    for round_ in range(20):
        sockets = []
        for _ in range(10):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(str(ws.socket))
            sock.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                sock.send(data)
            sockets.append(sock)
        time.sleep(round_ / 2000)
        for sock in sockets:
            sock.close()
        client.alive()
