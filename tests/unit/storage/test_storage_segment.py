"""Segment header/footer codecs and a segment scan (unisondb/storage/segment.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from _storage_helpers import key_for, time_for, value_for
from hypothesis import given, settings
from hypothesis import strategies as st

from unisondb.errors import CorruptLog
from unisondb.storage import segment
from unisondb.storage.fingerprint import Fingerprint
from unisondb.storage.layout import segment_name
from unisondb.storage.record import Entry, EntryKind
from unisondb.storage.segment import SegmentFooter, SegmentHeader

U64 = st.integers(min_value=0, max_value=2**64 - 1)
U32 = st.integers(min_value=0, max_value=2**32 - 1)


@settings(max_examples=50, deadline=None, database=None)
@given(seg_id=U64, timeline=U64, first_lsn=U64, created=U64, ns_crc=U32)
def test_header_round_trip(seg_id: int, timeline: int, first_lsn: int, created: int, ns_crc: int) -> None:
    h = SegmentHeader(seg_id, timeline, first_lsn, created, ns_crc)
    raw = h.encode()
    assert len(raw) == segment.HEADER_SIZE == 128
    assert raw[:4] == segment.MAGIC
    assert segment.decode_header(raw, Path("x.wal")) == h


@settings(max_examples=50, deadline=None, database=None)
@given(last_lsn=U64, tmin=U64, tmax=U64, count=U64)
def test_footer_round_trip(last_lsn: int, tmin: int, tmax: int, count: int) -> None:
    f = SegmentFooter(last_lsn, tmin, tmax, count)
    raw = f.encode()
    assert len(raw) == segment.FOOTER_SIZE == 80
    assert raw[:4] == segment.FOOTER_MAGIC
    header = SegmentHeader(1, 1, 1, 0).encode()
    assert segment.try_decode_footer(header + raw) == f
    # Too short to hold a header and a footer: never mistaken for a sealed segment.
    assert segment.try_decode_footer(raw) is None


def test_header_rejects_short_and_foreign_files(tmp_path: Path) -> None:
    raw = SegmentHeader(7, 1, 1, 0).encode()
    with pytest.raises(CorruptLog, match="truncated"):
        segment.decode_header(raw[:-1], tmp_path / "a.wal")
    with pytest.raises(CorruptLog, match="magic"):
        segment.decode_header(b"XXXX" + raw[4:], tmp_path / "a.wal")


def test_scan_of_sealed_segment_reports_records_and_footer(
    wal_dir: Path, build_wal: Callable[..., int]
) -> None:
    build_wal(wal_dir, [3, 2], seal_last=True)
    s1 = segment.scan(wal_dir / segment_name(1))
    s2 = segment.scan(wal_dir / segment_name(2))
    assert s1.sealed and s2.sealed
    assert [r.lsn for r, _s, _e in s1.records] == [1, 2, 3]
    assert [r.lsn for r, _s, _e in s2.records] == [4, 5]
    assert s2.first_lsn == 4 and s2.last_lsn == 5
    assert s1.records[0][0].entries == (Entry(EntryKind.PUT, key_for(1), value_for(1)),)
    state = Fingerprint.of_items([(key_for(i), value_for(i)) for i in (1, 2, 3)])
    assert s1.footer == SegmentFooter(3, time_for(1), time_for(3), 3, state.digest())
    assert s2.header.start_fp == state.digest()  # the state before LSN 4 is the one after 3
    assert s1.data_end + segment.FOOTER_SIZE == s1.file_size
    assert s1.tail_error is None
    summary = segment.read_summary(wal_dir / segment_name(2))
    assert summary.footer == s2.footer and summary.header == s2.header


def test_sealed_segment_with_wrong_lsn_sequence_is_corrupt(
    tmp_path: Path, wal_dir: Path, build_wal: Callable[..., int]
) -> None:
    """A whole, checksummed segment whose header disagrees with its records is refused."""
    build_wal(wal_dir, [2, 1], seal_last=True)
    raw = (wal_dir / segment_name(2)).read_bytes()
    h = segment.decode_header(raw, wal_dir / segment_name(2))
    bad = SegmentHeader(h.segment_id, h.timeline, h.first_lsn + 1, h.created_ns, h.ns_crc)
    path = tmp_path / "bad.wal"
    path.write_bytes(bad.encode() + raw[segment.HEADER_SIZE :])
    with pytest.raises(CorruptLog, match="LSN 3 where 4 was expected") as info:
        segment.scan(path)
    assert info.value.offset == segment.HEADER_SIZE


def test_value_that_ends_with_a_footer_does_not_seal_a_segment(
    wal_dir: Path, build_wal: Callable[..., int]
) -> None:
    """Values are user data: one ending in a valid footer must not pass for a real one."""
    from unisondb.storage import record
    from unisondb.storage.wal import Wal

    build_wal(wal_dir, [2])
    forged = SegmentFooter(10**12, 0, 0, 1).encode()
    wal = Wal.open(wal_dir, "default")
    data = record.encode(3, 3, [Entry(EntryKind.PUT, b"evil", b"x" + forged)])
    wal.append(data, [(3, 3, len(data))])
    wal.sync()
    wal.close()
    path = wal_dir / segment_name(1)
    assert segment.read_summary(path).footer is not None  # the bytes do look like one
    scan = segment.scan(path)
    assert not scan.sealed and scan.tail_error is None
    assert [r.lsn for r, _s, _e in scan.records] == [1, 2, 3]
    wal = Wal.open(wal_dir, "default")
    try:
        assert wal.active is not None and wal.active.count == 3
        assert wal.last_lsn == 3 and not wal.sealed_segments()
    finally:
        wal.close()
