"""Restore planning: inventories + target → ``RestorePlan``. Pure: no file is read here.

``build_plan`` decides everything that can be decided from headers, footers and the
snapshot's checkpoint, and refuses what can never work:

* segments of another namespace, two different files with one segment id, unreadable or
  damaged segments the restore could need;
* a target before the snapshot (``--target-lsn`` below its LSN, ``--target-time``
  before its time), or past the available WAL;
* a hole in the LSNs between the snapshot and the target (every missing range is named).

What needs the records themselves — CRCs, the exact LSN of a ``--target-time`` — is
settled by ``verify.verify_plan`` before anything is written.

Target semantics (inclusive, whole records): ``--target-lsn N`` keeps every record with
LSN ≤ N; ``--target-time T`` keeps every record with time ≤ T (record times never
decrease along a history, so that is a prefix). A time target is reachable only if a
record *newer* than T is in the backup; otherwise the records between the last one
available and T may simply be missing, and the restore refuses instead of guessing.
Without a target the restore goes to the end of the contiguous WAL and says where that is.

Which history: ``timeline.select_chain`` follows the lineage recorded in segment headers
from the snapshot's history to the chosen (default: newest) continuation; records of any
other history are never combined with it.

The new history: a restore always forks. Its id is random (``history.py``), its parent is
the history the chain ends on, its fork LSN the restored LSN, its timeline ``max(every
timeline seen) + 1``, and its first segment id is ``fork_segment_id(max(every segment id in
the --wal dirs, every *sealed* segment id in the namespace's current wal/), the snapshot's)``
so the server's segments get ids above anything any WAL backup can hold. The current
wal/'s unsealed (active) segment is left out on purpose: the backup API never copies it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from unisondb.errors import InvalidRequest, LsnGap
from unisondb.restore.errors import BackupCorrupt, BackupMismatch, BadTarget
from unisondb.restore.inventory import (
    ExistingNamespace,
    SegmentMeta,
    SnapshotInfo,
    WalInventory,
    raise_on_conflicts,
)
from unisondb.restore.timefmt import format_ns
from unisondb.restore.timeline import Chain, Hole, Link, select_chain, unlinked_after
from unisondb.storage import history as hist
from unisondb.storage import layout, segment
from unisondb.storage.history import NO_HISTORY, fork_segment_id, new_history_id


@dataclass(frozen=True, slots=True)
class Target:
    """``end`` (no target), ``lsn`` or ``time``; inclusive, whole records."""

    kind: str = "end"
    lsn: int | None = None
    time_ns: int | None = None

    @classmethod
    def from_options(cls, target_lsn: int | None, target_time_ns: int | None) -> Target:
        if target_lsn is not None and target_time_ns is not None:
            raise InvalidRequest("give at most one of --target-lsn and --target-time")
        if target_lsn is not None:
            if target_lsn < 0:
                raise InvalidRequest(f"--target-lsn must be >= 0, got {target_lsn}")
            return cls("lsn", lsn=target_lsn)
        if target_time_ns is not None:
            return cls("time", time_ns=target_time_ns)
        return cls()

    def describe(self) -> str:
        if self.kind == "lsn":
            return f"LSN {self.lsn} (inclusive)"
        if self.kind == "time":
            assert self.time_ns is not None
            return f"time {format_ns(self.time_ns)} (inclusive)"
        return "end of the contiguous WAL"

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {"kind": self.kind}
        if self.lsn is not None:
            out["lsn"] = self.lsn
        if self.time_ns is not None:
            out["time"] = format_ns(self.time_ns)
            out["timeNs"] = self.time_ns
        return out


@dataclass(slots=True)
class RestorePlan:
    namespace: str
    data_dir: Path
    snapshot: SnapshotInfo
    wal_dirs: tuple[Path, ...]
    target: Target
    history_choice: str | None
    chain: Chain
    #: Last LSN to apply; None for a time target until ``verify_plan`` resolves it.
    end_lsn: int | None
    new_timeline: int
    #: First segment id of the new history (the restore writes it, empty).
    new_segment_id: int
    #: Id of the history the restore creates.
    new_history: bytes
    existing: ExistingNamespace | None
    #: Segment the snapshot's checkpoint points into, if present (checked while verifying).
    anchor: SegmentMeta | None
    segments_found: int
    warnings: list[str] = field(default_factory=list)

    @property
    def snapshot_lsn(self) -> int:
        return self.snapshot.checkpoint.applied_lsn

    def links_through(self, end_lsn: int) -> list[Link]:
        """The chain links holding LSNs snapshot+1..end_lsn, cut to that range."""
        out = []
        for link in self.chain.links:
            if link.from_lsn > end_lsn:
                break
            out.append(Link(link.segment, link.from_lsn, min(link.to_lsn, end_lsn)))
        return out


def build_plan(
    namespace: str,
    data_dir: Path,
    snapshot: SnapshotInfo,
    inventory: WalInventory,
    target: Target,
    *,
    history_choice: str | None = None,
    existing: ExistingNamespace | None = None,
    check_namespace: bool = True,
) -> RestorePlan:
    """Plan a restore; ``check_namespace=False`` (backup verify without --namespace) only
    requires every segment to come from one namespace."""
    layout.validate_namespace(namespace)
    cp = snapshot.checkpoint
    warnings: list[str] = []
    _check_target_not_before_snapshot(target, snapshot)
    max_lsn = target.lsn if target.kind == "lsn" else None
    chain = select_chain(
        cp.applied_lsn,
        cp.history,
        inventory.segments,
        history_choice,
        max_lsn=max_lsn,
        start_timeline=cp.timeline,
    )
    _check_inventory(namespace if check_namespace else None, inventory, snapshot, target, chain, warnings)
    _warn_unrelated_wal(snapshot, inventory, warnings)
    end_lsn = _resolve_end(target, snapshot, chain, warnings, _other_histories(inventory.segments, chain))
    anchor = _anchor_segment(snapshot, inventory)
    new_timeline = 1 + max(cp.timeline, inventory.max_timeline, existing.max_timeline if existing else 0)
    ids_seen = [
        inventory.max_segment_id,
        cp.segment_id,
        existing.max_archivable_segment_id if existing else 0,
    ]
    ids_seen += [layout.parse_segment_name(p.name) or 0 for p, _ in inventory.unreadable]
    new_segment_id = fork_segment_id(max(ids_seen), cp.segment_id)
    if existing is not None:
        warnings += _existing_warnings(existing, inventory)
    if chain.alternatives:
        names = ", ".join(lin.describe() for lin in chain.alternatives[:4])
        how = (
            "chosen with --history"
            if history_choice is not None
            else "the newest (its latest segment was written last)"
        )
        warnings.append(
            f"these backups hold {len(chain.alternatives) + 1} histories that continue the "
            f"snapshot; restoring history {hist.short(chain.target)}, {how}; the others: "
            f"{names}; pick one with --history ID"
        )
    for sw in chain.switches:
        warnings.append(
            f"the chain follows history {hist.short(sw.from_history)} up to LSN "
            f"{sw.at_lsn - 1}, then history {hist.short(sw.to_history)} (timeline "
            f"{sw.to_timeline}, forked there; first segment {sw.segment_id:09d}.wal)"
        )
    unsealed = [ln.segment.name for ln in chain.links if not ln.segment.sealed]
    if unsealed:
        warnings.append(
            f"segments without a footer (copied from a live WAL directory?): "
            f"{', '.join(unsealed)}; they are used up to their last whole record"
        )
    return RestorePlan(
        namespace=namespace,
        data_dir=data_dir,
        snapshot=snapshot,
        wal_dirs=inventory.dirs,
        target=target,
        history_choice=history_choice,
        chain=chain,
        end_lsn=end_lsn,
        new_timeline=new_timeline,
        new_segment_id=new_segment_id,
        new_history=new_history_id(),
        existing=existing,
        anchor=anchor,
        segments_found=len(inventory.segments),
        warnings=warnings,
    )


def _check_inventory(
    namespace: str | None,
    inv: WalInventory,
    snapshot: SnapshotInfo,
    target: Target,
    chain: Chain,
    warnings: list[str],
) -> None:
    if inv.unreadable:
        path, reason = inv.unreadable[0]
        more = f" (and {len(inv.unreadable) - 1} more)" if len(inv.unreadable) > 1 else ""
        raise BackupCorrupt(
            f"cannot read WAL segment {path}: {reason}{more}",
            hint="its LSN range is unknown, so the restore cannot tell whether it is needed; "
            "replace it with a good copy (see its .sha256), or move it out of the --wal "
            "directory if it is not part of this history",
        )
    raise_on_conflicts(inv)
    if namespace is None:
        crcs = {s.ns_crc for s in inv.segments}
        if len(crcs) > 1:
            raise BackupMismatch(
                "the WAL directories mix segments of more than one namespace",
                hint="pass --namespace to see which files do not belong",
            )
        foreign = []
    else:
        want = segment.namespace_crc(namespace)
        foreign = [s for s in inv.segments if s.ns_crc != want]
    if foreign:
        names = ", ".join(str(s.path) for s in foreign[:3])
        more = f" (and {len(foreign) - 3} more)" if len(foreign) > 3 else ""
        raise BackupMismatch(
            f"WAL segments from another namespace (not {namespace!r}): {names}{more}",
            hint="every segment header records its namespace; pass only this namespace's WAL "
            "directories (<data-dir>/backups/<ns>/...), or check --namespace",
        )
    cp = snapshot.checkpoint
    limit = target.lsn if target.kind == "lsn" else None
    for s in inv.segments:
        if s.damage is None:
            continue
        # A damaged segment whose header names a history on the chosen path (or any
        # history at all, if the damage hides it) could hold records the restore needs.
        on_path = {ln.history for ln in chain.links + chain.beyond} | {chain.start_history, chain.target}
        relevant = (
            (s.history in on_path or not s.lineage.is_set)
            and (not s.sealed or s.last_lsn > cp.applied_lsn)
            and (limit is None or s.first_lsn <= limit)
        )
        if relevant:
            raise BackupCorrupt(
                f"WAL segment {s.path} is damaged: {s.damage}",
                hint="fetch another copy of this segment (compare with its .sha256); "
                "'unisondb wal inspect --wal-dir DIR --segment-id N' shows the last good "
                "record",
            )
        warnings.append(f"ignoring damaged segment {s.path} (not needed): {s.damage}")


def _warn_unrelated_wal(snapshot: SnapshotInfo, inv: WalInventory, warnings: list[str]) -> None:
    """Say so plainly when no WAL record after the snapshot's LSN belongs to a history the
    headers present link to the snapshot's (another server's namespace, or an ancestry
    whose linking segments are not in these backups: two forks without a write between
    leave a history with no segment at all). Such records are never used; the restore then
    brings back the snapshot's own state, and ``backup verify`` reports the segments as a
    problem for the operator to resolve."""
    cp = snapshot.checkpoint
    if not snapshot.has_checkpoint:
        return
    later, unlinked = unlinked_after(cp.lineage, cp.applied_lsn, inv.segments)
    if not later or len(unlinked) < len(later):
        return
    names = sorted({hist.short(s.history) for s in later})
    warnings.append(
        f"none of the {len(later)} WAL segment(s) after the snapshot's LSN {cp.applied_lsn} "
        f"belong to the snapshot's history {hist.short(cp.history)} or a history these "
        f"backups link to it (they are of {', '.join(names[:4])}): they are not used, and "
        "the restore ends at the snapshot; if they are this namespace's WAL, pass the "
        "backups that link them (unisondb backup list shows each history's parent)"
    )


def _check_target_not_before_snapshot(target: Target, snapshot: SnapshotInfo) -> None:
    cp = snapshot.checkpoint
    if target.kind == "lsn" and target.lsn is not None and target.lsn < cp.applied_lsn:
        raise BadTarget(
            f"target LSN {target.lsn} is before the snapshot, which already contains LSNs "
            f"up to {cp.applied_lsn}",
            hint="use an older snapshot (unisondb backup list shows each snapshot's LSN)",
        )
    if target.kind == "time" and target.time_ns is not None and target.time_ns < cp.time_ns:
        raise BadTarget(
            f"target time {format_ns(target.time_ns)} is before the snapshot, which already "
            f"contains records up to {format_ns(cp.time_ns)} (LSN {cp.applied_lsn})",
            hint="use an older snapshot (unisondb backup list shows each snapshot's time)",
        )


def _other_histories(segments: list[SegmentMeta], chain: Chain) -> str:
    """Why the LSN after the chain's end is unusable where it exists at all (for messages)."""
    nxt = chain.end_lsn + 1
    others = [
        s
        for s in segments
        if s.count
        and s.damage is None
        and s.first_lsn <= nxt <= s.last_lsn
        and s.history != chain.end_history
    ]
    if not others:
        return ""
    names = ", ".join(
        f"{s.name} (timeline {s.timeline}, history {hist.short(s.history)})" for s in others[:3]
    )
    whys = dict.fromkeys(_why_other(s, chain) for s in others[:3])
    return f"; LSN {nxt} exists only in {names}, {'; '.join(whys)}"


def _why_other(seg: SegmentMeta, chain: Chain) -> str:
    """Where that history left the chain's, from the lineage in the headers, not a guess."""
    switch = next((sw for sw in chain.switches if sw.from_history == seg.history), None)
    if switch is not None:
        return (
            f"an older history: timeline {switch.to_timeline} replaced timeline "
            f"{seg.timeline} from LSN {switch.at_lsn} on"
        )
    lin = seg.lineage
    snap_lsn = chain.start_lsn - 1
    if lin.parent == NO_HISTORY:
        return "another history with no common origin (another server or installation)"
    where = (
        "before the snapshot's position"
        if lin.fork_lsn < snap_lsn
        else f"after the snapshot's LSN {snap_lsn}, not the one chosen (--history picks it)"
    )
    return f"another history that branched off after LSN {lin.fork_lsn}, {where}"


def _resolve_end(
    target: Target, snapshot: SnapshotInfo, chain: Chain, warnings: list[str], elsewhere: str = ""
) -> int | None:
    end = chain.end_lsn
    if target.kind == "end":
        if chain.holes:
            # Restoring "to the end" would silently stop before records the backup holds.
            raise LsnGap(
                f"the WAL after the snapshot (LSN {snapshot.checkpoint.applied_lsn}) has a hole "
                f"— missing {_holes_text(chain.holes)} — and continues after it up to LSN "
                f"{chain.last_known_lsn}; a restore without a target would stop at LSN {end}",
                hint="add the WAL directories that hold the missing segments, or accept the "
                f"earlier point explicitly with --target-lsn {end}",
            )
        if elsewhere:
            warnings.append(f"the restore ends at LSN {end}{elsewhere}")
        return end
    if target.kind == "lsn":
        assert target.lsn is not None
        if target.lsn <= end:
            return target.lsn
        before = [h for h in chain.holes if h.first_lsn <= target.lsn]
        if before:
            raise _gap_error(before, snapshot, f"target LSN {target.lsn}")
        raise BadTarget(
            f"target LSN {target.lsn} is beyond the available WAL, which ends at LSN {end} "
            f"(history {hist.short(chain.end_history)}){elsewhere}",
            hint="add the WAL directories that hold later segments, or omit the target to "
            f"restore to LSN {end}",
        )
    assert target.time_ns is not None
    # The cut is certain only if a record newer than the target is present.
    if any(ln.segment.max_time_ns > target.time_ns for ln in chain.links):
        return None
    if chain.holes:
        raise _gap_error(chain.holes, snapshot, f"target time {format_ns(target.time_ns)}")
    last = chain.links[-1].segment.max_time_ns if chain.links else snapshot.checkpoint.time_ns
    raise BadTarget(
        f"target time {format_ns(target.time_ns)} is after the last record in the WAL "
        f"backups (LSN {end}, {format_ns(last)}){elsewhere}; records written after that are not "
        "in the backup, so the state at the target time cannot be known",
        hint=f"add newer WAL segments, or omit --target-time to restore to LSN {end}",
    )


def _holes_text(holes: list[Hole]) -> str:
    return "; ".join(h.describe() for h in holes)


def _gap_error(holes: list[Hole], snapshot: SnapshotInfo, what: str) -> LsnGap:
    return LsnGap(
        f"cannot reach {what}: the WAL after the snapshot (LSN "
        f"{snapshot.checkpoint.applied_lsn}) is missing {_holes_text(holes)}",
        hint="add the WAL backup directories that hold the missing segments (unisondb backup "
        "list shows coverage), choose a target before the first missing LSN, or use a "
        "snapshot taken after it",
    )


def _anchor_segment(snapshot: SnapshotInfo, inv: WalInventory) -> SegmentMeta | None:
    """The segment the checkpoint points into; a mismatch means a different history."""
    cp = snapshot.checkpoint
    if not snapshot.has_checkpoint or cp.applied_lsn == 0 or cp.offset == 0:
        return None  # empty, or written by a restore (offset 0): nothing to compare
    seg = inv.by_id().get(cp.segment_id)
    if seg is None or seg.damage is not None:
        return None
    if seg.history != cp.history:
        return None  # that id belongs to another history; rule 1 already keeps it out
    if not seg.first_lsn <= cp.applied_lsn <= seg.last_lsn:
        raise BackupMismatch(
            f"the snapshot's checkpoint (LSN {cp.applied_lsn}, history "
            f"{hist.short(cp.history)}) names segment {cp.segment_id}, but {seg.path} holds "
            f"LSNs {seg.first_lsn}..{seg.last_lsn} of that history: one of them was altered",
            hint="use the WAL backups of the server the snapshot was taken from",
        )
    if seg.sealed and seg.last_lsn == cp.applied_lsn:
        if seg.max_time_ns != cp.time_ns or seg.size - segment.FOOTER_SIZE != cp.offset:
            raise BackupMismatch(
                f"the snapshot's checkpoint (LSN {cp.applied_lsn} ending at offset {cp.offset}, "
                f"{format_ns(cp.time_ns)}) does not match the last record of {seg.path}: the "
                "snapshot and the WAL come from different histories",
                hint="use the WAL backups of the server the snapshot was taken from",
            )
        return None
    return seg


def _existing_warnings(existing: ExistingNamespace, inv: WalInventory) -> list[str]:
    out = []
    if existing.has_data:
        parts = []
        if existing.has_btree:
            parts.append("db/data.mdb")
        if existing.segments:
            ids = [s.segment_id for s in existing.segments]
            parts.append(f"{len(ids)} WAL segment(s) {min(ids):09d}..{max(ids):09d}")
        out.append(
            f"{existing.path} holds data ({', '.join(parts)}): the restore replaces it (requires --force)"
        )
        # A copy inside the namespace being replaced is no backup: it is deleted with it.
        inside = existing.path.resolve()
        backed = {
            seg_id
            for seg_id, paths in inv.copies.items()
            if any(not p.resolve().is_relative_to(inside) for p in paths)
        }
        only_here = [
            s
            for s in existing.segments
            if s.segment_id not in backed
            and (s.last_lsn is None or s.first_lsn is None or s.last_lsn >= s.first_lsn)
        ]
        if only_here:
            ids = [s.segment_id for s in only_here]
            out.append(
                f"{len(ids)} segment(s) of the current WAL have no copy outside {existing.path} "
                f"and will be deleted with it: {', '.join(f'{i:09d}' for i in ids[:10])}"
                f"{' ...' if len(ids) > 10 else ''} (back them up first if you may need them)"
            )
    if existing.locked_by is not None:
        who = f" by pid {existing.locked_by}" if existing.locked_by else ""
        out.append(f"{existing.path / 'LOCK'} is held{who}: stop the server before restoring")
    return out
