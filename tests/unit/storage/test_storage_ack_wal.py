"""``ack="wal"``: acknowledged at the WAL fsync, visible through the in-memory table, LMDB
following from the applier thread.

Real WAL files and real LMDB; the applier is held with the engine's ``pause_applier``
seam (not a sleep) to make LMDB lag on purpose. The crash here is a copy of the files of
a running engine (what kill -9 leaves: the WAL fsynced, LMDB behind); tests/crash kills a
real server process.
"""

from __future__ import annotations

import os
import random
import shutil
import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

import pytest
from _storage_helpers import NS
from serverproc import wait_hold_reached

from unisondb.config import EngineConfig
from unisondb.storage import layout
from unisondb.storage.btree import BTree
from unisondb.storage.engine import Engine
from unisondb.storage.record import Entry, EntryKind

ACK_WAL = EngineConfig(ack="wal")


def _copy_running(data: Path, dest: Path) -> Path:
    shutil.copytree(data, dest, ignore=shutil.ignore_patterns("LOCK"))
    return dest


def test_acknowledged_writes_are_visible_before_lmdb_has_them(open_engine: Callable[..., Engine]) -> None:
    eng = open_engine(ACK_WAL)
    eng.put(b"base", b"0")
    assert eng.catch_up()
    eng.pause_applier()
    applied = eng.applied_lsn
    for i in range(20):
        assert eng.put(b"k%d" % i, b"v%d" % i) == applied + 1 + i
    eng.delete(b"base")
    # Read-your-writes through the table; LMDB has none of it yet.
    for i in range(20):
        assert eng.get(b"k%d" % i) == b"v%d" % i
        assert eng.btree.get(b"k%d" % i) is None
    assert eng.get(b"base") is None and eng.btree.get(b"base") == b"0"
    assert eng.applied_lsn == applied and eng.last_lsn == applied + 21
    assert eng.lmdb_lag == 21 and eng.table_bytes > 0
    assert eng.btree.count() == 1 and eng.key_count() == 20  # 20 new keys, "base" deleted
    assert eng.describe()["lmdbLagRecords"] == 21
    eng.resume_applier()
    assert eng.catch_up()
    assert eng.applied_lsn == eng.last_lsn and eng.lmdb_lag == 0 and eng.table_bytes == 0
    for i in range(20):
        assert eng.btree.get(b"k%d" % i) == b"v%d" % i
    assert eng.btree.get(b"base") is None


def test_a_crash_with_acknowledged_writes_not_in_lmdb_replays_them(
    tmp_path: Path, open_engine: Callable[..., Engine]
) -> None:
    data = tmp_path / "data"
    eng = open_engine(ACK_WAL, directory=data)
    for i in range(10):
        eng.put(b"a%d" % i, b"x")
    assert eng.catch_up()
    eng.pause_applier()
    for i in range(50):
        eng.put(b"k%d" % i, b"v%d" % i)
    assert eng.lmdb_lag == 50
    copy = _copy_running(data, tmp_path / "crashed")
    # LMDB of the copy stops at LSN 10: everything after it is only in the WAL.
    bt = BTree(layout.btree_dir(copy, NS), map_size=1 << 20)
    assert bt.read_checkpoint().applied_lsn == 10
    bt.close()
    again = open_engine(ACK_WAL, directory=copy)
    assert again.recovery.records_replayed == 50
    for i in range(50):
        assert again.get(b"k%d" % i) == b"v%d" % i
        assert again.btree.get(b"k%d" % i) == b"v%d" % i
    eng.resume_applier()


def test_a_full_table_holds_writes_back_and_loses_or_reorders_none(
    open_engine: Callable[..., Engine],
) -> None:
    eng = open_engine(EngineConfig(ack="wal", memtable_max_lag=8, group_commit_window=0))
    eng.pause_applier()
    threads = 4
    per_thread = 30
    results: dict[int, list[int]] = {t: [] for t in range(threads)}

    def writer(t: int) -> None:
        for i in range(per_thread):
            # Same key per thread, growing values: a reorder would leave an older value.
            results[t].append(eng.put(b"t%d" % t, b"%06d" % i))

    workers = [threading.Thread(target=writer, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    table = eng._table
    assert table is not None
    with table.cond:
        assert table.cond.wait_for(lambda: table.full_waits >= 1, timeout=30), "no backpressure"
    # Held back: at most the bound plus the one group written before the table was full.
    assert eng.lmdb_lag <= 8 + threads
    assert sum(len(r) for r in results.values()) < threads * per_thread
    eng.resume_applier()
    for w in workers:
        w.join(timeout=60)
        assert not w.is_alive()
    assert eng.catch_up()
    for t in range(threads):
        assert results[t] == sorted(results[t]) and len(results[t]) == per_thread
        assert eng.get(b"t%d" % t) == b"%06d" % (per_thread - 1)
        assert eng.btree.get(b"t%d" % t) == b"%06d" % (per_thread - 1)
    assert eng.last_lsn == threads * per_thread == eng.applied_lsn
    assert table.full_waits >= 1


def test_read_your_writes_under_concurrent_load(open_engine: Callable[..., Engine]) -> None:
    """Every client reads back what it was just acknowledged, while the applier moves the
    table into LMDB underneath (small table: it applies and drops constantly)."""
    eng = open_engine(EngineConfig(ack="wal", memtable_max_lag=50))
    errors: list[str] = []

    def client(c: int) -> None:
        rng = random.Random(c)
        for i in range(150):
            key = b"c%d-%d" % (c, rng.randrange(20))
            if rng.random() < 0.2:
                eng.delete(key)
                want = None
            else:
                want = b"%d-%d" % (c, i)
                eng.put(key, want)
            got = eng.get(key)
            if got != want:
                errors.append(f"client {c} op {i}: {key!r} read {got!r}, wrote {want!r}")

    workers = [threading.Thread(target=client, args=(c,)) for c in range(6)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
    assert not errors, errors[:5]
    assert eng.catch_up()
    assert eng.applied_lsn == eng.last_lsn == 6 * 150


def test_rotation_waits_for_the_applier_and_footers_carry_the_right_fingerprint(
    tmp_path: Path, open_engine: Callable[..., Engine]
) -> None:
    """4 KiB segments: nearly every group seals one. Reopening checks every footer's
    fingerprint against the state recovery rebuilds (a wrong one stops startup)."""
    data = tmp_path / "data"
    cfg = EngineConfig(ack="wal", segment_size=4096)
    eng = open_engine(cfg, directory=data)
    futures: list[Future[int]] = []
    for i in range(300):
        futures.append(eng.submit([Entry(EntryKind.PUT, b"k%d" % (i % 37), b"v" * (100 + i % 200))]))
    for f in futures:
        f.result(timeout=60)
    assert len(eng.sealed_segments()) > 10
    eng.close()
    # Rebuild from the WAL alone: every footer's fingerprint is checked on the way.
    shutil.rmtree(layout.btree_dir(data, NS))
    again = open_engine(cfg, directory=data)
    assert again.recovery.records_replayed == 300
    for k in range(37):
        last = max(i for i in range(300) if i % 37 == k)
        assert again.get(b"k%d" % k) == b"v" * (100 + last % 200)


def test_applier_paused_and_resumed_at_random_matches_a_model(
    tmp_path: Path, open_engine: Callable[..., Engine]
) -> None:
    """A small stateful test: random puts, deletes, batches, reads, applier pauses and
    resumes, and a restart at the end; the engine always answers like a dict."""
    data = tmp_path / "data"
    rng = random.Random(1211)
    eng = open_engine(EngineConfig(ack="wal", memtable_max_lag=1000), directory=data)
    model: dict[bytes, bytes] = {}
    paused = False
    for step in range(600):
        r = rng.random()
        key = b"k%d" % rng.randrange(40)
        if r < 0.45:
            value = b"s%d" % step
            eng.put(key, value)
            model[key] = value
        elif r < 0.6:
            eng.delete(key)
            model.pop(key, None)
        elif r < 0.7:
            keys = {b"k%d" % rng.randrange(40) for _ in range(rng.randrange(1, 6))}
            eng.write([Entry(EntryKind.PUT, k, b"b%d" % step) for k in sorted(keys)])
            model.update({k: b"b%d" % step for k in keys})
        elif r < 0.8:
            if paused:
                eng.resume_applier()
            else:
                eng.pause_applier()
            paused = not paused
        else:
            assert eng.get(key) == model.get(key), step
    if paused:
        eng.resume_applier()
    eng.close()
    again = open_engine(EngineConfig(ack="wal"), directory=data)
    for k in range(40):
        key = b"k%d" % k
        assert again.get(key) == model.get(key)
        assert again.btree.get(key) == model.get(key)


def test_a_snapshot_holds_every_write_acknowledged_before_it(
    tmp_path: Path, open_engine: Callable[..., Engine]
) -> None:
    """The snapshot waits for the applier (``Engine.snapshot_to``): a snapshot-only backup
    never misses a write answered before it was requested."""
    eng = open_engine(ACK_WAL)
    eng.pause_applier()
    for i in range(30):
        eng.put(b"k%d" % i, b"v%d" % i)
    out = tmp_path / "snap.mdb"
    done: list[int] = []

    def snapshot() -> None:
        with open(out, "wb") as f:
            done.append(eng.snapshot_to(f).applied_lsn)

    t = threading.Thread(target=snapshot)
    t.start()
    t.join(timeout=0.2)
    assert not done, "the snapshot did not wait for LMDB to catch up"
    eng.resume_applier()
    t.join(timeout=60)
    assert done == [30]
    snap_dir = tmp_path / "snapdb"
    snap_dir.mkdir()
    shutil.copyfile(out, snap_dir / "data.mdb")
    bt = BTree(snap_dir, map_size=1 << 20)
    try:
        assert all(bt.get(b"k%d" % i) == b"v%d" % i for i in range(30))
    finally:
        bt.close()


def test_pause_waits_for_the_transaction_in_progress(
    tmp_path: Path, open_engine: Callable[..., Engine], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``pause_applier`` returns only once no LMDB transaction is running, so LMDB's files
    and checkpoint stand still while paused (the applier is held inside its transaction
    by the ``UNISONDB_TEST_HOLD=apply`` seam, an exact point)."""
    fifo = tmp_path / "hold"
    os.mkfifo(fifo)
    monkeypatch.setenv("UNISONDB_TEST_HOLD", f"apply:{fifo}")
    eng = open_engine(ACK_WAL)
    eng.put(b"a", b"1")
    wait_hold_reached(fifo)  # the applier took the batch and waits at the hold
    paused = threading.Event()
    t = threading.Thread(target=lambda: (eng.pause_applier(), paused.set()))
    t.start()
    assert not paused.wait(0.2), "pause returned while a transaction was in progress"
    monkeypatch.delenv("UNISONDB_TEST_HOLD")
    with open(fifo, "wb") as f:
        f.write(b"x")
    assert paused.wait(30)
    t.join()
    assert eng.applied_lsn == 1  # the transaction in progress finished
    eng.put(b"b", b"2")
    assert eng.applied_lsn == 1 and eng.get(b"b") == b"2"  # then nothing more while paused
    eng.resume_applier()
    assert eng.catch_up(timeout=30) and eng.applied_lsn == 2


def test_a_seal_applies_the_table_even_while_the_applier_is_paused(
    open_engine: Callable[..., Engine],
) -> None:
    """A segment's footer needs the state after its last record: ``rotate`` (and a
    size rotation mid-group) drains the table although the applier is paused, instead of
    waiting for ``resume`` forever; afterwards the pause holds again."""
    eng = open_engine(EngineConfig(ack="wal", segment_size=4096))
    eng.pause_applier()
    for i in range(5):
        eng.put(b"k%d" % i, b"v")
    assert eng.applied_lsn == 0
    assert eng.rotate() == 1
    assert eng.applied_lsn == 5 and eng.lmdb_lag == 0
    # Size rotations inside a group, paused: 60 writes of ~300 bytes over 4 KiB segments.
    futures = [eng.submit([Entry(EntryKind.PUT, b"r%d" % i, b"x" * 300)]) for i in range(60)]
    lsns = [f.result(timeout=60) for f in futures]
    assert lsns == list(range(6, 66))
    assert len(eng.sealed_segments()) >= 4
    assert eng.applied_lsn >= eng.sealed_segments()[-1].last_lsn  # every sealed record is in LMDB
    eng.put(b"after", b"y")
    assert eng.applied_lsn < eng.last_lsn  # paused again for what no seal needs
    eng.resume_applier()
    assert eng.catch_up(timeout=30) and eng.applied_lsn == eng.last_lsn == 66


def test_a_transaction_of_rewritten_keys_leaves_the_state_and_fingerprint_of_every_write(
    open_engine: Callable[..., Engine], tmp_path: Path
) -> None:
    """The applier writes only the last entry of each key of a transaction (puts over puts,
    deletes of new and old keys, batches): LMDB, its fingerprint and a full scan must be
    what applying every write in turn gives (an ``ack="lmdb"`` engine, which does)."""
    rng = random.Random(11)
    eng = open_engine(ACK_WAL)
    ref = Engine.open(tmp_path / "ref", NS, EngineConfig(ack="lmdb"))
    try:
        writes: list[list[Entry]] = [[Entry(EntryKind.PUT, b"k%d" % i, b"old%d" % i)] for i in range(4)]
        for _ in range(300):
            n = rng.choice([1, 1, 1, 3])
            writes.append(
                [
                    Entry(EntryKind.PUT, b"k%d" % rng.randrange(6), b"v%d" % rng.randrange(10**6))
                    if rng.random() < 0.7
                    else Entry(EntryKind.DELETE, b"k%d" % rng.randrange(6))
                    for _ in range(n)
                ]
            )
        for w in writes[:4]:
            eng.write(w)
            ref.write(w)
        assert eng.catch_up()
        assert eng._applier is not None
        txns = eng._applier.transactions
        eng.pause_applier()
        for w in writes[4:]:
            eng.write(w)
            ref.write(w)
        eng.resume_applier()
        assert eng.catch_up()
        assert eng._applier.transactions == txns + 1  # all 300 in one transaction
        cp, rcp = eng.btree.read_checkpoint(), ref.btree.read_checkpoint()
        assert cp.applied_lsn == rcp.applied_lsn == len(writes)
        assert cp.fingerprint == rcp.fingerprint
        scanned, _ = eng.btree.scan_fingerprint()
        assert scanned.state() == cp.fp_state
        for i in range(6):
            assert eng.btree.get(b"k%d" % i) == ref.btree.get(b"k%d" % i)
    finally:
        ref.close()
