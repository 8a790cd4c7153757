"""The options of `docker volume create -o KEY=VALUE`: each checked, and together made
into what the new volume is (its metadata, or the volume it is a clone of). Every
refusal is the user's to fix, and says how.
"""

from __future__ import annotations

import os
import re
import stat
import time
from collections.abc import Mapping
from dataclasses import dataclass

from . import kernel, sizelimit
from .errors import UserError
from .layers import MAX_LOWER_LAYERS
from .metadata import Metadata, rfc3339
from .store import VolumeStore

_TRUE_WORDS = frozenset({"true", "yes"})
_FALSE_WORDS = frozenset({"false", "no"})
_UPPER_BASE = re.compile(r"base\.([1-9][0-9]*)")
_KNOWN = (
    "the options are 'base' (required), 'base.1', 'base.2', ... (more bases, stacked "
    "above it), 'volatile', 'from' (a clone, instead of bases) and 'size' (a limit on "
    "the changes)"
)


@dataclass(frozen=True)
class Creation:
    """What a Create asks for: a volume over bases (`metadata`), or a clone of `origin`."""

    volatile: bool
    metadata: Metadata | None = None
    origin: str | None = None
    size_limit: int | None = None


def creation(store: VolumeStore, options: Mapping[str, str]) -> Creation:
    numbers = []
    for option in options:
        upper = _UPPER_BASE.fullmatch(option)
        if upper is not None:
            numbers.append(int(upper.group(1)))
        elif option not in ("base", "volatile", "from", "size"):
            raise UserError(f"invalid option {option!r}: {_KNOWN}")
    volatile = parse_volatile(options.get("volatile", "false"))
    size_limit = parse_size_option(options["size"]) if "size" in options else None
    if "from" in options:
        if "base" in options or numbers:
            raise UserError("`from` and `base` exclude each other: a clone brings its bases along")
        return Creation(volatile=volatile, origin=options["from"], size_limit=size_limit)
    numbers.sort()
    if numbers != list(range(1, len(numbers) + 1)):
        raise UserError(
            "the bases above `base` are numbered 1, 2, 3, ... with no gaps: `base.1`, "
            f"`base.2`, ... (got {', '.join(f'base.{n}' for n in numbers)})"
        )
    if numbers and "base" not in options:
        raise UserError("`base.N` needs `base`, the bottom layer")
    if len(numbers) + 1 > MAX_LOWER_LAYERS:
        raise UserError(f"overlayfs stacks at most {MAX_LOWER_LAYERS} layers")
    metadata = Metadata(
        base_dir=checked_base(store, options.get("base")),
        volatile=volatile,
        created_at=rfc3339(time.time()),
        upper_bases=tuple(checked_base(store, options[f"base.{n}"], f"base.{n}") for n in numbers),
        size_limit=size_limit,
    )
    return Creation(volatile=volatile, metadata=metadata, size_limit=size_limit)


def checked_base(store: VolumeStore, base: str | None, option: str = "base") -> str:
    """`base` when it names an existing directory the volume can be mounted over."""
    if base is None:
        raise UserError(
            "`base` option must be provided and set to an absolute path to the base "
            "directory on host"
        )
    if not base.startswith("/"):
        raise UserError(f"`{option}` must be an absolute path")
    try:
        os.fsencode(base)
    except UnicodeEncodeError:
        raise UserError(f"`{option}` is not a valid path (it cannot be encoded)") from None
    if "\0" in base:
        raise UserError(f"`{option}` must not contain a NUL character")
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
        raise UserError(f"the base directory does not exist ({option}={base})") from None
    except OSError as error:
        raise UserError(f"the specified base directory is inaccessible: {error}") from None
    if not is_directory:
        raise UserError(f"the base {base} is not a directory")
    real_base, real_root = os.path.realpath(on_host), store.real_root
    if within(real_base, real_root):
        raise UserError("the base directory must not be inside the plugin's state root")
    if within(real_root, real_base):
        raise UserError(
            f"the base directory contains the plugin's state root {store.root}, "
            "and overlayfs refuses layers inside one another"
        )
    return base


def within(path: str, folder: str) -> bool:
    """Whether `path` is `folder` or below it; both absolute, without symlinks, `..` or a
    trailing slash (as realpath makes them)."""
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def parse_size_option(value: str) -> int:
    """`-o size=`: bytes, with k, M, G or T (powers of 1024, any case) and an optional B."""
    try:
        size = sizelimit.parse_size(value)
        sizelimit.check_size(size)
    except ValueError as error:
        raise UserError(f"option `size`: {error}") from None
    return size


def parse_volatile(value: str) -> bool:
    word = value.lower()
    if word in _TRUE_WORDS:
        return True
    if word in _FALSE_WORDS:
        return False
    raise UserError("option `volatile` must be either 'true', 'false', 'yes', or 'no'")
