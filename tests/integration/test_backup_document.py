"""The Backup and Restore document's backup commands, run verbatim with bash + curl + jq.

Each snippet below is copied character for character from the document. ``adapt`` changes
only what cannot be the same on a test machine, and nothing else:

* ``http://localhost:8080`` → the test server's URL;
* ``/var/unison/data`` → the server's data dir; ``/var/backups``, ``/var/lib/unison`` and
  ``/var/log`` → a scratch state dir;
* ``aws s3 cp`` commands are removed (a line continued into one loses its trailing ``\\``);
* the systemd script's "only at midnight" test is forced true so its snapshot branch runs.

The servers run with ``--wal-segment-size 64KiB`` so a few hundred KiB of writes seal
several segments between runs of the loops.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import httpx
from test_backup_helpers import (
    NS,
    Server,
    backup_root,
    fill_segments,
    immutable,
    read_snapshot,
    sha256sum_check,
    tmp_files,
)

SMALL_SEGMENTS = ["--wal-segment-size", "64KiB"]

# --- "Backup APIs" ---

DOC_WAL_EXAMPLE = """\
curl -X POST http://localhost:8080/api/v1/users/wal/backup \\
  -H "Content-Type: application/json" \\
  -d '{
    "afterSegmentId": 100,
    "backupDir": "wal/daily"
  }'
"""

DOC_BTREE_EXAMPLE = """\
curl -X POST http://localhost:8080/api/v1/users/btree/backup \\
  -H "Content-Type: application/json" \\
  -d '{
    "path": "snapshots/users-'$(date +%Y%m%d)'.snapshot"
  }'
"""

# --- "Backup Strategies" ---

DOC_FULL_BACKUP = """\
# Daily full snapshot
curl -X POST http://localhost:8080/api/v1/users/btree/backup \\
  -H "Content-Type: application/json" \\
  -d '{"path": "daily/snapshot-'$(date +%Y%m%d)'.db"}'
"""

DOC_DAILY_BASELINE = """\
# Full B-Tree snapshot
curl -X POST http://localhost:8080/api/v1/users/btree/backup \\
  -d '{"path": "weekly/snapshot-'$(date +%Y%m%d)'.db"}'
"""

DOC_HOURLY = """\
# Every hour: Copy new WAL segments
LAST_SEGMENT=$(cat /var/backups/last_wal_id.txt || echo 0)

curl -X POST http://localhost:8080/api/v1/users/wal/backup \\
  -d "{\\"afterSegmentId\\": $LAST_SEGMENT, \\"backupDir\\": \\"wal/$(date +%Y%m%d-%H)\\"}" \\
  | jq -r '.backups[-1].segmentId' > /var/backups/last_wal_id.txt
"""

DOC_CONTINUOUS = """\
#!/bin/bash
# /usr/local/bin/unison-wal-archive.sh

NAMESPACE="users"
STATE_FILE="/var/lib/unison/wal-archive-state.json"

# Read last archived segment
LAST_SEGMENT=$(jq -r '.lastSegmentId // 0' "$STATE_FILE" 2>/dev/null || echo 0)

# Backup new segments
RESPONSE=$(curl -s -X POST http://localhost:8080/api/v1/$NAMESPACE/wal/backup \\
  -H "Content-Type: application/json" \\
  -d "{\\"afterSegmentId\\": $LAST_SEGMENT, \\"backupDir\\": \\"wal/archive\\"}")

# Extract latest segment ID
NEW_LAST=$(echo "$RESPONSE" | jq -r '.backups[-1].segmentId // 0')

if [ "$NEW_LAST" != "0" ]; then
  # Update state
  echo "{\\"lastSegmentId\\": $NEW_LAST, \\"timestamp\\": \\"$(date -Iseconds)\\"}" > "$STATE_FILE"

  # Compress and upload to S3
  find /var/unison/data/backups/$NAMESPACE/wal/archive -name "*.wal" \\
    -mmin -15 -exec gzip {} \\; \\
    -exec aws s3 cp {}.gz s3://backups/unison/$NAMESPACE/wal/ \\;
fi
"""

# --- "Backup Automation" ---

DOC_SYSTEMD_SCRIPT = """\
#!/bin/bash
set -euo pipefail

NAMESPACE="users"
BACKUP_ROOT="/var/unison/data/backups/$NAMESPACE"
DATE=$(date +%Y%m%d-%H%M)

# 1. B-Tree snapshot (daily at midnight)
if [ "$(date +%H%M)" = "0000" ]; then
  echo "Creating B-Tree snapshot..."
  curl -X POST http://localhost:8080/api/v1/$NAMESPACE/btree/backup \\
    -H "Content-Type: application/json" \\
    -d "{\\"path\\": \\"snapshots/btree-$DATE.db\\"}"

  # Compress snapshot
  zstd -q --rm "$BACKUP_ROOT/snapshots/btree-$DATE.db"

  # Upload to S3
  aws s3 cp "$BACKUP_ROOT/snapshots/btree-$DATE.db.zst" \\
    s3://backups/unison/$NAMESPACE/snapshots/
fi

# 2. WAL incremental (every run)
echo "Backing up WAL segments..."
STATE_FILE="/var/lib/unison/wal-state-$NAMESPACE.json"
LAST_SEGMENT=$(jq -r '.lastSegmentId // 0' "$STATE_FILE" 2>/dev/null || echo 0)

RESPONSE=$(curl -s -X POST http://localhost:8080/api/v1/$NAMESPACE/wal/backup \\
  -H "Content-Type: application/json" \\
  -d "{\\"afterSegmentId\\": $LAST_SEGMENT, \\"backupDir\\": \\"wal/$DATE\\"}")

# Update state
NEW_LAST=$(echo "$RESPONSE" | jq -r '.backups[-1].segmentId // 0')
if [ "$NEW_LAST" != "0" ]; then
  echo "{\\"lastSegmentId\\": $NEW_LAST, \\"timestamp\\": \\"$(date -Iseconds)\\"}" > "$STATE_FILE"

  # Compress and upload WAL segments
  tar -czf "$BACKUP_ROOT/wal-$DATE.tar.gz" -C "$BACKUP_ROOT" "wal/$DATE"
  aws s3 cp "$BACKUP_ROOT/wal-$DATE.tar.gz" s3://backups/unison/$NAMESPACE/wal/

  # Cleanup local WAL backups older than 7 days
  find "$BACKUP_ROOT/wal" -type d -mtime +7 -exec rm -rf {} +
fi

echo "Backup completed successfully"
"""

# --- "Best Practices" → Security → Audit logging ---

DOC_AUDIT = """\
# Log all backup API calls
curl -X POST http://localhost:8080/api/v1/users/wal/backup \\
  -d '{"backupDir": "wal/archive"}' \\
  | tee -a /var/log/unison-backups.log
"""

# --- "Monitoring" ---

DOC_MONITORING = """\
# Backup success rate
curl http://localhost:8080/metrics | grep backup_success_total

# Last backup timestamp
curl http://localhost:8080/metrics | grep backup_last_timestamp_seconds

# Backup size
curl http://localhost:8080/metrics | grep backup_bytes_total
"""

# --- "Troubleshooting" ---

DOC_PERMISSION_SYMPTOM = '{"error": "permission denied: /var/unison/data/backups/users/wal"}'
DOC_CLEANUP = """\
# Clean up old local backups
find /var/unison/data/backups -type f -mtime +7 -delete
"""

Run = Callable[[str], subprocess.CompletedProcess[str]]


def adapt(script: str, url: str, data_dir: Path, state_dir: Path) -> str:
    """The substitutions listed in the module docstring, and nothing else."""
    s = (
        script.replace("http://localhost:8080", url)
        .replace("/var/unison/data", str(data_dir))
        .replace("/var/backups", str(state_dir))
        .replace("/var/lib/unison", str(state_dir))
        .replace("/var/log", str(state_dir))
        .replace('"$(date +%H%M)" = "0000"', '"0000" = "0000"')
    )
    out: list[str] = []
    skipping = False
    for line in s.split("\n"):
        if skipping:
            skipping = line.rstrip().endswith("\\")
            continue
        stripped = line.lstrip()
        if stripped.startswith("aws s3 cp") or stripped.startswith("-exec aws s3 cp"):
            skipping = line.rstrip().endswith("\\")
            if out and out[-1].rstrip().endswith("\\"):
                out[-1] = out[-1].rstrip()[:-1].rstrip()
            continue
        out.append(line)
    return "\n".join(out)


def runner(srv: Server, state_dir: Path) -> Run:
    state_dir.mkdir(exist_ok=True)

    def run(script: str) -> subprocess.CompletedProcess[str]:
        text = adapt(script, srv.url, srv.data_dir, state_dir)
        assert "aws " not in text and "localhost:8080" not in text
        return subprocess.run(
            ["bash", "-c", text],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "LC_ALL": "C"},
        )

    return run


def test_adapt_only_drops_aws_and_substitutes(tmp_path: Path) -> None:
    text = adapt(DOC_CONTINUOUS, "http://127.0.0.1:1", Path("/d"), Path("/s"))
    assert "-mmin -15 -exec gzip {} \\;\nfi" in text
    assert 'STATE_FILE="/s/wal-archive-state.json"' in text
    text = adapt(DOC_SYSTEMD_SCRIPT, "http://127.0.0.1:1", Path("/d"), Path("/s"))
    assert "s3://" not in text and 'zstd -q --rm "$BACKUP_ROOT/snapshots/btree-$DATE.db"' in text
    assert 'tar -czf "$BACKUP_ROOT/wal-$DATE.tar.gz"' in text


def all_backed_up_ids(root: Path) -> dict[int, list[Path]]:
    found: dict[int, list[Path]] = {}
    for p in root.rglob("*.wal"):
        found.setdefault(int(p.name.split(".")[0]), []).append(p)
    return found


def sealed_ids(srv: Server) -> list[int]:
    wal = srv.data_dir / NS / "wal"
    ids = sorted(int(p.name[:9]) for p in wal.glob("*.wal"))
    return ids[:-1]  # the newest one is the active segment


def test_api_examples_and_strategies(server_factory: Callable[..., Server], tmp_path: Path) -> None:
    srv = server_factory(tmp_path / "data", "default", "users", extra_args=SMALL_SEGMENTS)
    run = runner(srv, tmp_path / "state")
    root = backup_root(srv.data_dir)
    with srv.client() as c:
        fill_segments(c, 200_000, "a")

    # WAL example: afterSegmentId 100 is past every segment this server has → nothing new.
    r = run(DOC_WAL_EXAMPLE)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"backups": []}

    # Snapshot example, the full-backup workflow and the daily baseline (no Content-Type).
    for script, rel in (
        (DOC_BTREE_EXAMPLE, "snapshots/users-{d}.snapshot"),
        (DOC_FULL_BACKUP, "daily/snapshot-{d}.db"),
        (DOC_DAILY_BASELINE, "weekly/snapshot-{d}.db"),
    ):
        r = run(script)
        assert r.returncode == 0, r.stderr
        resp = json.loads(r.stdout)
        date = subprocess.run(["date", "+%Y%m%d"], capture_output=True, text=True).stdout.strip()
        expected = root / rel.format(d=date)
        assert resp["path"] == str(expected)
        assert resp["bytes"] == expected.stat().st_size > 0
        sha256sum_check(expected.parent)
        data, cp = read_snapshot(expected)
        assert cp.applied_lsn == resp["lsn"] and len(data) > 0
    assert tmp_files(root) == []


def test_hourly_incremental_loop(server_factory: Callable[..., Server], tmp_path: Path) -> None:
    """Three hourly runs with writes in between: every segment exactly once, no gap."""
    srv = server_factory(tmp_path / "data", "default", "users", extra_args=SMALL_SEGMENTS)
    state = tmp_path / "state"
    run = runner(srv, state)
    root = backup_root(srv.data_dir)
    previous = 0
    with srv.client() as c:
        for round_no in range(3):
            fill_segments(c, 200_000, f"h{round_no}")
            r = run(DOC_HOURLY)
            assert r.returncode == 0, r.stderr
            sealed = sealed_ids(srv)
            last = int((state / "last_wal_id.txt").read_text())
            assert last == sealed[-1] > previous, (last, sealed, previous)
            copies = all_backed_up_ids(root)
            assert sorted(copies) == sealed  # everything sealed so far, no gap
            assert all(len(paths) == 1 for paths in copies.values())  # each exactly once
            previous = last
        for d in {p.parent for paths in all_backed_up_ids(root).values() for p in paths}:
            sha256sum_check(d)

        # A run with nothing new: the document's jq writes "null" into the state file ...
        r = run(DOC_HOURLY)
        assert r.returncode == 0, r.stderr
        assert (state / "last_wal_id.txt").read_text().strip() == "null"
        # ... and the next run sends {"afterSegmentId": null}, which means "from the start".
        fill_segments(c, 100_000, "h3")
        r = run(DOC_HOURLY)
        assert r.returncode == 0, r.stderr
        assert int((state / "last_wal_id.txt").read_text()) == sealed_ids(srv)[-1]
    assert tmp_files(root) == []


def test_continuous_archival_systemd_audit_monitoring(
    server_factory: Callable[..., Server], tmp_path: Path
) -> None:
    srv = server_factory(tmp_path / "data", "default", "users", extra_args=SMALL_SEGMENTS)
    state = tmp_path / "state"
    run = runner(srv, state)
    root = backup_root(srv.data_dir)
    archive = root / "wal" / "archive"
    with srv.client() as c:
        for round_no in range(2):
            fill_segments(c, 150_000, f"c{round_no}")
            r = run(DOC_CONTINUOUS)
            assert r.returncode == 0, r.stderr
            st = json.loads((state / "wal-archive-state.json").read_text())
            assert st["lastSegmentId"] == sealed_ids(srv)[-1]
        # The script gzips what it archived; every sealed segment is there exactly once.
        gz = sorted(int(p.name[:9]) for p in archive.glob("*.wal.gz"))
        assert gz == sealed_ids(srv) and not list(archive.glob("*.wal"))
        for p in archive.glob("*.wal.gz"):
            raw = subprocess.run(["gzip", "-dc", str(p)], capture_output=True, check=True).stdout
            assert raw == (srv.data_dir / NS / "wal" / p.name[:-3]).read_bytes()

        # Backup Automation: the systemd unit's script, snapshot branch forced.
        fill_segments(c, 100_000, "s")
        r = run(DOC_SYSTEMD_SCRIPT)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "Backup completed successfully" in r.stdout
        zst = list((root / "snapshots").glob("btree-*.db.zst"))
        assert len(zst) == 1
        restored = tmp_path / "restored.db"
        subprocess.run(["zstd", "-q", "-d", str(zst[0]), "-o", str(restored)], check=True)
        sidecar = zst[0].with_name(zst[0].name[:-4] + ".sha256")
        want = sidecar.read_text().split()[0]
        got = subprocess.run(
            ["sha256sum", str(restored)], capture_output=True, text=True, check=True
        ).stdout.split()[0]
        assert got == want  # the sidecar still verifies the decompressed snapshot
        assert list(root.glob("wal-*.tar.gz"))
        st = json.loads((state / "wal-state-users.json").read_text())
        assert st["lastSegmentId"] == sealed_ids(srv)[-1]

        # Audit logging: the response is appended to the log file.
        r = run(DOC_AUDIT)
        assert r.returncode == 0, r.stderr
        logged = (state / "unison-backups.log").read_text()
        assert [b["segmentId"] for b in json.loads(logged)["backups"]] == sealed_ids(srv)

        # Monitoring: every grep finds a sample line, not only # HELP / # TYPE.
        r = run(DOC_MONITORING)
        assert r.returncode == 0, r.stderr
        lines = [ln for ln in r.stdout.splitlines() if not ln.startswith("#")]
        for name in ("backup_success_total", "backup_last_timestamp_seconds", "backup_bytes_total"):
            assert any(ln.startswith(f"unisondb_{name}{{") for ln in lines), (name, r.stdout)
    assert tmp_files(root) == []


def test_troubleshooting_permission_denied(server_factory: Callable[..., Server], tmp_path: Path) -> None:
    """The document's "Permission Denied" symptom, produced for real, then fixed."""
    srv = server_factory(tmp_path / "data", "default", "users", extra_args=SMALL_SEGMENTS)
    run = runner(srv, tmp_path / "state")
    root = backup_root(srv.data_dir)
    (root / "wal").mkdir(parents=True)
    with srv.client() as c:
        fill_segments(c, 100_000, "p")
        with immutable(root / "wal"):
            r = run(DOC_AUDIT)  # backupDir wal/archive: needs a new directory inside wal/
            assert r.returncode == 0, r.stderr
            expected = json.loads(adapt(DOC_PERMISSION_SYMPTOM, srv.url, srv.data_dir, tmp_path))
            assert json.loads(r.stdout) == expected
            assert c.get("/health").status_code == 200  # the server keeps serving
        # The fix (the document uses chown/chmod; here the obstacle was chattr +i).
        r = run(DOC_AUDIT)
        assert r.returncode == 0 and json.loads(r.stdout)["backups"], r.stdout
        r = run(DOC_CLEANUP)  # nothing is older than 7 days: it must delete nothing
        assert r.returncode == 0, r.stderr
        assert list((root / "wal" / "archive").glob("*.wal"))
        assert httpx.get(srv.url + "/health").status_code == 200
    assert tmp_files(root) == []
