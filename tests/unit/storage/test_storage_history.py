"""History identity and state fingerprints in the engine: real LMDB, real WAL files."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from _storage_helpers import NS
from hypothesis import given, settings
from hypothesis import strategies as st

from unisondb.backup.snapshot import write_snapshot
from unisondb.config import EngineConfig
from unisondb.storage import layout, segment, snapfile
from unisondb.storage.engine import Engine
from unisondb.storage.fingerprint import Fingerprint
from unisondb.storage.history import FORK_SEGMENT_GAP, NO_HISTORY

SMALL = EngineConfig(segment_size=4096)


def _scan_fp(eng: Engine) -> bytes:
    fp, _cp = eng.btree.scan_fingerprint()
    return fp.digest()


def test_new_namespace_gets_a_history_that_a_restart_keeps(open_engine: Callable[..., Engine]) -> None:
    eng = open_engine(SMALL)
    h = eng.checkpoint().history
    assert h != NO_HISTORY and eng.checkpoint().parent == NO_HISTORY
    for i in range(50):
        eng.put(b"k%d" % i, b"v" * 100)
    eng.close()
    eng = open_engine(SMALL)
    assert eng.checkpoint().history == h  # the WAL continues the B-tree: no fork


def test_two_namespaces_never_share_a_history(tmp_path: Path) -> None:
    histories = set()
    for name in ("a", "b"):
        eng = Engine.open(tmp_path / name, NS, SMALL)
        histories.add(eng.checkpoint().history)
        eng.close()
    assert len(histories) == 2


def test_every_footer_and_header_records_the_true_state(
    open_engine: Callable[..., Engine], wal_dir: Path
) -> None:
    eng = open_engine(SMALL)
    for i in range(200):  # overwrites and deletes too, across many rotations
        if i % 7 == 3:
            eng.delete(b"k%d" % (i // 2))
        else:
            eng.put(b"k%d" % (i % 60), b"v%d" % i * 20)
    eng.close()
    segs = [segment.scan(p) for _i, p in segment.iter_segment_files(wal_dir)]
    assert len(segs) > 5
    state: dict[bytes, bytes] = {}
    prev_fp = Fingerprint().digest()
    for s in segs:
        assert s.header.start_fp == prev_fp
        for rec, _a, _b in s.records:
            for e in rec.entries:
                if e.kind == 1:
                    state[e.key] = e.value
                else:
                    state.pop(e.key, None)
        if s.footer is not None:
            assert s.footer.fingerprint == Fingerprint.of_items(state.items()).digest()
            prev_fp = s.footer.fingerprint


def test_a_btree_without_its_wal_forks_a_new_history(
    open_engine: Callable[..., Engine], data_dir: Path, wal_dir: Path
) -> None:
    eng = open_engine(SMALL)
    for i in range(100):
        eng.put(b"k%d" % i, b"x" * 100)
    assert eng.catch_up()
    before = eng.checkpoint()
    last_id = eng.wal.max_segment_id()
    eng.close()
    shutil.rmtree(wal_dir)  # the WAL beside data.mdb is gone: its history cannot continue
    eng = open_engine(SMALL)
    cp = eng.checkpoint()
    assert cp.history != before.history and cp.parent == before.history
    assert cp.fork_lsn == before.applied_lsn and cp.timeline == before.timeline + 1
    assert cp.fingerprint == before.fingerprint == _scan_fp(eng)
    # Nothing visible beyond the checkpoint's segment: ids leave room for unseen ones.
    assert eng.wal.active is not None
    assert eng.wal.active.header.segment_id == before.segment_id + FORK_SEGMENT_GAP
    assert eng.wal.active.header.segment_id > last_id
    assert eng.wal.active.header.parent == before.history


def test_fork_ids_start_above_the_backups_of_the_old_history(
    open_engine: Callable[..., Engine], data_dir: Path, wal_dir: Path
) -> None:
    eng = open_engine(SMALL)
    for i in range(100):
        eng.put(b"k%d" % i, b"x" * 100)
    eng.close()
    archive = layout.backup_root(data_dir, NS) / "wal" / "archive"
    archive.mkdir(parents=True)
    for _i, p in segment.iter_segment_files(wal_dir):
        shutil.copy(p, archive / p.name)
    highest = max(i for i, _p in segment.iter_segment_files(wal_dir))
    shutil.rmtree(wal_dir)
    eng = open_engine(SMALL)
    assert eng.wal.active is not None and eng.wal.active.header.segment_id == highest + 1


def test_an_empty_btree_is_rebuilt_from_a_complete_wal(
    open_engine: Callable[..., Engine], db_dir: Path
) -> None:
    eng = open_engine(SMALL)
    for i in range(80):
        eng.put(b"k%d" % (i % 30), b"v%d" % i)
    assert eng.catch_up()
    before = eng.checkpoint()
    eng.close()
    shutil.rmtree(db_dir)
    eng = open_engine(SMALL)
    assert eng.checkpoint().history == before.history
    assert eng.checkpoint().fingerprint == before.fingerprint == _scan_fp(eng)


def test_a_snapshot_installed_by_hand_forks_even_when_the_wal_continues_it(
    open_engine: Callable[..., Engine], tmp_path: Path, db_dir: Path
) -> None:
    eng = open_engine(SMALL)
    for i in range(40):
        eng.put(b"k%d" % i, b"a" * 50)
    snap = tmp_path / "s.db"
    with open(snap, "w+b") as f:  # read back once for the hash
        cp_snap, _size, _sha = write_snapshot(eng, f.fileno(), snap)
    for i in range(40, 60):
        eng.put(b"k%d" % i, b"b" * 50)
    assert eng.catch_up()
    tip = eng.checkpoint()
    eng.close()
    assert snapfile.read_trailer(snap) is not None
    # The document's "copy snapshot + WAL segments" procedure: data.mdb replaced, WAL kept.
    shutil.copy(snap, db_dir / "data.mdb")
    eng = open_engine(SMALL)
    cp = eng.checkpoint()
    assert cp.applied_lsn == tip.applied_lsn  # replayed the WAL after the snapshot
    assert cp.history != tip.history and cp.parent == tip.history
    assert cp.fork_lsn == tip.applied_lsn and cp.fingerprint == tip.fingerprint
    assert not (db_dir / snapfile.INSTALL_MARKER).exists()
    assert cp_snap.applied_lsn == 40


def test_a_crash_after_stripping_the_trailer_still_forks(
    open_engine: Callable[..., Engine], db_dir: Path
) -> None:
    eng = open_engine(SMALL)
    eng.put(b"k", b"v")
    before = eng.checkpoint()
    eng.close()
    # What install_check leaves if the process dies right after stripping the trailer.
    (db_dir / snapfile.INSTALL_MARKER).write_bytes(NS.encode())
    eng = open_engine(SMALL)
    assert eng.checkpoint().parent == before.history
    assert not (db_dir / snapfile.INSTALL_MARKER).exists()


OPS = st.lists(
    st.tuples(st.sampled_from(["put", "del"]), st.integers(0, 15), st.binary(max_size=8)), max_size=60
)


@settings(max_examples=60, deadline=None, database=None)
@given(ops=OPS, seed=st.randoms(use_true_random=False))
def test_fingerprint_depends_only_on_the_final_set(ops: list[tuple[str, int, bytes]], seed: object) -> None:
    """Insert/overwrite/delete in any order and any batching give one value: the scan's."""
    state: dict[bytes, bytes] = {}
    fp = Fingerprint()
    for op, k, v in ops:
        key = b"key%d" % k
        old = state.pop(key, None)
        if old is not None:
            fp.remove(key, old)
        if op == "put":
            state[key] = v
            fp.add(key, v)
    items = list(state.items())
    seed.shuffle(items)  # type: ignore[attr-defined]
    assert fp == Fingerprint.of_items(items)
    assert fp.digest() == Fingerprint.of_items(reversed(items)).digest()


def test_fingerprint_separates_near_misses() -> None:
    base = Fingerprint.of_items([(b"ab", b"c")])
    assert base != Fingerprint.of_items([(b"a", b"bc")])  # the length prefix
    assert base != Fingerprint.of_items([(b"ab", b"c"), (b"ab", b"c")])  # a duplicate counts
    assert Fingerprint.of_items([]).digest() == Fingerprint().digest()


def test_restarts_after_a_fork_never_take_an_id_below_the_fork(
    open_engine: Callable[..., Engine], wal_dir: Path
) -> None:
    eng = open_engine(SMALL)
    eng.put(b"k", b"v")
    eng.close()
    shutil.rmtree(wal_dir)  # fork with the gap: nothing visible beyond the checkpoint
    eng = open_engine(SMALL)
    assert eng.wal.active is not None
    first = eng.wal.active.header.segment_id
    assert first >= FORK_SEGMENT_GAP
    eng.close()  # no write: the fork's first segment stays empty
    for _ in range(2):
        eng = open_engine(SMALL)
        assert eng.wal.active is not None and eng.wal.active.header.segment_id >= first
        eng.close()
