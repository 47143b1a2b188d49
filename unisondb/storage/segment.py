"""WAL segment file format: header, records, and (once sealed) a footer.

A segment is named ``%09d.wal`` after its id. All integers are little-endian.

Header (128 bytes, written once at creation through tmp + fsync + rename)::

    Offset  Size  Field
    0       4     magic        b"UDBW"
    4       2     version      2 (format 1 was a pre-release and is refused)
    6       2     flags        0 (reserved)
    8       8     segment_id   equals the id in the file name
    16      8     timeline     human-friendly history counter (parent's + 1); not an identity
    24      8     first_lsn    LSN the first record of this segment must carry
    32      8     created_ns   wall-clock nanoseconds at creation
    40      4     ns_crc       CRC32C of the namespace name (detects a segment from another namespace)
    44      4     reserved     zero
    48      16    history      history id: random, unique per history (see history.py)
    64      16    parent       history this one forked from (zero: none)
    80      8     fork_lsn     last LSN shared with ``parent`` (records here start after it)
    88      32    start_fp     state fingerprint digest before this segment's first record
    120     4     reserved     zero
    124     4     crc          CRC32C of bytes [0, 124)

Records follow from offset 128, back to back (format in ``record.py``).

Footer (80 bytes, appended when the segment is sealed; a sealed segment is never written again
and has no bytes besides header, records and footer)::

    Offset  Size  Field
    0       4     magic        b"UDBF"
    4       4     flags        bit 0: ``fingerprint`` is known (a segment sealed while
                               repairing a crash, before its state was rebuilt, has none)
    8       8     last_lsn     LSN of the last record
    16      8     min_time_ns  smallest record time
    24      8     max_time_ns  largest record time
    32      8     count        number of records
    40      32    fingerprint  state fingerprint digest after the last record
    72      4     reserved     zero
    76      4     crc          CRC32C of bytes [0, 76)

The footer lets backup, point-in-time planning and gap checks know a sealed segment's
LSN and time range by reading 208 bytes instead of scanning it; header and footer
fingerprints let a restore prove, at every segment boundary, that the state it rebuilt
is exactly the one the server had (``fingerprint.py``).
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import crc32c

from unisondb.errors import CorruptLog, from_os_error
from unisondb.storage import fsutil, record, walk
from unisondb.storage.fingerprint import EMPTY_DIGEST
from unisondb.storage.history import NO_HISTORY, Lineage
from unisondb.storage.layout import segment_name

MAGIC = b"UDBW"
FOOTER_MAGIC = b"UDBF"
VERSION = 2
HEADER = struct.Struct("<4sHHQQQQI4x16s16sQ32s4xI")
FOOTER = struct.Struct("<4sIQQQQ32s4xI")
HEADER_SIZE = HEADER.size  # 128
FOOTER_SIZE = FOOTER.size  # 80
_HEADER_CRC_AT = HEADER_SIZE - 4
_FOOTER_CRC_AT = FOOTER_SIZE - 4
assert (HEADER_SIZE, FOOTER_SIZE) == (walk.SEGMENT_HEADER_SIZE, walk.SEGMENT_FOOTER_SIZE)
FOOTER_HAS_FINGERPRINT = 1


def namespace_crc(namespace: str) -> int:
    return int(crc32c.crc32c(namespace.encode()))


@dataclass(frozen=True, slots=True)
class SegmentHeader:
    segment_id: int
    timeline: int
    first_lsn: int
    created_ns: int
    ns_crc: int = 0
    history: bytes = NO_HISTORY
    parent: bytes = NO_HISTORY
    fork_lsn: int = 0
    start_fp: bytes = EMPTY_DIGEST

    @classmethod
    def for_lineage(
        cls, segment_id: int, lineage: Lineage, first_lsn: int, created_ns: int, ns_crc: int, start_fp: bytes
    ) -> SegmentHeader:
        return cls(
            segment_id,
            lineage.timeline,
            first_lsn,
            created_ns,
            ns_crc,
            lineage.history,
            lineage.parent,
            lineage.fork_lsn,
            start_fp,
        )

    @property
    def lineage(self) -> Lineage:
        return Lineage(self.history, self.parent, self.fork_lsn, self.timeline)

    def encode(self) -> bytes:
        body = HEADER.pack(
            MAGIC,
            VERSION,
            0,
            self.segment_id,
            self.timeline,
            self.first_lsn,
            self.created_ns,
            self.ns_crc,
            self.history,
            self.parent,
            self.fork_lsn,
            self.start_fp,
            0,
        )[:_HEADER_CRC_AT]
        return body + struct.pack("<I", crc32c.crc32c(body))


@dataclass(frozen=True, slots=True)
class SegmentFooter:
    last_lsn: int
    min_time_ns: int
    max_time_ns: int
    count: int
    #: State fingerprint digest after the last record; None if it was not known at sealing.
    fingerprint: bytes | None = None

    def encode(self) -> bytes:
        flags = 0 if self.fingerprint is None else FOOTER_HAS_FINGERPRINT
        body = FOOTER.pack(
            FOOTER_MAGIC,
            flags,
            self.last_lsn,
            self.min_time_ns,
            self.max_time_ns,
            self.count,
            self.fingerprint or bytes(32),
            0,
        )[:_FOOTER_CRC_AT]
        return body + struct.pack("<I", crc32c.crc32c(body))


def decode_header(buf: bytes, path: Path) -> SegmentHeader:
    if len(buf) < 6:
        raise CorruptLog("segment header is truncated", path=path, offset=0)
    magic = bytes(buf[:4])
    if magic != MAGIC:
        raise CorruptLog(f"not a UnisonDB WAL segment (magic {magic!r})", path=path, offset=0)
    version = struct.unpack_from("<H", buf, 4)[0]
    if version == 1:
        raise CorruptLog(
            "segment is format version 1 (a pre-release without history ids); this build "
            f"reads version {VERSION}",
            path=path,
            offset=4,
            hint="restore from a backup written by this version",
        )
    if len(buf) < HEADER_SIZE:
        raise CorruptLog("segment header is truncated", path=path, offset=0)
    if crc32c.crc32c(buf[:_HEADER_CRC_AT]) != struct.unpack_from("<I", buf, _HEADER_CRC_AT)[0]:
        raise CorruptLog("segment header checksum mismatch", path=path, offset=0)
    if version != VERSION:
        raise CorruptLog(f"unsupported segment format version {version}", path=path, offset=4)
    (
        _m,
        _v,
        _flags,
        seg_id,
        timeline,
        first_lsn,
        created,
        ns_crc,
        history,
        parent,
        fork_lsn,
        start_fp,
        _crc,
    ) = HEADER.unpack_from(buf, 0)
    return SegmentHeader(seg_id, timeline, first_lsn, created, ns_crc, history, parent, fork_lsn, start_fp)


def try_decode_footer(buf: bytes | memoryview) -> SegmentFooter | None:
    """Return the footer if the last FOOTER_SIZE bytes of ``buf`` are a valid one."""
    if len(buf) < HEADER_SIZE + FOOTER_SIZE:
        return None
    tail = bytes(buf[-FOOTER_SIZE:])
    magic, flags, last_lsn, tmin, tmax, count, fp, crc = FOOTER.unpack(tail)
    if magic != FOOTER_MAGIC or crc32c.crc32c(tail[:_FOOTER_CRC_AT]) != crc:
        return None
    return SegmentFooter(last_lsn, tmin, tmax, count, fp if flags & FOOTER_HAS_FINGERPRINT else None)


@dataclass(slots=True)
class SegmentScan:
    """The result of reading one segment file from start to end."""

    path: Path
    header: SegmentHeader
    footer: SegmentFooter | None
    #: (record, start offset, end offset) for every valid record, in order.
    records: list[tuple[record.Record, int, int]] = field(default_factory=list)
    #: Offset just past the last valid record (where the next record would go).
    data_end: int = HEADER_SIZE
    file_size: int = 0
    #: Why scanning stopped before the end of an unsealed file, if it did.
    tail_error: str | None = None
    #: True if a valid record follows the bad one: damage in the middle, not a torn tail.
    tail_is_midlog: bool = False

    @property
    def sealed(self) -> bool:
        return self.footer is not None

    @property
    def first_lsn(self) -> int:
        return self.header.first_lsn

    @property
    def last_lsn(self) -> int:
        return self.records[-1][0].lsn if self.records else self.header.first_lsn - 1


def read_file(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise from_os_error(exc, path) from exc


def scan(path: Path, buf: bytes | None = None) -> SegmentScan:
    """Read and verify a whole segment, every record decoded.

    A sealed segment must be perfect: every record valid, LSNs contiguous from the
    header's ``first_lsn``, and the footer matching; anything else is ``CorruptLog``.
    An unsealed segment stops at the first invalid record and reports it in
    ``tail_error``; whether that is a torn tail or corruption is the caller's call
    (only the newest segment may have a torn tail). A file whose last bytes merely look
    like a footer (a value can end with them) but that reads as whole records without
    one is reported as unsealed. The checks are the record walker's (``walk.py``).
    """
    data = read_file(path) if buf is None else buf
    w, records = _walk_either(path, data, _decoded)
    result = SegmentScan(path, w.header, w.footer, records, w.data_end, len(data))
    result.tail_error = w.tail_error
    result.tail_is_midlog = w.tail_is_midlog
    return result


def walk_bytes(path: Path, data: bytes) -> walk.Walk:
    """``scan`` without decoding the entries or keeping the records: every check, the
    counts, LSN and time range, and the tail (for ``verify`` and listings)."""
    return _walk_either(path, data, walk.Walk.run)[0]


_T = TypeVar("_T")


def _decoded(w: walk.Walk) -> list[tuple[record.Record, int, int]]:
    return [(rec, start, end) for _lsn, _t, start, end, rec in w.records() if rec is not None]


def _walk_either(path: Path, data: bytes, run: Callable[[walk.Walk], _T]) -> tuple[walk.Walk, _T]:
    """Walk ``data`` as sealed if its end reads as a footer, else as unsealed."""
    header = decode_header(data, path)
    footer = try_decode_footer(data)
    if footer is None:
        w = walk.Walk(path, data, header, None)
        return w, run(w)
    try:
        w = walk.Walk(path, data, header, footer)
        return w, run(w)
    except CorruptLog as sealed_error:
        # Values are user data: an unsealed segment whose last record's value ends with
        # the bytes of a valid footer looks sealed. If the whole file reads as whole
        # records without a footer, that is what it is.
        try:
            w = walk.Walk(path, data, header, None)
            out = run(w)
        except CorruptLog:
            raise sealed_error from None
        if w.tail_error is not None or not w.count:
            raise sealed_error from None
        return w, out


@dataclass(frozen=True, slots=True)
class SegmentSummary:
    """What a sealed segment's header and footer say, read without scanning it."""

    path: Path
    header: SegmentHeader
    footer: SegmentFooter | None
    size: int


def read_summary(path: Path) -> SegmentSummary:
    """Read only the header and (if present) the footer of a segment."""
    try:
        with open(path, "rb") as f:
            head = f.read(HEADER_SIZE)
            size = os.fstat(f.fileno()).st_size
            footer = None
            if size >= HEADER_SIZE + FOOTER_SIZE:
                f.seek(size - FOOTER_SIZE)
                footer = try_decode_footer(head + f.read(FOOTER_SIZE))
    except OSError as exc:
        raise from_os_error(exc, path) from exc
    return SegmentSummary(path, decode_header(head, path), footer, size)


class ActiveSegment:
    """The one segment that is being appended to. Only the WAL writer thread touches it."""

    def __init__(self, path: Path, header: SegmentHeader, fd: int, size: int) -> None:
        self.path = path
        self.header = header
        self._fd = fd
        self.size = size
        self.count = 0
        self.last_lsn = header.first_lsn - 1
        self.min_time_ns = 0
        self.max_time_ns = 0
        #: Offset at which the most recent record starts (for the /offset endpoint).
        self.last_record_offset = 0
        #: A failed write could not be cut back off again: where the file ends is unknown,
        #: so it must never be appended to or sealed (the engine stops; recovery decides).
        self.broken = False
        #: Shared with the zero-filler (``zerofill.py``): it writes zeros only at or past
        #: ``max(zeroed_end, size)`` and only while holding this lock.
        self.lock = threading.Lock()
        #: Offset up to which the file holds records or zeros (the file's length).
        self.zeroed_end = size
        self.closed = False

    @classmethod
    def create(cls, directory: Path, header: SegmentHeader) -> ActiveSegment:
        """Create a new segment durably: the header is whole before the name exists."""
        path = directory / segment_name(header.segment_id)
        fsutil.write_file_atomic(path, header.encode())
        return cls.open_existing(path, header, HEADER_SIZE)

    @classmethod
    def open_existing(cls, path: Path, header: SegmentHeader, size: int) -> ActiveSegment:
        try:
            fd = os.open(path, os.O_WRONLY)
            length = os.fstat(fd).st_size
        except OSError as exc:
            raise from_os_error(exc, path) from exc
        seg = cls(path, header, fd, size)
        seg.zeroed_end = max(size, length)  # a recovered zero tail (``scan`` checked it)
        return seg

    @property
    def fd(self) -> int:
        return self._fd

    def note_records(self, recs: list[tuple[int, int, int]]) -> None:
        """Account for records already present (lsn, time_ns, start offset)."""
        for lsn, t, start in recs:
            self._account(lsn, t, start)

    def _account(self, lsn: int, time_ns: int, start: int) -> None:
        if self.count == 0:
            self.min_time_ns = self.max_time_ns = time_ns
        else:
            self.min_time_ns = min(self.min_time_ns, time_ns)
            self.max_time_ns = max(self.max_time_ns, time_ns)
        self.count += 1
        self.last_lsn = lsn
        self.last_record_offset = start

    def append(self, data: bytes, meta: list[tuple[int, int, int]]) -> None:
        """Write encoded records at the end; ``meta`` is (lsn, time_ns, length) per record.

        Not durable until ``sync``. On error the file is cut back to its previous size
        so a failed write never leaves half a record before the next one.
        """
        start = self.size
        try:
            with self.lock:
                written = os.pwrite(self._fd, data, start)
                if written != len(data):
                    raise OSError(28, "short write")
                self.size = start + len(data)
        except OSError:
            self._cut_back(start)
            raise
        pos = start
        for lsn, t, length in meta:
            self._account(lsn, t, pos)
            pos += length

    def truncate(self, size: int) -> None:
        with self.lock:
            os.ftruncate(self._fd, size)
            self.size = self.zeroed_end = size

    def _cut_back(self, size: int, *, sync: bool = False) -> None:
        """Cut a failed write off again (``sync``: durably); on failure mark ``broken``."""
        try:
            with self.lock:
                os.ftruncate(self._fd, size)
                self.size = self.zeroed_end = size
            if sync:
                fsutil.fdatasync(self._fd)
        except OSError:
            self.broken = True
            return

    def mark(self) -> tuple[int, int, int, int, int, int]:
        """The segment's end and accounting now, for ``rollback``."""
        return (
            self.size,
            self.count,
            self.last_lsn,
            self.min_time_ns,
            self.max_time_ns,
            self.last_record_offset,
        )

    def rollback(self, mark: tuple[int, int, int, int, int, int]) -> None:
        """Durably drop what was appended after ``mark`` (records whose fdatasync failed:
        their bytes may or may not be on disk, so they are removed and the cut is synced).
        Sets ``broken`` if that fails too."""
        self._cut_back(mark[0], sync=True)
        if not self.broken:
            (
                _size,
                self.count,
                self.last_lsn,
                self.min_time_ns,
                self.max_time_ns,
                self.last_record_offset,
            ) = mark

    def sync(self) -> None:
        fsutil.fdatasync(self._fd)

    def footer(self, fingerprint: bytes | None) -> SegmentFooter:
        return SegmentFooter(self.last_lsn, self.min_time_ns, self.max_time_ns, self.count, fingerprint)

    def seal(self, fingerprint: bytes | None) -> SegmentFooter:
        """Append the footer and make it durable; the file is immutable afterwards.

        On failure (a full disk) the footer is cut off again and synced, so the segment
        is still a valid active segment that can be appended to or sealed later. If even
        that fails the footer may be on disk in part or in whole: ``broken`` is set, the
        engine stops accepting writes, and the next start sees either a sealed segment or
        a torn footer, which it cuts off as a torn tail.
        """
        footer = self.footer(fingerprint)
        data = footer.encode()
        try:
            with self.lock:
                self.closed = True  # the zero-filler stops; on failure it may resume
                if self.zeroed_end > self.size:  # a sealed segment ends at its footer
                    os.ftruncate(self._fd, self.size)
                    self.zeroed_end = self.size
            if os.pwrite(self._fd, data, self.size) != len(data):
                raise OSError(28, "short write of segment footer")
            fsutil.fdatasync(self._fd)
        except OSError:
            self._cut_back(self.size, sync=True)
            with self.lock:
                self.closed = False
            raise
        self.size += len(data)
        self.close()
        return footer

    def close(self) -> None:
        with self.lock:
            self.closed = True
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


def iter_segment_files(directory: Path) -> Iterator[tuple[int, Path]]:
    """(id, path) of every segment file in ``directory``, ascending by id."""
    from unisondb.storage.layout import parse_segment_name

    if not directory.is_dir():
        return iter(())
    found = []
    for p in directory.iterdir():
        seg_id = parse_segment_name(p.name)
        if seg_id is not None and p.is_file():
            found.append((seg_id, p))
    return iter(sorted(found))
