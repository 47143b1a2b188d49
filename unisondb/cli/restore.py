"""``unisondb restore``: offline restore / point-in-time recovery of one namespace.

Runbook: docs/RESTORE.md. The work is done by ``unisondb.restore``; this module parses
flags and renders the plan and the summary (text, or JSON with ``--json``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from unisondb.cli.archive_opts import archive_options, open_archive
from unisondb.cli.paths import LocalPath, data_dir_option
from unisondb.restore import RestoreOutcome, restore
from unisondb.restore.apply import RestoreSummary
from unisondb.restore.progress import for_terminal
from unisondb.restore.timefmt import format_bytes, format_lsn_range, format_ns
from unisondb.restore.verify import VerifiedPlan


def emit_json(payload: Any) -> None:
    click.echo(json.dumps(payload, indent=2, sort_keys=False))


@click.command("restore")
@click.option(
    "--data-dir",
    type=LocalPath(path_type=Path, file_okay=False),
    default=None,
    help="The server's data directory; the namespace is restored into <DIR>/<NS>. "
    "Default: the --data-dir given to unisondb itself, else ./data (the "
    "server's default).",
)
@click.option("--namespace", "-n", required=True, metavar="NS", help="Namespace to restore.")
@click.option(
    "--snapshot",
    type=LocalPath(path_type=Path, dir_okay=False),
    default=None,
    metavar="FILE",
    help="B-tree snapshot (the file from POST .../btree/backup, "
    "plain or .gz/.zst). Required unless --from is given.",
)
@archive_options
@click.option(
    "--wal",
    "wal_dirs",
    type=LocalPath(path_type=Path),
    multiple=True,
    metavar="DIR",
    help="Directory with WAL backup segments (NNNNNNNNN.wal, .wal.gz, .wal.zst, "
    "wal-*.tar.gz archives), searched recursively; or one such file. "
    "Repeatable.",
)
@click.option(
    "--target-time",
    metavar="RFC3339",
    help="Keep every record with time <= this (e.g. 2025-01-08T14:30:00Z).",
)
@click.option("--target-lsn", type=int, metavar="N", help="Keep every record with LSN <= N.")
@click.option(
    "--history",
    "history_id",
    metavar="ID",
    help="Restore this history (hex id or a unique prefix; 'unisondb backup list' "
    "shows them). Default: the newest history that continues the snapshot.",
)
@click.option(
    "--timeline",
    "timeline_no",
    type=int,
    metavar="N",
    help="Restore the history with timeline number N (must be unique).",
)
@click.option("--dry-run", is_flag=True, help="Verify and print the plan; change nothing.")
@click.option(
    "--force", is_flag=True, help="Replace the namespace's existing data (its B-tree and WAL are deleted)."
)
@click.option("--json", "as_json", is_flag=True, help="Print the plan/summary as JSON.")
@click.pass_context
def restore_cmd(
    ctx: click.Context,
    data_dir: Path | None,
    namespace: str,
    snapshot: Path | None,
    from_url: str | None,
    archive_endpoint: str | None,
    archive_path_style: bool,
    archive_key_file: Path | None,
    wal_dirs: tuple[Path, ...],
    target_time: str | None,
    target_lsn: int | None,
    history_id: str | None,
    timeline_no: int | None,
    dry_run: bool,
    force: bool,
    as_json: bool,
) -> None:
    """Restore NS from a snapshot plus WAL backups, to a point in time or LSN.

    Verifies every checksum, the snapshot's LMDB structure, every record CRC and LSN
    contiguity BEFORE touching the namespace; stages the result next to it and swaps it in
    atomically; starts a new history. The server must be stopped.
    """
    data_dir = data_dir_option(ctx, data_dir)
    if history_id is not None and timeline_no is not None:
        raise click.UsageError("give --history or --timeline, not both")
    choice = (
        history_id
        if history_id is not None
        else (f"timeline:{timeline_no}" if timeline_no is not None else None)
    )
    if (snapshot is None) == (from_url is None):
        raise click.UsageError("give --snapshot FILE (with --wal DIR) or --from s3://BUCKET/PREFIX")
    if from_url is not None and wal_dirs:
        raise click.UsageError("--from fetches the WAL from the archive: do not add --wal")
    progress = for_terminal()
    if from_url is not None:
        outcome = _restore_from_archive(
            data_dir,
            namespace,
            from_url,
            archive_endpoint,
            archive_path_style,
            archive_key_file,
            target_lsn=target_lsn,
            target_time=target_time,
            history_choice=choice,
            force=force,
            dry_run=dry_run,
            quiet=as_json,
        )
    else:
        assert snapshot is not None
        outcome = restore(
            data_dir,
            namespace,
            snapshot,
            list(wal_dirs),
            target_lsn=target_lsn,
            target_time=target_time,
            history_choice=choice,
            force=force,
            dry_run=dry_run,
            progress=progress,
        )
    if as_json:
        emit_json(outcome_to_json(outcome))
        return
    click.echo(render_plan(outcome.verified, dry_run=dry_run))
    if outcome.summary is not None:
        click.echo(render_summary(outcome.summary))


def _restore_from_archive(
    data_dir: Path,
    namespace: str,
    url: str,
    endpoint: str | None,
    path_style: bool,
    key_file: Path | None,
    *,
    target_lsn: int | None,
    target_time: str | None,
    history_choice: str | None,
    force: bool,
    dry_run: bool,
    quiet: bool,
) -> RestoreOutcome:
    """Download and decode into a private staging directory, then the ordinary restore."""
    import shutil
    import tempfile

    from unisondb.archive.fetch import fetch_for_restore
    from unisondb.restore.timefmt import parse_rfc3339

    src = open_archive(url, endpoint, path_style, key_file)
    target_time_ns = parse_rfc3339(target_time) if target_time is not None else None
    staging = Path(tempfile.mkdtemp(prefix="unisondb-archive-restore-"))
    try:
        # The bar is on stderr and only on a terminal; --json output stays clean either way.
        fetched = fetch_for_restore(
            src.store,
            src.url,
            namespace,
            staging,
            key=src.key,
            target_lsn=target_lsn,
            target_time_ns=target_time_ns,
            progress=for_terminal(enabled=not quiet),
        )
        if not quiet:
            click.echo(
                f"fetched from {src.url}: snapshot at LSN {fetched.manifest.lsn} and "
                f"{fetched.segments} segment(s), {format_bytes(fetched.bytes_downloaded)} "
                f"in {fetched.seconds:.2f} s (checksums, tags and SHA-256 verified)",
                err=True,
            )
        return restore(
            data_dir,
            namespace,
            fetched.snapshot,
            [fetched.wal_dir],
            target_lsn=target_lsn,
            target_time=target_time,
            history_choice=history_choice,
            force=force,
            dry_run=dry_run,
            progress=for_terminal(enabled=not quiet),
        )
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# --- rendering ---


def plan_to_json(vp: VerifiedPlan) -> dict[str, Any]:
    plan = vp.plan
    snap = plan.snapshot
    cp = snap.checkpoint
    sums = {c.path: c for c in vp.checksums}
    snap_sum = sums.get(snap.path)
    existing = plan.existing
    return {
        "namespace": plan.namespace,
        "targetDir": str(plan.data_dir / plan.namespace),
        "snapshot": {
            "path": str(snap.path),
            "bytes": snap.size,
            "sha256": vp.snapshot_sha256,
            "sidecar": snap_sum.status if snap_sum else "missing",
            "checked": snap_sum.sidecar if snap_sum else None,
            "lsn": cp.applied_lsn,
            "time": format_ns(cp.time_ns) if snap.has_checkpoint else None,
            "timeline": cp.timeline,
            "segmentId": cp.segment_id,
            "keys": snap.keys,
            "history": cp.history.hex(),
            "fingerprint": cp.fingerprint.hex(),
        },
        "wal": {
            "dirs": [str(d) for d in plan.wal_dirs],
            "segmentsFound": plan.segments_found,
            "replay": [
                {
                    "segmentId": s.link.segment.segment_id,
                    "path": str(s.link.segment.path),
                    "timeline": s.link.timeline,
                    "history": s.link.history.hex(),
                    "fromLsn": s.link.from_lsn,
                    "toLsn": s.link.to_lsn,
                    "records": s.link.records,
                    "bytes": s.size,
                    "sidecar": sums[s.link.segment.path].status if s.link.segment.path in sums else "missing",
                    "checked": sums[s.link.segment.path].sidecar if s.link.segment.path in sums else None,
                }
                for s in vp.steps
            ],
            "contiguousToLsn": plan.chain.end_lsn,
            "holesAfter": [h.describe() for h in plan.chain.holes],
            "history": plan.chain.target.hex(),
            "otherHistories": [lin.history.hex() for lin in plan.chain.alternatives],
            "timelineSwitches": [
                {
                    "atLsn": sw.at_lsn,
                    "from": sw.from_timeline,
                    "to": sw.to_timeline,
                    "fromHistory": sw.from_history.hex(),
                    "toHistory": sw.to_history.hex(),
                    "segmentId": sw.segment_id,
                }
                for sw in plan.chain.switches
            ],
        },
        "target": plan.target.to_json(),
        "result": {
            "lsn": vp.end_lsn,
            "time": format_ns(vp.end_time_ns) if vp.end_time_ns else None,
            "recordsToReplay": vp.records,
            "walBytes": vp.wal_bytes,
            "newTimeline": plan.new_timeline,
            "nextSegmentId": plan.new_segment_id,
            "newHistory": plan.new_history.hex(),
        },
        "existing": None
        if existing is None
        else {
            "path": str(existing.path),
            "exists": existing.exists,
            "hasData": existing.has_data,
            "segments": len(existing.segments),
            "lockedBy": existing.locked_by,
        },
        "warnings": vp.warnings,
    }


def summary_to_json(s: RestoreSummary) -> dict[str, Any]:
    rate = s.records_replayed / s.replay_seconds if s.replay_seconds > 0 else None
    return {
        "namespace": s.namespace,
        "targetDir": str(s.target_dir),
        "lsn": s.end_lsn,
        "time": format_ns(s.end_time_ns) if s.end_time_ns else None,
        "timeline": s.timeline,
        "nextSegmentId": s.next_segment_id,
        "recordsReplayed": s.records_replayed,
        "history": s.history.hex(),
        "fingerprint": s.proof.fingerprint.hex(),
        "proof": {
            "snapshotContentChecked": s.proof.snapshot_checked,
            "segmentBoundariesChecked": s.proof.boundaries,
            "provenLsn": s.proof.proven_lsn,
            "endProven": s.proof.end_proven,
            "text": s.proof.describe(),
        },
        "walBytes": s.wal_bytes,
        "snapshotBytes": s.snapshot_bytes,
        "replacedExisting": s.replaced_existing,
        "removedStaleStaging": [str(p) for p in s.removed_staging],
        "seconds": {
            "verify": round(s.verify_seconds, 4),
            "copy": round(s.copy_seconds, 4),
            "replay": round(s.replay_seconds, 4),
            "contentWait": round(s.content_wait_seconds, 4),
            "publish": round(s.publish_seconds, 4),
            "total": round(s.total_seconds, 4),
        },
        "recordsPerSecond": round(rate) if rate else None,
    }


def outcome_to_json(outcome: RestoreOutcome) -> dict[str, Any]:
    return {
        "dryRun": outcome.summary is None,
        "plan": plan_to_json(outcome.verified),
        "summary": summary_to_json(outcome.summary) if outcome.summary else None,
    }


def render_plan(vp: VerifiedPlan, *, dry_run: bool) -> str:
    p = plan_to_json(vp)
    snap, wal, res = p["snapshot"], p["wal"], p["result"]
    lines = [
        f"{'[DRY RUN] ' if dry_run else ''}Restore plan for namespace "
        f"{p['namespace']!r} into {p['targetDir']}",
        f"  snapshot   {snap['path']} ({format_bytes(snap['bytes'])}, sha256 "
        f"{_sidecar_word(snap['sidecar'], snap['checked'])}, LMDB structure ok)",
        f"             contains LSN <= {snap['lsn']}"
        + (f" (time {snap['time']})" if snap["time"] else "")
        + f", timeline {snap['timeline']}, {snap['keys']} keys",
        f"             history {snap['history'][:12]}, state fingerprint {snap['fingerprint'][:16]}",
    ]
    if wal["replay"]:
        first, last = wal["replay"][0], wal["replay"][-1]
        lines.append(
            f"  WAL        replay LSN {format_lsn_range(first['fromLsn'], last['toLsn'])} from "
            f"{len(wal['replay'])} segment(s) (of {wal['segmentsFound']} found in "
            f"{len(wal['dirs'])} dir(s)), all record CRCs ok"
        )
        steps = wal["replay"]
        shown = steps if len(steps) <= 8 else steps[:3] + [None] + steps[-3:]
        for step in shown:
            if step is None:
                lines.append(f"               ... {len(steps) - 6} more segment(s) ...")
                continue
            lines.append(
                f"               {Path(step['path']).name}  timeline {step['timeline']}  "
                f"LSN {format_lsn_range(step['fromLsn'], step['toLsn'])}  "
                f"({step['records']} records, "
                f"sha256 {_sidecar_word(step['sidecar'], step['checked'])})"
            )
    else:
        lines.append(f"  WAL        nothing to replay ({wal['segmentsFound']} segment(s) found)")
    lines.append(f"  target     {vp.plan.target.describe()}")
    lines.append(
        f"  result     LSN {res['lsn']}"
        + (f" ({res['time']})" if res["time"] else "")
        + f"; {res['recordsToReplay']} records to replay"
    )
    lines.append(
        f"  history    restoring history {wal['history'][:12]}"
        + (
            f" (the newest of {len(wal['otherHistories']) + 1} that continue the "
            "snapshot; --history picks another)"
            if wal["otherHistories"]
            else ""
        )
    )
    lines.append(
        f"             new history {res['newHistory'][:12]} (timeline "
        f"{res['newTimeline']}); the server's next WAL segment will be "
        f"{res['nextSegmentId']:09d}.wal"
    )
    if vp.plan.target.kind == "end":
        lines.append(f"             (end of the contiguous WAL: LSN {wal['contiguousToLsn']})")
    for w in p["warnings"]:
        lines.append(f"  warning    {w}")
    return "\n".join(lines)


def _sidecar_word(status: str, checked: str | None = None) -> str:
    if status == "ok" and checked:
        return f"matches {checked}"
    return {"ok": "matches its .sha256", "missing": "has no .sha256 sidecar", "mismatch": "MISMATCH"}.get(
        status, status
    )


def render_summary(s: RestoreSummary) -> str:
    rate = (
        f", {s.records_replayed / s.replay_seconds:,.0f} records/s"
        if s.replay_seconds > 0 and s.records_replayed
        else ""
    )
    return "\n".join(
        [
            f"Restored namespace {s.namespace!r} to LSN {s.end_lsn}"
            + (f" ({format_ns(s.end_time_ns)})" if s.end_time_ns else "")
            + f" on new timeline {s.timeline} (history {s.history.hex()[:12]})"
            + (" (previous data replaced)" if s.replaced_existing else ""),
            f"  proof      {s.proof.describe()}",
            f"  replayed   {s.records_replayed} records ({format_bytes(s.wal_bytes)} of WAL) in "
            f"{s.replay_seconds:.2f} s{rate}",
            f"  copied     snapshot {format_bytes(s.snapshot_bytes)} in {s.copy_seconds:.2f} s",
            f"  total      {s.total_seconds:.2f} s (verify {s.verify_seconds:.2f} s, publish "
            f"{s.publish_seconds:.2f} s)",
            f"  next       start the server; its first WAL segment will be "
            f"{s.next_segment_id:09d}.wal on timeline {s.timeline}",
        ]
    )
