"""Startup recovery: bring the B-tree up to the end of the WAL.

The B-tree's checkpoint names the last WAL record it contains. Recovery replays every
record after it, in order, applying them in bounded LMDB transactions whose checkpoint
advances with the data (so a crash during recovery just resumes it). Segments entirely
at or before the checkpoint are skipped by their footer. A hole in the LSN sequence
after the checkpoint stops startup: silently skipping records would serve a state that
never existed.

Only segments of the checkpoint's *history* (``history.py``) are replayed; records are
identified by (history, LSN), so a segment of another history is never applied, whatever
its LSNs. Fingerprints are checked on the way: where replay enters a segment at its first
record, the state must equal the segment header's ``start_fp``; where it finishes a sealed
segment, the state must equal the footer's fingerprint. A mismatch means the B-tree is not
the state this WAL was written on (or one of them is damaged), and startup stops.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import structlog

from unisondb.errors import CorruptLog, LsnGap, TimelineConflict
from unisondb.storage import fingerprint, history
from unisondb.storage.btree import BTree, Checkpoint
from unisondb.storage.record import Record
from unisondb.storage.segment import SegmentScan
from unisondb.storage.wal import Wal

log = structlog.get_logger(__name__)

#: Records applied per LMDB transaction during replay.
REPLAY_BATCH = 2000


@dataclass(frozen=True, slots=True)
class RecoveryResult:
    checkpoint: Checkpoint
    records_replayed: int
    seconds: float
    next_lsn: int


def recover(wal: Wal, btree: BTree) -> RecoveryResult:
    started = time.perf_counter()
    cp = _adopt_wal_history(wal, btree, btree.read_checkpoint())
    expected = cp.applied_lsn + 1
    replayed = 0
    pending: list[Record] = []
    other_timelines: list[tuple[int, int, int]] = []  # (segment id, timeline, last LSN)
    for scan, start in wal.replay_from(cp.applied_lsn):
        recs = scan.records[start:]
        if not recs:
            continue
        if scan.header.history != cp.history:
            # Another history (abandoned by a restore, or one the snapshot never saw): never
            # replayed into this one. Decided below whether it can be ignored.
            other_timelines.append((scan.header.segment_id, scan.header.timeline, recs[-1][0].lsn))
            continue
        first = recs[0][0].lsn
        if first != expected:
            raise LsnGap(
                f"WAL is missing LSNs {expected}..{first - 1} (checkpoint at LSN "
                f"{cp.applied_lsn}, next segment starts at {first})",
                path=scan.path,
                hint="copy the missing WAL segments (from a WAL backup) into the wal/ directory, "
                "or restore from a snapshot taken after LSN "
                f"{first - 1} with 'unisondb restore'",
            )
        if start == 0:
            _check_fingerprint(scan, cp, scan.header.start_fp, "before its first record")
        for rec, _start, end in recs:
            pending.append(rec)
            expected = rec.lsn + 1
            if len(pending) >= REPLAY_BATCH:
                cp = _apply(btree, pending, cp, scan.header.segment_id, end)
                replayed += len(pending)
                pending = []
        if pending:
            cp = _apply(btree, pending, cp, scan.header.segment_id, recs[-1][2])
            replayed += len(pending)
            pending = []
        if scan.footer is not None and scan.footer.fingerprint is not None:
            _check_fingerprint(scan, cp, scan.footer.fingerprint, "after its last record")
    conflicting = [t for t in other_timelines if t[2] > cp.applied_lsn]
    if conflicting:
        seg_id, timeline, last = conflicting[0]
        raise TimelineConflict(
            f"segment {seg_id} is on timeline {timeline} and holds LSNs up to {last}, after "
            f"the checkpoint (LSN {cp.applied_lsn}, timeline {cp.timeline}): startup replays "
            "only the checkpoint's timeline, and serving records of another history would "
            "produce a state that never existed",
            path=wal.dir,
            hint="remove the segments of other timelines from wal/ ('unisondb wal list' shows "
            "each segment's timeline), or restore with 'unisondb restore --snapshot ... "
            "--wal ...', which follows timeline switches",
        )
    if other_timelines:
        log.warning(
            "recovery.ignored_other_timelines", timeline=cp.timeline, segments=[t[0] for t in other_timelines]
        )
    claimed = max((s.last_lsn for s in wal.segments() if s.history == cp.history), default=0)
    if claimed > cp.applied_lsn:
        raise LsnGap(
            f"WAL is missing LSNs {cp.applied_lsn + 1}..{claimed}: the segments on disk claim "
            f"records up to LSN {claimed} but the last one that could be replayed is "
            f"{cp.applied_lsn}",
            path=wal.dir,
            hint="copy the missing WAL segments into the wal/ directory, or remove the "
            "segments that do not belong to this snapshot's history",
        )
    if replayed:
        log.info("recovery.replayed", records=replayed, applied_lsn=cp.applied_lsn)
    return RecoveryResult(cp, replayed, time.perf_counter() - started, next_lsn=cp.applied_lsn + 1)


def _adopt_wal_history(wal: Wal, btree: BTree, cp: Checkpoint) -> Checkpoint:
    """An empty B-tree beside a WAL that starts at LSN 1 is rebuilt from that WAL.

    (data.mdb deleted, or never committed before a crash.) Only a history that begins with
    the empty state can be rebuilt this way: a forked history starts from a state the WAL
    does not hold, and the checks below then report the missing LSNs.
    """
    if cp.lineage.is_set or cp.applied_lsn:
        return cp
    segs = wal.segments()
    if not segs or segs[0].first_lsn != 1 or segs[0].lineage.parent != history.NO_HISTORY:
        return cp
    log.warning("recovery.rebuilding_from_wal", history=history.show(segs[0].history))
    return btree.apply([], cp.on_lineage(segs[0].lineage, 0))


def _apply(btree: BTree, recs: list[Record], cp: Checkpoint, seg_id: int, end: int) -> Checkpoint:
    return btree.apply(recs, cp.advance(recs[-1].lsn, seg_id, end, recs[-1].time_ns))


def _check_fingerprint(scan: SegmentScan, cp: Checkpoint, recorded: bytes, where: str) -> None:
    if cp.fingerprint == recorded:
        return
    raise CorruptLog(
        f"state fingerprint mismatch at LSN {cp.applied_lsn}: the B-tree holds "
        f"{fingerprint.short(cp.fingerprint)} but segment {scan.header.segment_id} of "
        f"{history.short(scan.header.history)} recorded {fingerprint.short(recorded)} {where}: "
        "data.mdb is not the state this WAL was written on, or one of them is damaged",
        path=scan.path,
        hint="restore with 'unisondb restore --snapshot ... --wal ...' (it verifies every "
        "file first), or move this segment out of wal/ if it does not belong here",
    )
