"""Segment rotation: by size, on demand and by age (DESIGN §3)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from _storage_helpers import key_for, value_for

from unisondb.config import EngineConfig
from unisondb.storage import segment
from unisondb.storage.engine import Engine
from unisondb.storage.record import Entry, EntryKind

SMALL = EngineConfig(segment_size=4096)


def _write_many(eng: Engine, first: int, n: int, value_size: int = 60) -> list[int]:
    """``n`` writes, most submitted concurrently so group commits span rotations."""
    futures = [
        eng.submit([Entry(EntryKind.PUT, key_for(i), value_for(i, value_size))])
        for i in range(first, first + n)
    ]
    return [f.result() for f in futures]


def _check_sealed_segment(path: Path, max_size: int) -> segment.SegmentScan:
    scan = segment.scan(path)
    assert scan.sealed, path
    recs = [r for r, _s, _e in scan.records]
    assert recs, f"{path} is sealed but empty"
    footer = scan.footer
    assert footer is not None
    assert footer.count == len(recs)
    assert footer.last_lsn == recs[-1].lsn
    assert footer.min_time_ns == min(r.time_ns for r in recs)
    assert footer.max_time_ns == max(r.time_ns for r in recs)
    # Header, records and footer, and not one byte more (no padding, nothing after it).
    assert scan.data_end == scan.records[-1][2]
    assert scan.file_size == scan.data_end + segment.FOOTER_SIZE == path.stat().st_size
    assert path.read_bytes()[-segment.FOOTER_SIZE : -segment.FOOTER_SIZE + 4] == b"UDBF"
    # Size rotation: a multi-record segment never exceeds the limit (plus its footer).
    if len(recs) > 1:
        assert scan.data_end <= max_size
    return scan


def test_size_rotation_seals_contiguous_segments(open_engine: Callable[..., Engine]) -> None:
    eng = open_engine(SMALL)
    lsns = _write_many(eng, 1, 150) + [eng.put(key_for(151), value_for(151, 60))]
    lsns += _write_many(eng, 152, 149)
    assert lsns == list(range(1, 301))
    segs = eng.segments()
    sealed = [s for s in segs if s.sealed]
    assert len(sealed) >= 4
    assert not segs[-1].sealed and all(s.sealed for s in segs[:-1])
    assert [s.segment_id for s in segs] == list(range(1, len(segs) + 1))

    expected_lsn = 1
    last_time = 0
    for info in sealed:
        scan = _check_sealed_segment(info.path, SMALL.segment_size)
        assert info.first_lsn == scan.header.first_lsn == expected_lsn
        assert info.last_lsn == scan.last_lsn and info.count == len(scan.records)
        for rec, _s, _e in scan.records:
            assert rec.lsn == expected_lsn
            assert rec.time_ns >= last_time  # non-decreasing across segments
            last_time = rec.time_ns
            expected_lsn += 1
        assert segment.read_summary(info.path).footer == scan.footer
    active = segment.scan(segs[-1].path)
    assert active.first_lsn == expected_lsn
    assert [r.lsn for r, _s, _e in active.records] == list(range(expected_lsn, 301))
    for i in range(1, 301):
        assert eng.get(key_for(i)) == value_for(i, 60)


def test_record_larger_than_segment_size_gets_its_own_segment(open_engine: Callable[..., Engine]) -> None:
    eng = open_engine(SMALL)
    eng.put(b"small", b"x")
    big = b"B" * (3 * SMALL.segment_size)
    assert eng.put(b"big", big) == 2
    assert eng.put(b"after", b"y") == 3
    segs = eng.segments()
    assert [(s.first_lsn, s.last_lsn, s.sealed) for s in segs] == [(1, 1, True), (2, 2, True), (3, 3, False)]
    _check_sealed_segment(segs[1].path, SMALL.segment_size)
    assert eng.get(b"big") == big


def test_rotate_on_demand(open_engine: Callable[..., Engine]) -> None:
    eng = open_engine()
    assert eng.rotate() is None  # empty active segment: nothing to seal
    assert [s.segment_id for s in eng.segments()] == [1]
    eng.put(b"a", b"1")
    eng.put(b"b", b"2")
    assert eng.rotate() == 1
    assert eng.rotate() is None
    segs = eng.segments()
    assert [(s.segment_id, s.sealed, s.first_lsn, s.last_lsn, s.count) for s in segs] == [
        (1, True, 1, 2, 2),
        (2, False, 3, 2, 0),
    ]
    _check_sealed_segment(segs[0].path, 1 << 30)
    assert eng.put(b"c", b"3") == 3
    assert eng.rotate() == 2
    segs = eng.segments()
    assert [s.segment_id for s in segs] == [1, 2, 3]
    assert segs[1].first_lsn == segs[1].last_lsn == 3
    assert eng.offset() == (2, segment.HEADER_SIZE)  # the last record starts right after the header


def test_age_rotation_seals_nonempty_and_never_empty(open_engine: Callable[..., Engine]) -> None:
    """Time through the engine's seams: its ``wall_clock`` is the test's, and ``housekeep``
    runs the writer's between-groups pass (age seals) and returns once it ran."""
    age = 60.0
    eng = open_engine(EngineConfig(segment_max_age=age))
    now = [time.time_ns()]
    eng.wall_clock = lambda: now[0]

    def advance(seconds: float) -> None:
        now[0] += int(seconds * 1e9)
        eng.housekeep()

    # An empty segment is never sealed, however old it gets.
    advance(3 * age)
    assert [(s.segment_id, s.sealed) for s in eng.segments()] == [(1, False)]

    eng.put(b"k", b"v")  # into the (old by now) segment 1: sealed right after the commit
    eng.housekeep()
    sealed = eng.sealed_segments()
    assert [(s.segment_id, s.first_lsn, s.last_lsn) for s in sealed] == [(1, 1, 1)]
    _check_sealed_segment(sealed[0].path, 1 << 30)

    # The new, empty active segment stays unsealed.
    advance(3 * age)
    segs = eng.segments()
    assert [(s.segment_id, s.sealed, s.count) for s in segs] == [(1, True, 1), (2, False, 0)]

    # A write into the (old by now) segment 2 seals it right after the commit; a write
    # into a fresh segment 3 is sealed only once that segment is older than the limit.
    assert eng.put(b"k2", b"v2") == 2
    eng.housekeep()
    assert [s.segment_id for s in eng.sealed_segments()] == [1, 2]
    act = eng.wal.active
    assert act is not None and act.header.segment_id == 3
    now[0] = act.header.created_ns  # the clock at segment 3's creation
    assert eng.put(b"k3", b"v3") == 3
    advance(age - 1)
    assert [s.segment_id for s in eng.sealed_segments()] == [1, 2], "sealed before it was old enough"
    advance(2)
    sealed = eng.sealed_segments()
    assert [(s.segment_id, s.first_lsn, s.last_lsn) for s in sealed][-1] == (3, 3, 3)
    assert all(s.count > 0 for s in sealed)
