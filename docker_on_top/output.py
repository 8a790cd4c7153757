"""What the command line prints: paths quoted so that no name can forge a line, paths
in JSON without loss, sizes for people, columns; written as UTF-8 whatever the locale."""

from __future__ import annotations

import base64
import os
import sys
from collections.abc import Sequence


def human_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1000
    raise AssertionError("unreachable")


_ESCAPES = {
    "\\": "\\\\",
    "\n": "\\n",
    "\t": "\\t",
    "\r": "\\r",
    "\a": "\\a",
    "\b": "\\b",
    "\f": "\\f",
    "\v": "\\v",
}


def quote(text: str) -> str:
    """`text` (a path, decoded with surrogateescape) as one line of plain output that no
    name can forge: a backslash, control characters and what is not printable become C
    escapes (\\n, \\t, \\\\, ...), each other byte of them, and each byte that is not
    UTF-8, \\xHH."""
    if text.isprintable() and "\\" not in text:
        return text
    quoted = []
    for character in text:
        if character in _ESCAPES:
            quoted.append(_ESCAPES[character])
        elif character.isprintable():
            quoted.append(character)
        else:
            raw = os.fsencode(character)
            quoted.append("".join(f"\\x{byte:02x}" for byte in raw))
    return "".join(quoted)


def json_path(path: str) -> dict[str, str]:
    """A path for JSON output, lossless: "Path" as text, and when the name is not UTF-8
    (its invalid bytes then shown as U+FFFD), "PathBytes", the raw bytes in base64."""
    if path.isascii():
        return {"Path": path}
    raw = os.fsencode(path)
    try:
        return {"Path": raw.decode()}
    except UnicodeDecodeError:
        return {
            "Path": raw.decode(errors="replace"),
            "PathBytes": base64.b64encode(raw).decode(),
        }


def write(text: str) -> None:
    """Plain output as UTF-8 whatever the locale: what is not text was quoted before."""
    sys.stdout.buffer.write(text.encode(errors="surrogateescape"))


def print_columns(rows: Sequence[tuple[str, ...]]) -> None:
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]) - 1)]
    for row in rows:
        cells = (cell.ljust(width) for cell, width in zip(row, widths))
        write("   ".join(cells) + " " + row[-1] + "\n")
