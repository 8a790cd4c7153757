"""Stuck volumes: an Unmount that never came, found and released by `doctor`."""

import re

import pytest

from ..harness.commands import wait_until
from .conftest import plugin_call

pytestmark = pytest.mark.e2e

LEAKED_ID = "f" * 64


def test_doctor_releases_a_leaked_mount_and_spares_a_volume_in_use(dot):
    base = dot.make_base()
    stuck = dot.create_volume(base, volatile="true")
    busy = dot.create_volume(dot.make_base())
    # A client that abandons a Mount (as Podman does after its 5 s timeout) never
    # sends the Unmount: the volume stays mounted with a record nobody owns.
    status, reply = plugin_call(
        dot.plugin.socket, "/VolumeDriver.Mount", {"Name": stuck, "ID": LEAKED_ID}
    )
    assert status == 200, reply
    (dot.mountpoint(stuck) / "left-behind").write_text("stale\n")
    user = dot.start("sleep 600", volumes=[(busy, "/dot")])

    dot.plugin.stop()
    dot.plugin.start()
    # The start-up check names the stuck volume in a warning that points at the fix.
    warned = f"volume {stuck}: "
    assert wait_until(
        lambda: any(
            warned in line and "doctor --fix" in line for line in dot.plugin.log().splitlines()
        ),
        10,
    ), dot.plugin.log()

    report = dot.cli("doctor", "--name", dot.driver, check=False)
    assert report.returncode == 1
    lines = report.stdout.decode().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"{stuck}: ") and "no live container" in lines[0]
    assert dot.records(stuck) == [LEAKED_ID]

    fixed = dot.cli("doctor", "--fix", "--name", dot.driver)
    assert fixed.stdout.decode().strip().endswith("[fixed]")
    dot.assert_idle(stuck)
    dot.assert_in_use(busy)
    assert (
        dot.cli("doctor", "--name", dot.driver, check=False).stdout.decode().strip()
        == "no problem found"
    )

    res = dot.run("ls /dot", volumes=[(stuck, "/dot")])
    assert res.stdout.split() == ["a", "b"]  # volatile: the stale change is gone
    dot.rm(user)
    dot.assert_idle(busy)


@pytest.mark.parametrize("plugin_mode", ["managed"])
def test_doctor_on_a_managed_plugins_root_matches_its_containers_by_name_and_tag(dot):
    """dockerd names a managed plugin's driver NAME:latest in its containers' mounts."""
    busy = dot.create_volume(dot.make_base())
    user = dot.start("sleep 600", volumes=[(busy, "/dot")])
    dot.assert_in_use(busy)
    report = dot.cli("doctor", check=False)  # no --name: the root tells which plugin
    assert report.stdout.decode().strip() == "no problem found", report
    assert f"managed plugin {dot.driver}" in report.stderr.decode()
    assert report.returncode == 0
    dot.rm(user)
    dot.assert_idle(busy)
    # Its log lines have dockerd's timestamp only.
    lines = dot.plugin.log().splitlines()
    assert lines and not any(re.match(r"\d{4}-\d\d-\d\d", line) for line in lines), lines
