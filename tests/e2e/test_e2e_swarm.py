"""Swarm services that use the driver, on nodes made inside this machine.

Each node is a dockerd in a network namespace of its own (a veth on a bridge in a
"hub" namespace, on 10.213.77.0/24, which exists only in those namespaces) and a mount
namespace of its own (a slave of the host's), with its own data and exec roots, API
socket, /run/docker/plugins and instance of the plugin.  So the host's network is never
touched (swarm's docker_gwbridge and ingress live in the nodes' namespaces), and what
the plugin mounts on one node is seen by that node's dockerd only, as on real machines.

* One node: a service's task mounts a volume of the driver and writes to it; a task
  that is replaced or removed unmounts it.  Against the legacy plugin and the managed
  one (see DOT_E2E_MODE).
* Three nodes: a fresh node runs a task that needs the driver at once - the daemon
  makes dockerd register the driver when it starts (moby 32480) - and moving the
  service to another node moves its mount there.  Volumes are per node: the data
  stays behind.
"""

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from ..harness.commands import (
    T_RUN,
    T_SHORT,
    CommandError,
    apt_install,
    require_root,
    sh,
    stop_pid,
    tail,
)
from ..harness.dockerd import Dockerd
from ..harness.image import write_busybox_rootfs
from .conftest import plugin_environment, wanted_modes

pytestmark = pytest.mark.e2e

SUBNET = "10.213.77"  # the nodes' addresses, inside the namespaces made here only
ADDRESS_POOL = "10.213.128.0/17"  # swarm's own networks (ingress), in the same namespaces
# Swarm sends a node's new description (its volume drivers) at most this long after a
# change, and a task waits that long for a node that has what it needs.
NODE_UPDATE_S = 20
TASK_START_S = NODE_UPDATE_S + 40
# A task writes these into the volume: proof that it ran there, and what it saw.
TASK_SCRIPT = (
    "touch /dot/started-$HOSTNAME; ls /dot > /dot/seen-$HOSTNAME; "
    "trap 'exit 0' TERM; while :; do sleep 0.1; done"
)


def wait_for(condition, timeout, what, explain=lambda: ""):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout}s\n{explain()}")
        time.sleep(0.5)


def read_mounts(pid):
    """Mount points of the mount namespace of process `pid`."""
    with open(f"/proc/{pid}/mountinfo") as table:
        return [line.split()[4] for line in table]


class Node:
    """One dockerd with its namespaces and folders; made and cleaned up by a Lab."""

    def __init__(self, lab, index):
        self.lab = lab
        self.index = index
        self.name = f"n{index}"
        self.netns = f"{lab.prefix}-{self.name}"
        self.address = f"{SUBNET}.{index}"
        self.dir = lab.dir / self.name
        self.mntns = lab.ns_dir / self.name
        self.sock = self.dir / "docker.sock"
        self.dockerd = None
        self.plugin = None
        self.driver = None
        self.root = None  # the plugin's state root, as the host sees it

    def run_inside(self, args, log, env=None):
        """Starts `args` in this node's namespaces (nsenter execs it: same PID)."""
        nsenter = ["nsenter", f"--mount={self.mntns}", f"--net=/run/netns/{self.netns}"]
        with open(log, "ab") as out:
            return subprocess.Popen(
                [*nsenter, *map(str, args)],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )

    def docker(self, *args, check=True, timeout=T_SHORT):
        return sh(["docker", "-H", f"unix://{self.sock}", *args], check=check, timeout=timeout)

    def answers(self):
        try:
            return self.docker("info", "-f", "{{.ID}}", check=False, timeout=10).returncode == 0
        except CommandError:
            return False

    def start_dockerd(self):
        for sub in ("data", "exec"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        self.dockerd = self.run_inside(
            [
                "dockerd",
                "--iptables=false",
                "--ip6tables=false",
                "--bridge=none",
                "--data-root",
                self.dir / "data",
                "--exec-root",
                self.dir / "exec",
                "--pidfile",
                self.dir / "dockerd.pid",
                "--host",
                f"unix://{self.sock}",
            ],
            self.dir / "dockerd.log",
        )
        wait_for(
            lambda: self.dockerd.poll() is not None or self.answers(),
            60,
            f"dockerd of node {self.name} answering",
            self.explain,
        )
        assert self.dockerd.poll() is None, f"dockerd of {self.name} exited:\n{self.explain()}"
        self.docker("import", self.lab.image_tar, self.lab.image, timeout=T_RUN)

    def start_legacy_plugin(self, driver):
        """The daemon on this node's /run/docker/plugins, told where its dockerd is."""
        self.driver = driver
        self.root = self.dir / "root"
        env = plugin_environment()
        env.update(DOCKER_HOST=f"unix://{self.sock}", PYTHONUNBUFFERED="1")
        self.plugin = self.run_inside(
            [
                sys.executable,
                "-m",
                "docker_on_top",
                "serve",
                "--name",
                driver,
                "--root",
                self.root,
                "--log-level",
                "debug",
            ],
            self.dir / "plugin.log",
            env=env,
        )
        socket = self.dir / "plugins" / f"{driver}.sock"
        wait_for(
            lambda: self.plugin.poll() is not None or socket.exists(),
            30,
            f"the plugin of node {self.name} listening",
            self.explain,
        )
        assert self.plugin.poll() is None, f"the plugin of {self.name} exited:\n{self.explain()}"

    def install_managed_plugin(self, folder, name):
        self.docker("plugin", "create", name, folder, timeout=300)
        self.docker("plugin", "set", name, "LOG_LEVEL=debug")
        self.docker("plugin", "enable", name, timeout=T_RUN)
        self.driver = f"{name}:latest"
        plugin_id = self.docker("plugin", "inspect", "-f", "{{.Id}}", name).stdout.strip()
        self.root = self.dir / "data" / "plugins" / plugin_id / "propagated-mount"

    def node_id(self):
        return self.docker("info", "-f", "{{.Swarm.NodeID}}").stdout.strip()

    # ---- what the node's plugin keeps for a volume
    def records(self, vol):
        folder = self.root / vol / "activemounts"
        return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []

    def upper(self, vol):
        folder = self.root / vol / "upper"
        return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []

    def mounted(self, vol):
        return str(self.root / vol / "mountpoint") in read_mounts(self.dockerd.pid)

    def idle(self, vol):
        return (
            not self.records(vol)
            and not self.mounted(vol)
            and not (self.root / vol / "mountpoint").exists()
        )

    def explain(self):
        parts = [f"----- dockerd of {self.name}:\n{tail(self.dir / 'dockerd.log', 30)}"]
        if (self.dir / "plugin.log").exists():
            parts.append(f"----- plugin of {self.name}:\n{tail(self.dir / 'plugin.log', 40)}")
        return "\n".join(parts)


class Lab:
    """Network and mount namespaces for nodes, and everything needed to remove them."""

    def __init__(self, workdir, image_tar):
        self.prefix = f"dot-{secrets.token_hex(3)}"
        self.dir = workdir
        self.ns_dir = workdir / "ns"
        self.image_tar = image_tar
        self.image = f"dot-e2e-busybox:{secrets.token_hex(4)}"
        self.hub = f"{self.prefix}-hub"
        self.nodes = []
        self.cleanups = contextlib.ExitStack()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.cleanups.close()

    def ip(self, *args):
        sh(["ip", *args])

    def start(self):
        self.ip("netns", "add", self.hub)
        self.cleanups.callback(sh, ["ip", "netns", "del", self.hub], check=False)
        self.ip("-n", self.hub, "link", "add", "hub", "type", "bridge")
        self.ip("-n", self.hub, "link", "set", "hub", "up")
        # A persistent mount namespace is a bind mount of its nsfs file, which must not be
        # on a shared mount: the folder gets a private mount of its own.
        self.ns_dir.mkdir(parents=True)
        sh(["mount", "--bind", self.ns_dir, self.ns_dir])
        self.cleanups.callback(sh, ["umount", "-l", self.ns_dir], check=False)
        sh(["mount", "--make-private", self.ns_dir])
        Path("/run/docker/plugins").mkdir(parents=True, exist_ok=True)

    def add_node(self, index):
        node = Node(self, index)
        self.ip("netns", "add", node.netns)
        self.cleanups.callback(sh, ["ip", "netns", "del", node.netns], check=False)
        port = f"{self.prefix}{index}"[-15:]
        self.ip("-n", node.netns, "link", "set", "lo", "up")
        self.ip(
            "link", "add", port, "netns", self.hub, "type", "veth",
            "peer", "name", "eth0", "netns", node.netns,
        )  # fmt: skip
        self.ip("-n", self.hub, "link", "set", port, "master", "hub", "up")
        self.ip("-n", node.netns, "addr", "add", f"{node.address}/24", "dev", "eth0")
        self.ip("-n", node.netns, "link", "set", "eth0", "up")
        (node.dir / "plugins").mkdir(parents=True)
        node.mntns.touch()
        sh(["unshare", f"--mount={node.mntns}", "--propagation", "slave", "true"])
        self.cleanups.callback(sh, ["umount", node.mntns], check=False)
        # Its dockerd finds plugins, and keeps managed plugins' sockets, in a folder of its own.
        sh(["nsenter", f"--mount={node.mntns}", "mount", "--bind", node.dir / "plugins",
            "/run/docker/plugins"])  # fmt: skip
        self.cleanups.callback(self._stop_node, node)
        self.nodes.append(node)
        return node

    def _stop_node(self, node):
        if node.dockerd is not None and node.dockerd.poll() is None:
            node.docker("swarm", "leave", "--force", check=False, timeout=T_RUN)
            for plugin in node.docker("plugin", "ls", "-q", check=False).stdout.split():
                node.docker("plugin", "rm", "--force", plugin, check=False, timeout=T_RUN)
        if node.plugin is not None:
            stop_pid(node.plugin, 20)
        if node.dockerd is not None:
            children = Dockerd._children(node.dockerd.pid)
            if not stop_pid(node.dockerd, 60):
                for pid in children:  # the containerd it started would linger
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)

    def swarm(self, manager, workers=()):
        manager.docker(
            "swarm", "init", "--advertise-addr", manager.address,
            "--listen-addr", f"{manager.address}:2377",
            "--default-addr-pool", ADDRESS_POOL,
        )  # fmt: skip
        token = manager.docker("swarm", "join-token", "-q", "worker").stdout.strip()
        for node in workers:
            node.docker(
                "swarm", "join", "--token", token, "--advertise-addr", node.address,
                "--listen-addr", f"{node.address}:2377", f"{manager.address}:2377",
            )  # fmt: skip
        for node in (manager, *workers):
            manager.docker("node", "update", "--label-add", f"dot={node.name}", node.node_id())


@pytest.fixture(scope="module")
def lab_tools(host_tools):
    require_root()
    if not shutil.which("ip"):
        apt_install(["iproute2"], recommends=False)
    for tool in ("ip", "nsenter", "unshare", "dockerd"):
        if not shutil.which(tool):
            pytest.fail(f"the swarm tests need {tool}")
    return host_tools


@contextlib.contextmanager
def make_lab(host_tools, e2e_tmp):
    workdir = Path(tempfile.mkdtemp(prefix="swarm-", dir=e2e_tmp))
    image_tar = workdir / "image.tar"
    write_busybox_rootfs(host_tools["busybox"], image_tar)
    with Lab(workdir, image_tar) as lab:
        lab.start()
        yield lab


class Service:
    """A service with one task that mounts volume `vol` of `manager`'s driver at /dot."""

    def __init__(self, manager, vol, base, constraint=None):
        self.manager = manager
        self.name = f"svc-{secrets.token_hex(3)}"
        mount = (
            f"type=volume,source={vol},target=/dot,volume-driver={manager.driver},"
            f"volume-opt=base={base}"
        )
        args = ["--constraint", constraint] if constraint else []
        manager.docker(
            "service", "create", "--detach", "--name", self.name, "--no-resolve-image",
            "--stop-grace-period", "2s", "--mount", mount, *args,
            manager.lab.image, "sh", "-c", TASK_SCRIPT,
        )  # fmt: skip

    def tasks(self):
        out = self.manager.docker(
            "service", "ps", "--no-trunc", "--format", "{{json .}}", self.name, check=False
        ).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def explain(self):
        rows = [
            f"{t['Name']} node={t['Node'] or '-'} desired={t['DesiredState']} "
            f"state={t['CurrentState']} error={t['Error']}"
            for t in self.tasks()
        ]
        nodes = "\n".join(n.explain() for n in self.manager.lab.nodes)
        return "tasks:\n" + "\n".join(rows) + "\n" + nodes

    def remove(self):
        self.manager.docker("service", "rm", self.name, check=False)


def started(node, vol):
    return [name for name in node.upper(vol) if name.startswith("started-")]


@pytest.mark.parametrize("mode", wanted_modes("test_e2e_swarm"))
def test_one_node_service_mounts_and_its_tasks_unmount(request, lab_tools, e2e_tmp, mode):
    with make_lab(lab_tools, e2e_tmp) as lab:
        node = lab.add_node(1)
        node.start_dockerd()
        if mode == "managed":
            folder = request.getfixturevalue("managed_plugin_folder")
            node.install_managed_plugin(folder, f"{lab.prefix}-managed")
        else:
            node.start_legacy_plugin(f"{lab.prefix}-legacy")
        lab.swarm(node)
        base = lab.dir / "base"
        base.mkdir()
        (base / "a").write_text("123\n")
        vol = "data"

        service = Service(node, vol, base)
        wait_for(lambda: len(started(node, vol)) == 1, TASK_START_S, "the task", service.explain)
        assert node.records(vol) and node.mounted(vol), service.explain()
        first = started(node, vol)

        # A replaced task unmounts the volume; its successor mounts it with the changes.
        node.docker("service", "update", "--detach", "--force", service.name)
        wait_for(
            lambda: len(started(node, vol)) == 2 and len(node.records(vol)) == 1,
            TASK_START_S,
            "the replacement task, alone on the volume",
            service.explain,
        )
        [second] = set(started(node, vol)) - set(first)
        seen = (node.root / vol / "upper" / second.replace("started-", "seen-")).read_text()
        assert first[0] in seen.split(), "the new task did not see the volume's changes"
        assert node.mounted(vol)

        service.remove()
        wait_for(lambda: node.idle(vol), T_SHORT, "the volume unmounted", service.explain)
        assert sorted(p.name for p in base.iterdir()) == ["a"], "the base changed"
        info = json.loads(node.docker("volume", "inspect", vol).stdout)[0]
        assert info["Driver"] == node.driver


def test_three_nodes_fresh_node_schedulable_and_moving_moves_the_mount(lab_tools, e2e_tmp):
    with make_lab(lab_tools, e2e_tmp) as lab:
        driver = f"{lab.prefix}-legacy"
        n1, n2, n3 = (lab.add_node(i) for i in (1, 2, 3))
        for node in (n1, n2):
            node.start_dockerd()
            node.start_legacy_plugin(driver)
        # n3's plugin starts first, as at boot: it waits for its dockerd to register.
        n3.start_legacy_plugin(driver)
        n3.start_dockerd()
        lab.swarm(n1, [n2, n3])
        base = lab.dir / "base"
        base.mkdir()
        (base / "a").write_text("123\n")
        vol = "data"

        # No volume of the driver was ever used on n2: without the registration, the task
        # stays pending with "missing plugin".
        service = Service(n1, vol, base, constraint="node.labels.dot==n2")
        wait_for(lambda: started(n2, vol), TASK_START_S, "the task on n2", service.explain)
        assert n2.records(vol) and n2.mounted(vol), service.explain()
        assert not n1.upper(vol) and not n3.upper(vol)

        n1.docker(
            "service", "update", "--detach", "--constraint-rm", "node.labels.dot==n2",
            "--constraint-add", "node.labels.dot==n3", service.name,
        )  # fmt: skip
        wait_for(lambda: started(n3, vol), TASK_START_S, "the task on n3", service.explain)
        wait_for(lambda: n2.idle(vol), T_SHORT, "the volume released on n2", service.explain)
        assert n3.records(vol) and n3.mounted(vol), service.explain()
        # Volumes are per node: n3's starts from the base, n2's keeps its changes.
        [seen] = [n for n in n3.upper(vol) if n.startswith("seen-")]
        assert sorted((n3.root / vol / "upper" / seen).read_text().split()) == sorted(
            ["a", seen, *started(n3, vol)]
        ), "the task on n3 found more than the base in its new volume"
        assert len(started(n2, vol)) == 1
        assert vol in n2.docker("volume", "ls", "-q").stdout.split()

        service.remove()
        wait_for(lambda: n3.idle(vol), T_SHORT, "the volume released on n3", service.explain)
        assert sorted(p.name for p in base.iterdir()) == ["a"], "the base changed"
