"""SPEC B2: state files are written to a staging file and renamed over the real name, so
a crash leaves the old content or the new one; metadata.json is forced to disk before
its rename. Read from the clean strace of each request (what the daemon really did).

Usage records are renamed into place too, but not fsynced (docs/reliability.md: after a
power loss the overlay is gone and recovery resets them).
"""

from __future__ import annotations

import re

from ..protocol.conftest import Workspace
from .harness import Call, clean_trace

_FD = re.compile(r"\) = (\d+)$")


def _position(calls: tuple[Call, ...], name: str, *fragments: str) -> int:
    for index, call in enumerate(calls):
        if call.name == name and all(fragment in call.text for fragment in fragments):
            return index
    raise AssertionError(f"no {name} with {fragments} in:\n" + "\n".join(c.text for c in calls))


def test_create_fsyncs_metadata_in_a_staging_file_before_renaming_it(ws: Workspace) -> None:
    calls = clean_trace("create").calls
    opened = _position(calls, "openat", "/.metadata.json.tmp", "O_CREAT")
    fd = _FD.search(calls[opened].text)
    assert fd is not None, calls[opened].text
    synced = _position(calls, "fsync", f"fsync({fd[1]})")
    renamed = _position(calls, "rename", "/.metadata.json.tmp", "/metadata.json")
    assert opened < synced < renamed
    # Nothing writes metadata.json in place.
    assert not any(
        c.name == "openat" and '/metadata.json"' in c.text and "O_CREAT" in c.text for c in calls
    )


def test_a_usage_record_is_renamed_into_place(ws: Workspace) -> None:
    calls = clean_trace("mount-first").calls
    opened = _position(calls, "openat", "/.activemount.tmp", "O_CREAT")
    renamed = _position(calls, "rename", "/.activemount.tmp", "/activemounts/c1")
    assert opened < renamed
    assert not any(c.name == "openat" and "/activemounts/c1" in c.text for c in calls)
