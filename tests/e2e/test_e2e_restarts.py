"""Restarts under running containers: the plugin crashes, dockerd restarts."""

import json
import os
import time

import pytest

pytestmark = pytest.mark.e2e


def wait_for_host_file(path, timeout=60):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout}s"
        time.sleep(0.05)


WAIT_FOR_GO = """
i=0
while [ ! -e /ctl/go ]; do
  i=$((i+1)); [ $i -lt 600 ] || { echo 'no go signal from the test' >&2; exit 3; }
  sleep 0.1
done
"""


def write_files(first, last):
    return f"""
i={first}
while [ $i -le {last} ]; do
  echo "file $i" > /dot/f$i
  i=$((i+1))
  sleep 0.1
done
"""


def test_plugin_killed_and_restarted_while_container_writes(dot):
    base = dot.make_base()
    ctl = dot.make_dir("ctl")
    vol = dot.create_volume(base)
    upper = dot.state_dir(vol) / "upper"

    c = dot.start(
        write_files(1, 20) + WAIT_FOR_GO + write_files(21, 40) + "echo done > /dot/done\n",
        volumes=[(vol, "/dot")],
        binds=[(ctl, "/ctl")],
    )
    wait_for_host_file(upper / "f5")

    dot.plugin.kill()  # SIGKILL: no clean-up, the socket file stays
    # the container keeps writing meanwhile
    wait_for_host_file(upper / "f10")
    dot.plugin.start()  # same name, root and socket
    # A4: the volume is still mounted (busy), so the restart leaves it alone
    dot.assert_in_use(vol)

    (ctl / "go").touch()
    rc, logs = dot.wait(c)
    assert rc == 0, f"the container failed after the plugin restart (exit {rc}):\n{logs}"
    dot.rm(c)

    dot.assert_idle(vol)
    assert not dot.overlay_mounted(vol)

    expect = "".join(f"file {i}\n" for i in range(1, 41)) + "done\n"
    res = dot.run(
        "i=1; while [ $i -le 40 ]; do cat /dot/f$i; i=$((i+1)); done; cat /dot/done",
        volumes=[(vol, "/dot")],
    )
    assert res.stdout == expect, "files written by the container were lost"
    assert sorted(p.name for p in base.iterdir()) == ["a", "b"]
    dot.assert_idle(vol)


def test_dockerd_restart_keeps_volumes(dot, dockerd):
    idle = dot.create_volume(dot.make_base())
    busy = dot.create_volume(dot.make_base(), volatile="false")
    dot.run("echo kept > /dot/k\nrm /dot/a\n", volumes=[(idle, "/dot")])

    # a container that runs across the restart (dockerd stops it on shutdown)
    c = dot.start(
        "echo kept > /dot/k\ntrap 'exit 0' TERM\nwhile :; do sleep 0.1; done\n",
        volumes=[(busy, "/dot")],
        extra=["--stop-timeout", "5"],
    )
    wait_for_host_file(dot.state_dir(busy) / "upper" / "k")
    dot.assert_in_use(busy)

    dockerd.restart()  # same flags; the plugin keeps running

    out = dot.docker(
        "volume", "ls", "--filter", f"driver={dot.driver}", "--format", "{{.Name}} {{.Driver}}"
    ).stdout.split("\n")
    assert sorted(x for x in out if x) == sorted([f"{idle} {dot.driver}", f"{busy} {dot.driver}"])
    for v in (idle, busy):
        info = json.loads(dot.docker("volume", "inspect", v).stdout)[0]
        assert info["Driver"] == dot.driver

    state = dot.docker("inspect", "--format", "{{.State.Status}}", c).stdout.strip()
    assert state == "exited"
    dot.rm(c)
    dot.assert_records_truthful(busy)
    dot.assert_idle(busy)

    res = dot.run("cat /dot/k; [ ! -e /dot/a ]; cat /dot/b", volumes=[(idle, "/dot")])
    assert res.stdout == "kept\n456\n"
    res = dot.run("cat /dot/k /dot/a", volumes=[(busy, "/dot")])
    assert res.stdout == "kept\n123\n"
    dot.assert_idle(idle)
    dot.assert_idle(busy)
