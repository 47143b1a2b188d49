"""A torn or zero-filled tail of the newest segment is the end of the log (DESIGN §2.5)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
from _storage_helpers import NS, key_for, value_for

from unisondb.config import EngineConfig
from unisondb.storage import segment
from unisondb.storage.btree import BTree
from unisondb.storage.engine import Engine
from unisondb.storage.layout import segment_name
from unisondb.storage.recovery import recover
from unisondb.storage.wal import Wal

LAST = 7  # LSNs 1..4 in sealed segment 1, 5..7 in the active segment 2


@pytest.fixture
def template(tmp_path: Path, build_wal: Callable[..., int]) -> Path:
    """A WAL with a sealed segment and an active (newest) one of three records."""
    directory = tmp_path / "template"
    assert build_wal(directory, [4, 3]) == LAST
    return directory


def _last_record_span(path: Path) -> tuple[int, int]:
    scan = segment.scan(path)
    assert not scan.sealed and scan.records[-1][0].lsn == LAST
    _rec, start, end = scan.records[-1]
    assert end == scan.file_size
    return start, end


def _reopen(wal_dir: Path, db_dir: Path) -> tuple[Wal, int, BTree]:
    wal = Wal.open(wal_dir, NS)
    btree = BTree(db_dir, map_size=1 << 20)
    result = recover(wal, btree)
    return wal, result.next_lsn, btree


def _check_log_ends_at(wal: Wal, next_lsn: int, btree: BTree, last: int) -> None:
    assert wal.last_lsn == last
    assert next_lsn == last + 1
    assert btree.read_checkpoint().applied_lsn == last
    for lsn in range(1, last + 1):
        assert btree.get(key_for(lsn)) == value_for(lsn)
    assert btree.get(key_for(last + 1)) is None


def test_torn_tail_at_every_offset_of_last_record(tmp_path: Path, template: Path) -> None:
    newest = template / segment_name(2)
    start, end = _last_record_span(newest)
    original = newest.read_bytes()
    for cut in range(start, end):
        work = tmp_path / f"cut{cut}"
        wal_dir = work / "wal"
        shutil.copytree(template, wal_dir)
        seg = wal_dir / segment_name(2)
        torn = original[:cut]
        seg.write_bytes(torn)

        wal, next_lsn, btree = _reopen(wal_dir, work / "db")
        try:
            _check_log_ends_at(wal, next_lsn, btree, LAST - 1)
            assert wal.active is not None and wal.active.size == start
        finally:
            wal.close()
            btree.close()
        assert seg.stat().st_size == start, cut
        broken = seg.with_name(seg.name + ".broken")
        if cut > start:
            assert broken.read_bytes() == torn, cut
            assert wal.report.truncated_bytes == cut - start
            assert wal.report.broken_copy == broken
        else:
            assert not broken.exists()
            assert wal.report.truncated_bytes == 0
        # Idempotent: a second open finds a clean log and repairs nothing.
        wal2 = Wal.open(wal_dir, NS)
        try:
            assert wal2.last_lsn == LAST - 1 and wal2.report.truncated_bytes == 0
        finally:
            wal2.close()
        shutil.rmtree(work)


@pytest.mark.parametrize("zeros", [1, 7, 8, 100, 4096])
def test_zero_filled_space_after_last_record(tmp_path: Path, template: Path, zeros: int) -> None:
    """Zeros after a whole record (preallocated space, ``zerofill.py``) end the log cleanly:
    nothing is cut, nothing is reported as torn."""
    wal_dir = tmp_path / "wal"
    shutil.copytree(template, wal_dir)
    seg = wal_dir / segment_name(2)
    size = seg.stat().st_size
    with open(seg, "ab") as f:
        f.write(b"\0" * zeros)
    wal, next_lsn, btree = _reopen(wal_dir, tmp_path / "db")
    try:
        _check_log_ends_at(wal, next_lsn, btree, LAST)
        assert wal.active is not None and wal.active.size == size
    finally:
        wal.close()
        btree.close()
    assert not seg.with_name(seg.name + ".broken").exists()
    assert wal.report.truncated_bytes == 0


def test_last_record_replaced_by_zeros(tmp_path: Path, template: Path) -> None:
    """The size of the last record reached the disk but its data did not: the log ends
    before it (zeros are never the start of a record)."""
    wal_dir = tmp_path / "wal"
    shutil.copytree(template, wal_dir)
    seg = wal_dir / segment_name(2)
    start, end = _last_record_span(seg)
    raw = seg.read_bytes()
    seg.write_bytes(raw[:start] + b"\0" * (end - start))
    wal, next_lsn, btree = _reopen(wal_dir, tmp_path / "db")
    try:
        _check_log_ends_at(wal, next_lsn, btree, LAST - 1)
        assert wal.active is not None and wal.active.size == start
    finally:
        wal.close()
        btree.close()
    assert wal.report.truncated_bytes == 0


def test_engine_continues_after_torn_tail(
    tmp_path: Path, template: Path, open_engine: Callable[..., Engine]
) -> None:
    """After the repair the next write reuses the LSN of the record that was never whole."""
    data_dir = tmp_path / "data"
    wal_dir = data_dir / NS / "wal"
    shutil.copytree(template, wal_dir)
    seg = wal_dir / segment_name(2)
    start, end = _last_record_span(seg)
    seg.write_bytes(seg.read_bytes()[: (start + end) // 2])
    eng = open_engine(EngineConfig(), directory=data_dir)
    assert eng.recovery.records_replayed == LAST - 1
    assert eng.put(b"after", b"tear") == LAST
    assert eng.get(key_for(LAST)) is None
    assert eng.get(b"after") == b"tear"
    assert seg.with_name(seg.name + ".broken").exists()
    # The repaired segment was sealed at startup and the new write went to a new one.
    segs = eng.segments()
    assert [s.segment_id for s in segs] == [1, 2, 3]
    assert segs[1].sealed and segs[1].last_lsn == LAST - 1 and segs[2].first_lsn == LAST


def test_older_segment_missing_its_footer_is_sealed_on_open(tmp_path: Path, template: Path) -> None:
    """A crash between a segment's last record and its footer: the next open seals it."""
    wal_dir = tmp_path / "wal"
    shutil.copytree(template, wal_dir)
    seg = wal_dir / segment_name(1)
    sealed = seg.read_bytes()
    seg.write_bytes(sealed[: -segment.FOOTER_SIZE])
    wal, next_lsn, btree = _reopen(wal_dir, tmp_path / "db")
    try:
        _check_log_ends_at(wal, next_lsn, btree, LAST)
        assert wal.report.sealed_on_open == 1
        assert [s.segment_id for s in wal.sealed_segments()] == [1]
    finally:
        wal.close()
        btree.close()
    # The footer the rotation would have written, except that the state fingerprint after
    # the segment was not known when it was sealed during open (before recovery).
    resealed = segment.try_decode_footer(seg.read_bytes())
    original = segment.try_decode_footer(sealed)
    assert resealed is not None and original is not None and original.fingerprint is not None
    assert resealed == replace(original, fingerprint=None)
    assert seg.read_bytes()[: -segment.FOOTER_SIZE] == sealed[: -segment.FOOTER_SIZE]


@pytest.mark.parametrize("keep", [1, 20, segment.FOOTER_SIZE - 1])
def test_torn_footer_of_newest_segment(tmp_path: Path, build_wal: Callable[..., int], keep: int) -> None:
    """A crash while sealing the newest segment: the partial footer is a torn tail."""
    wal_dir = tmp_path / "wal"
    build_wal(wal_dir, [2, 3], seal_last=True)
    seg = wal_dir / segment_name(2)
    raw = seg.read_bytes()
    records_end = len(raw) - segment.FOOTER_SIZE
    seg.write_bytes(raw[: records_end + keep])
    wal, next_lsn, btree = _reopen(wal_dir, tmp_path / "db")
    try:
        _check_log_ends_at(wal, next_lsn, btree, 5)
        assert wal.active is not None and wal.active.count == 3
    finally:
        wal.close()
        btree.close()
    assert seg.stat().st_size == records_end
