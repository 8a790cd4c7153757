"""SPEC A6: what the original Go plugin's own integration tests check.

Base content everywhere: a=123, b=456.  A container checks it, deletes a,
changes b to 789, adds c=etc and checks its own changes (as in the Go tests).
"""

import time

import pytest

pytestmark = pytest.mark.e2e

CHECK_INITIAL = """
[ "$(cat /dot/a)" = 123 ]
[ "$(cat /dot/b)" = 456 ]
[ ! -e /dot/c ]
"""

MAKE_AND_CHECK_CHANGES = """
rm -f /dot/a
[ ! -e /dot/a ]
echo 789 > /dot/b
[ "$(cat /dot/b)" = 789 ]
echo etc > /dot/c
[ "$(cat /dot/c)" = etc ]
"""

CHECK_CHANGED = """
[ ! -e /dot/a ]
[ "$(cat /dot/b)" = 789 ]
[ "$(cat /dot/c)" = etc ]
"""

# Waits (at most 60s) for the host to create /ctl/go.
WAIT_FOR_GO = """
i=0
while [ ! -e /ctl/go ]; do
  i=$((i+1)); [ $i -lt 600 ] || { echo 'no go signal from the test' >&2; exit 3; }
  sleep 0.1
done
"""


def assert_base_untouched(base):
    assert sorted(p.name for p in base.iterdir()) == ["a", "b"]
    assert (base / "a").read_text() == "123\n"
    assert (base / "b").read_text() == "456\n"


# ---------------------------------------------------------------- basic use


@pytest.mark.parametrize("volatile", [False, True], ids=["regular", "volatile"])
def test_basic_usage(dot, volatile):
    base = dot.make_base()
    vol = dot.create_volume(base, volatile=str(volatile).lower())

    dot.run(CHECK_INITIAL + MAKE_AND_CHECK_CHANGES, volumes=[(vol, "/dot")])

    assert_base_untouched(base)
    dot.assert_idle(vol)

    if volatile:
        # changes are gone: the pristine base again
        res = dot.run("cat /dot/*", volumes=[(vol, "/dot")])
        assert res.stdout == "123\n456\n"
        dot.run(CHECK_INITIAL, volumes=[(vol, "/dot")])
    else:
        res = dot.run("cat /dot/*", volumes=[(vol, "/dot")])
        assert res.stdout == "789\netc\n"
        dot.run(CHECK_CHANGED, volumes=[(vol, "/dot")])
    assert_base_untouched(base)
    dot.assert_idle(vol)


# ---------------------------------------------------------------- docker cp


def test_docker_cp_keeps_volatile_volume_of_running_container(dot):
    """kolayne/docker-on-top#18, moby#47964: `docker cp` mounts and unmounts the
    volume again under the running container's mount ID."""
    base = dot.make_base()
    ctl = dot.make_dir("ctl")
    out = dot.make_dir("out")
    vol = dot.create_volume(base, volatile="true")

    first = dot.start(
        "echo 123 > /dot/mine\n"
        + WAIT_FOR_GO
        + 'ls /dot | grep -x mine\n[ "$(cat /dot/mine)" = 123 ]\n'
        '[ "$(cat /dot/second)" = was-here ]\n',
        volumes=[(vol, "/dot")],
        binds=[(ctl, "/ctl")],
    )
    # wait until the container has written its file
    for _ in range(300):
        if (dot.state_dir(vol) / "upper" / "mine").exists():
            break
        time.sleep(0.1)
    dot.assert_in_use(vol)

    dot.docker("cp", f"{first}:/dot/mine", str(out / "mine"))
    assert (out / "mine").read_text() == "123\n"
    dot.docker("cp", f"{first}:/bin/busybox", str(out / "busybox"))
    dot.assert_in_use(vol)

    # another container on the same volume: it shares the live volume
    dot.run('[ "$(cat /dot/mine)" = 123 ]\necho was-here > /dot/second\n', volumes=[(vol, "/dot")])
    dot.assert_in_use(vol)

    (ctl / "go").touch()
    rc, logs = dot.wait(first)
    assert rc == 0, f"the first container lost its volume (exit {rc}):\n{logs}"
    dot.rm(first)
    dot.assert_idle(vol)
    assert_base_untouched(base)


# ---------------------------------------------------------------- invalid input


@pytest.mark.parametrize("name", ["_x", "a*b"])
def test_invalid_name_refused(dot, name):
    base = dot.make_base()
    res = dot.create_volume(base, name=name, check=False)
    assert res.returncode != 0, f"volume name {name!r} was accepted:\n" + res.stdout
    assert res.stderr.strip()
    assert not (dot.root / name).exists()
    listed = dot.docker("volume", "ls", "-q", "--filter", f"driver={dot.driver}").stdout.split()
    assert name not in listed


@pytest.mark.parametrize("kind", ["backslash", "relative", "missing", "regular-file"])
def test_invalid_base_refused(dot, kind):
    if kind == "backslash":
        base = "\\"
    elif kind == "relative":
        base = "a/b"
    elif kind == "missing":
        base = str(dot.workdir / "does" / "not" / "exist")
    else:
        f = dot.make_dir("f") / "file"
        f.write_text("x\n")
        base = str(f)
    name = dot.new_name()
    res = dot.create_volume(base, name=name, check=False)
    assert res.returncode != 0, f"base {base!r} was accepted:\n" + res.stdout
    assert res.stderr.strip()
    assert not (dot.root / name).exists(), "a half-made volume was left behind"
    listed = dot.docker("volume", "ls", "-q", "--filter", f"driver={dot.driver}").stdout.split()
    assert name not in listed


# ---------------------------------------------------------------- state safety


class Fault:
    """One way of breaking the plugin's state, and how to undo it."""

    def before_start(self, dot, vol, base):
        pass

    def undo_before_start(self, dot, vol, base):
        pass

    def before_stop(self, dot, vol, base):
        pass

    def undo_before_stop(self, dot, vol, base):
        pass


class ImmutableActivemounts(Fault):
    """The record of the new use cannot be written."""

    def before_start(self, dot, vol, base):
        dot.chattr(dot.state_dir(vol) / "activemounts", "+i")

    def undo_before_start(self, dot, vol, base):
        dot.chattr(dot.state_dir(vol) / "activemounts", "-i")


class ImmutableRecords(Fault):
    """The record of the finished use cannot be removed or rewritten."""

    def before_stop(self, dot, vol, base):
        recs = list((dot.state_dir(vol) / "activemounts").iterdir())
        assert recs, "no record in activemounts/ while a container uses the volume"
        for r in recs:
            dot.chattr(r, "+i")

    def undo_before_stop(self, dot, vol, base):
        for r in (dot.state_dir(vol) / "activemounts").iterdir():
            dot.chattr(r, "-i")


class BusyMountpoint(Fault):
    """A host process keeps a file of the overlay open while the volume is unmounted."""

    def before_stop(self, dot, vol, base):
        with open(dot.mountpoint(vol) / "b", "rb") as f:
            self.holder = dot.spawn(["sleep", "120"], stdin=f)

    def undo_before_stop(self, dot, vol, base):
        assert self.holder.poll() is None, "the busy-maker exited too early"
        self.holder.kill()
        self.holder.wait(10)


class BaseRemoved(Fault):
    """The overlay cannot be mounted."""

    def before_start(self, dot, vol, base):
        for p in base.iterdir():
            p.unlink()
        base.rmdir()

    def undo_before_start(self, dot, vol, base):
        base.mkdir()
        (base / "a").write_text("123\n")
        (base / "b").write_text("456\n")


FAULTS = {
    "activemounts-immutable-before-start": ImmutableActivemounts,
    "records-immutable-before-stop": ImmutableRecords,
    "mountpoint-busy-while-stopping": BusyMountpoint,
    "base-removed-before-start": BaseRemoved,
}


@pytest.mark.parametrize("volatile", [False, True], ids=["regular", "volatile"])
@pytest.mark.parametrize("fault_name", list(FAULTS))
def test_state_safety(dot, fault_name, volatile):
    """After the fault is undone the volume either refuses to mount or mounts
    correctly; it never hands out an empty, unmounted folder."""
    fault = FAULTS[fault_name]()
    base = dot.make_base()
    ctl = dot.make_dir("ctl")
    vol = dot.create_volume(base, volatile=str(volatile).lower())

    fault.before_start(dot, vol, base)
    res = dot.start(
        WAIT_FOR_GO + CHECK_INITIAL + MAKE_AND_CHECK_CHANGES,
        volumes=[(vol, "/dot")],
        binds=[(ctl, "/ctl")],
        check=False,
    )
    started = res.returncode == 0
    if not started:
        assert dot.refused(res), "docker run failed for another reason:\n" + str(res)
        assert res.stderr.strip()
    fault.undo_before_start(dot, vol, base)
    dot.assert_records_truthful(vol)

    if started:
        container = res.container
        dot.assert_in_use(vol)
        fault.before_stop(dot, vol, base)
        (ctl / "go").touch()
        rc, logs = dot.wait(container)
        fault.undo_before_stop(dot, vol, base)
        assert rc == 0, f"the container did not see the volume right (exit {rc}):\n{logs}"
        dot.rm(container)
    assert_base_untouched(base)
    dot.assert_records_truthful(vol)

    # Afterwards: refused, or the right content.
    if volatile or not started:
        expected, state = CHECK_INITIAL, "the pristine base"
    else:
        expected, state = CHECK_CHANGED, "the first container's changes"
    res = dot.run(expected + MAKE_AND_CHECK_CHANGES, volumes=[(vol, "/dot")], check=False)
    if res.returncode != 0:
        assert dot.refused(res), (
            f"the volume mounted but did not show {state} "
            f"(started={started}):\n" + str(res.stdout) + str(res.stderr)
        )
    dot.assert_records_truthful(vol)
    assert_base_untouched(base)
