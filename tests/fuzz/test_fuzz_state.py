"""A state machine: valid Creates, Mounts, Unmounts and Removes mixed with fuzzed requests.

A model follows every request the daemon accepts (HTTP 200); after each step the state
root must match it exactly (volumes, records and counts, each volume mounted exactly
while in use), and the properties of FuzzTarget.check hold. A refused request (500)
must change nothing; an accepted one exactly what it says.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from ..protocol.conftest import http_request
from .conftest import FuzzTarget, check_reply, fuzz_settings, fuzz_target
from .strategies import EXISTING_IDS, json_requests, near_valid_requests

# The names and IDs the fuzz strategies favour too, so fuzzed requests hit the model.
NAMES = st.sampled_from(["v", "w", "m1"])
IDS = st.sampled_from(EXISTING_IDS)
CHANGING = {"/VolumeDriver.Create", "/VolumeDriver.Mount", "/VolumeDriver.Unmount",
            "/VolumeDriver.Remove"}  # fmt: skip


class ProtocolModel(RuleBasedStateMachine):
    target: FuzzTarget

    def __init__(self) -> None:
        super().__init__()
        client = self.target.client
        for name in client.names():
            client.remove(name)
        self.volumes: dict[str, Counter[str]] = {}

    def call(self, endpoint: str, body: object) -> tuple[int, dict[str, object]]:
        reply = self.target.client.call(endpoint, body)
        check_reply(reply)
        return reply.status, reply.json  # type: ignore[return-value]

    # --- valid requests ---------------------------------------------------------------

    @rule(name=NAMES, volatile=st.booleans())
    def create(self, name: str, volatile: bool) -> None:
        options = {"base": str(self.target.ws.base), "volatile": str(volatile).lower()}
        status, document = self.call("/VolumeDriver.Create", {"Name": name, "Opts": options})
        if name in self.volumes:
            assert status == 500 and "exists" in str(document["Err"]), document
        else:
            assert status == 200, document
            self.volumes[name] = Counter()

    @rule(name=NAMES, mount_id=IDS)
    def mount(self, name: str, mount_id: str) -> None:
        status, document = self.call("/VolumeDriver.Mount", {"Name": name, "ID": mount_id})
        if name in self.volumes:
            assert status == 200, document
            assert document == {"Mountpoint": f"{self.target.ws.volume(name).mountpoint}/"}
            self.volumes[name][mount_id] += 1
        else:
            assert status == 500, document

    @precondition(lambda self: any(self.volumes.values()))
    @rule(data=st.data())
    def unmount_what_is_held(self, data: st.DataObject) -> None:
        held = sorted((n, i) for n, ids in self.volumes.items() for i in ids)
        name, mount_id = data.draw(st.sampled_from(held))
        status, document = self.call("/VolumeDriver.Unmount", {"Name": name, "ID": mount_id})
        assert status == 200, document
        self.release(name, mount_id)

    @rule(name=NAMES, mount_id=IDS)
    def unmount_anything(self, name: str, mount_id: str) -> None:
        """Also what is not held: a missing record counts as one use (SPEC A3)."""
        status, document = self.call("/VolumeDriver.Unmount", {"Name": name, "ID": mount_id})
        if name in self.volumes:
            assert status == 200, document
            self.release(name, mount_id)
        else:
            assert status == 500, document

    @rule(name=NAMES)
    def remove(self, name: str) -> None:
        status, document = self.call("/VolumeDriver.Remove", {"Name": name})
        assert status == 200, document
        self.volumes.pop(name, None)

    @rule(name=NAMES)
    def get(self, name: str) -> None:
        status, document = self.call("/VolumeDriver.Get", {"Name": name})
        if name not in self.volumes:
            assert status == 500, document
            return
        assert status == 200, document
        volume = document["Volume"]
        uses = sum(self.volumes[name].values())
        assert volume["Status"]["ActiveMounts"] == uses, (self.volumes, document)  # type: ignore[index]
        assert volume["Status"]["Mounted"] is (uses > 0), (self.volumes, document)  # type: ignore[index]

    # --- fuzzed requests --------------------------------------------------------------

    @rule(request=json_requests())
    def fuzzed(self, request: tuple[str, bytes]) -> None:
        self.follow(*request)

    @rule(request=near_valid_requests())
    def near_valid(self, request: tuple[str, bytes]) -> None:
        self.follow(*request)

    def follow(self, endpoint: str, raw: bytes) -> None:
        """Send one request; when accepted, apply to the model what it says."""
        body = self.target.resolve(raw)
        exchange = self.target.send(http_request(endpoint, body))
        assert exchange.closed_by_daemon
        for reply in exchange.replies:
            check_reply(reply)
        if not exchange.replies or exchange.replies[0].status != 200 or endpoint not in CHANGING:
            return
        # Accepted: it must have been a valid request, and does what it says.
        document = json.loads(body)
        name = document["Name"]
        if endpoint == "/VolumeDriver.Create":
            assert name not in self.volumes, f"created {name!r} twice"
            self.volumes[name] = Counter()
        elif endpoint == "/VolumeDriver.Remove":
            self.volumes.pop(name, None)
        elif endpoint == "/VolumeDriver.Mount":
            assert name in self.volumes, f"mounted {name!r}, which does not exist"
            self.volumes[name][document["ID"]] += 1
        else:
            assert name in self.volumes, f"unmounted {name!r}, which does not exist"
            self.release(name, document["ID"])

    def release(self, name: str, mount_id: str) -> None:
        records = self.volumes[name]
        if records[mount_id] > 1:
            records[mount_id] -= 1
        else:
            records.pop(mount_id, None)

    @invariant()
    def state_matches_the_model(self) -> None:
        records = self.target.check()
        expected = {name: dict(ids) for name, ids in self.volumes.items()}
        assert records == expected, f"state {records}, model {expected}"


@pytest.fixture(scope="module")
def target() -> Iterator[FuzzTarget]:
    with fuzz_target() as fuzz:
        yield fuzz


def test_state_follows_exactly_the_requests_the_daemon_accepts(target: FuzzTarget) -> None:
    ProtocolModel.target = target
    run_state_machine_as_test(  # type: ignore[no-untyped-call]
        ProtocolModel, settings=fuzz_settings(40, stateful_step_count=40)
    )
