"""Stateful property test: an in-process ``Engine`` against a plain ``dict`` model.

Hypothesis drives random sequences of puts, deletes, atomic batches (mixed puts and
deletes in one ``Engine.write``), group commits (several requests committed by one
writer pass), rotations, clean restarts and *simulated* crashes, and after every step
checks that the engine serves exactly the model, that LSNs are contiguous and that the
WAL on disk is a gapless chain of whole segments.

Two machines: ``ack="wal"`` (the default: acknowledged at the WAL fsync, LMDB following
from the applier thread) with the applier **paused and resumed at random** through the
engine's seam, so LMDB lags the acknowledged state by a random amount at every step,
crashes included; and ``ack="lmdb"`` (every write in LMDB before its answer). While the
applier is paused LMDB must hold exactly the model as of its checkpoint's LSN (the
one-transaction rule), and every snapshot must hold exactly the state its checkpoint
names; ``catch_up`` (a rule) brings LMDB to the model.

Simulated crashes copy the namespace directory (``db/data.mdb`` + ``wal/``) while the
engine is open, between two completed writes, and restart on the copy, optionally after
damaging the copy the way an interrupted writer would:

* ``torn``: a prefix of the next record (never acknowledged) at the end of the newest
  segment: recovery must cut it off, keep a ``.broken`` copy and reuse its LSN;
* ``seal``: (only right after a rotation) the empty new segment is missing and the
  previous segment's footer is cut short, i.e. the crash hit while sealing;
* ``stale``: ``data.mdb`` is replaced by an earlier hot snapshot (``snapshot_to``), so
  recovery must replay exactly the WAL records after that snapshot's checkpoint.

A file copy of a live process resembles power loss only loosely (it sees the page
cache, not the disk). The real crash coverage is the SIGKILL test in
``tests/crash/test_kill9.py``; this test covers the state space (edge-case keys and
values, records larger than a segment, map growth, every rotation path) far more
densely than a crash test can.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import ClassVar

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from unisondb.config import EngineConfig
from unisondb.storage import layout, record, segment
from unisondb.storage.btree import BTree
from unisondb.storage.engine import Engine
from unisondb.storage.record import Entry, EntryKind

NS = "default"
#: Small segments (rotation every few records, records larger than a segment) and a tiny
#: LMDB map (so the map-growth path runs). Age rotation is off: the test is deterministic.
CONFIG = EngineConfig(segment_size=4096, segment_max_age=0, map_size=32 << 10, ack="wal")

KEYS = [
    b"a",
    b"b",
    b"c",
    b"d",
    b"e",
    b"k/with/slash",
    b"\x00",
    b"\xff" * 3,
    "ключ".encode(),
    b"batch",
    b"x" * record.MAX_KEY,
]
keys = st.sampled_from(KEYS)
#: A valid segment footer: a value ending with one makes an unsealed segment look sealed.
footers = st.builds(
    lambda lsn, t, n: segment.SegmentFooter(lsn, t, t, n).encode(),
    st.integers(0, 400),
    st.integers(0, 2**63 - 1),
    st.integers(0, 400),
)
#: Mostly small values; sometimes empty, larger than a whole segment, or footer-shaped.
values = st.one_of(
    st.binary(max_size=200),
    st.just(b""),
    st.builds(lambda n, b: bytes([b]) * n, st.integers(4000, 9000), st.integers(0, 255)),
    st.builds(lambda prefix, footer: prefix + footer, st.binary(max_size=16), footers),
)
entries = st.one_of(
    st.builds(lambda k, v: Entry(EntryKind.PUT, k, v), keys, values),
    st.builds(lambda k: Entry(EntryKind.DELETE, k), keys),
)
writes = st.lists(entries, min_size=1, max_size=8)


def apply_entries(model: dict[bytes, bytes], batch: list[Entry]) -> None:
    for e in batch:
        if e.kind == EntryKind.PUT:
            model[e.key] = e.value
        else:
            model.pop(e.key, None)


def check_wal_files(wal_dir: Path, last_lsn: int) -> None:
    """Scan every segment file: all but the newest sealed and whole; LSNs 1..last_lsn gapless."""
    files = list(segment.iter_segment_files(wal_dir))
    assert files, "no WAL segment on disk"
    expected = 1
    for i, (seg_id, path) in enumerate(files):
        scan = segment.scan(path)  # raises CorruptLog for any damage in a sealed segment
        assert scan.header.segment_id == seg_id
        assert scan.tail_error is None, f"{path}: {scan.tail_error}"
        if i < len(files) - 1:
            assert scan.sealed, f"{path} is not the newest segment but has no footer"
            assert scan.data_end + segment.FOOTER_SIZE == scan.file_size
            assert scan.records, f"sealed segment {path} is empty"
        else:
            assert scan.data_end == scan.file_size
        assert scan.first_lsn == expected, f"{path} starts at {scan.first_lsn}, not {expected}"
        expected = scan.last_lsn + 1
    assert expected - 1 == last_lsn


class EngineMachine(RuleBasedStateMachine):
    #: The engine's configuration (the subclass below pins ``ack="lmdb"``).
    config: ClassVar[EngineConfig] = CONFIG

    def __init__(self) -> None:
        super().__init__()
        self.root = Path(tempfile.mkdtemp(prefix="unisondb-prop-"))
        self.generation = 0
        self.data_dir = self.root / "gen0"
        self.engine = Engine.open(self.data_dir, NS, self.config)
        self.model: dict[bytes, bytes] = {}
        #: The model after every LSN (what LMDB must hold when its checkpoint names it).
        self.history: dict[int, dict[bytes, bytes]] = {0: {}}
        self.lsn = 0
        #: ``ack="wal"``: is the applier held (``Engine.pause_applier``)?
        self.paused = False
        #: Does the active segment hold records (so that ``rotate`` must seal it)?
        self.active_dirty = False
        #: Hot B-tree snapshots taken so far: (file, checkpoint LSN).
        self.snapshots: list[tuple[Path, int]] = []

    # --- helpers ---

    def _wrote(self, lsn: int, batch: list[Entry], *, last_of_group: bool = True) -> None:
        assert lsn == self.lsn + 1, f"write got LSN {lsn}, expected {self.lsn + 1}"
        self.lsn = lsn
        apply_entries(self.model, batch)
        self.history[lsn] = dict(self.model)
        self.active_dirty = True
        if not last_of_group:
            return
        assert self.engine.last_lsn == lsn
        if self.wal_ack:
            assert self.engine.applied_lsn <= lsn
        else:
            assert self.engine.applied_lsn == lsn

    @property
    def wal_ack(self) -> bool:
        return self.config.ack == "wal"

    def _assert_lmdb_holds_its_checkpoint(self) -> None:
        """LMDB (stable: applier paused or caught up) holds exactly the model at its LSN."""
        eng = self.engine
        cp = eng.checkpoint()
        assert cp.applied_lsn == eng.applied_lsn <= self.lsn
        want = self.history[cp.applied_lsn]
        assert eng.btree.count() == len(want)
        assert list(eng.btree.items()) == sorted(want.items())

    @property
    def wal_dir(self) -> Path:
        return layout.wal_dir(self.data_dir, NS)

    def _copy_namespace(self) -> Path:
        """Copy db/data.mdb and wal/ of the live engine into a fresh data dir."""
        self.generation += 1
        new_dir = self.root / f"gen{self.generation}"
        src = layout.namespace_dir(self.data_dir, NS)
        dst = layout.namespace_dir(new_dir, NS)
        (dst / "db").mkdir(parents=True)
        shutil.copy2(src / "db" / "data.mdb", dst / "db" / "data.mdb")
        shutil.copytree(src / "wal", dst / "wal")
        return new_dir

    def _reopen(self, data_dir: Path) -> Engine:
        self.data_dir = data_dir
        self.engine = Engine.open(data_dir, NS, self.config)
        self.active_dirty = False
        self.paused = False
        check_wal_files(self.wal_dir, self.lsn)
        return self.engine

    # --- writes ---

    @rule(key=keys, value=values)
    def put(self, key: bytes, value: bytes) -> None:
        self._wrote(self.engine.put(key, value), [Entry(EntryKind.PUT, key, value)])

    @rule(key=keys)
    def delete(self, key: bytes) -> None:
        self._wrote(self.engine.delete(key), [Entry(EntryKind.DELETE, key)])

    @rule(batch=writes)
    def batch(self, batch: list[Entry]) -> None:
        self._wrote(self.engine.write(batch), batch)

    @rule(requests=st.lists(writes, min_size=2, max_size=6))
    def group_commit(self, requests: list[list[Entry]]) -> None:
        # With the writer paused (the engine's seam) nothing is taken while the requests
        # are queued, so all of them form ONE group commit (which may rotate in the middle
        # with these small segments).
        assert self.engine.wal.active is not None
        seg_before = self.engine.wal.active.header.segment_id
        groups_before = self.engine.stats.group_commits
        self.engine.pause_writer()
        try:
            futures = [self.engine.submit(r) for r in requests]
        finally:
            self.engine.resume_writer()
        for i, (fut, req) in enumerate(zip(futures, requests, strict=True)):
            self._wrote(fut.result(timeout=30), req, last_of_group=i == len(requests) - 1)
        assert self.engine.wal.active is not None
        if self.engine.wal.active.header.segment_id != seg_before:
            event("group commit rotated mid-group")
        assert self.engine.stats.group_commits == groups_before + 1, "not one group commit"

    # --- the applier (ack="wal") ---

    @precondition(lambda self: self.wal_ack and not self.paused)
    @rule(then=st.lists(st.tuples(keys, st.binary(max_size=64)), max_size=6))
    def pause_applier(self, then: list[tuple[bytes, bytes]]) -> None:
        """Hold the applier, then write: LMDB lags from here until a seal or ``resume``."""
        self.engine.pause_applier()
        self.paused = True
        for key, value in then:
            self._wrote(self.engine.put(key, value), [Entry(EntryKind.PUT, key, value)])

    @precondition(lambda self: self.wal_ack and self.paused)
    @rule()
    def resume_applier(self) -> None:
        if self.engine.lmdb_lag:
            event("applier resumed with LMDB behind")
        self.engine.resume_applier()
        self.paused = False

    @precondition(lambda self: not self.paused)
    @rule()
    def catch_up(self) -> None:
        assert self.engine.catch_up(timeout=60)
        assert self.engine.applied_lsn == self.lsn and self.engine.lmdb_lag == 0
        self._assert_lmdb_holds_its_checkpoint()

    # --- WAL and lifecycle ---

    @rule()
    def rotate(self) -> None:
        before = self.engine.wal.active
        assert before is not None
        active_id = before.header.segment_id
        sealed = self.engine.rotate()
        if self.active_dirty:
            # Sealed only once LMDB holds its last record (the footer's fingerprint), even
            # with the applier paused.
            assert self.engine.applied_lsn == self.lsn
            assert sealed == active_id
            assert self.engine.wal.active is not None
            assert self.engine.wal.active.header.segment_id == active_id + 1
            assert self.engine.wal.active.header.first_lsn == self.lsn + 1
        else:
            assert sealed is None
        self.active_dirty = False

    @rule()
    def restart(self) -> None:
        self.engine.close()
        self._reopen(self.data_dir)
        assert self.engine.recovery.records_replayed == 0

    @rule()
    def take_snapshot(self) -> None:
        path = self.root / f"snap{len(self.snapshots)}.mdb"
        with open(path, "wb") as f:
            if self.paused:
                # The engine's snapshot_to would wait for the held applier: copy LMDB as
                # it is (behind), which must still be exactly the state it names.
                cp = self.engine.btree.snapshot_to(f)
                if cp.applied_lsn < self.lsn:
                    event("snapshot of a lagging LMDB")
            else:
                cp = self.engine.snapshot_to(f)  # every acknowledged write is in it
                assert cp.applied_lsn == self.lsn
        snap_dir = self.root / f"snapdb{len(self.snapshots)}"
        snap_dir.mkdir()
        shutil.copyfile(path, snap_dir / "data.mdb")
        bt = BTree(snap_dir, map_size=CONFIG.map_size)
        try:
            assert bt.read_checkpoint() == cp
            assert list(bt.items()) == sorted(self.history[cp.applied_lsn].items())
        finally:
            bt.close()
        shutil.rmtree(snap_dir)
        self.snapshots.append((path, cp.applied_lsn))

    @rule(cut=st.floats(0.0, 1.0, exclude_max=True, exclude_min=True), torn=st.booleans())
    def crash_restart(self, cut: float, torn: bool) -> None:
        """Restart on a copy taken between two writes, maybe with a torn unacked record.
        With ``ack="wal"`` LMDB of the copy may lag (the applier paused): recovery replays
        exactly the records after its checkpoint."""
        if not self.paused:
            # The applier may be committing right now: a file copy needs LMDB still.
            assert self.engine.catch_up(timeout=60)
        in_lmdb = self.engine.applied_lsn
        new_dir = self._copy_namespace()
        newest = list(segment.iter_segment_files(layout.wal_dir(new_dir, NS)))[-1][1]
        garbage = b""
        if torn:
            data = record.encode(
                self.lsn + 1, time.time_ns(), [Entry(EntryKind.PUT, b"never-acked", b"v" * 64)]
            )
            garbage = data[: max(1, int(len(data) * cut))]
            # Written where the next record goes: after the records, over the zeros the
            # zero-filler may have written ahead (``zerofill.py``), as a crash leaves it.
            end = segment.scan(newest).data_end
            with open(newest, "r+b") as f:
                f.seek(end)
                f.write(garbage)
            file_len = newest.stat().st_size
        self.engine.close()
        eng = self._reopen(new_dir)
        assert eng.recovery.records_replayed == self.lsn - in_lmdb
        if self.lsn > in_lmdb:
            event("crash replayed acknowledged writes LMDB did not hold")
        if torn and any(garbage):
            event("recovered from a torn tail")
            assert eng.wal.report.truncated_bytes == file_len - end
            assert newest.with_name(newest.name + ".broken").exists()
        elif torn:  # a prefix of zeros only: the clean end of the log, nothing cut
            assert eng.wal.report.truncated_bytes == 0
        assert eng.get(b"never-acked") is None

    @precondition(lambda self: not self.active_dirty and self.lsn > 0)
    @rule(cut=st.integers(0, segment.FOOTER_SIZE - 1))
    def crash_while_sealing(self, cut: int) -> None:
        """Crash after the last segment's records, while its footer was being written."""
        event("crash while sealing a segment")
        new_dir = self._copy_namespace()
        files = list(segment.iter_segment_files(layout.wal_dir(new_dir, NS)))
        empty_path = files[-1][1]
        assert empty_path.stat().st_size == segment.HEADER_SIZE
        empty_path.unlink()  # the crash came before the next segment was created
        sealed_path = files[-2][1]
        size = sealed_path.stat().st_size
        with open(sealed_path, "r+b") as f:
            f.truncate(size - segment.FOOTER_SIZE + cut)
        self.engine.close()
        eng = self._reopen(new_dir)
        assert eng.recovery.records_replayed == 0
        assert eng.wal.report.truncated_bytes == cut

    @precondition(lambda self: bool(self.snapshots))
    @rule(data=st.data())
    def crash_with_stale_btree(self, data: st.DataObject) -> None:
        """The B-tree is an older snapshot: recovery replays exactly the WAL after it."""
        snap_path, snap_lsn = data.draw(st.sampled_from(self.snapshots), label="snapshot")
        event("crash with a stale B-tree snapshot")
        new_dir = self._copy_namespace()
        shutil.copyfile(snap_path, layout.btree_dir(new_dir, NS) / "data.mdb")
        self.engine.close()
        eng = self._reopen(new_dir)
        assert eng.recovery.records_replayed == self.lsn - snap_lsn
        if eng.recovery.records_replayed:
            event("recovery replayed records after a stale snapshot")

    # --- invariants ---

    @invariant()
    def serves_the_model(self) -> None:
        eng = self.engine
        if eng.btree.map_size > CONFIG.map_size:
            event("LMDB map grew")
        assert eng.last_lsn == self.lsn
        # Read-your-writes through the engine (the in-memory table, then LMDB).
        for k in KEYS:
            assert eng.get(k) == self.model.get(k), f"key {k!r}"
        assert eng.key_count() == len(self.model)
        if self.wal_ack and not self.paused:
            return  # the applier is moving the table into LMDB right now (see catch_up)
        if not self.wal_ack:
            assert eng.applied_lsn == self.lsn
        self._assert_lmdb_holds_its_checkpoint()

    @invariant()
    def segment_table_is_a_chain(self) -> None:
        segs = self.engine.segments()
        assert segs and not segs[-1].sealed and all(s.sealed for s in segs[:-1])
        expected = 1
        for s in segs:
            assert s.first_lsn == expected, f"segment {s.segment_id} starts at {s.first_lsn}"
            expected = s.last_lsn + 1
        assert expected - 1 == self.lsn

    def teardown(self) -> None:
        try:
            self.engine.close()
            check_wal_files(self.wal_dir, self.lsn)
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


class LmdbAckMachine(EngineMachine):
    """The same machine with ``ack="lmdb"``: LMDB holds every write before its answer."""

    config = EngineConfig(segment_size=4096, segment_max_age=0, map_size=32 << 10, ack="lmdb")


_SETTINGS = settings(
    # ~10-20 s each by default; raise for a soak, e.g. UNISONDB_PROPERTY_EXAMPLES=2000.
    max_examples=int(os.environ.get("UNISONDB_PROPERTY_EXAMPLES", "60")),
    stateful_step_count=int(os.environ.get("UNISONDB_PROPERTY_STEPS", "40")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
EngineMachine.TestCase.settings = _SETTINGS
LmdbAckMachine.TestCase.settings = _SETTINGS
test_engine_matches_dict_model = EngineMachine.TestCase
test_engine_matches_dict_model_ack_lmdb = LmdbAckMachine.TestCase
