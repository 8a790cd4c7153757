"""End-to-end fixtures: the plugin under a real dockerd of the tests' own.

Run: ``python3 -m pytest tests/e2e -m e2e`` as root.  The machinery they share with
the Podman, socket-activation and Swarm modules (commands with timeouts, the private
dockerd, the busybox image) is in tests/harness/; the fixtures are here.

Environment knobs (all optional):

* ``DOT_E2E_TMPDIR``: where the session folder goes (default /var/tmp; it must be
  a disk filesystem that supports chattr and overlayfs upper dirs, not tmpfs).
* ``DOT_E2E_LOG_DIR``: keep the plugin logs (one per test) and dockerd's log
  there instead of deleting them with the session folder.
* ``DOT_E2E_DOCKERD_ARGS``: extra flags for the harness's dockerd.
* ``DOT_E2E_SOURCE``: run the plugin from another checkout (default: this repo).
* ``DOT_E2E_MODE``: ``legacy`` or ``managed`` runs the ``dot`` tests against
  that kind of plugin only.  Unset (as in CI), every ``dot`` test runs against
  the legacy plugin, and those of ``MANAGED_MODULES`` against the managed one
  as well (their test IDs end in ``legacy``/``managed``).

What the fixtures do:

* ``host_tools`` (session): makes sure ``docker``/``dockerd``, a *static*
  busybox and ``chattr`` exist, installing ``docker.io``, ``busybox-static``
  and ``e2fsprogs`` with apt-get only when something is missing.
* ``dockerd`` (session): always a dockerd of the tests' own, beside any other
  that runs on the host and never touching it: its own data root, exec root,
  socket, pid file, config file and containerd namespaces; the session's
  ``DOCKER_HOST`` points at it, so every ``docker`` call, plugin and command of
  the tests talks to it.  It is stopped by its PID at the end.  Extra flags can
  be given in ``DOT_E2E_DOCKERD_ARGS``.
* ``image`` (session): a tiny busybox image made with ``docker import``.
* ``dot`` (function): starts ``python -m docker_on_top serve`` under a
  private driver name with a private state root, and hands the test a
  ``DotE2E`` object with helpers.  At teardown it removes every container and
  volume the test made, stops the plugin by PID, unmounts what is left under
  its root and deletes its folders - also when the test failed.  It builds the
  plugin with the ``plugin_class`` fixture (default ``Plugin``), which a test
  module may override to run the plugin another way.
* ``managed_plugin`` (session): for the managed runs, builds the managed
  plugin with ``packaging/plugin/build.py`` (its rootfs is cached outside the
  repo), ``docker plugin create``s it under a private name with
  ``LOG_LEVEL=debug``, and removes it at the end.  ``ManagedPlugin`` enables it
  for each test on an emptied state root (its propagated mount) and disables it
  after; its log is read from dockerd's.

Everything here talks to docker through the ``docker`` CLI (subprocess, with
a timeout on every call), to the session's dockerd through ``DOCKER_HOST``.  Nothing
is ever stopped by name: only processes this harness started, by their PID.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
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
    describe,
    mounts_at,
    require_root,
    sh,
    stop_pid,
    tail,
    unmount_all_under,
    wait_until,
)
from ..harness.dockerd import Dockerd
from ..harness.image import find_static_busybox, write_busybox_rootfs

E2E_DIR = Path(__file__).resolve().parent
REPO_ROOT = E2E_DIR.parents[1]
# Where the plugin's `docker_on_top` package is taken from (default: this repo).
PLUGIN_SOURCE = Path(os.environ.get("DOT_E2E_SOURCE") or REPO_ROOT).resolve()
PLUGIN_DIR = "/run/docker/plugins"
MODES = ("legacy", "managed")
# The modules whose ``dot`` tests run against the managed plugin as well: the core
# scenarios (SPEC A6, docker cp, the volume commands) and the single-node swarm.
MANAGED_MODULES = frozenset({"test_e2e_original", "test_e2e_docker", "test_e2e_swarm"})

# Every docker call gets a timeout.  dockerd itself gives a plugin 2 minutes
# for Create and Mount, so a container start may legitimately take that long.


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "e2e: end-to-end test against a real dockerd (needs root; starts dockerd when none runs)",
    )


def wanted_modes(module):
    """The kinds of plugin the `dot` tests of `module` run against (DOT_E2E_MODE)."""
    wanted = os.environ.get("DOT_E2E_MODE", "")
    if wanted not in ("", *MODES):
        raise pytest.UsageError(f"DOT_E2E_MODE={wanted!r}: use one of {', '.join(MODES)}")
    if module not in MANAGED_MODULES:
        return () if wanted == "managed" else ("legacy",)
    return (wanted,) if wanted else MODES


def pytest_generate_tests(metafunc):
    if "dot" not in metafunc.fixturenames:
        return
    modes = wanted_modes(metafunc.module.__name__.rpartition(".")[2])
    if modes != ("legacy",):
        metafunc.parametrize("plugin_mode", modes)


def pytest_collection_modifyitems(config, items):
    # DOT_E2E_MODE=managed: a `dot` test that cannot run managed is not run at all.
    keep, drop = [], []
    for item in items:
        module = item.module.__name__.rpartition(".")[2]
        unwanted = "dot" in getattr(item, "fixturenames", ()) and not wanted_modes(module)
        (drop if unwanted else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
    # The managed runs go first among these tests: once a legacy plugin of the session has
    # run and stopped, dockerd retries its dead socket for ~15 s in every `docker volume
    # ls`, and for every volume name it does not know.
    here = [i for i, item in enumerate(keep) if item.path.is_relative_to(E2E_DIR)]
    ordered = sorted((keep[i] for i in here), key=lambda item: _mode_of(item) != "managed")
    for i, item in zip(here, ordered):
        keep[i] = item
    items[:] = keep


def _mode_of(item):
    callspec = getattr(item, "callspec", None)
    return callspec.params.get("plugin_mode") if callspec else None


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    # Lets fixtures know at teardown whether the test failed (to print logs).
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "dot_rep_" + rep.when, rep)


# --------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------


def release_workdir(plugin, workdir):
    """Stop the plugin, unmount and delete its folder; notes for what could not be."""
    plugin.stop()
    notes = []
    left = unmount_all_under(workdir)
    if left:
        notes.append(f"could not unmount {[m['mountpoint'] for m in left]}")
    sh(["chattr", "-R", "-i", workdir], check=False, timeout=60)
    shutil.rmtree(workdir, ignore_errors=True)
    return notes


# --------------------------------------------------------------------------
# session fixtures
# --------------------------------------------------------------------------


def log_dir(e2e_tmp):
    d = Path(os.environ.get("DOT_E2E_LOG_DIR") or e2e_tmp / "logs")
    d.mkdir(parents=True, exist_ok=True)
    return d


@pytest.fixture(scope="session")
def e2e_tmp():
    """Session folder on a disk filesystem (chattr and overlay upper dirs need one)."""
    require_root()
    parent = os.environ.get("DOT_E2E_TMPDIR", "/var/tmp")
    path = Path(tempfile.mkdtemp(prefix="dot-e2e-", dir=parent)).resolve()
    yield path
    unmount_all_under(path)
    sh(["chattr", "-R", "-i", path], check=False, timeout=60)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def host_tools():
    """Installs the Debian packages the tests need, only when something is missing."""
    require_root()
    need = []
    if not shutil.which("docker") or not shutil.which("dockerd"):
        need.append("docker.io")
    if not find_static_busybox():
        need.append("busybox-static")
    if not shutil.which("chattr"):
        need.append("e2fsprogs")
    if need:
        # with recommends: docker.io needs apparmor (on AppArmor kernels) and cgroupfs-mount
        apt_install(need)
    bb = find_static_busybox()
    if not bb:
        pytest.fail("no statically linked busybox found even after installing busybox-static")
    return {"busybox": bb, "installed": need}


@pytest.fixture(scope="session")
def dockerd(host_tools, e2e_tmp):
    folder = e2e_tmp / "dockerd"
    folder.mkdir()
    d = Dockerd(folder, log_dir(e2e_tmp))
    previous = os.environ.get("DOCKER_HOST")
    os.environ["DOCKER_HOST"] = d.host
    try:
        d.start()
        yield d
    finally:
        d.stop()
        d.remove()
        if previous is None:
            del os.environ["DOCKER_HOST"]
        else:
            os.environ["DOCKER_HOST"] = previous


@pytest.fixture(scope="session")
def image(dockerd, host_tools, e2e_tmp):
    """A busybox-only image made with `docker import`; removed at the end."""
    tar_path = e2e_tmp / "image.tar"
    write_busybox_rootfs(host_tools["busybox"], tar_path)
    tag = f"dot-e2e-busybox:{secrets.token_hex(4)}"
    sh(["docker", "import", tar_path, tag], timeout=120)
    tar_path.unlink()
    try:
        yield tag
    finally:
        sh(["docker", "rmi", "-f", tag], check=False, timeout=T_SHORT)


# --------------------------------------------------------------------------
# the plugin
# --------------------------------------------------------------------------


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path, timeout):
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self._path)
        self.sock = s


def plugin_call(sock_path, endpoint, body=None, timeout=10):
    """One request the way dockerd makes it. Returns (status, parsed JSON body)."""
    conn = _UnixHTTPConnection(str(sock_path), timeout)
    try:
        data = json.dumps(body if body is not None else {}).encode()
        conn.request(
            "POST",
            endpoint,
            body=data,
            headers={
                "Accept": "application/vnd.docker.plugins.v1.2+json",
                "Content-Type": "application/json",
            },
        )
        resp = conn.getresponse()
        raw = resp.read()
        try:
            return resp.status, json.loads(raw or b"null")
        except ValueError:
            return resp.status, raw
    finally:
        conn.close()


def plugin_environment():
    """The environment that runs the plugin's package from PLUGIN_SOURCE."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(PLUGIN_SOURCE) + (
        os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""
    )
    return env


class Plugin:
    def __init__(self, name, root: Path, socket_path: Path, log_path: Path):
        self.name = name
        self.root = root
        self.socket = socket_path
        self.log_path = log_path
        self.proc = None
        self.problems = []

    @property
    def cmd(self):
        return [
            sys.executable,
            "-m",
            "docker_on_top",
            "serve",
            "--name",
            self.name,
            "--root",
            str(self.root),
            "--socket",
            str(self.socket),
            "--log-level",
            "debug",
        ]

    def start(self, timeout=30):
        env = plugin_environment()
        env["PYTHONUNBUFFERED"] = "1"
        with open(self.log_path, "ab") as logf:
            logf.write(f"\n===== e2e harness: starting {shlex.join(self.cmd)}\n".encode())
            logf.flush()
            self.proc = subprocess.Popen(
                self.cmd,
                cwd=PLUGIN_SOURCE,
                env=env,
                stdout=logf,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(
                    f"the plugin exited with code {self.proc.returncode} while starting; "
                    f"its log:\n{self.log()}",
                    pytrace=False,
                )
            try:
                status, body = plugin_call(self.socket, "/Plugin.Activate", timeout=5)
                if status == 200 and "VolumeDriver" in (body or {}).get("Implements", []):
                    return
                last = (status, body)
            except OSError as e:  # no socket yet, or a stale one: refused
                last = e
            time.sleep(0.1)
        pytest.fail(
            f"the plugin did not answer /Plugin.Activate on {self.socket} within "
            f"{timeout}s (last: {last!r}); its log:\n{self.log()}",
            pytrace=False,
        )

    def kill(self):
        """SIGKILL, as a crash would."""
        self.proc.kill()
        self.proc.wait(30)

    def stop(self):
        """SIGTERM; records a problem when it does not exit or leaves its socket."""
        if self.proc is None or self.proc.poll() is not None:
            return
        if not stop_pid(self.proc, 20):
            self.problems.append("the plugin did not exit within 20s of SIGTERM (killed)")
        elif self.proc.returncode not in (0, -signal.SIGTERM):
            self.problems.append(f"the plugin exited with code {self.proc.returncode} on SIGTERM")
        if os.path.lexists(self.socket):
            self.problems.append(f"the plugin left its socket {self.socket} after SIGTERM")
            with contextlib.suppress(OSError):
                os.unlink(self.socket)

    def log(self, lines=300):
        return tail(self.log_path, lines)

    @property
    def driver(self):
        """The name docker knows the driver by."""
        return self.name

    def exited(self):
        """True when the plugin was started and is no longer running."""
        return self.proc is not None and self.proc.poll() is not None


def empty_state_root(root: Path):
    """Unmounts what is left under a state root and deletes its content."""
    if not root.is_dir():  # a managed plugin's, before it was first enabled
        return
    left = unmount_all_under(root)
    if left:
        raise CommandError(f"cannot unmount {[m['mountpoint'] for m in left]}")
    sh(["chattr", "-R", "-i", root], check=False, timeout=60)
    for entry in root.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


class ManagedPluginInstall:
    """The managed plugin of the session, created (and not enabled) by ``managed_plugin``."""

    def __init__(self, name, plugin_id, root: Path):
        self.name = name
        self.id = plugin_id
        self.root = root  # the propagated mount as dockerd's host sees it


class ManagedPlugin(Plugin):
    """The session's managed plugin, enabled for one test on an emptied state root.

    dockerd runs it; its output goes to dockerd's log with ``plugin=<ID>``."""

    def __init__(self, managed: ManagedPluginInstall, dockerd: Dockerd):
        super().__init__(managed.name, managed.root, None, dockerd.log_path)
        self.managed = managed
        self.dockerd = dockerd
        self._log_start = dockerd.log_path.stat().st_size
        self._emptied = False

    @property
    def driver(self):
        return f"{self.name}:latest"

    def start(self, timeout=60):
        if not self._emptied:
            empty_state_root(self.root)
            self._emptied = True
        res = sh(["docker", "plugin", "enable", self.name], check=False, timeout=timeout)
        if res.returncode != 0:
            pytest.fail(
                f"the managed plugin could not be enabled:\n{describe(res)}\n"
                f"its log:\n{self.log()}",
                pytrace=False,
            )

    def enabled(self):
        res = sh(["docker", "plugin", "inspect", "-f", "{{.Enabled}}", self.name], check=False)
        return res.stdout.strip() == "true"

    def exited(self):
        return not self.enabled()

    def kill(self):
        pytest.fail("a managed plugin cannot be killed by the tests", pytrace=False)

    def stop(self):
        if not self.enabled():
            return
        res = sh(["docker", "plugin", "disable", "--force", self.name], check=False)
        if res.returncode != 0:
            self.problems.append(f"the managed plugin could not be disabled: {res.stderr.strip()}")

    def log(self, lines=300):
        with open(self.dockerd.log_path, "rb") as f:
            f.seek(self._log_start)
            text = f.read().decode(errors="replace")
        mark = f"plugin={self.managed.id}"
        found = [
            m.group(1).replace('\\"', '"')
            for line in text.splitlines()
            if mark in line and (m := re.search(r'msg="(.*)" plugin=', line))
        ]
        return "\n".join(found[-lines:])


class DotE2E:
    """What a test gets: the plugin plus helpers around the docker CLI."""

    def __init__(self, plugin: Plugin, image: str, workdir: Path, dockerd: Dockerd):
        self.plugin = plugin
        self.driver = plugin.driver
        self.root = plugin.root
        self.image = image
        self.workdir = workdir
        self.dockerd = dockerd
        self.containers: list[str] = []
        self.volumes: list[str] = []
        self.immutable: list[Path] = []
        self.procs: list[subprocess.Popen] = []
        self._n = 0
        self._tag = secrets.token_hex(3)

    # ---- names and host folders
    def new_name(self, kind="v"):
        """A fresh volume/container name, private to this test."""
        self._n += 1
        return f"{self.plugin.name}-{self._tag}-{kind}{self._n}"

    def make_base(self, files=None):
        """A fresh base folder for this test (default content: a=123, b=456)."""
        self._n += 1
        base = self.workdir / "bases" / f"base{self._n}"
        base.mkdir(parents=True)
        for k, v in ({"a": "123", "b": "456"} if files is None else files).items():
            (base / k).parent.mkdir(parents=True, exist_ok=True)
            (base / k).write_text(v + "\n")
        return base

    def make_dir(self, kind="dir"):
        self._n += 1
        d = self.workdir / f"{kind}{self._n}"
        d.mkdir(parents=True)
        return d

    # ---- docker
    def docker(self, *args, timeout=T_SHORT, check=True, input=None):
        return sh(["docker", *args], timeout=timeout, check=check, input=input)

    def create_volume(self, base=None, *, volatile=None, name=None, opts=(), labels=(), check=True):
        name = name or self.new_name()
        self.volumes.append(name)
        args = ["volume", "create", "--driver", self.driver]
        if base is not None:
            args += ["-o", f"base={base}"]
        if volatile is not None:
            args += ["-o", f"volatile={volatile}"]
        for o in opts:
            args += ["-o", o]
        for lab in labels:
            args += ["--label", lab]
        args.append(name)
        res = self.docker(*args, check=False)
        if check:
            assert res.returncode == 0, "docker volume create failed:\n" + describe(res)
            return name
        return res

    def _run_args(self, name, volumes, binds, extra):
        args = ["--network", "none", "--name", name]
        for vol, target in volumes:
            args += ["-v", f"{vol}:{target}"]
        for src, target in binds:
            args += ["-v", f"{src}:{target}"]
        return args + list(extra)

    def _container(self, mode, script, volumes, binds, extra, timeout):
        """`docker run MODE ... sh -e -c script` under a fresh name: (name, CompletedProcess)."""
        name = self.new_name("c")
        self.containers.append(name)
        res = self.docker(
            "run",
            mode,
            *self._run_args(name, volumes, binds, extra),
            self.image,
            "sh",
            "-e",
            "-c",
            script,
            timeout=timeout,
            check=False,
        )
        return name, res

    def run(self, script, volumes=(), binds=(), extra=(), check=True, timeout=T_RUN):
        """`docker run --rm` of `sh -e -c script`; returns CompletedProcess."""
        _, res = self._container("--rm", script, volumes, binds, extra, timeout)
        if check:
            assert res.returncode == 0, "container failed:\n" + describe(res)
        return res

    def start(self, script, volumes=(), binds=(), extra=(), check=True, timeout=T_RUN):
        """`docker run -d`; returns the container name (or the CompletedProcess if check=False)."""
        name, res = self._container("-d", script, volumes, binds, extra, timeout)
        if check:
            assert res.returncode == 0, "could not start container:\n" + describe(res)
            return name
        res.container = name
        return res

    def wait(self, name, timeout=T_RUN):
        """Waits for the container to exit; returns (exit code, its logs).

        `docker wait` returns before dockerd has unmounted the container's
        volumes; `docker inspect` takes the container lock, which dockerd holds
        until that clean-up is done, so after it the Unmount calls are over."""
        rc = int(self.docker("wait", name, timeout=timeout).stdout.strip().splitlines()[-1])
        self.docker("inspect", "--format", "{{.State.Status}}", name)
        logs = self.docker("logs", name, check=False)
        return rc, logs.stdout + logs.stderr

    def rm(self, name):
        self.docker("rm", "-f", name, timeout=T_RUN)

    @staticmethod
    def refused(res):
        """True when `docker run` failed because docker could not set the container up."""
        return res.returncode == 125 and "Error response from daemon" in res.stderr

    def cli(self, *args, check=True):
        """The plugin's command line on this test's state root; output as bytes."""
        res = subprocess.run(
            [sys.executable, "-m", "docker_on_top", *args, "--root", str(self.root)],
            cwd=PLUGIN_SOURCE,
            env=plugin_environment(),
            capture_output=True,
            timeout=T_SHORT,
        )
        if check and res.returncode != 0:
            raise CommandError(f"docker-on-top {args} failed: {res.stderr.decode()}")
        return res

    # ---- plugin state on disk
    def state_dir(self, vol):
        return self.root / vol

    def mountpoint(self, vol):
        return self.root / vol / "mountpoint"

    def records(self, vol):
        d = self.root / vol / "activemounts"
        return sorted(p.name for p in d.iterdir()) if d.is_dir() else []

    def overlay_mounted(self, vol):
        ms = mounts_at(self.mountpoint(vol))
        return bool(ms) and ms[-1]["fstype"] == "overlay"

    def assert_records_truthful(self, vol):
        """A2: a record in activemounts/ means "in use", so the overlay must be mounted."""
        recs = self.records(vol)
        if recs:
            assert self.overlay_mounted(vol), (
                f"volume {vol}: activemounts/ holds {recs} but no overlay is mounted at "
                f"{self.mountpoint(vol)} - a container would get an empty folder.\n"
                f"mounts there: {mounts_at(self.mountpoint(vol))}"
            )

    def assert_in_use(self, vol):
        assert self.records(vol), f"volume {vol} is used by a container but activemounts/ is empty"
        assert self.overlay_mounted(vol), f"volume {vol} is used by a container but not mounted"

    def assert_idle(self, vol, timeout=10):
        """Nobody uses the volume: no record, no overlay, no mountpoint/ or workdir/."""

        def idle():
            return (
                not self.records(vol)
                and not mounts_at(self.mountpoint(vol))
                and not self.mountpoint(vol).exists()
                and not (self.state_dir(vol) / "workdir").exists()
            )

        if not wait_until(idle, timeout):
            raise AssertionError(
                f"volume {vol} is not idle although no container uses it:\n"
                f"  activemounts/: {self.records(vol)}\n"
                f"  mounts at mountpoint: {mounts_at(self.mountpoint(vol))}\n"
                f"  mountpoint/ exists: {self.mountpoint(vol).exists()}\n"
                f"  workdir/ exists: {(self.state_dir(vol) / 'workdir').exists()}"
            )

    def metadata(self, vol):
        return json.loads((self.state_dir(vol) / "metadata.json").read_text())

    # ---- faults
    def chattr(self, path, flag):
        path = Path(path)
        if flag == "+i":
            self.immutable.append(path)
        sh(["chattr", flag, path])

    def spawn(self, args, **kw):
        p = subprocess.Popen(args, **kw)
        self.procs.append(p)
        return p

    # ---- teardown
    def cleanup(self):
        notes = []
        for p in self.immutable:
            sh(["chattr", "-i", p], check=False)
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
        for c in self.containers:
            r = self.docker("rm", "-f", "-v", c, check=False, timeout=T_RUN)
            if r.returncode != 0 and "No such container" not in r.stderr:
                notes.append(f"could not remove container {c}: {r.stderr.strip()}")
        for v in self.volumes:
            r = self.docker("volume", "rm", v, check=False, timeout=T_SHORT)
            if r.returncode != 0 and "no such volume" not in r.stderr.lower():
                notes.append(f"`docker volume rm {v}` failed at teardown: {r.stderr.strip()}")
                self.docker("volume", "rm", "-f", v, check=False, timeout=T_SHORT)
        return notes


@pytest.fixture(scope="session")
def driver_name():
    """One private driver name for the whole session.

    dockerd caches every legacy plugin it has talked to and, for a volume name
    it does not know (`docker volume rm/inspect` of a missing volume), asks
    each of them, retrying a dead one for ~30s.  A new name per test would
    leave a dead driver behind after every test."""
    return f"dot-e2e-{secrets.token_hex(4)}"


@pytest.fixture(scope="session")
def managed_plugin_folder(host_tools, e2e_tmp):
    """The managed plugin's folder (config.json, rootfs/), built from PLUGIN_SOURCE."""
    folder = e2e_tmp / "managed-plugin"
    sh(
        [sys.executable, PLUGIN_SOURCE / "packaging" / "plugin" / "build.py", "--out", folder],
        timeout=900,
    )
    return folder


@pytest.fixture(scope="session")
def managed_plugin(dockerd, managed_plugin_folder, driver_name):
    """The managed plugin, created (not enabled) once on the tests' dockerd."""
    name = f"{driver_name}-managed"
    sh(["docker", "plugin", "create", name, managed_plugin_folder], timeout=300)
    root = None
    try:
        sh(["docker", "plugin", "set", name, "LOG_LEVEL=debug"])
        plugin_id = sh(["docker", "plugin", "inspect", "-f", "{{.Id}}", name]).stdout.strip()
        data_root = sh(["docker", "info", "-f", "{{.DockerRootDir}}"]).stdout.strip()
        root = Path(data_root) / "plugins" / plugin_id / "propagated-mount"
        yield ManagedPluginInstall(name, plugin_id, root)
    finally:
        sh(["docker", "plugin", "disable", "--force", name], check=False)
        if root is not None:
            with contextlib.suppress(CommandError, OSError):
                empty_state_root(root)
        sh(["docker", "plugin", "rm", "--force", name], check=False, timeout=T_SHORT)


@pytest.fixture
def plugin_mode():
    """legacy (a socket-file plugin) or managed; see DOT_E2E_MODE."""
    return "legacy"


@pytest.fixture
def plugin_class(request, plugin_mode, dockerd):
    """How `dot` runs the plugin; a test module may override this fixture with a subclass."""
    if plugin_mode == "managed":
        managed = request.getfixturevalue("managed_plugin")
        return lambda *_: ManagedPlugin(managed, dockerd)
    return Plugin


@pytest.fixture
def dot(request, dockerd, image, e2e_tmp, driver_name, plugin_class):
    """The plugin under a private driver name and a fresh state root, plus helpers."""
    sanitized = re.sub(r"[^A-Za-z0-9_.-]+", "-", request.node.name)[:60]
    workdir = Path(tempfile.mkdtemp(prefix=sanitized + "-", dir=e2e_tmp))
    driver = driver_name
    logdir = log_dir(e2e_tmp)
    plugin = plugin_class(
        driver,
        workdir / "root",
        Path(PLUGIN_DIR) / f"{driver}.sock",
        logdir / f"{workdir.name}.plugin.log",
    )
    h = DotE2E(plugin, image, workdir, dockerd)
    started = False
    try:
        plugin.start()
        started = True
        yield h
    finally:
        notes = []
        try:
            if started and plugin.exited():
                # e.g. a test killed it: it must be up so volumes can be removed
                try:
                    plugin.start()
                except BaseException as e:  # pytest.fail: clean up all the same
                    notes.append(f"could not restart the plugin for the clean-up: {e}")
            notes += h.cleanup()
        finally:
            notes += release_workdir(plugin, workdir)
        failed = any(
            getattr(getattr(request.node, "dot_rep_" + w, None), "failed", False)
            for w in ("setup", "call")
        )
        if failed or notes or plugin.problems:
            sys.stderr.write(f"\n===== plugin log ({plugin.log_path}) =====\n{plugin.log()}\n")
            sys.stderr.write(
                "\n===== dockerd log (warnings and errors) =====\n"
                f"{dockerd.log_tail(40, important=True)}\n"
            )
        for n in notes:
            sys.stderr.write(f"teardown note: {n}\n")
        if plugin.problems:
            pytest.fail("; ".join(plugin.problems), pytrace=False)
