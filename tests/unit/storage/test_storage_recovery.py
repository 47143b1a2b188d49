"""Checkpoint, replay after the checkpoint, LSN gaps and restart continuity (DESIGN §2)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from _storage_helpers import key_for, value_for

from unisondb.config import EngineConfig
from unisondb.errors import LsnGap
from unisondb.storage import segment
from unisondb.storage.btree import BTree
from unisondb.storage.engine import Engine
from unisondb.storage.layout import segment_name

SMALL = EngineConfig(segment_size=4096)


def _put_range(eng: Engine, first: int, last: int) -> list[int]:
    return [eng.put(key_for(i), value_for(i, 60)) for i in range(first, last + 1)]


def test_checkpoint_follows_every_write(open_engine: Callable[..., Engine]) -> None:
    eng = open_engine()
    assert eng.checkpoint().applied_lsn == 0
    _put_range(eng, 1, 20)
    eng.delete(key_for(3))
    assert eng.catch_up()  # ack="wal": the checkpoint follows once LMDB has the writes
    cp = eng.checkpoint()
    assert cp.applied_lsn == eng.last_lsn == 21
    assert eng.wal.active is not None
    assert cp.segment_id == eng.wal.active.header.segment_id
    assert cp.offset == eng.wal.active.size  # just past the last record
    assert cp.time_ns == segment.scan(eng.wal.active.path).records[-1][0].time_ns
    eng.close()

    eng = open_engine()
    assert eng.recovery.records_replayed == 0
    assert eng.checkpoint().applied_lsn == 21
    assert eng.get(key_for(3)) is None and eng.get(key_for(4)) == value_for(4, 60)


def test_old_data_mdb_replays_newer_wal(
    tmp_path: Path, db_dir: Path, open_engine: Callable[..., Engine]
) -> None:
    eng = open_engine(SMALL)
    _put_range(eng, 1, 10)
    eng.close()
    old = tmp_path / "old-data.mdb"
    shutil.copyfile(db_dir / "data.mdb", old)

    eng = open_engine(SMALL)
    assert eng.recovery.records_replayed == 0
    _put_range(eng, 11, 200)  # several sealed segments
    eng.delete(key_for(5))
    assert len(eng.wal.sealed_segments()) >= 3
    eng.close()

    shutil.copyfile(old, db_dir / "data.mdb")
    eng = open_engine(SMALL)
    assert eng.recovery.records_replayed == 191
    assert eng.checkpoint().applied_lsn == eng.last_lsn == 201
    for i in range(1, 201):
        assert eng.get(key_for(i)) == (None if i == 5 else value_for(i, 60)), i
    assert eng.put(b"next", b"x") == 202
    eng.close()

    # The replay was checkpointed: the next start replays nothing.
    eng = open_engine(SMALL)
    assert eng.recovery.records_replayed == 0
    assert eng.get(b"next") == b"x"


def test_missing_segment_after_checkpoint_is_an_lsn_gap(
    tmp_path: Path, db_dir: Path, wal_dir: Path, open_engine: Callable[..., Engine]
) -> None:
    eng = open_engine(SMALL)
    _put_range(eng, 1, 5)
    eng.close()
    old = tmp_path / "old-data.mdb"
    shutil.copyfile(db_dir / "data.mdb", old)

    eng = open_engine(SMALL)
    _put_range(eng, 6, 200)
    segs = eng.segments()
    eng.close()
    # A sealed segment entirely after the old checkpoint, with data segments on both sides.
    middle = [s for s in segs if s.sealed and s.first_lsn > 5 and s.last_lsn < 200][1]
    shutil.copyfile(old, db_dir / "data.mdb")
    kept = tmp_path / "kept.wal"
    shutil.move(middle.path, kept)

    with pytest.raises(LsnGap) as info:
        open_engine(SMALL)
    msg = str(info.value)
    assert f"missing LSNs {middle.first_lsn}..{middle.last_lsn}" in msg
    # It names the segment where replay found the hole.
    assert info.value.path == wal_dir / segment_name(middle.segment_id + 1)

    # The refused start applied at most the contiguous prefix before the hole (replay is
    # checkpointed as it goes), never anything after it.
    bt = BTree(db_dir)
    try:
        assert bt.read_checkpoint().applied_lsn == middle.first_lsn - 1
        assert bt.get(key_for(middle.last_lsn + 1)) is None
    finally:
        bt.close()
    # With the segment back, replay resumes and everything is there.
    shutil.move(kept, middle.path)
    eng = open_engine(SMALL)
    assert eng.recovery.records_replayed == 200 - (middle.first_lsn - 1)
    assert all(eng.get(key_for(i)) == value_for(i, 60) for i in range(1, 201))


def test_missing_newest_segments_after_checkpoint_is_an_lsn_gap(
    tmp_path: Path, db_dir: Path, open_engine: Callable[..., Engine]
) -> None:
    """Removing the segment with the tail of the log (nothing after it to replay)."""
    eng = open_engine(SMALL)
    _put_range(eng, 1, 5)
    eng.close()
    old = tmp_path / "old-data.mdb"
    shutil.copyfile(db_dir / "data.mdb", old)
    eng = open_engine(SMALL)
    _put_range(eng, 6, 100)
    eng.rotate()
    segs = eng.wal.sealed_segments()
    eng.close()
    shutil.copyfile(old, db_dir / "data.mdb")
    segs[-1].path.unlink()  # the empty active segment after it still says where LSNs stand
    with pytest.raises(LsnGap) as info:
        open_engine(SMALL)
    assert f"missing LSNs {segs[-1].first_lsn}..{segs[-1].last_lsn}" in str(info.value)


def test_restart_continuity(open_engine: Callable[..., Engine]) -> None:
    all_lsns: list[int] = []
    active_ids: list[int] = []
    for restart in range(4):
        eng = open_engine(SMALL)
        assert eng.wal.active is not None
        active_ids.append(eng.wal.active.header.segment_id)
        # The new segment starts after everything on disk, at the next LSN.
        assert active_ids[-1] > max([s.segment_id for s in eng.wal.sealed_segments()], default=0)
        assert eng.wal.active.header.first_lsn == len(all_lsns) + 1
        assert eng.recovery.records_replayed == 0
        all_lsns += _put_range(eng, len(all_lsns) + 1, len(all_lsns) + 30 + restart)
        eng.close()
    assert all_lsns == list(range(1, len(all_lsns) + 1))  # contiguous, never reused
    assert active_ids == sorted(set(active_ids))  # strictly increasing

    eng = open_engine(SMALL)
    segs = eng.segments()
    assert [s.segment_id for s in segs] == list(range(1, len(segs) + 1))
    assert all(s.sealed for s in segs[:-1])
    expected = 1
    for s in segs[:-1]:
        assert s.first_lsn == expected
        expected = s.last_lsn + 1
    assert segs[-1].first_lsn == expected == len(all_lsns) + 1
    for i in all_lsns:
        assert eng.get(key_for(i)) == value_for(i, 60)


def test_restart_without_writes_keeps_lsns(open_engine: Callable[..., Engine]) -> None:
    eng = open_engine()
    eng.put(b"a", b"1")
    eng.close()
    seen = []
    for _ in range(3):
        eng = open_engine()
        assert eng.wal.active is not None
        seen.append(eng.wal.active.header.segment_id)
        assert eng.last_lsn == 1
        eng.close()
    assert seen == sorted(seen)  # never goes backwards
    eng = open_engine()
    assert eng.put(b"b", b"2") == 2
    assert [s.last_lsn for s in eng.wal.sealed_segments()] == [1]


@pytest.mark.parametrize("claimed_lsn", [2, 10**12])
def test_value_that_looks_like_a_footer_survives_restart(
    db_dir: Path, open_engine: Callable[..., Engine], claimed_lsn: int
) -> None:
    """A client-chosen value ending in a forged footer, last in the newest segment at
    shutdown, must neither stop the next start nor make the segment unreadable."""
    from unisondb.storage.segment import SegmentFooter

    evil = b"hello" + SegmentFooter(claimed_lsn, 0, 0, 2).encode()
    eng = open_engine()
    eng.put(b"a", b"1")
    eng.put(b"evil", evil)
    eng.close()

    eng = open_engine()
    assert eng.last_lsn == 2 and eng.get(b"evil") == evil
    assert eng.put(b"b", b"2") == 3
    segs = eng.segments()
    assert [(s.segment_id, s.sealed, s.first_lsn, s.last_lsn) for s in segs] == [
        (1, True, 1, 2),
        (2, False, 3, 3),
    ]
    assert segment.scan(segs[0].path).sealed
    eng.close()

    # Replaying the whole WAL from scratch gives the same data.
    shutil.rmtree(db_dir)
    eng = open_engine()
    assert eng.recovery.records_replayed == 3
    assert eng.get(b"evil") == evil and eng.get(b"b") == b"2"
