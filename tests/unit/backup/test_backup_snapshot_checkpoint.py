"""The checkpoint a snapshot states is exactly its content, for both copy modes.

The plain copy (``BTree.copy_plain_to``) takes the meta pages and its read transaction
under LMDB's writer lock and reads the checkpoint in that transaction; the compacting copy
reads it in the copy's own transaction. Either way, with writers racing the copy: write,
snapshot, then rebuild the expected state from a model of every acknowledged write up to
the *stated* LSN (the WAL replay a restore would do from that LSN starts after it) and
compare it pair by pair with the snapshot's content. Real engine, real LMDB files, real threads; no fakes.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import lmdb
import pytest

from unisondb.backup import paths, snapshot
from unisondb.backup.snapshot import take_snapshot
from unisondb.config import EngineConfig
from unisondb.restore import inventory
from unisondb.storage import layout, snapfile
from unisondb.storage.btree import CHECKPOINT_KEY, Checkpoint
from unisondb.storage.engine import Engine
from unisondb.storage.fingerprint import Fingerprint
from unisondb.storage.record import Entry, EntryKind

NS = "snapcp"


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    eng = Engine.open(tmp_path / "data", NS, EngineConfig(segment_size=1 << 20))
    yield eng
    eng.close()


def _target(eng: Engine, rel: str) -> paths.Resolved:
    parts = paths.parse_relative(rel, "x", is_file=True)
    return paths.resolve(layout.backup_root(eng.data_dir, NS), parts, "x", is_file=True)


def _content(path: Path) -> tuple[Checkpoint, dict[bytes, bytes]]:
    assert snapfile.read_trailer(path) is not None  # a self-verifying snapshot
    env = lmdb.open(str(path), subdir=False, readonly=True, lock=False, max_dbs=4, map_size=1 << 30)
    try:
        kv, meta = env.open_db(b"kv", create=False), env.open_db(b"meta", create=False)
        with env.begin() as txn:
            cp = Checkpoint.decode(bytes(txn.get(CHECKPOINT_KEY, db=meta)))
            pairs = {bytes(k): bytes(v) for k, v in txn.cursor(db=kv).iternext()}
    finally:
        env.close()
    return cp, pairs


@pytest.mark.parametrize("compact", [False, True], ids=["plain", "compacting"])
def test_stated_checkpoint_is_exactly_the_content(
    engine: Engine, monkeypatch: pytest.MonkeyPatch, compact: bool
) -> None:
    # Force the mode: 0 % free pages never exceeds -1 (compact), always stays under 2 (plain).
    monkeypatch.setattr(snapshot, "PLAIN_COPY", True)
    monkeypatch.setattr(snapshot, "COMPACT_FREE_FRACTION", -1.0 if compact else 2.0)
    log: list[tuple[int, bytes, bytes | None]] = []  # (lsn, key, value or None: delete)
    for i in range(300):
        key, value = b"k%04d" % (i % 120), b"v%06d" % i
        log.append((engine.put(key, value), key, value))
    stop = threading.Event()
    lock = threading.Lock()

    def writer() -> None:
        i = 0
        while not stop.is_set():
            key = b"k%04d" % (i % 150)
            if i % 7 == 3:
                entry, value = Entry(EntryKind.DELETE, key), None
            else:
                value = b"w%06d" % i
                entry = Entry(EntryKind.PUT, key, value)
            lsn = engine.write([entry])
            with lock:
                log.append((lsn, key, value))
            i += 1

    threads = [threading.Thread(target=writer) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        snaps = [take_snapshot(engine, _target(engine, f"s/{n}.db")) for n in range(3)]
    finally:
        stop.set()
        for t in threads:
            t.join()
    for snap in snaps:
        cp, pairs = _content(snap.path)
        assert cp == snap.checkpoint  # what the API answered is what the file holds
        model: dict[bytes, bytes] = {}
        for lsn, key, value in sorted(log):
            if lsn > cp.applied_lsn:
                break
            if value is None:
                model.pop(key, None)
            else:
                model[key] = value
        assert pairs == model, (
            f"snapshot at LSN {cp.applied_lsn} does not hold exactly LSNs 1..{cp.applied_lsn}"
        )
        assert Fingerprint.of_items(pairs.items()).state() == cp.fp_state
        # What restore checks first: LMDB structure (every page), trailer, content scan.
        info = inventory.inspect_snapshot(snap.path)
        assert info.checkpoint == cp
        inventory.check_snapshot_content(info)
    # The writers really raced the copies: later records exist beyond the first snapshot.
    assert max(lsn for lsn, _k, _v in log) > snaps[0].checkpoint.applied_lsn
