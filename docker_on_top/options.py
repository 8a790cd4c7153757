"""The options of `docker volume create -o KEY=VALUE`: each checked, and together made
into the metadata of the new volume. Every refusal is the user's to fix, and says how.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Mapping
from pathlib import Path

from . import kernel
from .errors import UserError
from .store import VolumeStore
from .volume import Metadata, rfc3339

OPTIONS = ("base", "volatile")
_TRUE_WORDS = frozenset({"true", "yes"})
_FALSE_WORDS = frozenset({"false", "no"})


def new_volume_metadata(store: VolumeStore, options: Mapping[str, str]) -> Metadata:
    for option in options:
        if option not in OPTIONS:
            raise UserError(
                f"invalid option {option!r}: the options are 'base' (required) and 'volatile'"
            )
    return Metadata(
        base_dir=checked_base(store, options.get("base")),
        volatile=parse_volatile(options.get("volatile", "false")),
        created_at=rfc3339(time.time()),
    )


def checked_base(store: VolumeStore, base: str | None) -> str:
    """`base` when it names an existing directory the volume can be mounted over."""
    if base is None:
        raise UserError(
            "`base` option must be provided and set to an absolute path to the base "
            "directory on host"
        )
    if not base.startswith("/"):
        raise UserError("`base` must be an absolute path")
    try:
        os.fsencode(base)
    except UnicodeEncodeError:
        raise UserError("`base` is not a valid path (it cannot be encoded)") from None
    if "\0" in base:
        raise UserError("`base` must not contain a NUL character")
    # SPEC B3: the new mount API takes such a path; mount(2)'s option string cannot.
    if kernel.UNSAFE_OPTION_CHARACTERS & set(base) and not kernel.takes_any_overlay_path():
        raise UserError(
            "directories with commas and/or colons in the path are not supported "
            "(they need Linux 6.8 or later)"
        )
    on_host = store.on_host(base)
    try:
        is_directory = stat.S_ISDIR(os.stat(on_host).st_mode)
    except (FileNotFoundError, NotADirectoryError):
        raise UserError("the base directory does not exist") from None
    except OSError as error:
        raise UserError(f"the specified base directory is inaccessible: {error}") from None
    if not is_directory:
        raise UserError(f"the base {base} is not a directory")
    real_base = Path(os.path.realpath(on_host))
    real_root = Path(os.path.realpath(store.root))
    if real_base == real_root or real_root in real_base.parents:
        raise UserError("the base directory must not be inside the plugin's state root")
    if real_base in real_root.parents:
        raise UserError(
            f"the base directory contains the plugin's state root {store.root}, "
            "and overlayfs refuses layers inside one another"
        )
    return base


def parse_volatile(value: str) -> bool:
    word = value.lower()
    if word in _TRUE_WORDS:
        return True
    if word in _FALSE_WORDS:
        return False
    raise UserError("option `volatile` must be either 'true', 'false', 'yes', or 'no'")
