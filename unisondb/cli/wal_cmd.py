"""``unisondb wal list|inspect``: read-only views of WAL segment files.

Safe on a live server's ``wal/`` directory and on backups: every file is opened
``O_RDONLY``; nothing is created, truncated, sealed or locked (upstream's equivalent
rewrites segments when it opens them). A torn or damaged tail is reported, not repaired.
Segments may be plain, ``.wal.gz``, ``.wal.zst`` or members of ``wal-*.tar.gz`` archives in
the directory (read through ``restore/sources.py``; byte counts are of the plain segment).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from unisondb.cli.paths import LocalPath
from unisondb.cli.restore import emit_json
from unisondb.errors import CorruptLog, NotFound, UnisonDBError
from unisondb.restore import sources
from unisondb.restore.errors import BackupMismatch
from unisondb.restore.timefmt import format_bytes, format_ns
from unisondb.storage import record, segment


@click.group("wal")
def wal_group() -> None:
    """Inspect WAL segments (read-only; safe while the server runs)."""


def _segment_files(wal_dir: Path) -> tuple[list[tuple[int, Path]], list[tuple[Path, str]]]:
    """(segment id by name, origin) of every segment input directly in ``wal_dir`` (archives
    included), in id order; and the inputs that cannot be read at all."""
    if not wal_dir.is_dir():
        raise NotFound(f"WAL directory not found: {wal_dir}")
    found = sources.find_segments(wal_dir, recursive=False)
    files = []
    for p in found.segments:
        seg_id = sources.classify_name(p.name).segment_id
        assert seg_id is not None
        files.append((seg_id, p))
    return sorted(files, key=lambda t: (t[0], str(t[1]))), found.unreadable


def _unreadable_row(path: Path, reason: str) -> dict[str, Any]:
    return {
        "path": str(path),
        "file": path.name,
        "status": "unreadable",
        "crc": "unreadable",
        "error": reason,
    }


def describe_segment(
    path: Path, *, is_last: bool, with_records: bool = False, namespace: str | None = None
) -> dict[str, Any]:
    """Everything about one segment file, from one read-only pass over its bytes."""
    out: dict[str, Any] = {"path": str(path), "file": path.name}
    try:
        codec = sources.stored_codec(path)
        if codec != "none":
            out["compression"] = codec
        data = sources.read_segment(path)
    except UnisonDBError as exc:
        return {**out, "status": "unreadable", "crc": "unreadable", "error": str(exc)}
    out["bytes"] = len(data)
    try:
        header = segment.decode_header(data, path)
    except CorruptLog as exc:
        return {**out, "status": "unknown", "crc": "bad header", "error": exc.message}
    out.update(
        {
            "segmentId": header.segment_id,
            "timeline": header.timeline,
            "firstLsn": header.first_lsn,
            "created": format_ns(header.created_ns),
            "nsCrc": f"{header.ns_crc:08x}",
        }
    )
    if namespace is not None:
        out["namespaceMatches"] = header.ns_crc == segment.namespace_crc(namespace)
    footer = segment.try_decode_footer(data)
    # Only a plain file in a live wal/ directory can be the active segment.
    is_last = is_last and codec == "none" and sources.local(path) == path
    out["status"] = "sealed" if footer else ("active" if is_last else "unsealed")
    try:
        scan = segment.scan(path, data)
    except CorruptLog as exc:
        out.update({"crc": "damaged", "error": exc.message})
        return out
    recs = scan.records
    out.update(
        {
            "lastLsn": scan.last_lsn,
            "records": len(recs),
            "minTime": format_ns(min(r.time_ns for r, _s, _e in recs)) if recs else None,
            "maxTime": format_ns(max(r.time_ns for r, _s, _e in recs)) if recs else None,
            "dataEnd": scan.data_end,
            "lastRecordOffset": recs[-1][1] if recs else None,
        }
    )
    if footer is not None:
        out["footer"] = {
            "lastLsn": footer.last_lsn,
            "records": footer.count,
            "minTime": format_ns(footer.min_time_ns) if footer.count else None,
            "maxTime": format_ns(footer.max_time_ns) if footer.count else None,
        }
    if scan.tail_error is None:
        out["crc"] = "ok"
    elif scan.tail_is_midlog or not is_last:
        out.update(
            {
                "crc": "damaged",
                "error": f"{scan.tail_error} (valid records follow or a "
                "newer segment exists: not a torn tail)",
            }
        )
    else:
        out.update(
            {"crc": "torn tail", "error": f"{scan.tail_error}; the server cuts this on its next start"}
        )
    if with_records:
        out["recordList"] = [
            {
                "lsn": r.lsn,
                "time": format_ns(r.time_ns),
                "offset": start,
                "bytes": end - start,
                "entries": len(r.entries),
                "puts": sum(1 for e in r.entries if e.kind == record.EntryKind.PUT),
                "deletes": sum(1 for e in r.entries if e.kind == record.EntryKind.DELETE),
                "firstKey": r.entries[0].key.decode("utf-8", "backslashreplace") if r.entries else None,
            }
            for r, start, end in recs
        ]
    return out


def _refuse_foreign(rows: list[dict[str, Any]], namespace: str | None) -> None:
    """After the listing: ``-n NS`` is a check, so a segment of another namespace fails it
    (exit 5, the same error restore gives for such a segment)."""
    foreign = [r["file"] for r in rows if r.get("namespaceMatches") is False]
    if namespace is None or not foreign:
        return
    more = f" (and {len(foreign) - 3} more)" if len(foreign) > 3 else ""
    raise BackupMismatch(
        f"WAL segments from another namespace (not {namespace!r}): {', '.join(foreign[:3])}{more}",
        hint="every segment header records its namespace; check -n, or keep only this "
        "namespace's segments in the directory",
    )


@wal_group.command("list")
@click.option(
    "--wal-dir",
    type=LocalPath(path_type=Path, file_okay=False),
    required=True,
    metavar="DIR",
    help="A WAL directory (<data-dir>/<ns>/wal or a backup dir).",
)
@click.option("--namespace", "-n", default=None, metavar="NS", help="Also check each segment's namespace.")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def list_cmd(wal_dir: Path, namespace: str | None, as_json: bool) -> None:
    """One line per segment: id, timeline, LSN and time range, records, status, CRC."""
    with sources.staging():
        files, unreadable = _segment_files(wal_dir)
        rows = [
            describe_segment(p, is_last=i == len(files) - 1, namespace=namespace)
            for i, (_id, p) in enumerate(files)
        ]
    rows += [_unreadable_row(p, reason) for p, reason in unreadable]
    if as_json:
        emit_json(rows)
        _refuse_foreign(rows, namespace)
        return
    click.echo(
        f"{'ID':>9}  {'TL':>3}  {'STATUS':<8}  {'FIRST_LSN':>10}  {'LAST_LSN':>10}  "
        f"{'RECORDS':>8}  {'MIN_TIME':<30}  {'MAX_TIME':<30}  {'SIZE':>10}  CRC"
    )
    for r in rows:
        click.echo(
            f"{r.get('segmentId', 0):>09}  {r.get('timeline', '-'):>3}  {r['status']:<8}  "
            f"{r.get('firstLsn', '-'):>10}  {_last_lsn_cell(r):>10}  "
            f"{r.get('records', '-'):>8}  {r.get('minTime') or '-':<30}  "
            f"{r.get('maxTime') or '-':<30}  {format_bytes(r.get('bytes', 0)):>10}  "
            f"{r['crc']}"
            + (f" ({r['error']})" if r.get("error") else "")
            + ("  OTHER NAMESPACE" if r.get("namespaceMatches") is False else "")
        )
    _refuse_foreign(rows, namespace)


@wal_group.command("inspect")
@click.option(
    "--wal-dir",
    type=LocalPath(path_type=Path, file_okay=False),
    required=True,
    metavar="DIR",
    help="A WAL directory.",
)
@click.option(
    "--segment-id", "-s", type=int, default=None, metavar="N", help="Only this segment (default: all)."
)
@click.option("--records", "with_records", is_flag=True, help="List every record.")
@click.option("--namespace", "-n", default=None, metavar="NS", help="Also check the segment's namespace.")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def inspect_cmd(
    wal_dir: Path, segment_id: int | None, with_records: bool, namespace: str | None, as_json: bool
) -> None:
    """Header, footer, CRC status, last good record and (with --records) every record."""
    with sources.staging():
        files, unreadable = _segment_files(wal_dir)
        chosen = [(i, p) for i, (sid, p) in enumerate(files) if segment_id is None or sid == segment_id]
        if segment_id is not None and not chosen:
            if unreadable:
                p, reason = unreadable[0]
                raise NotFound(f"segment {segment_id} not found in {wal_dir}; {p} cannot be read: {reason}")
            raise NotFound(f"segment {segment_id} not found in {wal_dir}")
        rows = [
            describe_segment(p, is_last=i == len(files) - 1, with_records=with_records, namespace=namespace)
            for i, p in chosen
        ]
    if segment_id is None:
        rows += [_unreadable_row(p, reason) for p, reason in unreadable]
    if as_json:
        emit_json(rows[0] if segment_id is not None else rows)
        _refuse_foreign(rows, namespace)
        return
    for r in rows:
        click.echo(f"segment {r['file']}  ({r['path']})")
        for key in (
            "status",
            "crc",
            "error",
            "compression",
            "segmentId",
            "timeline",
            "firstLsn",
            "lastLsn",
            "records",
            "minTime",
            "maxTime",
            "created",
            "nsCrc",
            "namespaceMatches",
            "bytes",
            "dataEnd",
            "lastRecordOffset",
        ):
            if key in r and r[key] is not None:
                click.echo(f"  {key:<17} {_text_value(r, key, namespace)}")
        if "footer" in r:
            f = r["footer"]
            click.echo(
                f"  {'footer':<17} "
                + (
                    "no records (empty segment)"
                    if not f["records"]
                    else f"last LSN {f['lastLsn']}, {f['records']} records, {f['minTime']} .. {f['maxTime']}"
                )
            )
        for rec in r.get("recordList", []):
            click.echo(
                f"    LSN {rec['lsn']:>10}  {rec['time']}  offset {rec['offset']:>9}  "
                f"{rec['bytes']:>7} B  {rec['puts']} put / {rec['deletes']} delete  "
                f"{rec['firstKey']}"
            )
        click.echo("")
    _refuse_foreign(rows, namespace)


def _last_lsn_cell(row: dict[str, Any]) -> object:
    # An empty segment stores last = first - 1; "402  401" reads as a backwards range.
    return "(empty)" if row.get("records") == 0 else row.get("lastLsn", "-")


def _text_value(row: dict[str, Any], key: str, namespace: str | None) -> object:
    if key == "namespaceMatches":
        return f"yes ({namespace})" if row[key] else f"NO: written by another namespace, not {namespace!r}"
    if key == "lastLsn":
        return _last_lsn_cell(row)
    return row[key]
