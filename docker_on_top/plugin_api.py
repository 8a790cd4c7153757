"""Docker's volume plugin protocol: routes `/VolumeDriver.X` to the driver's `x`, JSON in
and out. Every failure is HTTP 500 with `{"Err": ...}` (Podman looks only at the status
code), logged here, once.

It knows which requests may block (the server answers those off its event loop) and how
to undo a Mount whose reply never reached its client; it touches no socket (server.py)
and frames no HTTP (wire.py). An Unmount replies before its teardown (SPEC B11): the
driver says when the reply may go, and the teardown then runs on, after the reply.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

from .errors import InternalError, PluginError, UserError
from .wire import Request, Response

log = logging.getLogger(__name__)

CONTENT_TYPE = b"application/vnd.docker.plugins.v1.1+json"
MOUNT = "/VolumeDriver.Mount"
UNMOUNT = "/VolumeDriver.Unmount"
# Requests that may wait on a volume's lock or on the kernel; the others only read.
_MAY_BLOCK = frozenset({"/VolumeDriver.Create", "/VolumeDriver.Remove", MOUNT, UNMOUNT})
# A Get may wait too while start-up recovery has volumes left: it recovers its own first.
_GET = "/VolumeDriver.Get"
# A List too, and one of a large root reads the mount table; of a few volumes it is a
# few stats, like a Get, and the hand-over to a worker would cost more than the answer.
_LIST = "/VolumeDriver.List"
# Requests that dockerd may send with an empty body.
_EMPTY_BODY_OK = frozenset({"/Plugin.Activate", "/VolumeDriver.Capabilities", "/VolumeDriver.List"})


class Mountable(Protocol):
    """The volume information the protocol encodes."""

    @property
    def name(self) -> str: ...
    @property
    def mountpoint(self) -> str: ...
    @property
    def created_at(self) -> str: ...
    @property
    def status(self) -> Mapping[str, object]: ...


class VolumeDriver(Protocol):
    """What the protocol needs of a driver (see driver.Driver)."""

    def capabilities(self) -> str: ...
    def recovering(self) -> bool: ...
    def few_volumes(self) -> bool: ...
    def create(self, name: str, options: Mapping[str, str]) -> None: ...
    def get(self, name: str) -> Mountable: ...
    def remove(self, name: str) -> None: ...
    def path(self, name: str) -> str: ...
    def mount(self, name: str, mount_id: str) -> str: ...
    def unmount(
        self, name: str, mount_id: str, reply: Callable[[], None] | None = None
    ) -> None: ...
    def list_volumes(self) -> Sequence[Mountable]: ...


# A route's second argument replies at once (for the Unmount's teardown to follow).
Handler = Callable[[Mapping[str, object], Callable[[], None]], dict[str, object]]


class PluginAPI:
    """The protocol's endpoints over one driver; safe to call from any thread."""

    def __init__(self, driver: VolumeDriver) -> None:
        self._driver = driver
        self._routes = _routes(driver)

    def may_block(self, request: Request) -> bool:
        path = request.path
        if path in _MAY_BLOCK:
            return True
        if path == _GET:
            return self._driver.recovering()
        if path == _LIST:
            return self._driver.recovering() or not self._driver.few_volumes()
        return False

    def answer(self, request: Request, reply: Callable[[Response], None]) -> None:
        """Call `reply` once with the response. A route may reply before it ends (an
        Unmount before its teardown); what fails after that reply is only logged."""
        replied = False

        def reply_now() -> None:
            nonlocal replied
            replied = True
            reply(_OK)

        response = self._response(request, reply_now)
        if not replied:
            reply(response)

    def _response(self, request: Request, reply_now: Callable[[], None]) -> Response:
        path = request.path
        if log.isEnabledFor(logging.DEBUG):
            log.debug("request %s %s", path, request.body[:2048].decode("utf-8", "replace"))
        try:
            route = self._routes.get(path)
            if route is None:
                raise UserError(f"unknown endpoint {path}")
            if request.method != "POST":
                raise UserError(f"{path} takes POST, not {request.method}")
            return _json(200, route(_decode(path, request.body), reply_now))
        except UserError as error:
            log.info("%s refused: %s", path, error)
            return _json(500, {"Err": str(error)})
        except PluginError as error:
            log.error("%s failed: %s", path, error)
            return _json(500, {"Err": str(error)})
        except Exception as error:
            log.exception("%s failed unexpectedly", path)
            return _json(500, {"Err": str(InternalError("unexpected failure", error))})

    @staticmethod
    def refuse(reason: str) -> Response:
        """The reply to bytes that are not a request (wire.BadRequest)."""
        log.info("bad request on the socket: %s", reason)
        return _json(500, {"Err": f"bad request: {reason}"})

    def undelivered(self, request: Request, response: Response) -> None:
        """The reply to `request` did not reach its client. A Mount that succeeded is
        undone, as its Unmount would: moby sends none for a Mount that never answered,
        and a record means a user. Other requests leave nothing to undo: their client
        asks again, or finds out."""
        if request.path != MOUNT or response.status != 200:
            return
        body = _decode(MOUNT, request.body)  # it decoded once already
        name, mount_id = _string_field(body, "Name"), _string_field(body, "ID")
        log.warning(
            "the reply to the Mount of volume %s for %s did not reach its client; undoing it",
            name,
            mount_id,
        )
        try:
            self._driver.unmount(name, mount_id)
        except PluginError as error:
            log.error("volume %s: cannot undo the Mount for %s: %s", name, mount_id, error)


def _json(status: int, document: Mapping[str, object]) -> Response:
    return Response(status, json.dumps(document).encode(), CONTENT_TYPE)


_OK = _json(200, {})


def _decode(path: str, body: bytes) -> Mapping[str, object]:
    if not body.strip():
        if path in _EMPTY_BODY_OK:
            return {}
        raise UserError(f"invalid request: {path} needs a JSON body")
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError) as error:
        raise UserError(f"invalid request: the body is not JSON ({error})") from None
    except RecursionError:
        raise UserError("invalid request: the JSON body is nested too deeply") from None
    if document is None and path in _EMPTY_BODY_OK:
        return {}
    if not isinstance(document, dict):
        raise UserError("invalid request: the body must be a JSON object")
    return document


def _string_field(body: Mapping[str, object], key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str):
        raise UserError(f"invalid request: {key} must be a string")
    return value


def _options_field(body: Mapping[str, object]) -> dict[str, str]:
    options = body.get("Opts")
    if options is None:
        return {}
    if not isinstance(options, dict) or not all(isinstance(v, str) for v in options.values()):
        raise UserError("invalid request: Opts must be an object of string values")
    return options


def _volume_json(volume: Mountable) -> dict[str, object]:
    document: dict[str, object] = {"Name": volume.name}
    if volume.mountpoint:
        document["Mountpoint"] = volume.mountpoint
    if volume.created_at:
        document["CreatedAt"] = volume.created_at
    if volume.status:
        document["Status"] = volume.status
    return document


def _routes(driver: VolumeDriver) -> dict[str, Handler]:
    def create(body: Mapping[str, object], _: object) -> dict[str, object]:
        driver.create(_string_field(body, "Name"), _options_field(body))
        return {}

    def remove(body: Mapping[str, object], _: object) -> dict[str, object]:
        driver.remove(_string_field(body, "Name"))
        return {}

    def unmount(body: Mapping[str, object], reply_now: Callable[[], None]) -> dict[str, object]:
        driver.unmount(_string_field(body, "Name"), _string_field(body, "ID"), reply_now)
        return {}

    return {
        "/Plugin.Activate": lambda *_: {"Implements": ["VolumeDriver"]},
        "/VolumeDriver.Capabilities": lambda *_: {"Capabilities": {"Scope": driver.capabilities()}},
        "/VolumeDriver.Create": create,
        "/VolumeDriver.List": lambda *_: {
            "Volumes": [_volume_json(v) for v in driver.list_volumes()]
        },
        "/VolumeDriver.Get": lambda body, _: {
            "Volume": _volume_json(driver.get(_string_field(body, "Name")))
        },
        "/VolumeDriver.Remove": remove,
        "/VolumeDriver.Path": lambda body, _: {
            "Mountpoint": driver.path(_string_field(body, "Name"))
        },
        MOUNT: lambda body, _: {
            "Mountpoint": driver.mount(_string_field(body, "Name"), _string_field(body, "ID"))
        },
        UNMOUNT: unmount,
    }
