"""LMDB B-tree: map growth and the checkpoint codec (unisondb/storage/btree.py)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from unisondb.config import EngineConfig
from unisondb.storage.btree import BTree, Checkpoint
from unisondb.storage.engine import Engine
from unisondb.storage.fingerprint import Fingerprint
from unisondb.storage.record import Entry, EntryKind, Record


def test_map_grows_past_a_tiny_initial_size(open_engine: Callable[..., Engine]) -> None:
    cfg = EngineConfig(map_size=1 << 20)
    eng = open_engine(cfg)
    value = bytes(range(256)) * 256  # 64 KiB
    n = 80  # 5 MiB of values, five times the initial map
    for i in range(n):
        eng.put(b"big-%03d" % i, value[i:] + value[:i])
    # Several values in one record (one LMDB transaction larger than the map once was).
    eng.write([Entry(EntryKind.PUT, b"batch-%d" % j, value) for j in range(20)])
    assert eng.catch_up()  # (ack="wal": LMDB grows as the applier takes the writes)
    assert eng.btree.map_size >= 5 << 20
    for i in range(n):
        assert eng.get(b"big-%03d" % i) == value[i:] + value[:i]
    eng.close()

    eng = open_engine(cfg)
    assert eng.recovery.records_replayed == 0
    assert eng.btree.map_size >= 5 << 20  # sized from the existing data file
    assert eng.get(b"big-079") == value[79:] + value[:79]
    assert eng.get(b"batch-19") == value
    eng.put(b"more", value)
    assert eng.catch_up()
    assert eng.btree.count() == n + 21


def test_checkpoint_round_trip_and_atomic_apply(tmp_path: Path) -> None:
    cp = Checkpoint(applied_lsn=2**64 - 1, segment_id=7, offset=4096, timeline=3, time_ns=5)
    assert Checkpoint.decode(cp.encode()) == cp
    assert len(cp.encode()) == 344
    bt = BTree(tmp_path / "db", map_size=1 << 20)
    try:
        assert bt.read_checkpoint() == Checkpoint()
        recs = [
            Record(1, 10, (Entry(EntryKind.PUT, b"a", b"1"),)),
            Record(2, 11, (Entry(EntryKind.PUT, b"b", b"2"), Entry(EntryKind.DELETE, b"a"))),
        ]
        written = bt.apply(recs, Checkpoint(2, 1, 200, 1, 11))
        assert bt.read_checkpoint() == written
        assert written.fp_state == Fingerprint.of_items([(b"b", b"2")]).state()
        assert written == Checkpoint(2, 1, 200, 1, 11, fp_state=written.fp_state)
        assert list(bt.items()) == [(b"b", b"2")]
        # The fingerprint in the checkpoint always equals a scan of the data beside it.
        scanned, cp = bt.scan_fingerprint()
        assert scanned.state() == cp.fp_state
    finally:
        bt.close()


def test_snapshot_leaves_half_the_map_free_for_writes_during_the_copy(tmp_path: Path) -> None:
    """A snapshot pins a read txn (no map resize until it ends), so it grows the map first."""
    bt = BTree(tmp_path / "db", map_size=1 << 20)
    try:
        recs = [Record(i + 1, i, (Entry(EntryKind.PUT, f"k{i}".encode(), b"v" * 2000),)) for i in range(300)]
        bt.apply(recs, Checkpoint(300, 1, 0, 1, 0))
        used = (bt.env.info()["last_pgno"] + 1) * bt.env.stat()["psize"]
        with open(tmp_path / "snap.mdb", "wb") as f:
            cp = bt.snapshot_to(f)
        assert cp.applied_lsn == 300
        assert bt.map_size >= 2 * used
    finally:
        bt.close()


def test_apply_ops_equals_apply(tmp_path: Path) -> None:
    # The restore's bulk apply (flat entries, ``walk.Walk.records(ops=...)``) writes the
    # same data and the same checkpoint as ``apply`` of the records (its thin wrapper), and
    # both are checked against the expected pairs and a full scan's fingerprint: overwrites,
    # deletes of present and absent keys, a key put twice in one transaction, an empty value.
    recs = [
        Record(1, 10, (Entry(EntryKind.PUT, b"a", b"1"), Entry(EntryKind.PUT, b"b", b"2"))),
        Record(2, 11, (Entry(EntryKind.PUT, b"a", b"3"),)),
        Record(3, 12, (Entry(EntryKind.DELETE, b"b"), Entry(EntryKind.DELETE, b"zz"))),
        Record(4, 13, (Entry(EntryKind.PUT, b"c", b""), Entry(EntryKind.PUT, b"c", b"4"))),
        Record(5, 14, (Entry(EntryKind.PUT, b"d", b"5"),)),
    ]
    start = Checkpoint(0, 1, 100, 1, 9)
    one = BTree(tmp_path / "one", map_size=1 << 20)
    two = BTree(tmp_path / "two", map_size=1 << 20)
    try:
        cp_one = one.apply([Record(0, 1, (Entry(EntryKind.PUT, b"a", b"0"),))], start)
        cp_two = two.apply([Record(0, 1, (Entry(EntryKind.PUT, b"a", b"0"),))], start)
        end = Checkpoint(5, 2, 300, 1, 14)
        calls: list[int] = []
        cp_one = one.apply(recs, replace(end, fp_state=cp_one.fp_state))
        ops = [(e.key, e.value if e.kind == EntryKind.PUT else None) for r in recs for e in r.entries]
        cp_two = two.apply_ops(
            ops, replace(end, fp_state=cp_two.fp_state), every=(3, lambda: calls.append(1))
        )
        assert cp_two == cp_one == two.read_checkpoint()
        assert list(two.items()) == list(one.items()) == [(b"a", b"3"), (b"c", b"4"), (b"d", b"5")]
        assert two.scan_fingerprint()[0].state() == cp_two.fp_state
        assert len(calls) == 3  # after entries 3, 6 and the last (8)
        assert two.apply_ops([], cp_two) == cp_two
    finally:
        one.close()
        two.close()
