"""The protocol's routes without a socket: requests in, responses out, on a real driver
(real overlay mounts under a temporary root)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from docker_on_top.driver import _STAT_EACH_UP_TO, Driver
from docker_on_top.plugin_api import CONTENT_TYPE, PluginAPI
from docker_on_top.wire import Request, Response

from ..mounts import mounts_under


def answer(api: PluginAPI, request: Request) -> Response:
    """The one response `answer` replies with, once it has returned."""
    replies: list[Response] = []
    api.answer(request, replies.append)
    assert len(replies) == 1, replies
    return replies[0]


def call(api: PluginAPI, path: str, body: object = None, method: str = "POST") -> Response:
    raw = b"" if body is None else json.dumps(body).encode()
    return answer(api, Request(method, path, raw, keep_alive=True))


def document(response: Response) -> object:
    assert response.content_type == CONTENT_TYPE
    return json.loads(response.body)


@pytest.fixture
def api(driver: Driver) -> PluginAPI:
    return PluginAPI(driver)


def test_each_endpoint_maps_to_the_driver(api: PluginAPI, root: Path, base: Path) -> None:
    assert document(call(api, "/Plugin.Activate")) == {"Implements": ["VolumeDriver"]}
    assert document(call(api, "/VolumeDriver.Capabilities")) == {"Capabilities": {"Scope": "local"}}
    for name in ("v", "w"):
        created = call(api, "/VolumeDriver.Create", {"Name": name, "Opts": {"base": str(base)}})
        assert created.status == 200 and document(created) == {}
    mountpoint = f"{root}/v/mountpoint/"
    assert document(call(api, "/VolumeDriver.Mount", {"Name": "v", "ID": "c1"})) == {
        "Mountpoint": mountpoint
    }
    assert document(call(api, "/VolumeDriver.Path", {"Name": "v"})) == {"Mountpoint": mountpoint}
    volume = document(call(api, "/VolumeDriver.Get", {"Name": "v"}))
    assert volume["Volume"]["Name"] == "v"  # type: ignore[index]
    listed = document(call(api, "/VolumeDriver.List"))
    assert sorted(v["Name"] for v in listed["Volumes"]) == ["v", "w"]  # type: ignore[index]
    assert document(call(api, "/VolumeDriver.Unmount", {"Name": "v", "ID": "c1"})) == {}
    assert document(call(api, "/VolumeDriver.Remove", {"Name": "w"})) == {}
    assert mounts_under(root) == []


@pytest.mark.parametrize(
    ("path", "body", "method", "message"),
    [
        ("/VolumeDriver.Nope", {}, "POST", "unknown endpoint /VolumeDriver.Nope"),
        ("/VolumeDriver.Get", {"Name": "v"}, "GET", "takes POST, not GET"),
        ("/VolumeDriver.Get", None, "POST", "needs a JSON body"),
        ("/VolumeDriver.Get", ["v"], "POST", "must be a JSON object"),
        ("/VolumeDriver.Get", {"Name": 1}, "POST", "Name must be a string"),
        ("/VolumeDriver.Get", {"Name": "nothing"}, "POST", "no such volume"),
        ("/VolumeDriver.Create", {"Name": "v", "Opts": {"base": 1}}, "POST", "Opts must be"),
    ],
)
def test_every_failure_is_500_with_err(
    api: PluginAPI, path: str, body: object, method: str, message: str
) -> None:
    response = call(api, path, body, method)
    assert response.status == 500
    error = document(response)
    assert isinstance(error, dict) and set(error) == {"Err"} and message in error["Err"], error


def test_bad_framing_is_refused_as_500_with_err(api: PluginAPI) -> None:
    response = api.refuse("malformed request line")
    assert response.status == 500
    assert document(response) == {"Err": "bad request: malformed request line"}


def test_an_undelivered_mount_is_undone_and_nothing_else(
    api: PluginAPI, driver: Driver, root: Path, base: Path
) -> None:
    call(api, "/VolumeDriver.Create", {"Name": "v", "Opts": {"base": str(base)}})
    first = Request("POST", "/VolumeDriver.Mount", b'{"Name": "v", "ID": "c1"}', True)
    again = Request("POST", "/VolumeDriver.Mount", b'{"Name": "v", "ID": "c2"}', True)
    kept, undone = answer(api, first), answer(api, again)
    assert kept.status == undone.status == 200
    api.undelivered(again, undone)
    assert [r.name for r in (root / "v" / "activemounts").iterdir()] == ["c1"]
    assert len(mounts_under(root)) == 1
    # A failed Mount and any other request leave nothing to undo.
    failed = Request("POST", "/VolumeDriver.Mount", b'{"Name": "nothing", "ID": "c1"}', True)
    api.undelivered(failed, answer(api, failed))
    unmount = Request("POST", "/VolumeDriver.Unmount", b'{"Name": "v", "ID": "c1"}', True)
    api.undelivered(unmount, answer(api, unmount))
    assert list((root / "v" / "activemounts").iterdir()) == []
    assert mounts_under(root) == []


def test_a_list_of_a_few_volumes_is_answered_on_the_loop_and_of_many_on_a_worker(
    api: PluginAPI, driver: Driver, base: Path
) -> None:
    listing = Request("POST", "/VolumeDriver.List", b"", True)
    for blocking in ("Create", "Remove", "Mount", "Unmount"):
        assert api.may_block(Request("POST", f"/VolumeDriver.{blocking}", b"{}", True))
    assert not api.may_block(Request("POST", "/VolumeDriver.Get", b"{}", True))
    for count in range(1, _STAT_EACH_UP_TO + 1):
        call(api, "/VolumeDriver.Create", {"Name": f"v{count}", "Opts": {"base": str(base)}})
    assert not api.may_block(listing)
    call(api, "/VolumeDriver.Create", {"Name": "one-more", "Opts": {"base": str(base)}})
    assert api.may_block(listing)  # the mount table then, which may be long
    document_ = document(call(api, "/VolumeDriver.List"))
    assert isinstance(document_, dict) and len(document_["Volumes"]) == _STAT_EACH_UP_TO + 1
