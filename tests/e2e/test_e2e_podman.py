"""The plugin under real Podman (Debian's podman 4.3), registered in containers.conf.

Podman talks to Docker volume plugins differently from dockerd: it never calls
Capabilities or List, sends the same mount ID for every container and counts the
users itself (one Mount for the first, one Unmount for the last), and gives every
call 5 s.  What Podman keeps is private to the test: its own containers.conf and
storage.conf (CONTAINERS_CONF, CONTAINERS_STORAGE_CONF) put its storage, run, lock
and network config folders under the session folder.  Two places have no setting:
containers/image's blob cache and the OCI runtime's state folder (/run/runc or
/run/crun, empty again once a container is removed); the test removes them at the
end when it made them.
"""

import contextlib
import os
import re
import shutil
import signal
import sys
import tempfile
from pathlib import Path

import pytest

from ..harness.commands import (
    T_RUN,
    apt_install,
    describe,
    require_root,
    sh,
    unmount_all_under,
    wait_until,
)
from ..harness.image import write_busybox_rootfs
from .conftest import PLUGIN_DIR, DotE2E, Plugin, log_dir, release_workdir

pytestmark = pytest.mark.e2e

BLOB_CACHE = Path("/var/lib/containers/cache/blob-info-cache-v1.boltdb")
# Folders podman makes outside its configured ones, parents first.
OUTSIDE = [BLOB_CACHE.parent.parent, BLOB_CACHE.parent, Path("/run/runc"), Path("/run/crun")]


class Podman:
    """The podman CLI on a private configuration and store."""

    def __init__(self, home: Path, driver: str):
        self.home = home
        self.driver = driver
        conf = home / "containers.conf"
        storage_conf = home / "storage.conf"
        socket_path = Path(PLUGIN_DIR) / f"{driver}.sock"
        # No CAP_SYS_RESOURCE in some sandboxes: podman's default ulimits cannot be set.
        conf.write_text(
            f"""\
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]

[engine]
tmp_dir = "{home}/tmp"
lock_type = "file"
events_logger = "none"
cgroup_manager = "cgroupfs"

[engine.volume_plugins]
{driver} = "{socket_path}"

[network]
network_config_dir = "{home}/net"
"""
        )
        storage_conf.write_text(
            f"""\
[storage]
driver = "overlay"
graphroot = "{home}/graph"
runroot = "{home}/run"
"""
        )
        self.env = dict(
            os.environ, CONTAINERS_CONF=str(conf), CONTAINERS_STORAGE_CONF=str(storage_conf)
        )

    def __call__(self, *args, timeout=T_RUN, check=True):
        return sh(["podman", *args], timeout=timeout, check=check, env=self.env)


@pytest.fixture(scope="module")
def podman(host_tools, e2e_tmp, driver_name):
    """Podman with a private store and a busybox image made with `podman import`."""
    require_root()
    if not shutil.which("podman"):
        # Without recommends: no slirp4netns, fuse-overlayfs or buildah are needed here.
        apt_install(["podman"], recommends=False)
    if not shutil.which("podman"):
        pytest.fail("no podman even after installing Debian's podman package")
    cache_was_there = BLOB_CACHE.exists()
    made_dirs = [d for d in OUTSIDE if not d.exists()]
    home = Path(tempfile.mkdtemp(prefix="podman-", dir=e2e_tmp))
    p = Podman(home, driver_name)
    try:
        tar_path = home / "rootfs.tar"
        write_busybox_rootfs(host_tools["busybox"], tar_path)
        p.image = "localhost/dot-e2e-busybox:latest"
        p("import", tar_path, p.image, timeout=120)
        tar_path.unlink()
        yield p
    finally:
        notes = []
        for args in (("rm", "--all", "--force"), ("rmi", "--all", "--force")):
            res = p(*args, check=False)
            if res.returncode != 0:
                notes.append(f"podman {' '.join(args)} failed:\n{describe(res)}")
        left = unmount_all_under(home)
        if left:
            notes.append(f"could not unmount {[m['mountpoint'] for m in left]}")
        shutil.rmtree(home, ignore_errors=True)
        if not cache_was_there:
            with contextlib.suppress(FileNotFoundError):
                BLOB_CACHE.unlink()
        for d in reversed(made_dirs):
            with contextlib.suppress(OSError):  # only when empty
                d.rmdir()
        for n in notes:
            sys.stderr.write(f"podman teardown note: {n}\n")


class PodmanE2E(DotE2E):
    """DotE2E's helpers with the podman CLI in place of docker's (same commands and flags)."""

    def __init__(self, plugin, podman, workdir):
        super().__init__(plugin, podman.image, workdir, dockerd=None)
        self.podman = podman

    def docker(self, *args, timeout=T_RUN, check=True, input=None):
        assert input is None
        return self.podman(*args, timeout=timeout, check=check)

    def cleanup(self):
        notes = []
        for c in self.containers:
            r = self.podman("rm", "--force", "--volumes", c, check=False)
            if r.returncode != 0 and "no such container" not in r.stderr.lower():
                notes.append(f"could not remove container {c}: {r.stderr.strip()}")
        for v in self.volumes:
            r = self.podman("volume", "rm", "--force", v, check=False)
            if r.returncode != 0 and "no such volume" not in r.stderr.lower():
                notes.append(f"`podman volume rm {v}` failed at teardown: {r.stderr.strip()}")
        return notes


@pytest.fixture
def pm(request, podman, e2e_tmp, driver_name):
    """The plugin (no dockerd involved) with a fresh state root, and podman helpers."""
    sanitized = re.sub(r"[^A-Za-z0-9_.-]+", "-", request.node.name)[:60]
    workdir = Path(tempfile.mkdtemp(prefix=sanitized + "-", dir=e2e_tmp))
    plugin = Plugin(
        driver_name,
        workdir / "root",
        Path(PLUGIN_DIR) / f"{driver_name}.sock",
        log_dir(e2e_tmp) / f"{workdir.name}.plugin.log",
    )
    h = PodmanE2E(plugin, podman, workdir)
    notes = []
    try:
        plugin.start()
        yield h
    finally:
        try:
            notes += h.cleanup()
        finally:
            notes += release_workdir(plugin, workdir)
        failed = getattr(getattr(request.node, "dot_rep_call", None), "failed", False)
        if failed or notes or plugin.problems:
            sys.stderr.write(f"\n===== plugin log ({plugin.log_path}) =====\n{plugin.log()}\n")
        for n in notes:
            sys.stderr.write(f"teardown note: {n}\n")
        if plugin.problems:
            pytest.fail("; ".join(plugin.problems), pytrace=False)


def remove_volume(pm, vol):
    pm.docker("volume", "rm", vol)
    pm.volumes.remove(vol)
    assert not pm.state_dir(vol).exists(), "`podman volume rm` left the volume's state"
    assert vol not in pm.docker("volume", "ls", "--quiet").stdout.split()


def test_a_volume_keeps_its_changes_from_one_container_to_the_next(pm):
    base = pm.make_base()
    vol = pm.create_volume(base)
    assert pm.metadata(vol)["BaseDirPath"] == str(base)
    driver = pm.docker("volume", "inspect", "--format", "{{.Driver}}", vol).stdout.strip()
    assert driver == pm.driver

    res = pm.run(
        "cat /dot/a /dot/b; rm /dot/a; echo 789 > /dot/b; echo new > /dot/c; ls /dot",
        volumes=[(vol, "/dot")],
    )
    assert res.stdout == "123\n456\nb\nc\n"
    pm.assert_idle(vol)  # Podman sent the Unmount when the container left

    res = pm.run("ls /dot; cat /dot/b /dot/c", volumes=[(vol, "/dot")])
    assert res.stdout == "b\nc\n789\nnew\n", "the second container did not see the changes"
    pm.assert_idle(vol)
    assert sorted(p.name for p in base.iterdir()) == ["a", "b"], "the base was changed"
    assert (base / "b").read_text() == "456\n"

    remove_volume(pm, vol)


def test_a_volatile_volume_discards_its_changes(pm):
    base = pm.make_base()
    vol = pm.create_volume(base, volatile="true")
    pm.run("rm /dot/a; echo 789 > /dot/b; echo new > /dot/c", volumes=[(vol, "/dot")])
    pm.assert_idle(vol)
    res = pm.run("ls /dot; cat /dot/a /dot/b", volumes=[(vol, "/dot")])
    assert res.stdout == "a\nb\n123\n456\n", "the volatile volume kept its changes"
    remove_volume(pm, vol)


def test_two_containers_at_once_share_the_volume_until_the_last_leaves(pm):
    vol = pm.create_volume(pm.make_base())
    ctl = pm.make_dir("ctl")
    first = pm.start(
        "echo first > /dot/first; "
        "i=0; while [ ! -e /ctl/go ]; do i=$((i+1)); [ $i -lt 600 ]; sleep 0.1; done; "
        "cat /dot/second",
        volumes=[(vol, "/dot")],
        binds=[(ctl, "/ctl")],
    )
    assert wait_until((pm.state_dir(vol) / "upper" / "first").exists, 60), pm.wait(first)
    res = pm.run("cat /dot/first; echo second > /dot/second", volumes=[(vol, "/dot")])
    assert res.stdout == "first\n"
    # Podman counts the users itself: one Mount for both, so one record (the README says so).
    assert len(pm.records(vol)) == 1, pm.records(vol)
    # The second container left; the first still uses the volume: it stays mounted.
    pm.assert_in_use(vol)
    (ctl / "go").touch()
    rc, logs = pm.wait(first)
    assert (rc, logs) == (0, "second\n")
    pm.rm(first)
    pm.assert_idle(vol)


def test_a_user_mistake_reaches_the_podman_user(pm):
    res = pm.create_volume(pm.make_dir("x") / "missing", check=False)
    assert res.returncode != 0
    assert "the base directory does not exist" in res.stderr, describe(res)
    res = pm.create_volume(pm.make_base(), opts=["colour=blue"], check=False)
    assert res.returncode != 0
    assert "invalid option 'colour'" in res.stderr, describe(res)


def test_the_plugin_stopping_leaves_podman_volumes_usable_after_restart(pm):
    base = pm.make_base()
    vol = pm.create_volume(base)
    pm.run("echo kept > /dot/c", volumes=[(vol, "/dot")])
    pm.plugin.proc.send_signal(signal.SIGTERM)
    assert pm.plugin.proc.wait(20) in (0, -signal.SIGTERM)
    pm.plugin.start()
    res = pm.run("cat /dot/c", volumes=[(vol, "/dot")])
    assert res.stdout == "kept\n"
    remove_volume(pm, vol)
