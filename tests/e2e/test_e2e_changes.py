"""Seeing and managing a volume's changes after a real container made them."""

import json
import shutil

import pytest

from ..trees import apply_oci_layer, below_root, snapshot, without_times

pytestmark = pytest.mark.e2e

CHANGES = """
rm /dot/a
echo 789 > /dot/b
echo etc > /dot/c
rm -r /dot/d
mkdir /dot/d
echo y > /dot/d/y
mkdir /dot/e
ln -s c /dot/e/link
"""


def merged_view(dot, vol, workdir):
    """The volume's content as a container sees it, copied out with `docker cp`."""
    name = dot.start("sleep 600", volumes=[(vol, "/dot")])
    out = workdir / "seen"
    dot.docker("cp", f"{name}:/dot", str(out))
    dot.rm(name)
    return out


def content(tree_root):
    # docker cp does not keep owners and times exactly; names, kinds and data must agree.
    return {
        path: (node.kind, node.detail)
        for path, node in without_times(below_root(snapshot(tree_root))).items()
    }


def test_diff_export_commit_and_reset_of_what_a_container_changed(dot):
    base = dot.make_base({"a": "123", "b": "456", "d/x": "x"})
    vol = dot.create_volume(base)
    dot.run(CHANGES, volumes=[(vol, "/dot")])
    dot.assert_idle(vol)

    diff = dot.cli("diff", vol).stdout.decode().splitlines()
    assert diff == [
        "D /a",
        "C /b",
        "A /c",
        "C /d",
        "D /d/x",
        "A /d/y",
        "A /e",
        "A /e/link",
    ]

    work = dot.make_dir("changes")
    seen = merged_view(dot, vol, work)

    layer = dot.cli("export", vol).stdout
    copy = work / "copy"
    shutil.copytree(base, copy, symlinks=True)
    apply_oci_layer(layer, copy)
    assert content(copy) == content(seen)

    committed = work / "committed"
    dot.cli("commit", vol, "--into", str(committed))
    assert content(committed) == content(seen)

    dot.cli("reset", vol)
    assert dot.cli("diff", vol).stdout == b""
    res = dot.run("ls /dot; cat /dot/a /dot/d/x", volumes=[(vol, "/dot")])
    assert res.stdout.split() == ["a", "b", "d", "123", "x"]
    assert sorted(p.name for p in base.iterdir()) == ["a", "b", "d"]


def test_docker_volume_inspect_shows_the_status(dot):
    base = dot.make_base()
    vol = dot.create_volume(base, volatile="true")
    status = json.loads(dot.docker("volume", "inspect", vol).stdout)[0]["Status"]
    assert status == {"Base": str(base), "Volatile": True, "Mounted": False, "ActiveMounts": 0}

    name = dot.start("sleep 600", volumes=[(vol, "/dot")])
    status = json.loads(dot.docker("volume", "inspect", vol).stdout)[0]["Status"]
    assert (status["Mounted"], status["ActiveMounts"]) == (True, 1)
    res = dot.cli("reset", vol, check=False)
    assert res.returncode == 1
    assert b"in use" in res.stderr
    dot.rm(name)
    dot.assert_idle(vol)
