"""The tar stream of an OCI image layer: ustar and pax headers, GNU sparse 1.0 entries,
OCI whiteout entries, gathered into large writes. It knows nothing of overlays: what an
upper entry becomes is `oci_layer.py`'s choice.

The headers are written here, not by tarfile, which costs more per entry than the
syscalls that read the entry. See docs/performance.md.
"""

from __future__ import annotations

import errno
import os
import zlib
from typing import BinaryIO

from .extents import _CHUNK

# OCI image-layer markers (image-spec layer.md, "Whiteouts").
_WHITEOUT_PREFIX = ".wh."
_OPAQUE_MARKER = ".wh..wh..opq"


# Tar entry types (POSIX ustar typeflag values, and pax's extended header).
_REGTYPE = b"0"
_LNKTYPE = b"1"
_SYMTYPE = b"2"
_CHRTYPE = b"3"
_BLKTYPE = b"4"
_DIRTYPE = b"5"
_FIFOTYPE = b"6"
_PAX_HEADER_TYPE = b"x"

_BLOCK = 512
_ZEROS = bytes(_BLOCK)
# ustar fields: names of up to 100 bytes, octal numbers of up to 7 digits (ids) and 11
# digits (size, mtime). Whatever does not fit goes into a pax record.
_NAME_BYTES = 100
_ID_LIMIT = 8**7
_SIZE_LIMIT = 8**11
_PAX_HEADER_NAME = b"././@PaxHeader"

_WHITEOUT_PREFIX_BYTES = _WHITEOUT_PREFIX.encode()
_OPAQUE_MARKER_NAME = b"/" + _OPAQUE_MARKER.encode()


class _LayerWriter:
    """Writes tar entries in the pax format to a binary stream, gathered into large writes.

    A ustar header describes most entries; a pax extended header comes before one with
    xattrs, a name or link name over 100 bytes, or a number too large for its field.
    """

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self._pending = bytearray()
        # Bytes of the current entry's content written by its header (a sparse map).
        self._stored = 0

    def add(
        self,
        name: bytes,
        kind: bytes,
        st: os.stat_result,
        *,
        mode: int | None = None,
        size: int = 0,
        linkname: bytes = b"",
        device: int = 0,
        xattrs: dict[str, bytes] | None = None,
        records: tuple[tuple[bytes, bytes], ...] = (),
    ) -> None:
        """The header of one entry (the caller writes a regular file's content after it);
        `records` go into its pax header after the others."""
        uid, gid, mtime = st.st_uid, st.st_gid, int(st.st_mtime)
        if (
            xattrs
            or records
            or len(name) > _NAME_BYTES
            or len(linkname) > _NAME_BYTES
            or not (0 <= uid < _ID_LIMIT and 0 <= gid < _ID_LIMIT and 0 <= mtime < _SIZE_LIMIT)
            or size >= _SIZE_LIMIT
        ):
            uid, gid, size, mtime = self._add_pax_header(
                name, linkname, uid, gid, size, mtime, xattrs or {}, records
            )
        self._pending += _ustar_header(
            name[:_NAME_BYTES],
            kind,
            st.st_mode if mode is None else mode,
            uid,
            gid,
            size,
            mtime,
            linkname[:_NAME_BYTES],
            device,
        )
        if len(self._pending) >= _CHUNK:
            self._write_pending()

    def _add_pax_header(
        self,
        name: bytes,
        linkname: bytes,
        uid: int,
        gid: int,
        size: int,
        mtime: int,
        xattrs: dict[str, bytes],
        extra: tuple[tuple[bytes, bytes], ...],
    ) -> tuple[int, int, int, int]:
        """The pax header for what the ustar header cannot hold; returns the uid, gid, size
        and mtime for the ustar header, 0 for those that moved to the pax header."""
        records = [(b"SCHILY.xattr." + os.fsencode(key), value) for key, value in xattrs.items()]
        if len(name) > _NAME_BYTES:
            records.append((b"path", name))
        if len(linkname) > _NAME_BYTES:
            records.append((b"linkpath", linkname))
        fields = []
        for key, value, limit in (
            (b"uid", uid, _ID_LIMIT),
            (b"gid", gid, _ID_LIMIT),
            (b"size", size, _SIZE_LIMIT),
            (b"mtime", mtime, _SIZE_LIMIT),
        ):
            if 0 <= value < limit:
                fields.append(value)
            else:
                records.append((key, b"%d" % value))
                fields.append(0)
        records.extend(extra)
        # Values go raw, as GNU tar writes binary xattrs; it would warn about a
        # "hdrcharset=BINARY" record, and neither it nor Go's archive/tar needs one.
        payload = b"".join(_pax_record(key, value) for key, value in records)
        self._pending += _ustar_header(
            _PAX_HEADER_NAME, _PAX_HEADER_TYPE, 0, 0, 0, len(payload), 0, b"", 0
        )
        self._pending += payload
        self._pad(len(payload))
        uid, gid, size, mtime = fields
        return uid, gid, size, mtime

    def add_whiteout(self, prefix: bytes, name: bytes, st: os.stat_result) -> None:
        """The OCI whiteout of `name` in the directory `prefix` (empty, or ending in "/")."""
        self.add(prefix + _WHITEOUT_PREFIX_BYTES + name, _REGTYPE, st, mode=0o600)

    def add_sparse(
        self,
        name: bytes,
        st: os.stat_result,
        size: int,
        extents: list[tuple[int, int]],
        xattrs: dict[str, bytes],
    ) -> None:
        """The header of a file of `size` bytes holding data only in `extents`, as GNU tar
        writes PAX sparse format 1.0: the real name and size in pax records, and the
        content starting with the map of the extents, in decimal lines. The caller writes
        the extents' data after it with `copy_content`."""
        map_entries = [*extents]
        if not extents or sum(extents[-1]) < size:
            # Readers make the file as long as the last extent's end.
            map_entries.append((size, 0))
        sparse_map = b"%d\n" % len(map_entries) + b"".join(
            b"%d\n%d\n" % extent for extent in map_entries
        )
        sparse_map += _ZEROS[: -len(sparse_map) % _BLOCK]
        parent, slash, own_name = name.rpartition(b"/")
        self.add(
            parent + slash + b"GNUSparseFile.0/" + own_name,
            _REGTYPE,
            st,
            size=len(sparse_map) + sum(length for _, length in extents),
            xattrs=xattrs,
            records=(
                (b"GNU.sparse.major", b"1"),
                (b"GNU.sparse.minor", b"0"),
                (b"GNU.sparse.name", name),
                (b"GNU.sparse.realsize", b"%d" % size),
            ),
        )
        self._pending += sparse_map
        # The map and the data count as one content for the padding at the end.
        self._stored = len(sparse_map)

    def copy_content(self, fd: int, extents: list[tuple[int, int]], name: bytes) -> None:
        """The content of the entry just added: the bytes of `extents` of `fd`, padded."""
        stored, self._stored = self._stored, 0
        for offset, length in extents:
            end = offset + length
            while offset < end:
                chunk = os.pread(fd, min(end - offset, _CHUNK), offset)
                if not chunk:
                    raise OSError(errno.EIO, f"/{os.fsdecode(name)} shrank while it was exported")
                if len(chunk) == _CHUNK:
                    self._write_pending()
                    self._out.write(chunk)
                else:
                    self._pending += chunk
                offset += len(chunk)
            stored += length
        self._pad(stored)

    def _pad(self, size: int) -> None:
        """Fill the last block of `size` bytes of content, and write out a large batch."""
        self._pending += _ZEROS[: -size % _BLOCK]
        if len(self._pending) >= _CHUNK:
            self._write_pending()

    def finish(self) -> None:
        """The end-of-archive marker (two zero blocks), and everything out to `out`."""
        self._pending += _ZEROS + _ZEROS
        self._write_pending()
        self._out.flush()

    def _write_pending(self) -> None:
        self._out.write(self._pending)
        self._pending.clear()


def _ustar_header(
    name: bytes,
    kind: bytes,
    mode: int,
    uid: int,
    gid: int,
    size: int,
    mtime: int,
    linkname: bytes,
    device: int,
) -> bytes:
    before_checksum = b"%s%07o\0%07o\0%07o\0%011o\0%011o\0" % (
        name.ljust(_NAME_BYTES, b"\0"),
        mode & 0o7777,
        uid,
        gid,
        size,
        mtime,
    )
    if linkname or device:
        after_checksum = _after_checksum(kind, linkname, device)
        after_sum = _byte_sum(after_checksum)
    else:
        after_checksum, after_sum = _PLAIN_AFTER_CHECKSUM[kind]
    # The checksum sums the header's bytes, its own field counted as 8 spaces.
    checksum = _byte_sum(before_checksum) + after_sum + 8 * ord(" ")
    return before_checksum + b"%06o\0 " % checksum + after_checksum


def _after_checksum(kind: bytes, linkname: bytes, device: int) -> bytes:
    """The header fields after the checksum: type, link name, magic and version, empty
    owner names, device numbers; then an empty name prefix (long names go to pax)."""
    return b"%s%sustar\x0000%s%07o\0%07o\0%s" % (
        kind,
        linkname.ljust(_NAME_BYTES, b"\0"),
        bytes(64),
        os.major(device),
        os.minor(device),
        bytes(167),
    )


def _byte_sum(data: bytes) -> int:
    """The sum of the bytes of one side of a header, from zlib in C (sum() in Python costs
    a tenth of the time spent per entry). Adler-32's low half is 1 + that sum modulo 65521,
    which is exact here: the 148 bytes before the checksum field, or the at most 125
    non-zero bytes after it, sum to less than 65521."""
    return (zlib.adler32(data) & 0xFFFF) - 1


# Those fields, and their byte sum, for each kind of entry without link name or device.
_PLAIN_AFTER_CHECKSUM = {
    kind: (fields, _byte_sum(fields))
    for kind in (
        _REGTYPE,
        _LNKTYPE,
        _SYMTYPE,
        _CHRTYPE,
        _BLKTYPE,
        _DIRTYPE,
        _FIFOTYPE,
        _PAX_HEADER_TYPE,
    )
    for fields in [_after_checksum(kind, b"", 0)]
}


def _pax_record(key: bytes, value: bytes) -> bytes:
    """A pax record: its length, a space, KEY=VALUE and a newline; the length counts its
    own digits."""
    rest = len(key) + len(value) + 3
    length = rest + 1
    while length != rest + len(str(length)):
        length = rest + len(str(length))
    return b"%d %s=%s\n" % (length, key, value)
