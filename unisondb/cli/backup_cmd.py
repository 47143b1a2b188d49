"""``unisondb backup verify`` and ``unisondb backup list``: offline checks of backup files.

Both only read: files are opened read-only and nothing is written next to them
(``verify --replay`` restores into a scratch directory it deletes afterwards). Inputs may be
plain, gzip, zstd or tar archives (``restore/sources.py``); compressed snapshots and archive
members are decompressed into a private staging directory that is removed at the end.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from unisondb.cli.archive_opts import archive_options, open_archive
from unisondb.cli.paths import LocalPath
from unisondb.cli.restore import emit_json
from unisondb.errors import UnisonDBError
from unisondb.restore import restore, sources
from unisondb.restore.catalog import list_backups
from unisondb.restore.drill import run_drill, sample_keys
from unisondb.restore.errors import BackupCorrupt
from unisondb.restore.progress import for_terminal
from unisondb.restore.timefmt import format_bytes, format_lsn_range, format_ns
from unisondb.restore.verify import VerifyReport, verify_backup_set

if TYPE_CHECKING:
    from unisondb.archive.fetch import Staged


@click.group("backup")
def backup_group() -> None:
    """Inspect and verify backup files (offline; the server may keep running)."""


@backup_group.command("verify")
@click.option(
    "--snapshot",
    type=LocalPath(path_type=Path, dir_okay=False),
    default=None,
    metavar="FILE",
    help="B-tree snapshot to check (plain, .gz or .zst).",
)
@click.option(
    "--wal",
    "wal_dirs",
    type=LocalPath(path_type=Path),
    multiple=True,
    metavar="DIR",
    help="WAL backup directory (recursive; .wal, .wal.gz, .wal.zst, "
    "wal-*.tar.gz), or one such file. Repeatable.",
)
@click.option(
    "--namespace",
    "-n",
    default=None,
    metavar="NS",
    help="Check that every segment belongs to NS (with --from: the namespace to verify).",
)
@archive_options
@click.option(
    "--replay",
    is_flag=True,
    help="The restore drill: restore into a scratch directory, serve it from a real server "
    "on a free loopback port, check what it serves, and report the RTO by phase.",
)
@click.option(
    "--scratch-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    metavar="DIR",
    help="Where --replay stages its restore and compressed inputs are "
    "decompressed (default: system temp dir; needs room for the snapshot).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def verify_cmd(
    snapshot: Path | None,
    wal_dirs: tuple[Path, ...],
    namespace: str | None,
    from_url: str | None,
    archive_endpoint: str | None,
    archive_path_style: bool,
    archive_key_file: Path | None,
    replay: bool,
    scratch_dir: Path | None,
    as_json: bool,
) -> None:
    """Check checksums, LMDB integrity, record CRCs, LSN gaps and overlaps.

    Exits 0 only if nothing is wrong. Every missing LSN range is named. With --replay the
    backup is actually restored (snapshot + every WAL record to the end of the contiguous
    chain) into a scratch directory, which proves it restorable and measures how long a
    restore takes.

    With --from s3://BUCKET/PREFIX --namespace NS: the newest complete snapshot of NS in the
    archive and every segment are downloaded (each object's key id, tags, SHA-256 checked)
    into a scratch directory and verified the same way.
    """
    if from_url is not None:
        if snapshot is not None or wal_dirs:
            raise click.UsageError("--from reads the archive: do not add --snapshot or --wal")
        if namespace is None:
            raise click.UsageError("--from needs --namespace NS")
        with _from_archive(
            from_url,
            archive_endpoint,
            archive_path_style,
            archive_key_file,
            namespace,
            scratch_dir,
            newest_snapshot_only=True,
            quiet=as_json,
        ) as staged:
            snap = staged.snapshots[0][0] if staged.snapshots else None
            report = _verify(snap, [staged.wal_dir], namespace, replay, scratch_dir)
            report.problems[:0] = staged.failed
            report.warnings += staged.incomplete
            if snap is None:
                report.problems.append(
                    f"no complete snapshot of namespace {namespace} in {staged.catalog.where}"
                )
            _relabel_report(report, staged.relabel)
    else:
        if snapshot is None and not wal_dirs:
            raise click.UsageError("give --snapshot FILE and/or --wal DIR, or --from s3://BUCKET/PREFIX")
        report = _verify(snapshot, list(wal_dirs), namespace, replay, scratch_dir)
    if as_json:
        emit_json(report.to_json())
    else:
        click.echo(render_verify(report))
    if not report.ok:
        raise BackupCorrupt(f"backup verification failed: {len(report.problems)} problem(s)")


def _verify(
    snapshot: Path | None, wal_dirs: list[Path], namespace: str | None, replay: bool, scratch_dir: Path | None
) -> VerifyReport:
    with sources.staging(scratch_dir):
        progress = for_terminal()
        if snapshot is not None:
            _stage_snapshot(snapshot)
        with progress:
            report, snap, _inv = verify_backup_set(snapshot, wal_dirs, namespace, progress)
        if snapshot is not None and report.snapshot is not None:
            _describe_stored(snapshot, report.snapshot)
        if replay:
            if snap is None:
                report.problems.append("--replay needs a sound --snapshot")
            elif report.ok:
                _replay(report, snap.path, wal_dirs, namespace, scratch_dir)
    return report


@contextmanager
def _from_archive(
    url: str,
    endpoint: str | None,
    path_style: bool,
    key_file: Path | None,
    namespace: str,
    scratch_dir: Path | None,
    *,
    newest_snapshot_only: bool,
    quiet: bool,
) -> Iterator[Staged]:
    """Download the namespace's objects into a scratch directory removed afterwards."""
    from unisondb.archive.fetch import fetch_catalog

    src = open_archive(url, endpoint, path_style, key_file)
    staging = Path(tempfile.mkdtemp(prefix="unisondb-archive-", dir=scratch_dir))
    try:
        yield fetch_catalog(
            src.store,
            src.url,
            namespace,
            staging,
            key=src.key,
            newest_snapshot_only=newest_snapshot_only,
            progress=for_terminal(enabled=not quiet),
        )
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def relabel(value: Any, fix: Callable[[str], str]) -> Any:
    """``value`` (JSON-like) with ``fix`` applied to every string in it."""
    if isinstance(value, str):
        return fix(value)
    if isinstance(value, dict):
        return {k: relabel(v, fix) for k, v in value.items()}
    if isinstance(value, list):
        return [relabel(v, fix) for v in value]
    return value


def _relabel_report(rep: VerifyReport, fix: Callable[[str], str]) -> None:
    """Name archive objects, not the scratch files they were decoded into."""
    rep.snapshot = relabel(rep.snapshot, fix)
    rep.segments = relabel(rep.segments, fix)
    rep.holes = relabel(rep.holes, fix)
    rep.overlaps = relabel(rep.overlaps, fix)
    rep.restorable = relabel(rep.restorable, fix)
    rep.problems = relabel(rep.problems, fix)
    rep.warnings = relabel(rep.warnings, fix)


def _stage_snapshot(snapshot: Path) -> None:
    """Decompress a compressed snapshot once, before verify reads it (hash, LMDB check).

    Errors are left for ``verify_backup_set``, which reads the same file and reports them.
    """
    try:
        if snapshot.is_file() and sources.classify(snapshot).kind is sources.Kind.SNAPSHOT:
            sources.materialize(snapshot)
    except UnisonDBError:
        pass


def _describe_stored(snapshot: Path, info: dict[str, object]) -> None:
    """For a compressed snapshot: plain size in ``bytes``, the file as stored in ``stored``."""
    try:
        codec = sources.stored_codec(snapshot)
        if codec == "none":
            return
        info["stored"] = {"compression": codec, "bytes": snapshot.stat().st_size}
        info["bytes"] = sources.plain_size(snapshot)
    except (UnisonDBError, OSError):
        pass


def _replay(
    report: VerifyReport,
    snapshot: Path,
    wal_dirs: list[Path],
    namespace: str | None,
    scratch_dir: Path | None,
) -> None:
    scratch = Path(tempfile.mkdtemp(prefix="unisondb-verify-", dir=scratch_dir))
    ns = namespace or "verify"
    try:
        try:
            outcome = restore(
                scratch,
                ns,
                snapshot,
                wal_dirs,
                progress=for_terminal(),
                check_namespace=namespace is not None,
            )
        except UnisonDBError as exc:
            report.problems.append(f"replay failed: {exc}")
            return
        s = outcome.summary
        assert s is not None
        # The drill proper: serve the restored namespace from a real server process and
        # check what it serves (drill.py), timing each phase of the recovery.
        keys, sample = sample_keys(scratch, ns)
        drill = run_drill(scratch, ns, s.end_lsn, s.proof.fingerprint.hex(), sample)
        report.problems += [f"drill: {p}" for p in drill.problems]
        rto = s.total_seconds + drill.start_seconds + drill.check_seconds
        report.replay = {
            "lsn": s.end_lsn,
            "time": format_ns(s.end_time_ns) if s.end_time_ns else None,
            "records": s.records_replayed,
            "walBytes": s.wal_bytes,
            "snapshotBytes": s.snapshot_bytes,
            "keys": keys,
            "history": s.history.hex(),
            "fingerprint": s.proof.fingerprint.hex(),
            "proof": {
                "endProven": s.proof.end_proven,
                "provenLsn": s.proof.proven_lsn,
                "segmentBoundariesChecked": s.proof.boundaries,
                "text": s.proof.describe(),
            },
            "server": drill.to_json(),
            "seconds": {
                "total": round(rto, 4),
                "verify": round(s.verify_seconds, 4),
                "copy": round(s.copy_seconds, 4),
                "replay": round(s.replay_seconds, 4),
                "publish": round(s.publish_seconds, 4),
                "serverStart": round(drill.start_seconds, 4),
                "serveChecks": round(drill.check_seconds, 4),
            },
            "recordsPerSecond": round(s.records_replayed / s.replay_seconds)
            if s.replay_seconds > 0 and s.records_replayed
            else None,
        }
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def render_verify(rep: VerifyReport) -> str:
    lines = []
    if rep.snapshot is not None:
        s = rep.snapshot
        if s.get("lmdb") == "ok":
            stored = s.get("stored")
            comp = (
                f" ({stored['compression']}, {format_bytes(int(stored['bytes']))} stored)"
                if isinstance(stored, dict)
                else ""
            )
            checked = f" ({s['checked']})" if s.get("checked") else ""
            lines.append(
                f"snapshot  {s['path']}: {format_bytes(int(str(s['bytes'])))}{comp}, "
                f"sha256 {s.get('sidecar')}{checked}, LMDB structure ok, LSN {s['lsn']} "
                f"({s['time']}), timeline {s['timeline']}, {s['keys']} keys"
            )
        else:
            lines.append(f"snapshot  {s['path']}: FAILED")
    if rep.segments:
        ok = sum(1 for s in rep.segments if s.get("crc") == "ok")
        lines.append(f"segments  {len(rep.segments)} file(s), {ok} with every record CRC ok")
        for seg in rep.segments:
            if seg.get("crc") != "ok" or seg.get("sidecar") == "mismatch":
                lines.append(
                    f"          {seg['path']}: crc {seg.get('crc')}, sha256 "
                    f"{seg.get('sidecar')}" + (f", {seg['damage']}" if seg.get("damage") else "")
                )
    for h in rep.holes:
        lines.append(f"hole      missing {h['text']}")
    if rep.restorable is not None:
        r = rep.restorable
        lines.append(
            f"restorable from LSN {r['fromLsn']} ({r['fromTime']}) to LSN {r['toLsn']} "
            f"({r['toTime']}) on timeline {r['toTimeline']}"
        )
    if rep.replay is not None:
        rp = rep.replay
        sec = rp["seconds"]
        assert isinstance(sec, dict)
        proof, srv = rp["proof"], rp["server"]
        assert isinstance(proof, dict) and isinstance(srv, dict)
        lines.append(
            f"replay    restored to LSN {rp['lsn']} ({rp['time']}): {rp['records']} records "
            f"replayed, {rp['keys']} keys, fingerprint {str(rp['fingerprint'])[:16]}"
        )
        lines.append(f"proof     {proof['text']}")
        lines.append(
            f"served    a real server on 127.0.0.1:{srv['port']} served LSN "
            f"{srv['servedLsn']} with fingerprint {str(srv['servedFingerprint'])[:16]}; "
            f"{srv['sampledKeys']} sampled keys read back, "
            f"{len(srv['mismatchedKeys'])} differ"
        )
        lines.append(
            f"          measured RTO {sec['total']:.2f} s (verify "
            f"{sec['verify']:.2f} s, copy {sec['copy']:.2f} s, replay "
            f"{sec['replay']:.2f} s, publish {sec['publish']:.2f} s, server start "
            f"{sec['serverStart']:.2f} s, checks {sec['serveChecks']:.2f} s)"
        )
    for w in rep.warnings:
        lines.append(f"warning   {w}")
    for p in rep.problems:
        lines.append(f"PROBLEM   {p}")
    lines.append("OK: the backup set is restorable" if rep.ok else f"FAILED: {len(rep.problems)} problem(s)")
    return "\n".join(lines)


# --- list ---


@backup_group.command("list")
@click.option(
    "--backup-dir",
    type=LocalPath(path_type=Path, file_okay=False, exists=True),
    default=None,
    metavar="DIR",
    help="A backup root, e.g. <data-dir>/backups/<ns> (searched recursively).",
)
@archive_options
@click.option("--namespace", "-n", default=None, metavar="NS", help="With --from: the namespace to list.")
@click.option(
    "--scratch-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    metavar="DIR",
    help="With --from: where the objects are decoded (default: system temp dir).",
)
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def list_cmd(
    backup_dir: Path | None,
    from_url: str | None,
    archive_endpoint: str | None,
    archive_path_style: bool,
    archive_key_file: Path | None,
    namespace: str | None,
    scratch_dir: Path | None,
    as_json: bool,
) -> None:
    """List snapshots and, per history, WAL coverage, holes and the restorable window.

    Reads headers, footers and each snapshot's checkpoint only; 'unisondb backup verify'
    checks contents. With --from s3://BUCKET/PREFIX --namespace NS: the archive's objects
    are downloaded and decoded (which checks each one) into a scratch directory first.
    """
    if (backup_dir is None) == (from_url is None):
        raise click.UsageError("give --backup-dir DIR or --from s3://BUCKET/PREFIX")
    if from_url is not None:
        if namespace is None:
            raise click.UsageError("--from needs --namespace NS")
        with _from_archive(
            from_url,
            archive_endpoint,
            archive_path_style,
            archive_key_file,
            namespace,
            scratch_dir,
            newest_snapshot_only=False,
            quiet=as_json,
        ) as staged:
            payload = _archive_listing(staged)
    else:
        assert backup_dir is not None
        payload = list_backups(backup_dir)
    if as_json:
        emit_json(payload)
    else:
        click.echo(render_list(payload))


def _archive_listing(staged: Staged) -> dict[str, Any]:
    """The local catalog of the staged objects, naming the objects, plus what only the archive has."""
    payload: dict[str, Any] = relabel(list_backups(staged.wal_dir.parent), staged.relabel)
    created = {staged.object_of[p]: m for p, m in staged.snapshots}
    for snap in payload["snapshots"]:
        manifest = created.get(snap["path"])
        if manifest is not None:
            snap["manifest"] = {
                "createdAt": format_ns(int(manifest.created_at * 1e9)),
                "writer": manifest.writer_id,
            }
    payload["backupDir"] = staged.catalog.where
    payload["problems"][:0] = staged.failed
    payload["archive"] = {
        "url": str(staged.catalog.url),
        "namespace": staged.catalog.namespace,
        "objects": len(staged.catalog.objects),
        "storedBytes": staged.stored_bytes,
        "plainBytes": staged.plain_bytes,
        "downloadSeconds": round(staged.seconds, 3),
        "unfinishedSnapshots": staged.incomplete,
    }
    return payload


def render_list(payload: dict[str, Any]) -> str:
    lines = [f"Backups in {payload['backupDir']}", "", "Snapshots:"]
    if not payload["snapshots"]:
        lines.append("  (none)")
    for s in payload["snapshots"]:
        if "error" in s:
            lines.append(f"  {s['path']}  ERROR: {s['error']}")
            continue
        r = s["restorableTo"]
        comp = f" ({s['compression']}, {format_bytes(s['plainBytes'])} plain)" if "compression" in s else ""
        lines.append(
            f"  {s['path']}  {format_bytes(s['bytes'])}{comp}  LSN {s['lsn']}  "
            f"{s['time'] or '-'}  timeline {s['timeline']}" + ("" if s["sidecar"] else "  (no .sha256)")
        )
        lines.append(
            f"      restorable to LSN {r['lsn']} ({r['time'] or '-'}) on timeline "
            f"{r['timeline']}" + (f"; then missing {'; '.join(r['holesAfter'])}" if r["holesAfter"] else "")
        )
    for c in payload["compressed"]:
        lines.append(
            f"  {c['path']}  {format_bytes(c['bytes'])}  {c['format']}-compressed, "
            + (f"ERROR: {c['error']}" if "error" in c else "not a snapshot or segment (ignored)")
        )
    if payload["encrypted"]:
        lines += ["", "Encrypted (not inspected):"]
    for e in payload["encrypted"]:
        lines.append(f"  {e['path']}  {format_bytes(e['bytes'])}  ({e['hint']})")
    lines += ["", "Histories (what you can restore to):"]
    if not payload["wal"]["histories"] and not payload["wal"]["empty"]:
        lines.append("  (none)")
    for t in payload["wal"]["histories"]:
        origin = (
            f"forked from {t['parent'][:12]} after LSN {t['forkLsn']}"
            if t["parent"]
            else "from an empty namespace"
        )
        lines.append(f"  history {t['history'][:12]} (timeline {t['timeline']}), {origin}")
        if t["segments"]:
            lines.append(
                f"      WAL: LSN {t['earliestLsn']}..{t['latestLsn']}  "
                f"{t['earliestTime']} .. {t['latestTime']}  {t['segments']} segment(s) "
                f"{t['firstSegmentId']:09d}..{t['lastSegmentId']:09d}, "
                f"{t['records']} records, {t['fingerprints']} recorded fingerprint(s)"
            )
        else:
            lines.append("      WAL: (no segments)")
        w = t["window"]
        if w is None:
            lines.append("      restorable: nothing (no snapshot reaches this history)")
        else:
            lines.append(
                f"      restorable: LSN {w['earliestLsn']}..{w['latestLsn']}  "
                f"({w['earliestTime'] or '-'} .. {w['latestTime'] or '-'})"
            )
            for anchor in w["anchors"]:
                lines.append(
                    f"        from {Path(anchor['snapshot']).name} (LSN "
                    f"{anchor['fromLsn']}): LSN {anchor['fromLsn']}..{anchor['toLsn']}"
                )
        for h in t["holes"]:
            lines.append(f"      hole: missing {h['text']}")
    for e in payload["wal"]["empty"]:
        lines.append(
            f"  {Path(e['path']).name}  timeline {e['timeline']}: LSN "
            f"{format_lsn_range(e['firstLsn'], e['firstLsn'] - 1)}, no records"
        )
    archive = payload.get("archive")
    if archive is not None:
        lines += [
            "",
            f"Archive: {archive['objects']} object(s), {format_bytes(archive['storedBytes'])} stored, "
            f"{format_bytes(archive['plainBytes'])} decoded and checked in "
            f"{archive['downloadSeconds']:.2f} s",
        ]
        for u in archive["unfinishedSnapshots"]:
            lines.append(f"  skipped {u}")
    for p in payload["problems"]:
        lines.append(f"PROBLEM {p}")
    return "\n".join(lines)
