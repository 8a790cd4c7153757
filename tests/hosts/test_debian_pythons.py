"""A checkout and the distribution's python3 are all the daemon needs (SPEC B10): it runs
with `python3 -m docker_on_top` in Debian 11, 12 and 13 roots, and the unit and protocol
suites pass under Debian 11's and 13's own python3 (3.9 and 3.13) with those releases'
own pytest. (Debian 12's python3 runs the whole suite on the CI host.)"""

from __future__ import annotations

import pytest

from docker_on_top import __version__

from ..mounts import mounts_under
from .debian import SOURCE, SUITES, TEST_SUITES, DaemonInRoot, chroot_of


@pytest.mark.parametrize("suite", sorted(SUITES))
def test_b10_the_daemon_runs_from_a_checkout_with_the_distributions_python3(suite: str) -> None:
    with chroot_of(suite) as root:
        version = root.run(["python3", "-m", "docker_on_top", "--version"], cwd=SOURCE)
        assert version.stdout.strip() == f"docker-on-top {__version__}", version
        base = root.tmp / "base"
        base.mkdir()
        (base / "a").write_text("from the base")
        daemon = DaemonInRoot(
            root,
            ["python3", "-m", "docker_on_top", "--name", "dot-hosts", "--root", "/tmp/state",
             "--socket", "/tmp/dot-hosts.sock"],
            "/tmp/dot-hosts.sock", cwd=SOURCE,
        )  # fmt: skip
        try:
            client = daemon.client
            client.create("v", "/tmp/base")
            merged = root.host_path(client.mount("v", "m1"))
            assert [kind for _, kind in mounts_under(merged)] == ["overlay"]
            assert (merged / "a").read_text() == "from the base"
            (merged / "b").write_text("a change")
            client.unmount("v", "m1")
            assert (root.tmp / "state" / "v" / "upper" / "b").read_text() == "a change"
            client.remove("v")
            daemon.stop()
        finally:
            daemon.close()


EXPLAINED_SKIPS = ("localedef cannot build", "/var/tmp is nosuid or an overlay", "CAP_SYS_RESOURCE")


@pytest.mark.parametrize("suite", TEST_SUITES)
def test_b10_unit_and_protocol_suites_pass_under_the_distributions_python3(suite: str) -> None:
    with chroot_of(suite) as root:
        found = root.run(["python3", "-c", "import sys; print(*sys.version_info[:2])"])
        result = root.run(
            ["python3", "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "tests/unit",
             "tests/protocol"],
            cwd=SOURCE, env={"PYTHONDONTWRITEBYTECODE": "1"},
        )  # fmt: skip
    assert tuple(map(int, found.stdout.split())) == SUITES[suite], found
    report = (result.stdout + result.stderr)[-20000:]
    assert result.returncode == 0, report
    assert " passed" in result.stdout, report
    # Only what a minimal root cannot offer may be skipped: its own locales, a /var/tmp
    # that is not an overlay, a capability this machine's sandbox withholds.
    skipped = [line for line in result.stdout.splitlines() if line.startswith("SKIPPED")]
    unexplained = [line for line in skipped if not any(r in line for r in EXPLAINED_SKIPS)]
    assert not unexplained, report
