"""Startup replays only the checkpoint's timeline (a restore starts a new one).

Segments of another history that hold records after the checkpoint are refused
(``TimelineConflict``): replaying them would serve a state that never existed. Segments of
another history that end at or before the checkpoint are superseded and ignored.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from unisondb.config import EngineConfig
from unisondb.errors import StorageError, TimelineConflict
from unisondb.storage import layout
from unisondb.storage.btree import BTree, Checkpoint
from unisondb.storage.engine import Engine
from unisondb.storage.record import Entry, EntryKind, Record

NS = "ns"


def timeline1_wal(tmp_path: Path, last_lsn: int) -> Path:
    """A WAL directory of timeline 1 holding LSNs 1..last_lsn (key x = b"old<lsn>")."""
    src = tmp_path / "src"
    eng = Engine.open(src, NS, EngineConfig())
    for i in range(1, last_lsn + 1):
        eng.put(b"x", b"old%d" % i)
    eng.rotate()
    eng.close()
    return layout.wal_dir(src, NS)


def restored_namespace(tmp_path: Path, wal: Path, lsn: int) -> Path:
    """A data dir whose B-tree is on timeline 2 at ``lsn`` (as after a restore), with ``wal``."""
    data = tmp_path / "data"
    bt = BTree(layout.btree_dir(data, NS))
    bt.apply(
        [Record(lsn, 1, (Entry(EntryKind.PUT, b"x", b"new%d" % lsn),))],
        Checkpoint(lsn, 50, 0, 2, 1, timeline_first_segment=51),
    )
    bt.close()
    shutil.copytree(wal, layout.wal_dir(data, NS))
    return data


def test_other_timeline_after_the_checkpoint_is_refused(tmp_path: Path) -> None:
    data = restored_namespace(tmp_path, timeline1_wal(tmp_path, 10), lsn=6)
    with pytest.raises(TimelineConflict) as err:
        Engine.open(data, NS, EngineConfig())
    assert "timeline 1" in str(err.value) and "LSNs up to 10" in str(err.value)
    # Nothing of the other history was applied.
    bt = BTree(layout.btree_dir(data, NS))
    try:
        assert bt.get(b"x") == b"new6" and bt.read_checkpoint().applied_lsn == 6
    finally:
        bt.close()


def test_other_timeline_ending_before_the_checkpoint_is_ignored(tmp_path: Path) -> None:
    data = restored_namespace(tmp_path, timeline1_wal(tmp_path, 4), lsn=6)
    eng = Engine.open(data, NS, EngineConfig())
    try:
        assert eng.get(b"x") == b"new6"
        assert eng.put(b"y", b"1") == 7
        assert eng.segments()[-1].timeline == 2
        assert eng.segments()[-1].segment_id == 51  # above the checkpoint's segment id
    finally:
        eng.close()


def test_a_data_mdb_of_another_namespace_is_refused(tmp_path: Path) -> None:
    """The document's copy-to-db/ restore into the wrong namespace directory fails loudly."""
    eng = Engine.open(tmp_path / "a", "users", EngineConfig())
    eng.put(b"u", b"1")
    eng.close()
    target = layout.btree_dir(tmp_path / "b", "orders")
    target.mkdir(parents=True)
    shutil.copy(layout.btree_dir(tmp_path / "a", "users") / "data.mdb", target / "data.mdb")
    with pytest.raises(StorageError, match="belongs to namespace 'users', not 'orders'"):
        Engine.open(tmp_path / "b", "orders", EngineConfig())
