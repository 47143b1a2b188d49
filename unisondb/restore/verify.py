"""Verification: everything a restore needs is checked before anything is published.

The checks (``verify_plan`` stops at the first fatal problem):

* the snapshot's ``.sha256`` sidecar (mismatch is fatal, a missing sidecar a warning), its
  self-verifying trailer, its LMDB structure (``lmdbfile`` page walk) and its content
  against the state fingerprint its checkpoint recorded;
* every segment the plan replays: sidecar, header, every record CRC, LSN contiguity and
  footer (the one record walker, ``storage/walk.py``, through ``ChainWalk``), and that the
  files did not change since the inventory;
* the snapshot's checkpoint against the segment it names (same history);
* for ``--target-time``: the exact last LSN with time ≤ target.

Where they run: ``--dry-run`` runs them here, reading the inputs. A restore that is going
to run calls ``verify_plan(deferred=True)``, which reads nothing, and ``apply_plan`` makes
the same checks on the bytes it reads once anyway — the snapshot while it copies it into
the staging directory, each segment while it replays it (``ChainWalk``) — and publishes
nothing before all of them passed. The target namespace is untouched either way.

``verify_backup_set`` (``unisondb backup verify``) checks a whole backup set and collects
every problem instead of stopping at the first one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

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
from unisondb.storage import segment
from unisondb.storage.walk import Op, Walk


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
    #: Made by ``verify_plan(deferred=True)``: nothing was read yet. ``apply_plan`` makes
    #: every check as it copies the snapshot and replays the WAL, reading each byte once,
    #: and fills in ``steps``, ``end_lsn``, ``end_time_ns``, the checksums and warnings.
    deferred: bool = False

    @property
    def records(self) -> int:
        return sum(s.link.records for s in self.steps)

    @property
    def wal_bytes(self) -> int:
        return sum(s.size for s in self.steps)


def _damaged(path: Path, offset: int | None, reason: str) -> BackupCorrupt:
    return BackupCorrupt(
        f"WAL segment {path} is damaged at offset {offset}: {reason}",
        hint="fetch another copy of this segment (compare with its .sha256)",
    )


def _reason(exc: CorruptLog) -> str:
    """The walker's message without the "<path> at offset <n>: " it starts with."""
    prefix = f"{exc.path} at offset {exc.offset}: " if exc.path is not None else ""
    return exc.message.removeprefix(prefix)


#: ``ChainWalk.walk`` events: the first record of a step is next; a run of records; a step
#: is done.
BEGIN, RUN, END = 0, 1, 2
#: Records per ``RUN`` event at most (a step's last run may be shorter).
RUN_RECORDS = 256


class Run(NamedTuple):
    """Consecutive records of one step, reported by a ``RUN`` event."""

    first_lsn: int
    last_lsn: int
    #: Time of the last record.
    time_ns: int
    #: Offsets in the segment: where the first record starts, where the last one ends.
    start: int
    end: int

    @property
    def records(self) -> int:
        return self.last_lsn - self.first_lsn + 1


#: (kind, link, the run for ``RUN``, else None).
Event = tuple[int, Link, "Run | None"]


class ChainWalk:
    """The plan's WAL segments, each read **once**: sha256 (on a second thread: hashlib
    runs without the GIL) and ``.sha256`` sidecar, header against the inventory, then every
    record through the one record walker (``storage/walk.py``: CRC, LSN contiguity,
    footer), the snapshot's anchor record, and the ``--target-time`` cut.

    ``verify_plan`` (``--dry-run``) walks it without decoding entries; ``apply_plan``
    replays the entries it decodes from the same bytes (``walk(ops=...)``, reported run
    by run), so no segment is read or CRC-checked twice. A segment's checksum is
    compared when its walk ends, before the next one starts; what was replayed from a
    file that then fails is in the staging directory only, which the failing restore
    deletes. Only one segment's bytes are in memory at a time.
    """

    def __init__(
        self,
        plan: RestorePlan,
        links: list[Link],
        on_bytes: Callable[[int], None] | None = None,
        *,
        end_lsn: int | None = None,
    ) -> None:
        self.plan, self.links, self.on_bytes = plan, links, on_bytes
        cp = plan.snapshot.checkpoint
        self.steps: list[ReplayStep] = []
        self.checksums: list[ChecksumResult] = []
        #: Resolved while walking for a time target (``plan.end_lsn`` is None then).
        self.end_lsn: int | None = plan.end_lsn if end_lsn is None else end_lsn
        self.end_time_ns = cp.time_ns

    def walk(self, *, ops: list[Op] | None = None) -> Iterator[Event]:
        """Events (see ``BEGIN``/``RUN``/``END``). ``ops`` (a replay): the entries of the
        records to replay are appended to it (``Walk.records(ops=...)``), those of each
        ``RUN`` before the event; the caller takes them out at each ``RUN`` (at ``BEGIN``
        the list may already hold the step's first record)."""
        plan = self.plan
        cp = plan.snapshot.checkpoint
        target_time = plan.target.time_ns if plan.target.kind == "time" else None
        anchor = plan.anchor
        anchor_done = anchor is None
        anchor_lsn = cp.applied_lsn
        with ThreadPoolExecutor(1, thread_name_prefix="restore-sha256") as pool:
            for link in self.links:
                seg = link.segment
                data = sources.read_segment(seg.path)
                hashing = pool.submit(sha256_bytes, data)
                w = self._open(seg, data, hashing)
                is_anchor = anchor is not None and anchor.segment_id == seg.segment_id
                anchor_seen = False
                begun = False
                cut: int | None = None
                last_time = self.end_time_ns
                from_lsn, to_lsn = link.from_lsn, link.to_lsn
                lo, hi = (from_lsn, to_lsn) if ops is not None else (1, 0)
                # The run being gathered: its first and last LSN, start and end offsets,
                # and how many records it still takes.
                first = last = run_start = run_end = 0
                room = RUN_RECORDS
                try:
                    for lsn, t, start, end, _rec in w.records(lo, hi, ops=ops, ops_until_ns=target_time):
                        if is_anchor and lsn == anchor_lsn:
                            _check_anchor(plan, seg.path, end, t)
                            anchor_seen = True
                        if cut is not None or not from_lsn <= lsn <= to_lsn:
                            continue
                        if target_time is not None and t > target_time:
                            cut = lsn  # the rest of the file is still walked (CRC, footer)
                            continue
                        if not begun:
                            yield BEGIN, link, None
                            begun = True
                            first, run_start = lsn, start
                        last, last_time, run_end = lsn, t, end
                        room -= 1
                        if not room:
                            yield RUN, link, Run(first, lsn, t, run_start, end)
                            first, run_start, room = lsn + 1, end, RUN_RECORDS
                    if room != RUN_RECORDS:
                        yield RUN, link, Run(first, last, last_time, run_start, run_end)
                except CorruptLog as exc:
                    self._sidecar(seg, hashing)  # a checksum mismatch says it first
                    raise _damaged(seg.path, exc.offset, _reason(exc)) from None
                digest = self._finish(seg, w, hashing)
                if self.on_bytes is not None:
                    self.on_bytes(len(data))
                del data
                if is_anchor:
                    if not anchor_seen:
                        _anchor_mismatch(plan, seg.path)
                    anchor_done = True
                if w.last_lsn < link.to_lsn:
                    raise LsnGap(
                        f"{seg.path} does not hold LSNs {link.from_lsn}..{link.to_lsn} as its footer claims",
                        path=seg.path,
                    )
                if cut is not None:
                    self.end_lsn = cut - 1
                    if begun:
                        self.end_time_ns = last_time
                        step = ReplayStep(Link(seg, link.from_lsn, cut - 1), digest, w.file_size)
                        self.steps.append(step)
                        yield END, step.link, None
                    break
                self.end_time_ns = last_time
                self.steps.append(ReplayStep(link, digest, w.file_size))
                yield END, link, None
            if not anchor_done:
                assert anchor is not None
                self._check_anchor_segment(anchor, pool)
        if self.end_lsn is None:
            assert target_time is not None
            raise BadTarget(
                f"target time {format_ns(target_time)} is after the last record the WAL backups "
                f"hold (LSN {plan.chain.end_lsn}); records written after that are not in the backup",
                hint=f"add newer WAL segments, or omit --target-time to restore to LSN {plan.chain.end_lsn}",
            )
        if self.end_lsn == cp.applied_lsn:
            self.end_time_ns = cp.time_ns

    def run(self) -> None:
        """Walk every segment without replaying (verification only)."""
        for _event in self.walk():
            pass

    def _open(self, seg: SegmentMeta, data: bytes, hashing: Future[str]) -> Walk:
        try:
            header = segment.decode_header(data, seg.path)
        except CorruptLog as exc:
            self._sidecar(seg, hashing)
            raise _damaged(seg.path, 0, _reason(exc)) from None
        if (header.segment_id, header.lineage, header.first_lsn, header.ns_crc) != (
            seg.segment_id,
            seg.lineage,
            seg.first_lsn,
            seg.ns_crc,
        ):
            raise BackupCorrupt(f"WAL segment {seg.path} changed while the restore was reading it")
        footer = segment.try_decode_footer(data) if seg.sealed else None
        if seg.sealed and footer is None:
            self._sidecar(seg, hashing)
            raise _damaged(seg.path, len(data) - segment.FOOTER_SIZE, "footer missing or damaged")
        return Walk(seg.path, data, header, footer)

    def _sidecar(self, seg: SegmentMeta, hashing: Future[str]) -> str:
        digest = hashing.result()
        res = check_sidecar(seg.path, digest)
        raise_on_mismatch(res)
        self.checksums.append(res)
        return digest

    def _finish(self, seg: SegmentMeta, w: Walk, hashing: Future[str]) -> str:
        digest = self._sidecar(seg, hashing)
        if w.tail_error is not None:
            raise _damaged(seg.path, w.tail_offset, w.tail_error.rsplit(" at offset ", 1)[0])
        if w.last_lsn < seg.last_lsn:
            raise BackupCorrupt(f"WAL segment {seg.path} changed while the restore was reading it")
        return digest

    def _check_anchor_segment(self, anchor: SegmentMeta, pool: ThreadPoolExecutor) -> None:
        """The anchor is not replayed (the snapshot ends at its last record): walk it only."""
        cp = self.plan.snapshot.checkpoint
        data = sources.read_segment(anchor.path)
        hashing = pool.submit(sha256_bytes, data)
        w = self._open(anchor, data, hashing)
        seen = False
        try:
            for lsn, t, _start, end, _rec in w.records(1, 0):
                if lsn == cp.applied_lsn:
                    _check_anchor(self.plan, anchor.path, end, t)
                    seen = True
        except CorruptLog as exc:
            self._sidecar(anchor, hashing)
            raise _damaged(anchor.path, exc.offset, _reason(exc)) from None
        self._finish(anchor, w, hashing)
        self.checksums.pop()  # reported with the plan's segments only
        if not seen:
            _anchor_mismatch(self.plan, anchor.path)


def checksum_warnings(checksums: list[ChecksumResult]) -> list[str]:
    """Notes of the sidecars checked, and one line for the files that have none."""
    out = [c.note for c in checksums if c.note and c.status != "missing"]
    missing = [c.path.name for c in checksums if c.status == "missing"]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        out.append(f"no .sha256 sidecar for {shown}: checked by CRC/LMDB structure only")
    return out


def plan_links(plan: RestorePlan) -> list[Link]:
    return plan.chain.links if plan.end_lsn is None else plan.links_through(plan.end_lsn)


def verify_plan(
    plan: RestorePlan,
    progress: Progress | None = None,
    *,
    background_content: bool = False,
    deferred: bool = False,
) -> VerifiedPlan:
    """Verify everything the plan reads. With ``background_content`` the snapshot's
    content check (every pair hashed, CPU-bound) runs on in a worker process, overlapping
    the copy and the replay; the caller must ``content.wait()`` before publishing, and
    ``content.cancel()`` if it gives up.

    ``deferred`` (a restore that is going to run): read nothing here. ``apply_plan`` then
    makes every one of these checks on the bytes it reads once to copy and replay, before
    anything is published (``VerifiedPlan.deferred``)."""
    progress = progress or Progress()
    started = time.perf_counter()
    snap = plan.snapshot
    links = plan_links(plan)
    if deferred:
        cp = snap.checkpoint
        steps = [ReplayStep(ln, "", ln.segment.size) for ln in links]
        end_time = links[-1].segment.max_time_ns if links else cp.time_ns
        return VerifiedPlan(
            plan,
            plan.end_lsn if plan.end_lsn is not None else plan.chain.end_lsn,
            end_time,
            steps,
            "",
            [],
            time.perf_counter() - started,
            list(plan.warnings),
            None,
            deferred=True,
        )
    warnings = list(plan.warnings)
    checksums: list[ChecksumResult] = []
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
        chain = ChainWalk(plan, links, progress.advance)
        chain.run()
    except BaseException:
        content.cancel()
        raise
    checksums += chain.checksums
    warnings += checksum_warnings(checksums)
    assert chain.end_lsn is not None
    return VerifiedPlan(
        plan,
        chain.end_lsn,
        chain.end_time_ns,
        chain.steps,
        snap_sha,
        checksums,
        time.perf_counter() - started,
        warnings,
        content,
    )


def _check_anchor(plan: RestorePlan, path: Path, end: int, time_ns: int) -> None:
    cp = plan.snapshot.checkpoint
    if end != cp.offset or time_ns != cp.time_ns:
        _anchor_mismatch(plan, path)


def _anchor_mismatch(plan: RestorePlan, path: Path) -> None:
    cp = plan.snapshot.checkpoint
    raise BackupMismatch(
        f"the snapshot's checkpoint (LSN {cp.applied_lsn} ending at offset {cp.offset}, "
        f"{format_ns(cp.time_ns)}) does not match that record in {path}: the snapshot "
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
            scan = segment.walk_bytes(path, data)
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
            if scan.footer is None:
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
