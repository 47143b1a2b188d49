"""Property test: every restore target ``backup list`` promises gives exactly that state.

Hypothesis interleaves, on one in-process ``Engine`` (small segments, so they rotate):

* writes: ``put``, ``delete`` and atomic batches over a small key space;
* snapshots: ``backup.snapshot.write_snapshot`` into ``backups/<ns>/snapshots/``;
* WAL backups: the document's incremental loop (``rotate`` then ``afterSegmentId`` = the
  last segment id copied) into one directory ``backups/<ns>/wal/archive`` through the
  real ``backup_wal``;
* manual restores by the document's *Full Restore* procedure: close, ``rm -rf <ns>``,
  copy an earlier snapshot to ``<ns>/db/data.mdb``, reopen (the engine forks by itself);
* ``unisondb restore`` forks (``unisondb.restore.restore``, ``force=True``) into the live
  data directory, to a target the backup listing offers;
* clean restarts.

The model keeps, for every history id the engine reports, the state at every LSN of that
history (a fork inherits its parent's states up to the fork LSN). Checks:

* after each write / fork the engine serves the model's state and its checkpoint carries
  the model's fingerprint; a fork's parent and fork LSN are the ones the model expects;
* no file name under ``backups/<ns>/`` ever holds different bytes (sha256 per name);
* after every WAL backup, every sealed segment on disk is in the archive, byte-identical
  (the incremental loop never skips a segment of a new history);
* for a bounded sample of the targets ``backup list --json`` promises (per history each
  ``window.anchors`` entry's ``fromLsn..toLsn`` with its snapshot, and per snapshot its
  default ``restorableTo``), a restore into a scratch directory gives exactly the model's
  state at (history, LSN), key by key, and ``summary.proof.fingerprint`` equals the
  model state's fingerprint. A restore that mixed records of two histories would produce
  a state the model does not have at that point, so this also proves no splice.

The CI size is ``UNISONDB_LINEAGE_EXAMPLES`` (default 100) examples of
``UNISONDB_LINEAGE_STEPS`` (default 40) steps, derandomized (the same sequences every
run); ``TestLineageSoak`` (``slow``) runs 1000 x 60 with fresh random choices.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, precondition, rule

from unisondb.backup.paths import resolve
from unisondb.backup.snapshot import write_snapshot
from unisondb.backup.wal_backup import backup_wal
from unisondb.cli.backup_cmd import list_backups
from unisondb.config import EngineConfig
from unisondb.restore import RestoreOutcome, restore
from unisondb.restore.errors import BackupMismatch
from unisondb.storage import layout
from unisondb.storage.btree import BTree
from unisondb.storage.engine import Engine
from unisondb.storage.fingerprint import Fingerprint
from unisondb.storage.record import Entry, EntryKind

NS = "users"
#: ~10 small records per segment, so WAL backups see several segments per history. Age
#: rotation off: only the test's steps decide when a segment is sealed.
CONFIG = EngineConfig(segment_size=1024, segment_max_age=0, map_size=1 << 20)
KEYS = [b"k0", b"k1", b"k2", b"k3", b"k4", b"k5"]
keys = st.sampled_from(KEYS)
values = st.binary(min_size=0, max_size=48)
entries = st.one_of(
    st.builds(lambda k, v: Entry(EntryKind.PUT, k, v), keys, values),
    st.builds(lambda k: Entry(EntryKind.DELETE, k), keys),
)
#: Known bug (pinned by ``test_list_promise_for_snapshot_of_grandchild_history_restores``):
#: a snapshot whose history and parent history have no segment in the WAL directory
#: (two manual restores with no write between them) is listed as restorable, but
#: ``restore`` with that WAL directory refuses it with ``BackupMismatch``. While True, such
#: a refusal is counted (Hypothesis event) instead of failing; set False with the fix.
KNOWN_UNLINKED_SNAPSHOT_BUG = False
#: Restores checked per ``verify_targets`` step (each is a real restore into scratch).
TARGETS_PER_CHECK = 3

State = dict[bytes, bytes]


def scratch_parent() -> str | None:
    """Where the test's files live: tmpfs when there is one, because every step fsyncs
    (WAL, LMDB, snapshot, backup publish) and on a busy disk the fsyncs, not the logic,
    took 90 % of the wall time. This test checks what is restored, not durability (that
    is the SIGKILL tests' job). ``UNISONDB_LINEAGE_TMP`` overrides."""
    chosen = os.environ.get("UNISONDB_LINEAGE_TMP")
    if chosen:
        return chosen
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None


def fingerprint_of(state: State) -> bytes:
    return Fingerprint.of_items(state.items()).digest()


class LineageMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.root = Path(tempfile.mkdtemp(prefix="unisondb-lineage-", dir=scratch_parent()))
        self.data_dir = self.root / "data"
        self.backups = layout.backup_root(self.data_dir, NS)
        self.snap_dir = self.backups / "snapshots"
        self.wal_archive = self.backups / "wal" / "archive"
        self.wal_archive.mkdir(parents=True)  # the loop's target exists before its first run
        self.engine: Engine | None = Engine.open(self.data_dir, NS, CONFIG)
        cp = self.engine.checkpoint()
        #: history id -> {LSN: state after that LSN} (a fork's entries up to its fork LSN
        #: are its parent's).
        self.states: dict[bytes, dict[int, State]] = {cp.history: {0: {}}}
        self.history = cp.history
        self.lsn = 0
        self.state: State = {}
        #: (path, history, LSN) of every snapshot written.
        self.snapshots: list[tuple[Path, bytes, int]] = []
        #: The incremental loop's state file: highest segment id copied so far.
        self.last_segment = 0
        #: sha256 of every file name ever seen under backups/<ns>/.
        self.seen: dict[str, str] = {}
        self.scratch_n = 0
        self.snap_n = 0
        #: history id -> the order the model met it (ids are random; this is not), so
        #: what Hypothesis draws from a list of targets does not depend on random ids.
        self.order: dict[bytes, int] = {cp.history: 0}
        #: history id -> (parent, fork LSN), as the engine reported it when it forked.
        self.parents: dict[bytes, tuple[bytes, int]] = {}
        #: The engine forked by itself (manual restore) and the new history has no write
        #: yet: where a restart once reused the old history's segment ids.
        self.fresh_fork = False
        self.check_backup_names()

    # --- helpers ---

    @property
    def eng(self) -> Engine:
        assert self.engine is not None
        return self.engine

    def wrote(self, lsn: int, batch: list[Entry]) -> None:
        assert lsn == self.lsn + 1, f"write got LSN {lsn}, expected {self.lsn + 1}"
        for e in batch:
            if e.kind == EntryKind.PUT:
                self.state[e.key] = e.value
            else:
                self.state.pop(e.key, None)
        self.lsn = lsn
        self.states[self.history][lsn] = dict(self.state)
        self.fresh_fork = False

    def check_engine(self) -> None:
        """The engine serves the model's state and its checkpoint says so."""
        assert self.eng.catch_up()  # (ack="wal": LMDB follows the acknowledged writes)
        served = dict(self.eng.btree.items())
        assert served == self.state
        cp = self.eng.checkpoint()
        assert cp.history == self.history
        assert cp.applied_lsn == self.lsn
        assert cp.fingerprint == fingerprint_of(self.state)

    def check_backup_names(self) -> None:
        """No name under backups/<ns>/ ever holds different bytes (issue 8, deliver 1)."""
        if not self.backups.is_dir():
            return
        for path in sorted(p for p in self.backups.rglob("*") if p.is_file()):
            name = str(path.relative_to(self.backups))
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            before = self.seen.setdefault(name, digest)
            assert before == digest, f"backup file {name} was rewritten with different bytes"

    def sharing(self, history: bytes, lsn: int) -> list[bytes]:
        """``history`` and each ancestor whose state at ``lsn`` is the same one (the fork
        came at or after ``lsn``): (history, lsn) may be named by any of them, and the
        last one is the history that wrote that LSN."""
        out = [history]
        while history in self.parents and lsn <= self.parents[history][1]:
            history = self.parents[history][0]
            out.append(history)
        return out

    def reopen(self, *, fork_from: tuple[bytes, int] | None) -> None:
        """Open the engine; with ``fork_from=(history, lsn)`` it must have forked there."""
        self.engine = Engine.open(self.data_dir, NS, CONFIG)
        cp = self.engine.checkpoint()
        if fork_from is None:
            assert cp.history == self.history, "a clean restart changed the history"
        else:
            parent, at = fork_from
            assert cp.history not in self.states, "a fork reused a known history id"
            assert cp.parent in self.sharing(parent, at) and cp.fork_lsn == at, (
                f"fork from {parent.hex()[:12]}@{at}, engine says {cp.parent.hex()[:12]}@{cp.fork_lsn}"
            )
            assert cp.applied_lsn == at
            inherited = {n: s for n, s in self.states[parent].items() if n <= at}
            self.states[cp.history] = inherited
            self.order[cp.history] = len(self.order)
            self.parents[cp.history] = (cp.parent, cp.fork_lsn)
            self.history, self.lsn = cp.history, at
            self.state = dict(inherited[at])
        self.check_engine()

    def close(self) -> None:
        self.eng.close()
        self.engine = None

    def promised_targets(self) -> list[tuple[Path, bytes | None, int | None, bytes, int]]:
        """(snapshot, history choice, target LSN, expected history, expected LSN) for what
        ``backup list --json`` promises; None choice/LSN = the restore's default."""
        listing: dict[str, Any] = list_backups(self.backups)
        assert not listing["problems"], listing["problems"]
        out: list[tuple[Path, bytes | None, int | None, bytes, int]] = []
        for hist in listing["wal"]["histories"]:
            h = bytes.fromhex(hist["history"])
            window = hist["window"]
            if window is None:
                continue
            for a in window["anchors"]:
                for n in range(a["fromLsn"], a["toLsn"] + 1):
                    out.append((Path(a["snapshot"]), h, n, h, n))
        for snap in listing["snapshots"]:
            assert "error" not in snap, snap
            r = snap["restorableTo"]
            # Without holes the default target is the promise; with a hole after it the
            # restore (by design) wants the earlier point named: --target-lsn.
            explicit = r["lsn"] if r["holesAfter"] else None
            out.append((Path(snap["path"]), None, explicit, bytes.fromhex(r["history"]), r["lsn"]))
        for t in out:
            assert t[3] in self.order, f"backup list names a history the model never saw: {t}"
        return sorted(out, key=lambda t: (t[0].name, -1 if t[1] is None else self.order[t[1]], t[2] or 0))

    def restore(
        self, data_dir: Path, snap: Path, choice: bytes | None, target: int | None, *, force: bool = False
    ) -> RestoreOutcome | None:
        """``unisondb restore`` with the archive; None = refused by the known bug."""
        try:
            return restore(
                data_dir,
                NS,
                snap,
                [self.wal_archive],
                target_lsn=target,
                history_choice=None if choice is None else choice.hex(),
                force=force,
            )
        except BackupMismatch:
            if KNOWN_UNLINKED_SNAPSHOT_BUG and self.unlinked(snap):
                event("known bug: listed snapshot refused (history not linked by WAL)")
                return None
            raise

    def restore_into_scratch(
        self, snap: Path, choice: bytes | None, target: int | None, want_history: bytes, want_lsn: int
    ) -> None:
        self.scratch_n += 1
        scratch = self.root / f"scratch-{self.scratch_n}"
        try:
            out = self.restore(scratch, snap, choice, target)
            if out is None:
                return
            assert out.summary is not None
            assert out.summary.end_lsn == want_lsn
            assert want_history in self.states, "restore target on an unknown history"
            want = self.states[want_history][want_lsn]
            assert out.summary.proof.fingerprint == fingerprint_of(want), (
                f"restore of {snap.name} to {want_history.hex()[:12]}@{want_lsn}: fingerprint "
                "differs from the model state's"
            )
            bt = BTree(layout.btree_dir(scratch, NS), map_size=CONFIG.map_size)
            try:
                got = dict(bt.items())
                cp = bt.read_checkpoint()
            finally:
                bt.close()
            assert got == want, (
                f"restore of {snap.name} to {want_history.hex()[:12]}@{want_lsn} built a state "
                "the model does not have there"
            )
            assert cp.applied_lsn == want_lsn
            # The restore started a history of its own, forked at the target.
            assert cp.parent in self.sharing(want_history, want_lsn), (
                f"restored history's parent {cp.parent.hex()[:12]} is not "
                f"{want_history.hex()[:12]} or an ancestor sharing LSN {want_lsn}"
            )
            assert cp.fork_lsn == want_lsn
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def unlinked(self, snap: Path) -> bool:
        """The known bug's condition: neither the snapshot's history nor its parent has a
        segment in the WAL archive, so nothing there links it to the archived histories."""
        in_archive = {
            bytes.fromhex(h["history"])
            for h in list_backups(self.backups)["wal"]["histories"]
            if h["segments"]
        }
        snap_history = next(h for p, h, _n in self.snapshots if p == snap)
        parent = self.parents.get(snap_history, (snap_history, 0))[0]
        return bool(in_archive) and not {snap_history, parent} & in_archive

    # --- writes ---

    @rule(key=keys, value=values)
    def put(self, key: bytes, value: bytes) -> None:
        self.wrote(self.eng.put(key, value), [Entry(EntryKind.PUT, key, value)])

    @rule(key=keys)
    def delete(self, key: bytes) -> None:
        self.wrote(self.eng.delete(key), [Entry(EntryKind.DELETE, key)])

    @rule(batch=st.lists(entries, min_size=1, max_size=6))
    def batch(self, batch: list[Entry]) -> None:
        self.wrote(self.eng.write(batch), batch)

    @rule(n=st.integers(3, 12), seed=st.integers(0, 2**16))
    def many_puts(self, n: int, seed: int) -> None:
        """Several writes in a row, so segments fill and rotate by size."""
        for i in range(n):
            key = KEYS[(seed + i) % len(KEYS)]
            value = f"{seed}-{i}".encode() * 4
            self.wrote(self.eng.put(key, value), [Entry(EntryKind.PUT, key, value)])
        self.check_engine()

    # --- backups ---

    @rule()
    def snapshot(self) -> None:
        self.snap_dir.mkdir(parents=True, exist_ok=True)
        self.snap_n += 1
        path = self.snap_dir / f"snap-{self.snap_n:03d}.db"
        with open(path, "w+b") as f:
            cp, _size, _digest = write_snapshot(self.eng, f.fileno(), path)
        assert cp.history == self.history and cp.applied_lsn == self.lsn
        self.snapshots.append((path, cp.history, cp.applied_lsn))
        self.check_backup_names()

    @rule()
    def wal_backup(self) -> None:
        target = resolve(self.backups, ("wal", "archive"), "backupDir", is_file=False)
        copies = backup_wal(self.eng, target, self.last_segment, rotate=True)
        if copies:
            self.last_segment = max(self.last_segment, max(c.segment_id for c in copies))
            event("wal_backup copied segments")
        # The loop with its state file captured every sealed segment there is, byte for byte.
        for info in self.eng.wal.sealed_segments():
            copy = self.wal_archive / layout.segment_name(info.segment_id)
            assert copy.is_file(), (
                f"sealed segment {info.segment_id} of history {info.history.hex()[:12]} was "
                f"never backed up (afterSegmentId={self.last_segment})"
            )
            assert copy.read_bytes() == info.path.read_bytes()
        self.check_backup_names()

    # --- restarts and forks ---

    @rule()
    def restart(self) -> None:
        if self.fresh_fork:
            event("restart right after a fork, before its first write")
        self.close()
        self.reopen(fork_from=None)

    @precondition(lambda self: bool(self.snapshots))
    @rule(data=st.data())
    def manual_restore(self, data: st.DataObject) -> None:
        """The document's Full Restore: rm -rf <ns>, cp snapshot <ns>/db/data.mdb, start."""
        path, snap_history, snap_lsn = data.draw(st.sampled_from(self.snapshots))
        self.close()
        ns_dir = layout.namespace_dir(self.data_dir, NS)
        shutil.rmtree(ns_dir)
        layout.btree_dir(self.data_dir, NS).mkdir(parents=True)
        shutil.copyfile(path, layout.btree_dir(self.data_dir, NS) / "data.mdb")
        self.reopen(fork_from=(snap_history, snap_lsn))
        self.fresh_fork = True
        event("manual restore")
        self.check_backup_names()

    @precondition(lambda self: bool(self.snapshots))
    @rule(data=st.data())
    def restore_fork(self, data: st.DataObject) -> None:
        """``unisondb restore --force`` into the live data dir, to a promised target."""
        targets = [t for t in self.promised_targets() if t[1] is not None]
        if not targets:
            return
        snap, choice, lsn, want_h, want_lsn = data.draw(st.sampled_from(targets))
        self.close()
        out = self.restore(self.data_dir, snap, choice, lsn, force=True)
        if out is None:  # refused before touching the data dir: the engine goes on as it was
            self.reopen(fork_from=None)
            return
        assert out.summary is not None and out.summary.end_lsn == want_lsn
        self.reopen(fork_from=(want_h, want_lsn))
        event("restore fork")
        self.check_backup_names()

    # --- the promise check ---

    @precondition(lambda self: bool(self.snapshots))
    @rule(data=st.data())
    def verify_targets(self, data: st.DataObject) -> None:
        targets = self.promised_targets()
        picks = data.draw(
            st.lists(st.sampled_from(targets), min_size=1, max_size=TARGETS_PER_CHECK, unique=True)
        )
        for t in picks:
            self.restore_into_scratch(*t)
        event(f"histories in backup dir: {min(len({t[3] for t in targets}), 4)}")

    def teardown(self) -> None:
        try:
            if self.engine is not None and self.snapshots:
                # The final listing: both ends of every anchor and every default target.
                targets = self.promised_targets()
                ends: dict[tuple[Path, bytes | None, int | None], Any] = {}
                for t in targets:
                    if t[1] is None:
                        ends[t[:3]] = t
                first_last: dict[tuple[Path, bytes | None], list[Any]] = {}
                for t in targets:
                    if t[1] is not None:
                        first_last.setdefault((t[0], t[1]), []).append(t)
                for group in first_last.values():
                    ends[group[0][:3]] = group[0]
                    ends[group[-1][:3]] = group[-1]
                for t in ends.values():
                    self.restore_into_scratch(*t)
            if self.engine is not None:
                self.close()
        finally:
            if self.engine is not None:
                self.engine.close()
            shutil.rmtree(self.root, ignore_errors=True)


CI_SETTINGS = settings(
    max_examples=int(os.environ.get("UNISONDB_LINEAGE_EXAMPLES", "100")),
    stateful_step_count=int(os.environ.get("UNISONDB_LINEAGE_STEPS", "40")),
    deadline=None,
    database=None,
    derandomize=True,
    report_multiple_bugs=False,
    # Shrinking a failure of this machine can run for Hypothesis's full 5 minutes (every
    # step is real I/O), past pytest's timeout; the unshrunk steps (<= 30) are printed.
    phases=[Phase.explicit, Phase.reuse, Phase.generate]
    + ([Phase.shrink] if os.environ.get("UNISONDB_LINEAGE_SHRINK") else []),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


class TestLineage(LineageMachine.TestCase):  # type: ignore[misc,valid-type]
    settings = CI_SETTINGS


@pytest.mark.slow
@pytest.mark.timeout(3600)
class TestLineageSoak(LineageMachine.TestCase):  # type: ignore[misc,valid-type]
    settings = settings(CI_SETTINGS, max_examples=1000, stateful_step_count=60, derandomize=False)


def test_list_promise_for_snapshot_of_grandchild_history_restores(tmp_path: Path) -> None:
    """Minimal case the property test found. H1 writes LSN 1 and its segment is backed up;
    snapshot a (H1@1); manual restore of a forks H2; snapshot b (H2@1); manual restore of
    b forks H3; snapshot c (H3@1). ``backup list`` says c is restorable to LSN 1; restoring
    c with the archive must then give that state (the archive's H1 segment ends at LSN 1,
    so the snapshot alone is the answer), not refuse."""
    data = tmp_path / "data"
    backups = layout.backup_root(data, NS)
    archive = backups / "wal" / "archive"
    archive.mkdir(parents=True)
    config = EngineConfig(segment_max_age=0)

    def snap(engine: Engine, name: str) -> Path:
        path = backups / name
        with open(path, "w+b") as f:
            write_snapshot(engine, f.fileno(), path)
        return path

    def manual_restore(engine: Engine, path: Path) -> Engine:
        engine.close()
        shutil.rmtree(layout.namespace_dir(data, NS))
        layout.btree_dir(data, NS).mkdir(parents=True)
        shutil.copyfile(path, layout.btree_dir(data, NS) / "data.mdb")
        return Engine.open(data, NS, config)

    engine = Engine.open(data, NS, config)
    engine.put(b"k", b"v1")
    backup_wal(engine, resolve(backups, ("wal", "archive"), "backupDir", is_file=False), 0, rotate=True)
    engine = manual_restore(engine, snap(engine, "a.db"))
    engine = manual_restore(engine, snap(engine, "b.db"))
    c = snap(engine, "c.db")
    engine.close()
    listed = {Path(s["path"]).name: s for s in list_backups(backups)["snapshots"]}
    assert listed["c.db"]["restorableTo"]["lsn"] == 1  # the promise (holds today)
    out = restore(tmp_path / "scratch", NS, c, [archive])  # raises BackupMismatch today
    assert out.summary is not None and out.summary.end_lsn == 1
    assert out.summary.proof.fingerprint == fingerprint_of({b"k": b"v1"})


def test_restart_right_after_a_fork_never_reuses_segment_ids(tmp_path: Path) -> None:
    """Regression (found by the property test, fixed in the engine). H1 writes LSN 1-3 in
    segments 1-3 (snapshot after LSN 1) and the loop backs up 1-3. The document's Full
    Restore of the snapshot forks H2 (first segment 4, above the backups). A clean restart
    before any write used to start segment 2: the next write went there, the loop
    (afterSegmentId=3) copied nothing, and the archive's 000000002.wal was H1's."""
    data = tmp_path / "data"
    backups = layout.backup_root(data, NS)
    archive = backups / "wal" / "archive"
    archive.mkdir(parents=True)
    config = EngineConfig(segment_max_age=0)
    target = resolve(backups, ("wal", "archive"), "backupDir", is_file=False)
    engine = Engine.open(data, NS, config)
    engine.put(b"a", b"1")
    snap = backups / "s1.db"
    with open(snap, "w+b") as f:
        write_snapshot(engine, f.fileno(), snap)
    engine.rotate()
    engine.put(b"b", b"2")
    engine.rotate()
    engine.put(b"c", b"3")
    last = max(c.segment_id for c in backup_wal(engine, target, 0, rotate=True))
    assert last == 3
    engine.close()
    shutil.rmtree(layout.namespace_dir(data, NS))  # the document's Full Restore
    layout.btree_dir(data, NS).mkdir(parents=True)
    shutil.copyfile(snap, layout.btree_dir(data, NS) / "data.mdb")
    engine = Engine.open(data, NS, config)  # forks H2; its first segment is above 3
    engine.close()
    engine = Engine.open(data, NS, config)  # a clean restart, no write yet
    try:
        engine.put(b"d", b"4")
        backup_wal(engine, target, last, rotate=True)
        for info in engine.wal.sealed_segments():
            assert info.segment_id > last, (
                f"H2 reused segment id {info.segment_id} (H1 used and backed up 1-{last})"
            )
            copy = archive / layout.segment_name(info.segment_id)
            assert copy.read_bytes() == info.path.read_bytes()
    finally:
        engine.close()
