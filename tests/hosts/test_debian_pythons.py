"""The unit and protocol suites pass under Debian 11's and Debian 13's own python3 (3.9
and 3.13, SPEC B10), with those releases' own pytest: a checkout and the distribution's
interpreter are all the daemon needs. (Debian 12's python3 runs the whole suite.)"""

from __future__ import annotations

import pytest

from .debian import SOURCE, SUITES, TEST_SUITES, chroot_of


@pytest.mark.parametrize("suite", TEST_SUITES)
def test_b10_unit_and_protocol_suites_pass_under_the_distributions_python3(suite: str) -> None:
    with chroot_of(suite) as root:
        found = root.run(["python3", "-c", "import sys; print(*sys.version_info[:2])"])
        result = root.run(
            ["python3", "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/unit",
             "tests/protocol"],
            cwd=SOURCE, env={"PYTHONDONTWRITEBYTECODE": "1"},
        )  # fmt: skip
    assert tuple(map(int, found.stdout.split())) == SUITES[suite], found
    report = (result.stdout + result.stderr)[-20000:]
    assert result.returncode == 0, report
    assert " passed" in result.stdout and " skipped" not in result.stdout, report
