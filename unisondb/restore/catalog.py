"""The backup catalog: what a backup directory holds and what it can restore to.

``list_backups(dir)`` reads headers, footers and each snapshot's checkpoint (never whole
segments) and returns, as JSON-ready data: the snapshots (LSN, time, history, fingerprint,
how far a restore from each reaches), compressed and encrypted files, and per history its
lineage (parent, fork LSN), WAL coverage, holes, recorded fingerprints and its restorable
window — for each snapshot that can reach it, the LSN/time range a restore of that history
can land in. Used by ``unisondb backup list`` and ``GET /api/v1/{ns}/backups``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from unisondb.errors import UnisonDBError
from unisondb.restore import sources
from unisondb.restore.inventory import WalInventory, collect_wal, has_sidecar, inspect_snapshot
from unisondb.restore.timefmt import format_ns
from unisondb.restore.timeline import by_history, coverage_holes, lineages, path_to, select_chain
from unisondb.storage.history import NO_HISTORY


def list_backups(backup_dir: Path) -> dict[str, Any]:
    with sources.staging():
        return _list_backups(backup_dir)


def _list_backups(backup_dir: Path) -> dict[str, Any]:
    snapshots: list[dict[str, Any]] = []
    compressed: list[dict[str, Any]] = []
    encrypted: list[dict[str, Any]] = []
    problems: list[str] = []
    inv = collect_wal([backup_dir])
    for path in sorted(p for p in backup_dir.rglob("*") if p.is_file()):
        by_name = sources.classify_name(path.name)
        if (
            by_name.kind in (sources.Kind.SIDECAR, sources.Kind.SEGMENT, sources.Kind.ARCHIVE)
            or path.name.endswith(".tmp")
            or path.name == "lock.mdb"
            or path.name.startswith(".")
        ):  # hidden: contrib's .<name>.partial files
            continue  # segments and archives are in ``inv``; sidecars are looked up per file
        try:
            kind = sources.classify(path)
        except UnisonDBError as exc:
            problems.append(f"{path}: {exc.message}")
            continue
        if kind.kind is sources.Kind.ENCRYPTED:
            encrypted.append(
                {"path": str(path), "bytes": path.stat().st_size, "hint": sources.encrypted_error(path).hint}
            )
        elif kind.kind is sources.Kind.SNAPSHOT:
            entry = _list_snapshot(path, kind.codec, inv, problems)
            # A compressed file that cannot be read as a snapshot stays with the compressed
            # files (with its error): whether it ever was a snapshot is unknown.
            (compressed if "error" in entry and kind.codec != "none" else snapshots).append(
                {**entry, "format": kind.codec} if "error" in entry and kind.codec != "none" else entry
            )
        elif kind.codec != "none":
            compressed.append({"path": str(path), "bytes": path.stat().st_size, "format": kind.codec})
    snapshots.sort(key=lambda s: (s.get("timeline", 0), s.get("lsn", 0)))
    histories = _histories(inv, snapshots)
    # Segments without records have no LSNs: listed on their own, so they neither widen a
    # history's LSN range nor show up as a backwards range like 402..401.
    empty = [
        {
            "segmentId": s.segment_id,
            "path": str(s.path),
            "timeline": s.timeline,
            "history": s.history.hex(),
            "firstLsn": s.first_lsn,
            "sealed": s.sealed,
        }
        for s in inv.segments
        if s.count == 0
    ]
    for snap_entry in snapshots + compressed:
        snap_entry.pop("_checkpoint", None)
    for seg in inv.segments:
        if seg.damage:
            problems.append(f"{seg.path}: {seg.damage}")
    for path, reason in inv.unreadable:
        problems.append(f"{path}: {reason}")
    return {
        "backupDir": str(backup_dir),
        "snapshots": snapshots,
        "compressed": compressed,
        "encrypted": encrypted,
        "wal": {
            "segments": len(inv.segments),
            "duplicates": sum(len(v) - 1 for v in inv.copies.values()),
            "histories": histories,
            "empty": empty,
        },
        "problems": problems,
    }


def _histories(inv: WalInventory, snapshots: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per history: its lineage, WAL coverage, holes, and the restorable window — for each
    snapshot that can reach it, the LSN range a restore of that history can land in."""
    known = lineages(inv.segments)
    groups = by_history(inv.segments)
    ids = set(known) | {bytes.fromhex(s["history"]) for s in snapshots if "history" in s}
    out = []
    for h in sorted(ids, key=lambda x: (known[x].timeline if x in known else 0, x)):
        lin = known.get(h)
        segs = groups.get(h, [])
        item: dict[str, Any] = {
            "history": h.hex(),
            "timeline": lin.timeline if lin else None,
            "parent": lin.parent.hex() if lin and lin.parent != NO_HISTORY else None,
            "forkLsn": lin.fork_lsn if lin else None,
            "segments": len(segs),
            "records": sum(s.count for s in segs),
            "bytes": sum(s.size for s in segs),
            "fingerprints": sum(1 for s in segs if s.end_fp is not None),
            "holes": [
                {"firstLsn": x.first_lsn, "lastLsn": x.last_lsn, "text": x.describe()}
                for x in coverage_holes(segs)
            ],
        }
        if segs:
            item.update(
                {
                    "earliestLsn": segs[0].first_lsn,
                    "latestLsn": max(s.last_lsn for s in segs),
                    "earliestTime": format_ns(min(s.min_time_ns for s in segs)),
                    "latestTime": format_ns(max(s.max_time_ns for s in segs)),
                    "firstSegmentId": min(s.segment_id for s in segs),
                    "lastSegmentId": max(s.segment_id for s in segs),
                }
            )
        anchors = []
        for snap in snapshots:
            cp = snap.get("_checkpoint")
            if cp is None or path_to(h, cp.history, cp.applied_lsn, known) is None:
                continue
            try:
                chain = select_chain(
                    cp.applied_lsn, cp.history, inv.segments, h.hex(), start_timeline=cp.timeline
                )
            except UnisonDBError:
                continue
            end_time = chain.links[-1].segment.max_time_ns if chain.links else cp.time_ns
            anchors.append(
                {
                    "snapshot": snap["path"],
                    "fromLsn": cp.applied_lsn,
                    "fromTime": snap["time"],
                    "toLsn": chain.end_lsn,
                    "toTime": format_ns(end_time) if end_time else None,
                    "holesAfter": [x.describe() for x in chain.holes],
                }
            )
        item["window"] = (
            None
            if not anchors
            else {
                "earliestLsn": min(a["fromLsn"] for a in anchors),
                "latestLsn": max(a["toLsn"] for a in anchors),
                "earliestTime": min((a["fromTime"] for a in anchors if a["fromTime"]), default=None),
                "latestTime": max((a["toTime"] for a in anchors if a["toTime"]), default=None),
                "anchors": anchors,
            }
        )
        out.append(item)
    return out


def _list_snapshot(path: Path, codec: str, inv: Any, problems: list[str]) -> dict[str, Any]:
    """One snapshot's entry; a compressed one is decompressed into staging and the copy
    deleted right after (one at a time: staging needs room for the largest only)."""
    entry: dict[str, Any] = {"path": str(path), "bytes": path.stat().st_size, "sidecar": has_sidecar(path)}
    if codec != "none":
        entry["compression"] = codec
    try:
        snap = inspect_snapshot(path, structural=False)
    except UnisonDBError as exc:
        entry["error"] = exc.message
        problems.append(f"{path}: {exc.message}")
        return entry
    finally:
        sources.current().release(path)
    cp = snap.checkpoint
    entry.update(
        {
            "plainBytes": snap.size,
            "lsn": cp.applied_lsn,
            "time": format_ns(cp.time_ns) if snap.has_checkpoint else None,
            "timeline": cp.timeline,
            "keys": snap.keys,
            "history": cp.history.hex(),
            "fingerprint": cp.fingerprint.hex(),
            "_checkpoint": cp,
        }
    )
    try:
        chain = select_chain(cp.applied_lsn, cp.history, inv.segments, start_timeline=cp.timeline)
    except UnisonDBError as exc:
        entry["error"] = exc.message
        problems.append(f"{path}: {exc.message}")
        return entry
    end_time = chain.links[-1].segment.max_time_ns if chain.links else cp.time_ns
    entry["restorableTo"] = {
        "lsn": chain.end_lsn,
        "timeline": chain.end_timeline,
        "history": chain.end_history.hex(),
        "time": format_ns(end_time) if end_time else None,
        "holesAfter": [h.describe() for h in chain.holes],
    }
    return entry
