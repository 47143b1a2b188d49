"""Segments zero-filled ahead of the writer (``zerofill.py``), and what recovery makes of them.

Real files throughout: the crash is simulated by writing exactly the bytes a crash can
leave (a record cut at every offset, the rest of the preallocated space zeros) and
opening the WAL again.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from _storage_helpers import NS, key_for, value_for

from unisondb.config import EngineConfig
from unisondb.storage import layout, segment
from unisondb.storage.btree import BTree
from unisondb.storage.engine import Engine
from unisondb.storage.layout import segment_name
from unisondb.storage.recovery import recover
from unisondb.storage.wal import Wal

LAST = 7  # LSNs 1..4 in sealed segment 1, 5..7 in the active segment 2
PREALLOCATED = 8192  # zeros after the last record, as the zero-filler leaves them


def _reopen(wal_dir: Path, db_dir: Path) -> tuple[Wal, int, BTree]:
    wal = Wal.open(wal_dir, NS)
    btree = BTree(db_dir, map_size=1 << 20)
    return wal, recover(wal, btree).next_lsn, btree


def test_crash_at_every_offset_of_the_last_record_in_zero_filled_space(
    tmp_path: Path, build_wal: Callable[..., int]
) -> None:
    """The last record cut at every byte, the preallocated zeros after it: the record is
    either whole (kept), absent (clean end: nothing cut, no .broken copy) or torn
    (cut off and reported, as without preallocation)."""
    template = tmp_path / "template"
    assert build_wal(template, [4, 3]) == LAST
    newest = template / segment_name(2)
    scan = segment.scan(newest)
    _rec, start, end = scan.records[-1]
    original = newest.read_bytes()
    assert end == len(original)
    seen = {"clean": 0, "torn": 0, "whole": 0}
    for cut in range(start, end + 1):
        work = tmp_path / f"cut{cut}"
        wal_dir = work / "wal"
        shutil.copytree(template, wal_dir)
        seg = wal_dir / segment_name(2)
        crashed = original[:cut] + bytes(end - cut + PREALLOCATED)
        seg.write_bytes(crashed)
        wal, next_lsn, btree = _reopen(wal_dir, work / "db")
        broken = seg.with_name(seg.name + ".broken")
        try:
            last = LAST if cut == end else LAST - 1
            assert wal.last_lsn == last and next_lsn == last + 1, cut
            assert btree.read_checkpoint().applied_lsn == last
            for lsn in range(1, last + 1):
                assert btree.get(key_for(lsn)) == value_for(lsn)
            assert btree.get(key_for(last + 1)) is None
            if cut == end or not any(original[start:cut]):
                kind = "whole" if cut == end else "clean"
                assert not broken.exists(), cut
                assert wal.report.truncated_bytes == 0, cut
                assert seg.stat().st_size == len(crashed)  # zeros kept: still preallocated
            else:
                kind = "torn"
                assert broken.read_bytes() == crashed, cut
                assert wal.report.truncated_bytes == len(crashed) - start, cut
                assert seg.stat().st_size == start
            assert wal.active is not None and wal.active.size == (end if cut == end else start)
            seen[kind] += 1
        finally:
            wal.close()
            btree.close()
        shutil.rmtree(work)
    # The first byte of a record is part of its CRC: every cut inside it is torn.
    assert seen == {"clean": 1, "torn": end - start - 1, "whole": 1}


def test_crash_at_every_offset_with_the_head_of_the_last_record_lost_in_zero_filled_space(
    tmp_path: Path, build_wal: Callable[..., int]
) -> None:
    """The other half of a torn write into preallocated space: the last record's first
    ``cut`` bytes never reached the disk (still the filler's zeros), the rest did (page
    writeback in another order), zeros after it. Zeros followed by anything non-zero is
    never the clean end of the log: the record is cut off and kept as ``.broken``; only
    when nothing of it survived is it the clean end (nothing cut)."""
    template = tmp_path / "template"
    assert build_wal(template, [4, 3]) == LAST
    newest = template / segment_name(2)
    scan = segment.scan(newest)
    _rec, start, end = scan.records[-1]
    original = newest.read_bytes()
    seen = {"clean": 0, "torn": 0}
    for cut in range(start + 1, end + 1):
        work = tmp_path / f"cut{cut}"
        wal_dir = work / "wal"
        shutil.copytree(template, wal_dir)
        seg = wal_dir / segment_name(2)
        crashed = original[:start] + bytes(cut - start) + original[cut:end] + bytes(PREALLOCATED)
        seg.write_bytes(crashed)
        wal, next_lsn, btree = _reopen(wal_dir, work / "db")
        broken = seg.with_name(seg.name + ".broken")
        try:
            assert wal.last_lsn == LAST - 1 and next_lsn == LAST, cut
            assert btree.read_checkpoint().applied_lsn == LAST - 1
            assert btree.get(key_for(LAST)) is None
            if not any(original[cut:end]):
                kind = "clean"
                assert not broken.exists() and wal.report.truncated_bytes == 0, cut
            else:
                kind = "torn"
                assert broken.read_bytes() == crashed, cut
                assert wal.report.truncated_bytes == len(crashed) - start, cut
                assert seg.stat().st_size == start
            assert wal.active is not None and wal.active.size == start
            seen[kind] += 1
        finally:
            wal.close()
            btree.close()
        shutil.rmtree(work)
    assert seen["clean"] + seen["torn"] == end - start and seen["torn"] >= end - start - 8


def test_ack_wal_copy_with_lmdb_behind_and_zeros_ahead_replays_every_acked_write(
    tmp_path: Path, open_engine: Callable[..., Engine]
) -> None:
    """``--ack wal`` (the default) and preallocation together: the applier held (LMDB at
    LSN 0), 150 acknowledged writes only in the zero-filled WAL, the last record torn at
    every 7th offset into the zeros: the copy replays exactly the whole records."""
    data = tmp_path / "data"
    cfg = EngineConfig(ack="wal", wal_preallocate=64 << 10, segment_size=1 << 20)
    eng = open_engine(cfg, directory=data)
    eng.pause_applier()
    for i in range(150):
        eng.put(b"k%03d" % i, b"%d" % i * 20)
    _fill_all(eng)
    act = eng.wal.active
    assert act is not None and act.zeroed_end > act.size and eng.applied_lsn == 0
    copy = tmp_path / "copy"
    shutil.copytree(data, copy, ignore=shutil.ignore_patterns("LOCK", "*.lock"))
    seg = layout.wal_dir(copy, NS) / act.path.name
    whole = seg.read_bytes()
    _rec, start, end = segment.scan(seg).records[-1]
    for cut in range(start, end + 1, 7):
        work = tmp_path / f"c{cut}"
        shutil.copytree(copy, work)
        (layout.wal_dir(work, NS) / seg.name).write_bytes(whole[:cut] + bytes(len(whole) - cut))
        again = open_engine(cfg, directory=work)
        n = 150 if cut == end else 149
        assert again.recovery.records_replayed == n and again.last_lsn == n, cut
        assert all(again.get(b"k%03d" % i) == b"%d" % i * 20 for i in range(n))
        assert again.get(b"k%03d" % 149) == (b"149" * 20 if cut == end else None)
        again.close()
        shutil.rmtree(work)
    eng.resume_applier()


def _fill_all(eng: Engine) -> int:
    """Run the zero-filler's steps on this thread until nothing is due (deterministic)."""
    zf = eng.wal.zerofill
    assert zf is not None
    while zf.fill_step():
        pass
    act = eng.wal.active
    assert act is not None
    return act.zeroed_end


def test_engine_keeps_zeros_ahead_and_seals_without_them(
    tmp_path: Path, open_engine: Callable[..., Engine]
) -> None:
    cfg = EngineConfig(wal_preallocate=64 << 10, segment_size=1 << 20)
    eng = open_engine(cfg)
    for i in range(50):
        eng.put(b"k%03d" % i, b"v" * 100)
    act = eng.wal.active
    assert act is not None
    zeroed = _fill_all(eng)
    assert zeroed >= act.size + (32 << 10)
    raw = act.path.read_bytes()
    assert len(raw) == zeroed and not any(raw[act.size :])
    assert len(segment.scan(act.path).records) == 50
    sealed_id = eng.rotate()
    assert sealed_id is not None
    info = [s for s in eng.sealed_segments() if s.segment_id == sealed_id][0]
    # A sealed segment ends at its footer: the zeros were cut off before it was written.
    assert info.path.stat().st_size == info.size
    assert segment.scan(info.path).sealed


def test_copy_of_a_running_engine_with_zeros_ahead_recovers_every_acked_write(
    tmp_path: Path, open_engine: Callable[..., Engine]
) -> None:
    """What a kill -9 leaves (every acknowledged write fsynced, zeros after them): a copy
    of the files taken while the engine runs opens with every write and no repair."""
    data = tmp_path / "data"
    cfg = EngineConfig(wal_preallocate=64 << 10, segment_size=1 << 20)
    eng = open_engine(cfg, directory=data)
    for i in range(200):
        eng.put(b"k%03d" % i, b"%d" % i * 20)
        if i % 50 == 0:
            _fill_all(eng)
    act = eng.wal.active
    assert act is not None and act.zeroed_end > act.size
    copy = tmp_path / "copy"
    shutil.copytree(data, copy, ignore=shutil.ignore_patterns("LOCK", "*.lock"))
    again = open_engine(cfg, directory=copy)
    for i in range(200):
        assert again.get(b"k%03d" % i) == b"%d" % i * 20
    assert again.wal.report.truncated_bytes == 0
    assert not list(layout.wal_dir(copy, NS).glob("*.broken"))


def test_no_zero_fill_on_a_nearly_full_disk(tmp_path: Path, open_engine: Callable[..., Engine]) -> None:
    """Below ``min_free`` the filler writes nothing: that space belongs to LMDB and records."""
    eng = open_engine(EngineConfig(wal_preallocate=64 << 10, segment_size=1 << 20))
    zf = eng.wal.zerofill
    assert zf is not None
    zf.min_free = 1 << 62
    act = eng.wal.active
    assert act is not None
    before = act.path.stat().st_size
    eng.put(b"a", b"b")
    assert not zf.fill_step()
    assert act.path.stat().st_size <= max(before, act.size)
