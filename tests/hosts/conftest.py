"""Host tests: other Debian releases' own python3 (tests/hosts/debian.py) and the .deb.

They need root, debootstrap and chroot, and Debian's archive the first time a root is
built; scripts/test installs debootstrap. Elsewhere they are skipped, except in CI,
where a missing tool fails them.
"""

from __future__ import annotations

import os
import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest

from .debian import SUITES, cached_root


@pytest.fixture(scope="session", autouse=True)
def debian_roots() -> None:
    """The host tools, then every suite's root, built side by side the first time (the
    downloads overlap)."""
    missing = [tool for tool in ("debootstrap", "chroot", "dpkg-deb") if not shutil.which(tool)]
    problem = "needs root" if os.geteuid() != 0 else ""
    if missing:
        problem = f"needs {', '.join(missing)} (scripts/test installs them)"
    if problem:
        if os.environ.get("CI"):
            pytest.fail(problem)
        pytest.skip(problem)
    with ThreadPoolExecutor(len(SUITES)) as pool:
        for root in pool.map(cached_root, SUITES):
            assert root.is_dir()
