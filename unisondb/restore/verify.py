"""Verification: everything a restore needs is checked before anything is written.

``verify_plan`` (restore) stops at the first fatal problem:

* the snapshot's ``.sha256`` sidecar (mismatch is fatal, a missing sidecar a warning) —
  its structure (``lmdbfile`` page walk) and checkpoint were checked when it was inspected;
* every segment the plan replays: sidecar, header, every record CRC, LSN contiguity and
  footer (``segment.scan``), and that the files did not change since the inventory;
* the snapshot's checkpoint against the segment it names (same history);
* for ``--target-time``: the exact last LSN with time ≤ target.

``verify_backup_set`` (``unisondb backup verify``) checks a whole backup set and collects
every problem instead of stopping at the first one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import crc32c

from unisondb.errors import CorruptLog, LsnGap, UnisonDBError
from unisondb.restore import sources
from unisondb.restore.errors import BackupCorrupt, BackupMismatch, BadTarget
from unisondb.restore.inventory import (
    ChecksumResult,
    ContentCheck,
    SegmentMeta,
    SnapshotInfo,
    WalInventory,
    check_sidecar,
    check_snapshot_content,
    collect_wal,
    inspect_snapshot,
    raise_on_mismatch,
    sha256_bytes,
    sha256_file,
    start_content_check,
)
from unisondb.restore.plan import RestorePlan
from unisondb.restore.progress import Progress
from unisondb.restore.timefmt import format_ns
from unisondb.restore.timeline import (
    Link,
    coverage_holes,
    overlaps,
    select_chain,
    unlinked_after,
)
from unisondb.storage import history as hist
from unisondb.storage import record, segment


@dataclass(frozen=True, slots=True)
class ReplayStep:
    """One verified link: replay records ``link.from_lsn..link.to_lsn`` of this file."""

    link: Link
    sha256: str
    size: int


@dataclass(slots=True)
class VerifiedPlan:
    plan: RestorePlan
    end_lsn: int
    end_time_ns: int
    steps: list[ReplayStep]
    snapshot_sha256: str
    checksums: list[ChecksumResult]
    seconds: float
    warnings: list[str] = field(default_factory=list)
    #: The snapshot content check, still running in the background when ``verify_plan``
    #: was asked not to wait for it: ``apply_plan`` waits before it publishes anything.
    content: ContentCheck | None = None

    @property
    def records(self) -> int:
        return sum(s.link.records for s in self.steps)

    @property
    def wal_bytes(self) -> int:
        return sum(s.size for s in self.steps)


@dataclass(frozen=True, slots=True)
class RecordIndex:
    """LSN, time and end offset of every record of one verified segment."""

    path: Path
    lsns: list[int]
    times: list[int]
    ends: list[int]

    @property
    def last_lsn(self) -> int:
        return self.lsns[-1] if self.lsns else 0


def check_segment_bytes(meta: SegmentMeta, data: bytes) -> RecordIndex:
    """Verify every record CRC, LSN contiguity and the footer of one segment; raise on damage.

    A fast walk over the record framing (``record.py``): the CRC covers each record's length
    and body, so a damaged byte anywhere is caught without decoding the entries. (Replay
    then decodes every record with ``segment.scan``, which re-checks all of it.)
    """
    path = meta.path

    def bad(reason: str, offset: int) -> BackupCorrupt:
        return BackupCorrupt(
            f"WAL segment {path} is damaged at offset {offset}: {reason}",
            hint="fetch another copy of this segment (compare with its .sha256)",
        )

    try:
        header = segment.decode_header(data, path)
    except CorruptLog as exc:
        raise bad(exc.message, 0) from None
    if (header.segment_id, header.lineage, header.first_lsn, header.ns_crc) != (
        meta.segment_id,
        meta.lineage,
        meta.first_lsn,
        meta.ns_crc,
    ):
        raise BackupCorrupt(f"WAL segment {path} changed while the restore was reading it")
    footer = segment.try_decode_footer(data) if meta.sealed else None
    if meta.sealed and footer is None:
        raise bad("footer missing or damaged", len(data) - segment.FOOTER_SIZE)
    end = len(data) - segment.FOOTER_SIZE if footer is not None else len(data)
    view = memoryview(data)
    lsns: list[int] = []
    times: list[int] = []
    ends: list[int] = []
    pos, expected = segment.HEADER_SIZE, header.first_lsn
    crc_fn = crc32c.crc32c
    unpack_head, unpack_body = record.HEADER.unpack_from, record.BODY_FIXED.unpack_from
    while pos < end:
        if end - pos < record.HEADER_SIZE:
            raise bad("record header is cut short", pos)
        crc, body_len = unpack_head(view, pos)
        nxt = pos + record.HEADER_SIZE + body_len
        if body_len < record.MIN_BODY or body_len > record.MAX_BODY or nxt > end:
            raise bad(f"record length {body_len} out of range", pos)
        if crc_fn(view[pos + 4 : nxt]) != crc:
            raise bad("record checksum mismatch", pos)
        lsn, time_ns, _op, _count = unpack_body(view, pos + record.HEADER_SIZE)
        if lsn != expected:
            raise bad(f"record LSN {lsn} where {expected} was expected", pos)
        lsns.append(lsn)
        times.append(time_ns)
        ends.append(nxt)
        expected += 1
        pos = nxt
    if footer is not None and (
        footer.count != len(lsns)
        or footer.last_lsn != expected - 1
        or (lsns and (footer.min_time_ns != min(times) or footer.max_time_ns != max(times)))
    ):
        raise bad("segment footer does not match its records", end)
    if (lsns[-1] if lsns else header.first_lsn - 1) < meta.last_lsn:
        raise BackupCorrupt(f"WAL segment {path} changed while the restore was reading it")
    return RecordIndex(path, lsns, times, ends)


def read_verified(meta: SegmentMeta, expected_sha256: str | None = None) -> tuple[bytes, str]:
    """The bytes of a segment file and their sha256 (checked against ``expected`` if given)."""
    data = sources.read_segment(meta.path)
    digest = sha256_bytes(data)
    if expected_sha256 is not None and digest != expected_sha256:
        raise BackupCorrupt(
            f"WAL segment {meta.path} changed after it was verified "
            f"(sha256 {digest}, verified {expected_sha256})"
        )
    return data, digest


def verify_plan(
    plan: RestorePlan, progress: Progress | None = None, *, background_content: bool = False
) -> VerifiedPlan:
    """Verify everything the plan reads. With ``background_content`` the snapshot's
    content check (every pair hashed, CPU-bound) runs on in a worker process, overlapping
    the copy and the replay; the caller must ``content.wait()`` before publishing, and
    ``content.cancel()`` if it gives up."""
    progress = progress or Progress()
    started = time.perf_counter()
    warnings = list(plan.warnings)
    checksums: list[ChecksumResult] = []
    snap = plan.snapshot
    links = plan.chain.links if plan.end_lsn is None else plan.links_through(plan.end_lsn)
    total = snap.size + sum(ln.segment.size for ln in links)
    progress.phase("verify checksums", total)
    snap_sha = sha256_file(snap.path, progress.advance)
    res = check_sidecar(snap.path, snap_sha)
    raise_on_mismatch(res)
    checksums.append(res)
    if not background_content:
        progress.phase("verify snapshot content", snap.keys, unit="keys")
    content = start_content_check(snap, snap_sha, background=background_content)
    try:
        return _verify_wal(plan, progress, started, snap_sha, checksums, warnings, links, content)
    except BaseException:
        content.cancel()
        raise


def _verify_wal(
    plan: RestorePlan,
    progress: Progress,
    started: float,
    snap_sha: str,
    checksums: list[ChecksumResult],
    warnings: list[str],
    links: list[Link],
    content: ContentCheck,
) -> VerifiedPlan:
    cp = plan.snapshot.checkpoint
    steps: list[ReplayStep] = []
    end_lsn = plan.end_lsn
    end_time = cp.time_ns
    anchor_done = plan.anchor is None
    target_time = plan.target.time_ns if plan.target.kind == "time" else None
    for link in links:
        data, digest = read_verified(link.segment)
        progress.advance(len(data))
        res = check_sidecar(link.segment.path, digest)
        raise_on_mismatch(res)
        checksums.append(res)
        idx = check_segment_bytes(link.segment, data)
        if plan.anchor is not None and plan.anchor.segment_id == link.segment.segment_id:
            _check_anchor(plan, idx)
            anchor_done = True
        first = link.from_lsn - link.segment.first_lsn
        last = link.to_lsn - link.segment.first_lsn
        if first < 0 or last >= len(idx.lsns):
            raise LsnGap(
                f"{link.segment.path} does not hold LSNs {link.from_lsn}..{link.to_lsn} as its footer claims",
                path=link.segment.path,
            )
        if target_time is not None:
            cut = next((i for i in range(first, last + 1) if idx.times[i] > target_time), None)
            if cut is not None:
                end_lsn = idx.lsns[cut] - 1
                if cut > first:
                    end_time = idx.times[cut - 1]
                    steps.append(ReplayStep(Link(link.segment, link.from_lsn, end_lsn), digest, len(data)))
                break
        end_time = idx.times[last]
        steps.append(ReplayStep(link, digest, len(data)))
    if not anchor_done:
        assert plan.anchor is not None
        data, _digest = read_verified(plan.anchor)
        _check_anchor(plan, check_segment_bytes(plan.anchor, data))
    if end_lsn is None:
        assert target_time is not None
        raise BadTarget(
            f"target time {format_ns(target_time)} is after the last record the WAL backups "
            f"hold (LSN {plan.chain.end_lsn}); records written after that are not in the backup",
            hint=f"add newer WAL segments, or omit --target-time to restore to LSN {plan.chain.end_lsn}",
        )
    if end_lsn == cp.applied_lsn:
        end_time = cp.time_ns
    warnings += [c.note for c in checksums if c.note and c.status != "missing"]
    missing = [c.path.name for c in checksums if c.status == "missing"]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        warnings.append(f"no .sha256 sidecar for {shown}: checked by CRC/LMDB structure only")
    return VerifiedPlan(
        plan, end_lsn, end_time, steps, snap_sha, checksums, time.perf_counter() - started, warnings, content
    )


def _check_anchor(plan: RestorePlan, idx: RecordIndex) -> None:
    cp = plan.snapshot.checkpoint
    i = cp.applied_lsn - plan.anchor.first_lsn if plan.anchor is not None else -1
    if 0 <= i < len(idx.lsns) and idx.ends[i] == cp.offset and idx.times[i] == cp.time_ns:
        return
    raise BackupMismatch(
        f"the snapshot's checkpoint (LSN {cp.applied_lsn} ending at offset {cp.offset}, "
        f"{format_ns(cp.time_ns)}) does not match that record in {idx.path}: the snapshot "
        "and the WAL come from different histories",
        hint="use the WAL backups of the server the snapshot was taken from",
    )


# --- unisondb backup verify ---


@dataclass(slots=True)
class VerifyReport:
    snapshot: dict[str, object] | None = None
    segments: list[dict[str, object]] = field(default_factory=list)
    holes: list[dict[str, object]] = field(default_factory=list)
    overlaps: list[dict[str, object]] = field(default_factory=list)
    restorable: dict[str, object] | None = None
    replay: dict[str, object] | None = None
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, object]:
        return {
            "ok": self.ok,
            "problems": self.problems,
            "warnings": self.warnings,
            "snapshot": self.snapshot,
            "segments": self.segments,
            "holes": self.holes,
            "overlaps": self.overlaps,
            "restorable": self.restorable,
            "replay": self.replay,
        }


def verify_backup_set(
    snapshot_path: Path | None, wal_dirs: list[Path], namespace: str | None, progress: Progress | None = None
) -> tuple[VerifyReport, SnapshotInfo | None, WalInventory | None]:
    """Check every file of a backup set; return the report (problems collected, not raised)."""
    progress = progress or Progress()
    rep = VerifyReport()
    snap: SnapshotInfo | None = None
    if snapshot_path is not None:
        snap = _verify_snapshot(snapshot_path, rep, progress)
    inv: WalInventory | None = None
    if wal_dirs:
        try:
            inv = collect_wal(wal_dirs)
        except UnisonDBError as exc:
            rep.problems.append(str(exc))
    if inv is not None:
        _verify_segments(inv, namespace, rep, progress)
        for h in coverage_holes(inv.segments):
            item: dict[str, object] = {
                "timeline": h.timeline,
                "history": h.history.hex(),
                "firstLsn": h.first_lsn,
                "lastLsn": h.last_lsn,
                "text": h.describe(),
            }
            if h.missing_ids:
                item["missingSegmentIds"] = list(h.missing_ids)
            rep.holes.append(item)
        for a, b in overlaps(inv.segments):
            rep.overlaps.append(
                {
                    "timeline": a.timeline,
                    "history": a.history.hex(),
                    "segments": [a.name, b.name],
                    "lsns": [b.first_lsn, min(a.last_lsn, b.last_lsn)],
                }
            )
            # One (history, LSN) names one record: two segments holding it is an altered
            # file or a history continued twice, never something to pick from silently.
            rep.problems.append(
                f"segments {a.name} and {b.name} of history {hist.short(a.history)} overlap "
                f"(LSNs {b.first_lsn}..{min(a.last_lsn, b.last_lsn)}): one LSN of one history "
                "must name one record"
            )
    if snap is not None:
        _restorable(snap, inv, rep)
    elif inv is not None:
        for item in rep.holes:
            rep.warnings.append(f"WAL hole: missing {item['text']}")
    return rep, snap, inv


def _verify_snapshot(path: Path, rep: VerifyReport, progress: Progress) -> SnapshotInfo | None:
    info: dict[str, object] = {"path": str(path)}
    rep.snapshot = info
    try:
        size = path.stat().st_size
        info["bytes"] = size
        progress.phase("snapshot sha256", size)
        digest = sha256_file(path, progress.advance)
        res = check_sidecar(path, digest)
        info.update(res.to_json())
        if res.status == "mismatch":
            rep.problems.append(
                f"snapshot {path}: sha256 {digest} does not match its sidecar ({res.expected})"
            )
        elif res.status == "missing":
            rep.warnings.append(f"snapshot {path}: no .sha256 sidecar")
        snap = inspect_snapshot(path, structural=True)
        check_snapshot_content(snap, digest)
    except (UnisonDBError, OSError) as exc:
        rep.problems.append(f"snapshot: {exc}")
        info["lmdb"] = "failed"
        return None
    cp = snap.checkpoint
    info.update(
        {
            "lmdb": "ok",
            "keys": snap.keys,
            "lsn": cp.applied_lsn,
            "time": format_ns(cp.time_ns) if snap.has_checkpoint else None,
            "timeline": cp.timeline,
            "segmentId": cp.segment_id,
            "history": cp.history.hex(),
            "fingerprint": cp.fingerprint.hex(),
        }
    )
    return snap


def _verify_segments(inv: WalInventory, namespace: str | None, rep: VerifyReport, progress: Progress) -> None:
    for path, reason in inv.unreadable:
        rep.problems.append(f"{path}: unreadable segment header: {reason}")
        rep.segments.append({"path": str(path), "crc": "unreadable", "damage": reason})
    for a, b in inv.conflicts:
        rep.problems.append(f"segment id conflict: {a} and {b} have the same id but different content")
    crcs = {s.ns_crc for s in inv.segments}
    if namespace is not None:
        want = segment.namespace_crc(namespace)
        for s in inv.segments:
            if s.ns_crc != want:
                rep.problems.append(f"{s.path}: belongs to another namespace, not {namespace!r}")
    elif len(crcs) > 1:
        rep.problems.append("segments from more than one namespace are mixed in these directories")
    files = [(s, p) for s in inv.segments for p in inv.copies[s.segment_id]]
    progress.phase("verify segments", sum(s.size for s, _p in files))
    for meta, path in files:
        entry: dict[str, object] = meta.to_json()
        entry["path"] = str(path)
        rep.segments.append(entry)
        try:
            data = sources.read_segment(path)
        except UnisonDBError as exc:
            entry["crc"] = "unreadable"
            rep.problems.append(str(exc))
            continue
        progress.advance(len(data))
        res = check_sidecar(path, sha256_bytes(data))
        entry.update({k: v for k, v in res.to_json().items() if k != "path"})
        if res.status == "mismatch":
            rep.problems.append(f"{path}: sha256 does not match its sidecar")
        try:
            scan = segment.scan(path, data)
        except CorruptLog as exc:
            entry["crc"] = "damaged"
            entry["damage"] = exc.message
            rep.problems.append(f"{path}: {exc.message}")
            continue
        if scan.tail_error is not None:
            entry["crc"] = "damaged"
            entry["damage"] = meta.damage or scan.tail_error
            rep.problems.append(f"{path}: {meta.damage or scan.tail_error}")
        elif meta.damage is not None:
            entry["crc"] = "damaged"
            rep.problems.append(f"{path}: {meta.damage}")
        else:
            entry["crc"] = "ok"
            if not scan.sealed:
                rep.warnings.append(f"{path}: not sealed (no footer); copied from a live WAL?")
    missing = [s for s in rep.segments if s.get("sidecar") == "missing"]
    if missing:
        rep.warnings.append(f"{len(missing)} segment file(s) have no .sha256 sidecar")


def _restorable(snap: SnapshotInfo, inv: WalInventory | None, rep: VerifyReport) -> None:
    cp = snap.checkpoint
    segs = inv.segments if inv is not None else []
    try:
        chain = select_chain(cp.applied_lsn, cp.history, segs, start_timeline=cp.timeline)
    except UnisonDBError as exc:
        rep.problems.append(str(exc))
        return
    end_time = chain.links[-1].segment.max_time_ns if chain.links else cp.time_ns
    # Only segments that could continue the snapshot matter (timeline.unlinked_after).
    _later, foreign = unlinked_after(cp.lineage, cp.applied_lsn, segs)
    if foreign:
        names = ", ".join(s.name for s in foreign[:5]) + (
            f" (and {len(foreign) - 5} more)" if len(foreign) > 5 else ""
        )
        rep.problems.append(
            f"{len(foreign)} segment(s) belong to a history unrelated to this snapshot's "
            f"({', '.join(sorted({hist.short(s.history) for s in foreign}))}: another server "
            f"or installation): {names}; a restore never uses them, remove them from this "
            "backup set"
        )
    if chain.alternatives:
        # Resolved by the documented default (the newest), so a warning, not a failure;
        # what cannot be resolved (overlaps, disagreeing lineage) is a problem above.
        rep.warnings.append(
            f"{len(chain.alternatives) + 1} histories continue this snapshot (newest: "
            f"{hist.short(chain.target)}; others: "
            f"{', '.join(lin.describe() for lin in chain.alternatives[:4])}): a restore "
            "without --history takes the newest; check that is the one you mean"
        )
    rep.restorable = {
        "fromLsn": cp.applied_lsn,
        "fromTime": format_ns(cp.time_ns) if snap.has_checkpoint else None,
        "toLsn": chain.end_lsn,
        "toTimeline": chain.end_timeline,
        "history": chain.end_history.hex(),
        # The latest time a --target-time can name exactly is just before the last record.
        "toTime": format_ns(end_time) if chain.links or snap.has_checkpoint else None,
        "segments": [ln.segment.name for ln in chain.links],
        "holesAfter": [h.describe() for h in chain.holes],
    }
    for h in chain.holes:
        rep.problems.append(
            f"LSN gap after the snapshot: missing {h.describe()}; a restore "
            f"from this snapshot stops at LSN {chain.end_lsn}"
        )
    chain_hs = {ln.history.hex() for ln in chain.links} | {cp.history.hex()}
    for item in rep.holes:
        lsn_first = item["firstLsn"]
        assert isinstance(lsn_first, int)
        if item["history"] not in chain_hs or lsn_first <= cp.applied_lsn:
            rep.warnings.append(f"WAL hole outside this snapshot's restore path: missing {item['text']}")
