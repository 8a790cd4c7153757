"""Layers and size limits under a real dockerd (SPEC B12, B13): snapshot, clone, rollback,
removal of the origin; a container writing past a volume's size limit."""

import json

import pytest

pytestmark = pytest.mark.e2e


def test_snapshot_clone_rollback_and_removal_of_the_origin(dot):
    base = dot.make_base({"a": "base"})
    golden = dot.create_volume(base)
    dot.run("echo prepared > /dot/prepared; rm /dot/a", volumes=[(golden, "/dot")])
    made = dot.cli("snapshot", f"{golden}@ready")
    assert made.stdout.decode().strip() == "ready"

    clone = dot.create_volume(opts=[f"from={golden}@ready"])
    # The origin goes on after the snapshot; the clone still shows the snapshot.
    dot.run("echo later > /dot/later", volumes=[(golden, "/dot")])
    dot.run(
        'test "$(cat /dot/prepared)" = prepared; test ! -e /dot/a; test ! -e /dot/later;'
        " echo clone > /dot/own",
        volumes=[(clone, "/dot")],
    )
    dot.run("test -e /dot/later; test ! -e /dot/own", volumes=[(golden, "/dot")])

    status = json.loads(dot.docker("volume", "inspect", clone).stdout)[0]["Status"]
    assert status["Origin"] == f"{golden}@ready"

    dot.cli("rollback", f"{golden}@ready")
    dot.run("test ! -e /dot/later; test -e /dot/prepared", volumes=[(golden, "/dot")])

    dot.docker("volume", "rm", golden)
    dot.volumes.remove(golden)
    dot.run('test "$(cat /dot/own)" = clone; test -e /dot/prepared', volumes=[(clone, "/dot")])
    assert (base / "a").read_text().strip() == "base"


def test_a_container_cannot_write_past_the_size_limit(dot):
    base = dot.make_base()
    small = dot.create_volume(base, opts=["size=16M"])
    other = dot.create_volume(base)
    res = dot.run(
        "dd if=/dev/zero of=/dot/big bs=1M count=64",
        volumes=[(small, "/dot")],
        check=False,
    )
    assert res.returncode != 0
    assert "No space left on device" in res.stderr + res.stdout
    dot.run("dd if=/dev/zero of=/dot/big bs=1M count=32", volumes=[(other, "/dot")])
    status = json.loads(dot.docker("volume", "inspect", small).stdout)[0]["Status"]
    assert status["SizeLimit"] <= 16 << 20
    assert status["Size"] > 8 << 20
    dot.run("rm /dot/big; dd if=/dev/zero of=/dot/again bs=1M count=4", volumes=[(small, "/dot")])
