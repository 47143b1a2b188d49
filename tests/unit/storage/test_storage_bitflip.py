"""A single flipped bit anywhere in a sealed segment is detected (DESIGN §2.5, §3).

Exhaustive over every bit of a small sealed segment: header, records and footer.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from _storage_helpers import NS, key_for

from unisondb.errors import CorruptLog
from unisondb.storage import segment
from unisondb.storage.btree import BTree
from unisondb.storage.engine import Engine
from unisondb.storage.layout import segment_name
from unisondb.storage.recovery import recover
from unisondb.storage.wal import Wal


def _flip(raw: bytes, byte: int, bit: int) -> bytes:
    out = bytearray(raw)
    out[byte] ^= 1 << bit
    return bytes(out)


def _regions(path: Path) -> tuple[list[tuple[int, int]], int]:
    """Record spans (start, end) and the footer offset of a sealed segment."""
    scan = segment.scan(path)
    assert scan.sealed
    return [(s, e) for _r, s, e in scan.records], scan.file_size - segment.FOOTER_SIZE


def _expected_offset(byte: int, spans: list[tuple[int, int]], footer_at: int) -> int:
    """Where the error must point for damage at ``byte``."""
    if byte < segment.HEADER_SIZE:
        return 0
    if byte >= footer_at:
        return footer_at  # the footer no longer decodes: scanning stops right there
    return next(s for s, e in spans if s <= byte < e)


@pytest.fixture
def small_wal(tmp_path: Path, build_wal: Callable[..., int]) -> Path:
    """Sealed segment 1 (LSNs 1-2), then an active segment 2 (LSN 3) after it."""
    directory = tmp_path / "wal"
    assert build_wal(directory, [2, 1], value_size=3) == 3
    return directory


def test_every_bit_flip_in_sealed_segment_is_detected(tmp_path: Path, small_wal: Path) -> None:
    seg = small_wal / segment_name(1)
    raw = seg.read_bytes()
    spans, footer_at = _regions(seg)
    assert footer_at + segment.FOOTER_SIZE == len(raw)

    # One empty B-tree for every attempt: recovery must refuse before applying anything.
    btree = BTree(tmp_path / "db", map_size=1 << 20)
    undetected: list[tuple[int, int, str]] = []
    try:
        for byte in range(len(raw)):
            want_offset = _expected_offset(byte, spans, footer_at)
            for bit in range(8):
                flipped = _flip(raw, byte, bit)
                where = (byte, bit)

                # 1. segment.scan on the damaged bytes.
                try:
                    scan = segment.scan(seg, flipped)
                except CorruptLog as exc:
                    assert byte < footer_at, where
                    assert exc.path == seg and exc.offset == want_offset, (where, str(exc))
                else:
                    if scan.sealed or byte < footer_at:
                        undetected.append((byte, bit, "scan"))
                    else:
                        # Footer damage: no longer recognised as sealed, and the footer bytes
                        # are not mistaken for a record.
                        assert segment.try_decode_footer(flipped) is None, where
                        assert scan.tail_error is not None and scan.data_end == footer_at, where

                # 2. Opening the WAL (segment 1 is not the newest) and replaying it refuses
                #    to start, naming the file and the offset.
                seg.write_bytes(flipped)
                try:
                    wal = Wal.open(small_wal, NS)
                    try:
                        recover(wal, btree)
                    finally:
                        wal.close()
                except CorruptLog as exc:
                    assert exc.path == seg, (where, str(exc))
                    assert exc.offset == want_offset, (where, str(exc))
                    assert str(seg) in str(exc)
                else:
                    undetected.append((byte, bit, "open"))
                assert btree.read_checkpoint().applied_lsn == 0, where
                assert btree.get(key_for(1)) is None, where
                # Refusing to start must not have modified or "repaired" anything.
                assert seg.read_bytes() == flipped, where
                assert not list(small_wal.glob("*.broken")), where
    finally:
        btree.close()
        seg.write_bytes(raw)
    assert undetected == []


@pytest.mark.parametrize("region", ["header", "record", "footer"])
def test_engine_refuses_to_start_on_damaged_sealed_segment(
    tmp_path: Path, small_wal: Path, open_engine: Callable[..., Engine], region: str
) -> None:
    data_dir = tmp_path / "data"
    wal_dir = data_dir / NS / "wal"
    shutil.copytree(small_wal, wal_dir)
    seg = wal_dir / segment_name(1)
    raw = seg.read_bytes()
    spans, footer_at = _regions(seg)
    byte = {"header": 20, "record": spans[1][0] + 30, "footer": footer_at + 10}[region]
    seg.write_bytes(_flip(raw, byte, 3))
    with pytest.raises(CorruptLog) as info:
        open_engine(directory=data_dir)
    assert info.value.path == seg
    assert info.value.offset == _expected_offset(byte, spans, footer_at)
    assert segment_name(1) in str(info.value)
    # The refused start released the namespace lock and changed nothing: with the good
    # segment back, the engine starts and replays everything.
    seg.write_bytes(raw)
    eng = open_engine(directory=data_dir)
    assert eng.recovery.records_replayed == 3
    assert eng.get(key_for(3)) is not None


@pytest.fixture
def newest_wal(tmp_path: Path, build_wal: Callable[..., int]) -> Path:
    """Sealed segment 1 (LSN 1), then the newest, unsealed segment 2 (LSNs 2-4)."""
    directory = tmp_path / "template"
    assert build_wal(directory, [1, 3], value_size=3) == 4
    return directory


def test_bit_flip_before_the_last_record_of_newest_segment_is_not_a_torn_tail(
    tmp_path: Path, newest_wal: Path
) -> None:
    """Damage in the header or a non-last record of the newest segment is corruption.

    In particular a flipped bit in a record's *length* must not make the following,
    acknowledged records look like a torn tail that is silently cut off.
    """
    wal_dir = tmp_path / "wal"
    shutil.copytree(newest_wal, wal_dir)
    seg = wal_dir / segment_name(2)
    raw = seg.read_bytes()
    scan = segment.scan(seg)
    spans = [(s, e) for _r, s, e in scan.records]
    last_start = spans[-1][0]
    undetected = []
    try:
        for byte in range(last_start):
            want = 0 if byte < segment.HEADER_SIZE else next(s for s, e in spans if s <= byte < e)
            for bit in range(8):
                flipped = _flip(raw, byte, bit)
                seg.write_bytes(flipped)
                try:
                    Wal.open(wal_dir, NS).close()
                except CorruptLog as exc:
                    assert exc.path == seg and exc.offset == want, (byte, bit, str(exc))
                else:
                    undetected.append((byte, bit))
                assert seg.read_bytes() == flipped, (byte, bit)
                assert not list(wal_dir.glob("*.broken")), (byte, bit)
    finally:
        seg.write_bytes(raw)
    assert undetected == []


def test_bit_flip_in_last_record_of_newest_segment_ends_the_log(tmp_path: Path, newest_wal: Path) -> None:
    """The last record of the newest segment cannot be told from a torn write: it is cut
    off like one, and the ``.broken`` copy keeps the original bytes."""
    scan = segment.scan(newest_wal / segment_name(2))
    start, end = scan.records[-1][1], scan.records[-1][2]
    raw = (newest_wal / segment_name(2)).read_bytes()
    for byte in range(start, end, 5):
        wal_dir = tmp_path / f"wal{byte}"
        shutil.copytree(newest_wal, wal_dir)
        seg = wal_dir / segment_name(2)
        flipped = _flip(raw, byte, byte % 8)
        seg.write_bytes(flipped)
        wal = Wal.open(wal_dir, NS)
        try:
            assert wal.last_lsn == 3
        finally:
            wal.close()
        assert seg.stat().st_size == start
        assert seg.with_name(seg.name + ".broken").read_bytes() == flipped
