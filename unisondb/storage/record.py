"""WAL record format: one record = one atomic write (a single put/delete or a batch).

All integers are little-endian. A record is::

    Offset  Size  Field
    0       4     crc        CRC32C of bytes [4, 8 + body_len): the length field and the body
    4       4     body_len   length of the body in bytes (>= BODY_FIXED)
    --- body ---
    8       8     lsn        log sequence number; contiguous per namespace (1, 2, 3 ...)
    16      8     time_ns    wall-clock nanoseconds, non-decreasing per namespace
    24      1     op         1 = write batch (the only operation today)
    25      3     reserved   zero
    28      4     count      number of entries
    32      ...   entries    `count` times:
                               0  1  kind       1 = put, 2 = delete
                               1  2  key_len    1..MAX_KEY
                               3  4  value_len  0 for delete
                               7  .  key, then value

Total size = 8 + body_len. The CRC covers the length so that a torn or flipped
length is detected, not trusted. A batch is one record, so after any crash it is
either entirely in the log or entirely absent.
"""

from __future__ import annotations

import struct
from enum import IntEnum
from typing import NamedTuple

import crc32c

HEADER = struct.Struct("<II")  # crc, body_len
BODY_FIXED = struct.Struct("<QQB3xI")  # lsn, time_ns, op, count
ENTRY_HEAD = struct.Struct("<BHI")  # kind, key_len, value_len
HEADER_SIZE = HEADER.size  # 8
MIN_BODY = BODY_FIXED.size  # 24
#: LMDB's default maximum key size; we enforce it at the edge so a write never fails late.
MAX_KEY = 511
#: Hard ceiling on one record (a sanity bound for decoding; the HTTP body limit is lower).
MAX_BODY = 64 * 1024 * 1024

OP_WRITE = 1


class EntryKind(IntEnum):
    PUT = 1
    DELETE = 2


# NamedTuples rather than dataclasses: replay and restore build millions of these, and a
# tuple is several times cheaper to construct than a frozen dataclass.
class Entry(NamedTuple):
    kind: EntryKind
    key: bytes
    value: bytes = b""


class Record(NamedTuple):
    lsn: int
    time_ns: int
    entries: tuple[Entry, ...]
    op: int = OP_WRITE


_KINDS = {int(k): k for k in EntryKind}


class RecordError(Exception):
    """Raised by ``decode`` for bytes that are not a valid record (caller decides: torn or corrupt)."""

    def __init__(self, reason: str, *, incomplete: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        #: True when the bytes simply end too early (the shape of a torn write).
        self.incomplete = incomplete


def encode(lsn: int, time_ns: int, entries: tuple[Entry, ...] | list[Entry]) -> bytes:
    parts = [BODY_FIXED.pack(lsn, time_ns, OP_WRITE, len(entries))]
    for e in entries:
        parts.append(ENTRY_HEAD.pack(e.kind, len(e.key), len(e.value)))
        parts.append(e.key)
        if e.value:
            parts.append(e.value)
    body = b"".join(parts)
    length = struct.pack("<I", len(body))
    crc = crc32c.crc32c(body, crc32c.crc32c(length))
    return struct.pack("<I", crc) + length + body


def encoded_size(entries: list[Entry] | tuple[Entry, ...]) -> int:
    return HEADER_SIZE + MIN_BODY + sum(ENTRY_HEAD.size + len(e.key) + len(e.value) for e in entries)


def decode(buf: bytes | memoryview, offset: int) -> tuple[Record, int]:
    """Decode the record at ``offset``; return it and the offset just past it.

    Raises ``RecordError`` with ``incomplete=True`` if ``buf`` ends before the record
    does, and ``incomplete=False`` for a checksum or structure failure.
    """
    end = len(buf)
    if end - offset < HEADER_SIZE:
        raise RecordError("record header is cut short", incomplete=True)
    crc, body_len = HEADER.unpack_from(buf, offset)
    if body_len < MIN_BODY or body_len > MAX_BODY:
        if crc == 0 and body_len == 0:
            raise RecordError("zero-filled space where a record was expected", incomplete=True)
        raise RecordError(f"record length {body_len} out of range")
    body_start = offset + HEADER_SIZE
    body_end = body_start + body_len
    if body_end > end:
        raise RecordError(f"record of {body_len} bytes extends past end of data", incomplete=True)
    if crc32c.crc32c(buf[offset + 4 : body_end]) != crc:
        raise RecordError("record checksum mismatch")
    lsn, time_ns, op, count = BODY_FIXED.unpack_from(buf, body_start)
    if op != OP_WRITE:
        raise RecordError(f"unknown record operation {op}")
    pos = body_start + MIN_BODY
    entries = []
    head_size = ENTRY_HEAD.size
    unpack_head = ENTRY_HEAD.unpack_from
    for _ in range(count):
        if pos + head_size > body_end:
            raise RecordError("entry header runs past record end")
        kind, klen, vlen = unpack_head(buf, pos)
        pos += head_size
        ekind = _KINDS.get(kind)
        if ekind is None or pos + klen + vlen > body_end:
            raise RecordError("malformed entry")
        key = bytes(buf[pos : pos + klen])
        pos += klen
        value = bytes(buf[pos : pos + vlen])
        pos += vlen
        entries.append(Entry(ekind, key, value))
    if pos != body_end:
        raise RecordError("trailing bytes inside record")
    return Record(lsn, time_ns, tuple(entries), op), body_end
