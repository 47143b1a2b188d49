"""Regression tests for engine defects found while writing the storage tests (all fixed)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from _storage_helpers import key_for, value_for

from unisondb.config import EngineConfig
from unisondb.errors import InvalidRequest, LsnGap
from unisondb.storage import record, segment
from unisondb.storage.engine import Engine
from unisondb.storage.layout import segment_name

SMALL = EngineConfig(segment_size=4096)


def test_write_larger_than_a_record_can_be_is_refused(
    db_dir: Path, open_engine: Callable[..., Engine]
) -> None:
    eng = open_engine()
    eng.put(b"a", b"1")
    try:
        with pytest.raises(InvalidRequest):
            eng.put(b"huge", bytes(record.MAX_BODY))
    finally:
        eng.close()
    # Whatever was acknowledged must be replayable from the WAL alone.
    shutil.rmtree(db_dir)
    eng = open_engine()
    assert eng.last_lsn == 1


def test_failed_open_leaks_no_file_descriptors(
    tmp_path: Path, db_dir: Path, wal_dir: Path, open_engine: Callable[..., Engine]
) -> None:
    eng = open_engine(SMALL)
    for i in range(1, 6):
        eng.put(key_for(i), value_for(i, 60))
    eng.close()
    shutil.copyfile(db_dir / "data.mdb", tmp_path / "old.mdb")
    eng = open_engine(SMALL)
    for i in range(6, 200):
        eng.put(key_for(i), value_for(i, 60))
    middle = [s for s in eng.wal.sealed_segments() if s.first_lsn > 5][1]
    eng.close()
    shutil.copyfile(tmp_path / "old.mdb", db_dir / "data.mdb")
    middle.path.unlink()

    before = len(os.listdir("/proc/self/fd"))
    for _ in range(3):
        with pytest.raises(LsnGap):
            open_engine(SMALL)
    assert len(os.listdir("/proc/self/fd")) == before


def test_offset_names_the_last_record_after_rotation(open_engine: Callable[..., Engine]) -> None:
    eng = open_engine()
    eng.put(b"a", b"1")
    eng.put(b"b", b"2")
    before = eng.offset()
    assert before[0] == 1 and before[1] > segment.HEADER_SIZE
    assert eng.rotate() == 1
    assert eng.offset() == before


def test_snapshot_with_larger_segment_ids_leaves_no_stray_empty_segment(
    tmp_path: Path, data_dir: Path, db_dir: Path, wal_dir: Path, open_engine: Callable[..., Engine]
) -> None:
    other = tmp_path / "other"
    src = open_engine(directory=other)
    for i in range(5):
        src.put(b"x%d" % i, b"1")
        src.rotate()
    src.close()

    eng = open_engine()  # fresh namespace: empty active segment 1
    eng.close()
    shutil.copyfile(other / "default" / "db" / "data.mdb", db_dir / "data.mdb")
    eng = open_engine()
    eng.put(b"y", b"2")
    on_disk = sorted(p.name for p in wal_dir.glob("*.wal"))
    tracked = [segment_name(s.segment_id) for s in eng.segments()]
    eng.close()
    eng = open_engine()
    assert all(s.count > 0 for s in eng.wal.sealed_segments())
    assert on_disk == tracked
