"""A3: each endpoint's reply shape, content type and failure format."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest

from .conftest import CONTENT_TYPE, Daemon, PluginClient, Workspace


def test_activate_with_empty_body(client: PluginClient) -> None:
    reply = client.call("/Plugin.Activate")
    assert reply.status == 200, reply
    assert reply.content_type == CONTENT_TYPE
    assert reply.json == {"Implements": ["VolumeDriver"]}


def test_capabilities_with_empty_body_scope_local(client: PluginClient) -> None:
    reply = client.call("/VolumeDriver.Capabilities")
    assert reply.status == 200, reply
    assert reply.content_type == CONTENT_TYPE
    assert reply.json == {"Capabilities": {"Scope": "local"}}


def test_list_with_empty_body(client: PluginClient) -> None:
    reply = client.call("/VolumeDriver.List")
    assert reply.status == 200, reply
    assert reply.content_type == CONTENT_TYPE
    assert reply.json == {"Volumes": []}


@pytest.mark.parametrize("body", [b"{}", b"null"])
def test_activate_list_capabilities_accept_empty_json(client: PluginClient, body: bytes) -> None:
    for endpoint in ("/Plugin.Activate", "/VolumeDriver.List", "/VolumeDriver.Capabilities"):
        reply = client.call(endpoint, raw=body)
        assert reply.status == 200, (endpoint, reply)
        assert reply.content_type == CONTENT_TYPE


def test_success_reply_shapes_of_every_endpoint(ws: Workspace, client: PluginClient) -> None:
    mountpoint = f"{ws.root}/v/mountpoint/"
    assert client.ok("/VolumeDriver.Create", {"Name": "v", "Opts": {"base": str(ws.base)}}) == {}

    volumes = client.ok("/VolumeDriver.List")["Volumes"]
    assert isinstance(volumes, list) and len(volumes) == 1
    assert volumes[0]["Name"] == "v"

    volume = client.ok("/VolumeDriver.Get", {"Name": "v"})["Volume"]
    assert isinstance(volume, dict) and volume["Name"] == "v"
    # B5: CreatedAt is the RFC 3339 time stored at Create, in both replies.
    stored = json.loads(ws.volume("v").metadata.read_text())["CreatedAt"]
    assert volumes[0]["CreatedAt"] == volume["CreatedAt"] == stored
    created = datetime.fromisoformat(stored.replace("Z", "+00:00"))
    assert abs((datetime.now(timezone.utc) - created).total_seconds()) < 60, stored

    assert client.ok("/VolumeDriver.Path", {"Name": "v"}) == {"Mountpoint": mountpoint}
    assert client.ok("/VolumeDriver.Mount", {"Name": "v", "ID": "c1"}) == {"Mountpoint": mountpoint}
    assert client.ok("/VolumeDriver.Unmount", {"Name": "v", "ID": "c1"}) == {}
    assert client.ok("/VolumeDriver.Remove", {"Name": "v"}) == {}
    assert client.ok("/VolumeDriver.List") == {"Volumes": []}


def test_create_with_null_opts_is_a_clear_missing_base_error(
    ws: Workspace, client: PluginClient
) -> None:
    before = ws.state()
    message = client.err("/VolumeDriver.Create", {"Name": "v", "Opts": None})
    assert "base" in message
    assert ws.state() == before


def test_failures_are_http_500_with_err(ws: Workspace, client: PluginClient) -> None:
    # client.err asserts: status 500, our Content-Type, body exactly {"Err": "<non-empty>"}.
    assert "no such volume" in client.err("/VolumeDriver.Get", {"Name": "missing"})
    assert "no such volume" in client.err("/VolumeDriver.Path", {"Name": "missing"})
    assert "no such volume" in client.err("/VolumeDriver.Mount", {"Name": "missing", "ID": "c"})
    client.err("/VolumeDriver.Unmount", {"Name": "missing", "ID": "c"})
    client.err("/VolumeDriver.Create", {"Name": "v", "Opts": {}})
    client.err("/VolumeDriver.Remove", {"Name": "../x"})
    client.err("/VolumeDriver.Nope", {})
    client.err("/Plugin.Activate", method="GET")


def test_requests_with_dockerd_headers_and_with_a_json_content_type(
    ws: Workspace, client: PluginClient
) -> None:
    body = {"Name": "v", "Opts": {"base": str(ws.base)}}
    client.ok("/VolumeDriver.Create", body, headers={"Content-Type": "application/json"})
    client.ok("/VolumeDriver.Get", {"Name": "v"})  # no Content-Type, as dockerd sends


def test_every_request_is_logged_at_debug_level(ws: Workspace, daemon: Daemon) -> None:
    client = ws.client()
    client.call("/VolumeDriver.Get", {"Name": "logged-name"})
    client.call("/VolumeDriver.Capabilities")
    log = daemon.log()
    assert "DEBUG" in log
    assert "/VolumeDriver.Get" in log and "logged-name" in log
    assert "/VolumeDriver.Capabilities" in log


def test_get_and_list_never_fail_for_an_existing_volume(
    ws: Workspace, client: PluginClient
) -> None:
    """dockerd forgets a volume whose Get fails: a damaged volume is still answered for."""
    client.create("v", ws.base)
    (ws.volume("v").metadata).write_text("{ not json")
    assert client.ok("/VolumeDriver.Get", {"Name": "v"})["Volume"]["Name"] == "v"  # type: ignore[index]
    assert client.names() == ["v"]
    # Mounting it is refused, with the internal-error prefix (not the user's fault).
    message = client.err("/VolumeDriver.Mount", {"Name": "v", "ID": "c1"})
    assert message.startswith("docker-on-top internal error:")
    assert ws.volume("v").records() == {}
