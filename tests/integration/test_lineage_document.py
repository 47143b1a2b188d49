"""Issue 8, findings 1 and 5, end to end: the document's commands (bash + curl + jq) against
real servers, then ``unisondb backup verify|list`` and ``unisondb restore`` over what they made.

Finding 1 — the exact splice sequence: LSN 1–150, snapshot ``s1``, 151–250, WAL backups with
``rotate`` into ``wal/archive``; the document's *Full Restore* after total loss (``rm -rf
<data>/users``, snapshot copied to ``users/db/data.mdb``); 151–230 written again with other
values; the document's continuous-archival loop run with its old state file. The server must
fork a new history by itself, the loop must capture the new segments without overwriting any
backup file, and the tools must never combine records of the two histories.

Finding 5 — two servers that each serve a namespace ``users``: A's snapshot and segments 1–2
mixed with B's segments 3–5 in one directory must never restore B's values.

The state fingerprint: a restore that ends at a segment boundary proves its end state, and the
restored server shows the same fingerprint as the original showed at that LSN.

Writes are curl loops in bash too (one PUT = one LSN), so the LSNs are the ones the finding
names. The continuous-archival script is the document's text (from test_backup_document),
with only its paths/URL substituted and its compress-and-upload tail left off (gzip would
replace the archived ``.wal`` files that the restore below reads; compressed inputs are a
separate finding).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from serverproc import ServerProcess, start_server
from test_backup_document import DOC_CONTINUOUS, adapt

from unisondb.storage import segment
from unisondb.storage.layout import segment_name

NS = "users"
OLD, NEW = "old", "new"

# The document's continuous-archival script up to and including its state update.
_CUT = "\n  # Compress and upload to S3\n"
assert _CUT in DOC_CONTINUOUS
DOC_ARCHIVE_LOOP = DOC_CONTINUOUS.split(_CUT)[0] + "\nfi\n"


def bash(script: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "LC_ALL": "C", **env},
    )


def cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "unisondb", *map(str, args)], capture_output=True, text=True, timeout=120
    )


def write(url: str, first: int, last: int, value: str) -> None:
    """``k$i=value`` for i in first..last, one PUT (one LSN) each, in key order.

    One curl process over one connection (a curl config of ``next``-separated transfers):
    a curl per key costs ~60 ms on a loaded 2-core machine."""
    r = bash(
        'V=$(printf %s "$VAL" | base64)\n'
        'for i in $(seq "$FIRST" "$LAST"); do\n'
        '  [ "$i" = "$FIRST" ] || echo next\n'
        '  printf \'url = "%s/api/v1/users/kv/k%s"\\nrequest = "PUT"\\n\' "$URL" "$i"\n'
        "  printf 'header = \"Content-Type: application/json\"\\n'\n"
        '  printf \'data = "{\\\\"value\\\\": \\\\"%s\\\\"}"\\n\' "$V"\n'
        '  printf \'output = "/dev/null"\\nwrite-out = "%%{http_code}\\\\n"\\n\'\n'
        "done | curl -s -K -",
        URL=url,
        FIRST=str(first),
        LAST=str(last),
        VAL=value,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["200"] * (last - first + 1), r.stdout


def curl_json(url: str, method: str = "GET", body: str | None = None) -> tuple[int, Any]:
    args = ["curl", "-s", "-o", "/dev/stdout", "-w", "\n%{http_code}", "-X", method, url]
    if body is not None:
        args += ["-H", "Content-Type: application/json", "-d", body]
    r = subprocess.run(args, capture_output=True, text=True, timeout=60)
    text, _nl, code = r.stdout.rpartition("\n")
    return int(code), json.loads(text) if text.strip() else None


def stats(srv: ServerProcess) -> dict[str, Any]:
    code, body = curl_json(f"{srv.url}/api/v1/{NS}/stats")
    assert code == 200, body
    assert isinstance(body, dict)
    return body


def wal_backup(srv: ServerProcess, body: dict[str, Any]) -> tuple[int, Any]:
    return curl_json(f"{srv.url}/api/v1/{NS}/wal/backup", "POST", json.dumps(body))


def served(url: str, n: int) -> dict[str, str | None]:
    """Every key k1..kn as the server at ``url`` serves it (curl + jq), None if absent."""
    r = bash(
        "set -o pipefail\n"
        'for i in $(seq 1 "$N"); do printf \'url = "%s/api/v1/users/kv/k%s"\\n\' "$URL" "$i"; '
        "done | curl -sf -K - | "
        "jq -r 'if .found then (.value | @base64d) else \"-\" end'",
        URL=url,
        N=str(n),
    )
    assert r.returncode == 0, r.stderr
    vals = r.stdout.split("\n")[:n]
    assert len(vals) == n and r.stdout.count("\n") == n, r.stdout
    return {f"k{i + 1}": (None if v == "-" else v) for i, v in enumerate(vals)}


def expect(spans: list[tuple[int, int, str]], n: int) -> dict[str, str | None]:
    out: dict[str, str | None] = {f"k{i}": None for i in range(1, n + 1)}
    for first, last, val in spans:
        for i in range(first, last + 1):
            out[f"k{i}"] = val
    return out


def tree_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def restore(data_dir: Path, snapshot: Path, wal: Path, *extra: str) -> dict[str, Any]:
    r = cli(
        "restore",
        "--data-dir",
        data_dir,
        "--namespace",
        NS,
        "--snapshot",
        snapshot,
        "--wal",
        wal,
        "--json",
        *extra,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    out: dict[str, Any] = json.loads(r.stdout)
    return out


def stop_clean(srv: ServerProcess) -> None:
    assert srv.stop() == 0, srv.log()


# --- finding 1 ---------------------------------------------------------------------------


class Splice:
    """State shared by the steps of finding 1 (one module-scoped run, several assertions)."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.data = base / "data"
        self.state = base / "state"
        self.state.mkdir(parents=True)
        self.state_file = self.state / "wal-archive-state.json"
        self.root = self.data / "backups" / NS
        self.archive = self.root / "wal" / "archive"
        self.snapshot = self.root / "snapshots" / "s1.db"
        self.servers: list[ServerProcess] = []

    def start(self, data: Path | None = None) -> ServerProcess:
        srv = start_server(data or self.data, (NS,))
        self.servers.append(srv)
        return srv


@pytest.fixture(scope="module")
def splice(tmp_path_factory: pytest.TempPathFactory) -> Any:
    sp = Splice(tmp_path_factory.mktemp("splice"))
    try:
        yield _run_splice(sp)
    finally:
        for srv in sp.servers:
            srv.stop()


def _run_splice(sp: Splice) -> Splice:
    srv = sp.start()
    write(srv.url, 1, 150, OLD)
    assert stats(srv)["lastLsn"] == 150
    code, snap = curl_json(f"{srv.url}/api/v1/{NS}/btree/backup", "POST", '{"path":"snapshots/s1.db"}')
    assert code == 200 and snap["lsn"] == 150, snap
    write(srv.url, 151, 200, OLD)
    code, first = wal_backup(srv, {"backupDir": "wal/archive", "rotate": True})
    assert code == 200 and first["backups"], first
    write(srv.url, 201, 250, OLD)
    # The archive's state file, written the way the document's archival script writes it.
    r = bash(
        'RESPONSE=$(curl -s -X POST "$URL/api/v1/users/wal/backup" '
        '-H "Content-Type: application/json" '
        '-d \'{"backupDir": "wal/archive", "rotate": true}\')\n'
        "NEW_LAST=$(echo \"$RESPONSE\" | jq -r '.backups[-1].segmentId // 0')\n"
        'echo "{\\"lastSegmentId\\": $NEW_LAST, \\"timestamp\\": \\"$(date -Iseconds)\\"}" '
        '> "$STATE_FILE"',
        URL=srv.url,
        STATE_FILE=str(sp.state_file),
    )
    assert r.returncode == 0, r.stderr
    sp.old_last = json.loads(sp.state_file.read_text())["lastSegmentId"]
    sp.old_segments = sorted(int(p.name.split(".")[0]) for p in sp.archive.glob("*.wal"))
    assert len(sp.old_segments) >= 2 and sp.old_segments[-1] == sp.old_last, sp.old_segments
    st = stats(srv)
    assert st["lastLsn"] == 250
    sp.old_history, sp.old_fp_250 = st["history"], st["fingerprint"]
    stop_clean(srv)

    # The document's Full Restore after total loss of the namespace directory.
    r = bash(
        'rm -rf "$DATA/users"\nmkdir -p "$DATA/users/db"\ncp "$SNAP" "$DATA/users/db/data.mdb"',
        DATA=str(sp.data),
        SNAP=str(sp.snapshot),
    )
    assert r.returncode == 0, r.stderr
    srv = sp.start()
    sp.after_restore = served(srv.url, 260)
    sp.fork_stats = stats(srv)
    sp.before_loop = tree_hashes(sp.root)
    write(srv.url, 151, 230, NEW)
    stop_clean(srv)  # a clean stop seals the active segment
    srv = sp.start()
    sp.live = srv

    sp.loop = bash(adapt(DOC_ARCHIVE_LOOP, srv.url, sp.data, sp.state))
    sp.new_last = json.loads(sp.state_file.read_text())["lastSegmentId"]
    sp.after_loop = tree_hashes(sp.root)
    sp.again = wal_backup(srv, {"afterSegmentId": 0, "backupDir": "wal/archive"})
    sp.after_again = tree_hashes(sp.root)
    sp.live_stats = stats(srv)
    sp.live_values = served(srv.url, 260)
    return sp


def test_manual_full_restore_forks_a_new_history(splice: Splice) -> None:
    assert splice.after_restore == expect([(1, 150, OLD)], 260)
    st = splice.fork_stats
    assert st["lastLsn"] == 150
    assert st["history"] != splice.old_history, "the copied-in snapshot continued the old history"
    assert len(st["history"]) == 32 and len(st["fingerprint"]) > 0


def test_archive_loop_captures_new_segments_and_overwrites_nothing(splice: Splice) -> None:
    assert splice.loop.returncode == 0, splice.loop.stderr
    assert splice.new_last > splice.old_last
    new_ids = sorted(int(p.name.split(".")[0]) for p in splice.archive.glob("*.wal"))
    captured = [i for i in new_ids if i not in splice.old_segments]
    assert captured and min(captured) > splice.old_last, (splice.old_segments, new_ids)
    new_hist = bytes.fromhex(splice.live_stats["history"])
    for i in captured:
        path = splice.archive / segment_name(i)
        assert segment.decode_header(path.read_bytes(), path).history == new_hist
    for name, digest in splice.before_loop.items():
        assert splice.after_loop.get(name) == digest, f"{name} was changed or removed"
    # The new history's records all reached the archive: up to the live server's last LSN.
    assert splice.live_stats["lastLsn"] == 230
    code, body = splice.again
    assert code == 200, body
    assert splice.after_again == splice.after_loop


def test_verify_says_two_histories_continue_the_snapshot(splice: Splice) -> None:
    r = cli("backup", "verify", "--snapshot", splice.snapshot, "--wal", splice.archive, "--json")
    rep = json.loads(r.stdout)
    assert rep["overlaps"] == [], rep["overlaps"]  # two histories, not one history twice
    assert any("2 histories continue this snapshot" in w for w in rep["warnings"]), rep
    assert rep["restorable"]["history"] == splice.live_stats["history"]
    assert r.returncode == (0 if rep["ok"] else 1), (r.returncode, rep)


def test_restore_takes_the_newest_history_and_equals_the_live_server(splice: Splice, tmp_path: Path) -> None:
    out = restore(tmp_path / "r", splice.snapshot, splice.archive)
    plan, summary = out["plan"], out["summary"]
    assert plan["wal"]["history"] == splice.live_stats["history"]
    assert plan["wal"]["otherHistories"] == [splice.old_history]
    assert summary["lsn"] == 230
    assert summary["proof"]["endProven"] is True, summary["proof"]
    assert summary["fingerprint"] == splice.live_stats["fingerprint"]
    srv = start_server(tmp_path / "r", (NS,))
    try:
        got = served(srv.url, 260)
        st = stats(srv)
    finally:
        stop_clean(srv)
    assert got == expect([(1, 150, OLD), (151, 230, NEW)], 260)
    assert got == splice.live_values
    # Same LSN, a segment end: the restored server proves the same state as the original.
    assert st["fingerprint"] == splice.live_stats["fingerprint"]
    assert st["history"] not in (splice.live_stats["history"], splice.old_history)


def test_restore_named_old_history(splice: Splice, tmp_path: Path) -> None:
    out = restore(tmp_path / "r", splice.snapshot, splice.archive, "--history", splice.old_history)
    assert out["plan"]["wal"]["history"] == splice.old_history
    summary = out["summary"]
    assert summary["lsn"] == 250
    assert summary["proof"]["endProven"] is True, summary["proof"]
    srv = start_server(tmp_path / "r", (NS,))
    try:
        got = served(srv.url, 260)
        st = stats(srv)
    finally:
        stop_clean(srv)
    assert got == expect([(1, 250, OLD)], 260)
    assert st["fingerprint"] == splice.old_fp_250 == summary["fingerprint"]


def test_checkpoint_endpoint_shows_the_fingerprint(splice: Splice) -> None:
    code, cp = curl_json(f"{splice.live.url}/api/v1/{NS}/checkpoint")
    assert code == 200 and cp["lsn"] == 230, cp
    assert cp.get("fingerprint") == splice.live_stats["fingerprint"], cp
    assert cp.get("history") == splice.live_stats["history"], cp


def test_backup_list_shows_both_histories_with_windows(splice: Splice) -> None:
    r = cli("backup", "list", "--backup-dir", splice.root, "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    hs = {h["history"]: h for h in json.loads(r.stdout)["wal"]["histories"]}
    assert set(hs) == {splice.old_history, splice.live_stats["history"]}, hs
    old, new = hs[splice.old_history], hs[splice.live_stats["history"]]
    assert new["parent"] == splice.old_history and new["forkLsn"] == 150
    assert old["window"]["earliestLsn"] == 150 and old["window"]["latestLsn"] == 250
    assert new["window"]["earliestLsn"] == 150 and new["window"]["latestLsn"] == 230
    assert new["firstSegmentId"] > old["lastSegmentId"]
    # The running server answers the same over HTTP, for its own backups/<ns>/.
    code, doc = curl_json(f"{splice.live.url}/api/v1/{NS}/backups")
    assert code == 200, doc
    served = {h["history"]: h["window"] for h in doc["wal"]["histories"]}
    assert served[splice.old_history]["latestLsn"] == 250
    assert served[splice.live_stats["history"]]["latestLsn"] >= 230


# --- finding 5 ---------------------------------------------------------------------------


def _rotate(srv: ServerProcess, after: int) -> int:
    code, body = wal_backup(srv, {"afterSegmentId": after, "backupDir": "wal/archive", "rotate": True})
    assert code == 200 and body["backups"], body
    last: int = body["backups"][-1]["segmentId"]
    return last


@dataclass
class Mixed:
    dir: Path
    a_hist: str
    b_hist: str


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> Mixed:
    """A's snapshot (LSN 30, with its sidecar) + A's segments 1–2 (LSN 1–100) + B's segments
    3–5 (LSN 101–250) in one directory; both servers serve a namespace ``users``."""
    base = tmp_path_factory.mktemp("two-servers")
    a = start_server(base / "a", (NS,))
    b = start_server(base / "b", (NS,))
    try:
        write(a.url, 1, 30, "A")
        code, snap = curl_json(f"{a.url}/api/v1/{NS}/btree/backup", "POST", '{"path":"snapshots/a.db"}')
        assert code == 200 and snap["lsn"] == 30, snap
        last = 0
        for first, end in ((31, 50), (51, 100)):
            write(a.url, first, end, "A")
            last = _rotate(a, last)
        assert last == 2
        last = 0
        for first in range(1, 251, 50):
            write(b.url, first, first + 49, "B")
            last = _rotate(b, last)
        assert last == 5
        a_hist, b_hist = stats(a)["history"], stats(b)["history"]
    finally:
        stop_clean(a)
        stop_clean(b)
    assert a_hist != b_hist

    out = base / "mixed"
    out.mkdir()
    for name in ("a.db", "a.db.sha256"):  # with its sidecar: no warning but the mix itself
        shutil.copy2(base / "a/backups/users/snapshots" / name, out)
    for src, ids in (
        (base / "a/backups/users/wal/archive", (1, 2)),
        (base / "b/backups/users/wal/archive", (3, 4, 5)),
    ):
        for i in ids:
            for name in (segment_name(i), segment_name(i) + ".sha256"):
                shutil.copy2(src / name, out)
    for i, h in ((1, a_hist), (2, a_hist), (3, b_hist), (4, b_hist), (5, b_hist)):
        path = out / segment_name(i)
        assert segment.decode_header(path.read_bytes(), path).history.hex() == h
    return Mixed(out, a_hist, b_hist)


def test_verify_two_servers_mix_is_not_ok_silently(mixed: Mixed) -> None:
    r = cli("backup", "verify", "--snapshot", mixed.dir / "a.db", "--wal", mixed.dir, "--json")
    rep = json.loads(r.stdout)
    assert rep["restorable"] is None or (
        rep["restorable"]["toLsn"] == 100 and rep["restorable"]["history"] == mixed.a_hist
    ), rep
    # Not OK silently: B's three segments are named as another history, as a problem or a
    # warning, not skipped without a word.
    said = [
        m
        for m in rep["warnings"] + rep["problems"]
        if mixed.b_hist[:12] in m or all(segment_name(i) in m for i in (3, 4, 5)) or "another history" in m
    ]
    assert said, (r.returncode, rep["ok"], rep["warnings"], rep["problems"])


def test_restore_two_servers_mix_never_gives_b_values(mixed: Mixed, tmp_path: Path) -> None:
    r = cli(
        "restore",
        "--data-dir",
        tmp_path / "r",
        "--namespace",
        NS,
        "--snapshot",
        mixed.dir / "a.db",
        "--wal",
        mixed.dir,
        "--json",
    )
    if r.returncode != 0:  # refusing is allowed, with a clear one-line reason
        msg = (r.stdout + r.stderr).strip()
        assert "history" in msg and "Traceback" not in msg, msg
        return
    out = json.loads(r.stdout)
    assert out["summary"]["lsn"] == 100 and out["plan"]["wal"]["history"] == mixed.a_hist, out
    assert all(step["history"] == mixed.a_hist for step in out["plan"]["wal"]["replay"])
    assert any(mixed.b_hist[:12] in w for w in out["plan"]["warnings"]), out["plan"]["warnings"]
    assert out["summary"]["proof"]["endProven"] is True, out["summary"]["proof"]
    srv = start_server(tmp_path / "r", (NS,))
    try:
        got = served(srv.url, 260)
    finally:
        stop_clean(srv)
    assert got == expect([(1, 100, "A")], 260)


def test_curl_helpers_see_absent_and_present_keys(tmp_path: Path) -> None:
    """The comparisons above can fail: ``served`` tells a value from an absent key."""
    srv = start_server(tmp_path / "d", (NS,))
    try:
        write(srv.url, 2, 3, "x")
        assert served(srv.url, 4) == {"k1": None, "k2": "x", "k3": "x", "k4": None}
        with httpx.Client(base_url=srv.url) as c:
            assert c.get(f"/api/v1/{NS}/kv/k2").json()["found"] is True
    finally:
        stop_clean(srv)
