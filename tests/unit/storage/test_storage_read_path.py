"""``Engine.get`` takes no lock: neither the in-memory table's nor the B-tree's read lock
(``memtable.MemTable.lookup``, ``btree._ReadWriteLock``), and still reads the newest
acknowledged value. Real WAL, table and LMDB; a lock held by the test shows a GET does
not wait for it (it would hang until pytest-timeout if it did)."""

from __future__ import annotations

import threading
from collections.abc import Callable

from unisondb.config import EngineConfig
from unisondb.storage.engine import Engine

ACK_WAL = EngineConfig(ack="wal")
DONE = 10.0


def _get_while_held(lock: threading.Condition | threading.Lock, get: Callable[[], object]) -> list[object]:
    """``get()`` on another thread while this one holds ``lock``: what it returned, or
    nothing if it was still waiting after DONE seconds."""
    got: list[object] = []
    with lock:
        t = threading.Thread(target=lambda: got.append(get()))
        t.start()
        t.join(DONE)
        while_held = list(got)
    t.join(DONE)
    return while_held


def test_a_get_from_the_table_does_not_wait_for_its_lock(open_engine: Callable[..., Engine]) -> None:
    eng = open_engine(ACK_WAL)
    eng.pause_applier()  # the value stays in the table only
    eng.put(b"k", b"v1")
    assert eng._table is not None
    assert _get_while_held(eng._table.cond, lambda: eng.get(b"k")) == [b"v1"]
    eng.resume_applier()


def test_a_get_from_lmdb_does_not_wait_for_the_read_lock(open_engine: Callable[..., Engine]) -> None:
    eng = open_engine(ACK_WAL)
    eng.put(b"k", b"v1")
    assert eng.catch_up(timeout=DONE) and eng.lmdb_lag == 0
    assert eng._table is not None
    lock = eng.btree._rw._lock
    assert _get_while_held(lock, lambda: eng.get(b"k")) == [b"v1"]
    assert _get_while_held(eng._table.cond, lambda: eng.get(b"missing")) == [None]


def test_reads_follow_writes_from_table_to_lmdb(open_engine: Callable[..., Engine]) -> None:
    """Overwrite and delete, paused (table) and applied (LMDB): every read is the newest."""
    eng = open_engine(ACK_WAL)
    eng.put(b"k", b"v1")
    assert eng.catch_up(timeout=DONE)
    eng.pause_applier()
    eng.put(b"k", b"v2")
    assert eng.get(b"k") == b"v2" and eng.btree.get(b"k") == b"v1"
    eng.delete(b"k")
    assert eng.get(b"k") is None and eng.btree.get(b"k") == b"v1"
    eng.resume_applier()
    assert eng.catch_up(timeout=DONE) and eng.lmdb_lag == 0
    assert eng.get(b"k") is None and eng.btree.get(b"k") is None
