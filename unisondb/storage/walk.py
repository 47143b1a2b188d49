"""The one walk over the records of a WAL segment: recovery, ``verify`` and restore use it.

Given a segment's bytes, its decoded header and its footer (``segment.py``; None when the
segment is unsealed), ``Walk.records`` goes from offset ``segment.HEADER_SIZE`` to the
footer (sealed) or to the end of the bytes (unsealed) and checks, for every record:

* its framing and CRC32C (``record.py``): the length field within
  ``[MIN_BODY, MAX_BODY]``, the record inside the data, the CRC over length and body,
  the operation; records it is asked to decode also have their entries checked;
* LSN contiguity: the i-th record carries ``header.first_lsn + i`` — an LSN out of
  sequence is ``CorruptLog`` whatever else holds;
* at the end of a sealed segment, the footer: record count, last LSN, min and max time.

Where the records stop before the end:

* **sealed** segment: any invalid record is ``CorruptLog`` ("invalid record in sealed
  segment"); a sealed segment is complete by construction, so nothing is a torn tail;
* **unsealed**, every byte from the bad position to the end is zero: preallocated space
  ahead of the writer (``zerofill.py``), the clean end of the log (a record never starts
  with 8 zero bytes, so zeros cannot hide one);
* **unsealed**, anything else: ``tail_error`` says what and where, and ``tail_is_midlog``
  whether a valid record follows (damage in the middle of the log, not a torn tail; see
  ``_valid_record_follows``). The walk does not raise: whether a tail may be torn is the
  caller's call (recovery: only the newest segment; ``verify``: never).

The walk reads nothing itself: the caller hands it the bytes it has read once (and
hashed, for ``verify``), so each byte of a segment is read and CRC-checked once.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import crc32c

from unisondb.errors import CorruptLog
from unisondb.storage import record
from unisondb.storage.record import Entry, Record

if TYPE_CHECKING:
    from unisondb.storage.segment import SegmentFooter, SegmentHeader

#: Sizes of the segment header and footer (``segment.py`` asserts they agree).
SEGMENT_HEADER_SIZE = 128
SEGMENT_FOOTER_SIZE = 80

SEALED_HINT = "restore this segment from a backup copy (unisondb backup verify names the good copies)"

#: One walked record: (lsn, time_ns, start offset, end offset, the decoded record or None
#: when it was only CRC-checked or decoded into ``ops``).
Item = tuple[int, int, int, int, "Record | None"]
#: One entry of a record decoded for a bulk apply (``Walk.records(ops=...)``): (key, value)
#: for a put, (key, None) for a delete.
Op = tuple[bytes, "bytes | None"]


class Walk:
    """One pass over one segment's bytes (see the module docstring)."""

    def __init__(
        self,
        path: Path,
        data: bytes | memoryview,
        header: SegmentHeader,
        footer: SegmentFooter | None,
    ) -> None:
        self.path = path
        self.header = header
        self.footer = footer
        self.file_size = len(data)
        self.end = len(data) - SEGMENT_FOOTER_SIZE if footer is not None else len(data)
        self._view = memoryview(data)[: self.end]
        #: Keys and values are sliced from ``bytes`` directly (one copy, no memoryview).
        self._bytes = data if type(data) is bytes else None
        #: Offset just past the last valid record (where the next record would go).
        self.data_end = SEGMENT_HEADER_SIZE
        self.count = 0
        self.last_lsn = header.first_lsn - 1
        self.min_time_ns = 0
        self.max_time_ns = 0
        #: Why an unsealed segment stopped before its end ("<reason> at offset <n>").
        self.tail_error: str | None = None
        #: The bad record is followed by a valid one: damage in the middle, not a torn tail.
        self.tail_is_midlog = False
        self.tail_offset: int | None = None

    def records(
        self,
        decode_from: int = 0,
        decode_to: int | None = None,
        *,
        ops: list[Op] | None = None,
        ops_until_ns: int | None = None,
    ) -> Iterator[Item]:
        """Every valid record, in order; those with ``decode_from <= lsn <= decode_to``
        fully decoded (entries too), the others CRC-checked only. Raises ``CorruptLog``
        as the module docstring says; the footer is checked when the iteration ends.

        ``ops`` (a replay): the decoded records' entries are appended to this list as
        ``Op`` pairs instead of being built into ``Record`` objects (the items then carry
        None), so applying a record costs no object beyond its key and value. Each
        record's entries are appended before its item is yielded. ``ops_until_ns``: from
        the first decoded record whose time is after it on, records are entry-checked
        but not appended (a restore's ``--target-time`` cut)."""
        view, end, path = self._view, self.end, self.path
        sealed = self.footer is not None
        pos, expected = SEGMENT_HEADER_SIZE, self.header.first_lsn
        stop_decode = expected + (1 << 62) if decode_to is None else decode_to
        until = (1 << 64) if ops_until_ns is None else ops_until_ns
        crc_fn = crc32c.crc32c
        unpack_head, unpack_body = record.HEADER.unpack_from, record.BODY_FIXED.unpack_from
        head, min_body, max_body, op_write = (
            record.HEADER_SIZE,
            record.MIN_BODY,
            record.MAX_BODY,
            record.OP_WRITE,
        )
        decode = record.decode
        entries = _entries
        raw = self._bytes if self._bytes is not None else view
        # The inline path slices ``bytes`` (a key or value is then one copy).
        sliced_bytes = self._bytes is not None
        data: bytes = self._bytes if self._bytes is not None else b""
        append = ops.append if ops is not None else None
        unpack_entry, entry_size = _ENTRY, _ENTRY_SIZE
        put, delete = int(record.EntryKind.PUT), int(record.EntryKind.DELETE)
        tmin, tmax = 0, 0
        try:
            while pos < end:
                rec: Record | None = None
                # The checks of ``record.decode``, inline (the decode of a replay is this
                # loop's cost); on any failure ``decode`` itself names the reason (one
                # source of truth for what a valid record is).
                ok = end - pos >= head
                if ok:
                    crc, body_len = unpack_head(view, pos)
                    nxt = pos + head + body_len
                    ok = (
                        min_body <= body_len <= max_body and nxt <= end and crc_fn(view[pos + 4 : nxt]) == crc
                    )
                if ok:
                    lsn, time_ns, op, count = unpack_body(view, pos + head)
                    ok = op == op_write
                if ok and decode_from <= expected <= stop_decode:
                    at = pos + head + min_body
                    if append is None or time_ns > until:
                        got = entries(raw, view, at, nxt, count)
                        if got is None:
                            ok = False
                        elif append is None:
                            rec = _new(Record, (lsn, time_ns, got, op_write))
                        else:
                            until = -1  # the cut: no later record is appended either
                    elif count == 1 and at + entry_size <= nxt and sliced_bytes:
                        # The common record, one put or delete: ``_entries``' checks inline.
                        kind, klen, vlen = unpack_entry(view, at)
                        at += entry_size
                        if at + klen + vlen != nxt:
                            ok = False
                        elif kind == put:
                            append((data[at : at + klen], data[at + klen : nxt]))
                        elif kind == delete:
                            append((data[at : at + klen], None))
                        else:
                            ok = False
                    else:
                        got = entries(raw, view, at, nxt, count)
                        if got is None:
                            ok = False
                        else:
                            for e in got:
                                append((e.key, e.value if e.kind == put else None))
                if not ok:
                    try:
                        decode(view, pos)
                        raise record.RecordError("record framing is inconsistent")
                    except record.RecordError as exc:
                        self._stop(pos, expected, exc)
                    break
                if lsn != expected:
                    raise CorruptLog(f"record LSN {lsn} where {expected} was expected", path=path, offset=pos)
                if self.count == 0:
                    tmin = tmax = time_ns
                elif time_ns < tmin:
                    tmin = time_ns
                elif time_ns > tmax:
                    tmax = time_ns
                self.count += 1
                yield lsn, time_ns, pos, nxt, rec
                expected += 1
                pos = nxt
        finally:
            self.data_end = pos
            self.last_lsn = expected - 1
            self.min_time_ns, self.max_time_ns = tmin, tmax
        if sealed:
            self._check_footer()

    def run(self) -> Walk:
        """Walk every record, CRC-check only (no entries decoded); return ``self``."""
        for _item in self.records(decode_from=1, decode_to=0):
            pass
        return self

    def _stop(self, pos: int, expected: int, exc: record.RecordError) -> None:
        if self.footer is not None:
            raise CorruptLog(
                f"invalid record in sealed segment: {exc.reason}",
                path=self.path,
                offset=pos,
                hint=SEALED_HINT,
            ) from None
        if zero_from(self._view, pos):
            return  # zero-filled space ahead of the writer: the clean end of the log
        self.tail_error = f"{exc.reason} at offset {pos}"
        self.tail_offset = pos
        self.tail_is_midlog = _valid_record_follows(self._view, pos, expected)

    def _check_footer(self) -> None:
        f = self.footer
        assert f is not None
        if not (
            f.count == self.count
            and f.last_lsn == self.last_lsn
            and (not self.count or (f.min_time_ns == self.min_time_ns and f.max_time_ns == self.max_time_ns))
        ):
            raise CorruptLog("segment footer does not match its records", path=self.path, offset=self.end)


_new = tuple.__new__  # builds a NamedTuple without its Python-level ``__new__``
_ENTRY = record.ENTRY_HEAD.unpack_from
_ENTRY_SIZE = record.ENTRY_HEAD.size
_KINDS = {int(k): k for k in record.EntryKind}


def _entries(
    raw: bytes | memoryview, view: memoryview, pos: int, end: int, count: int
) -> tuple[Entry, ...] | None:
    """The ``count`` entries of a record whose body ends at ``end`` (the layout and checks
    of ``record.decode``), or None if they are malformed (``decode`` then says how).
    ``raw``: the segment's bytes, so a key or value is one slice (``bytes`` if it is)."""
    if count == 1 and pos + _ENTRY_SIZE <= end:  # the common record: one put or delete
        kind, klen, vlen = _ENTRY(view, pos)
        pos += _ENTRY_SIZE
        ekind = _KINDS.get(kind)
        if ekind is None or pos + klen + vlen != end:
            return None
        key, value = raw[pos : pos + klen], raw[pos + klen : end]
        if type(key) is not bytes:
            key, value = bytes(key), bytes(value)
        return (_new(Entry, (ekind, key, value)),)
    out = []
    for _ in range(count):
        if pos + _ENTRY_SIZE > end:
            return None
        kind, klen, vlen = _ENTRY(view, pos)
        pos += _ENTRY_SIZE
        stop = pos + klen + vlen
        if stop > end:
            return None
        ekind = _KINDS.get(kind)
        if ekind is None:
            return None
        key = raw[pos : pos + klen]
        value = raw[pos + klen : stop]
        if type(key) is not bytes:
            key, value = bytes(key), bytes(value)
        out.append(_new(Entry, (ekind, key, value)))
        pos = stop
    if pos != end:
        return None
    return tuple(out)


def zero_from(view: memoryview, pos: int) -> bool:
    """Whether every byte from ``pos`` to the end of ``view`` is zero (and there is one)."""
    rest = view[pos:]
    return rest.nbytes > 0 and rest.tobytes().count(0) == rest.nbytes


def _valid_record_follows(view: memoryview, pos: int, lsn: int) -> bool:
    """After a bad record at ``pos`` (which should carry ``lsn``), does a good one follow?

    First where the bad record's length says it ends: damage inside a record whose
    successor is intact. Then the case of a flipped *length* bit, which must not turn the
    rest of the log into a "torn tail" and silently drop it: look for record ``lsn + 1``
    after ``pos``, and accept a hit only if the bad record's checksum is right for the
    length that the hit implies. That proves only the length field was damaged; a hit
    inside a torn record's own value bytes (a value may embed anything) fails that check.
    """
    if len(view) - pos < record.HEADER_SIZE:
        return False
    crc, body_len = record.HEADER.unpack_from(view, pos)
    if record.MIN_BODY <= body_len <= record.MAX_BODY and _decodes_at(
        view, pos + record.HEADER_SIZE + body_len, None
    ):
        return True
    # The LSN sits 8 bytes into a record; search for it (C speed) and verify each hit.
    base = pos + record.HEADER_SIZE + record.MIN_BODY
    rest = bytes(view[base:])
    needle = struct.pack("<Q", lsn + 1)
    hit = rest.find(needle)
    while hit >= 0:
        start = base + hit - record.HEADER_SIZE
        implied = start - pos - record.HEADER_SIZE
        if (
            _decodes_at(view, start, lsn + 1)
            and crc32c.crc32c(
                view[pos + record.HEADER_SIZE : start], crc32c.crc32c(struct.pack("<I", implied))
            )
            == crc
        ):
            return True
        hit = rest.find(needle, hit + 1)
    return False


def _decodes_at(view: memoryview, pos: int, lsn: int | None) -> bool:
    try:
        rec, _end = record.decode(view, pos)
    except record.RecordError:
        return False
    return lsn is None or rec.lsn == lsn
