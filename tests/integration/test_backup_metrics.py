"""Backup metrics move exactly as docs/OPERATIONS.md says, and a WAL gap is a clear 409.

/metrics is parsed with prometheus_client's own text parser.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from test_backup_helpers import (
    NS,
    Server,
    btree_backup,
    fill_segments,
    metric_samples,
    put,
    sample,
    wal_backup,
)


def backup_values(c: httpx.Client, kind: str) -> dict[str, float]:
    s = metric_samples(c)
    lab = {"namespace": NS, "kind": kind}
    return {
        "success": sample(s, "unisondb_backup_success_total", **lab),
        "failure": sample(s, "unisondb_backup_failure_total", **lab),
        "bytes": sample(s, "unisondb_backup_bytes_total", **lab),
        "last_ts": sample(s, "unisondb_backup_last_timestamp_seconds", **lab),
        "last_bytes": sample(s, "unisondb_backup_last_bytes", **lab),
        "consecutive": sample(s, "unisondb_backup_consecutive_failures", **lab),
        "count": sample(s, "unisondb_backup_duration_seconds_count", **lab),
        "gap": sample(s, "unisondb_backup_wal_gap_total", namespace=NS),
    }


def changed(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before[k] for k in before if after[k] != before[k]}


def test_backup_metrics_follow_success_and_failure(
    server_factory: Callable[..., Server], tmp_path: Path
) -> None:
    srv = server_factory(tmp_path / "data", "default", "users", extra_args=["--wal-segment-size", "64KiB"])
    with srv.client() as c:
        fill_segments(c, 200_000, "m")
        for kind in ("wal", "btree"):
            v = backup_values(c, kind)
            assert (v["success"], v["failure"], v["count"]) == (0, 0, 0)  # series exist at 0

        # WAL success: +1 success, bytes of the files written, a fresh timestamp.
        before = backup_values(c, "wal")
        t0 = time.time()
        r = wal_backup(c, {"backupDir": "wal/m", "rotate": True})
        t1 = time.time()
        assert r.status_code == 200
        written = sum(b["bytes"] for b in r.json()["backups"])
        after = backup_values(c, "wal")
        assert changed(before, after) == {
            "success": 1,
            "bytes": written,
            "count": 1,
            "last_ts": after["last_ts"],
            "last_bytes": written,
        }
        assert t0 <= after["last_ts"] <= t1

        # Re-running it writes nothing: a success of 0 bytes.
        before = after
        assert wal_backup(c, {"backupDir": "wal/m"}).status_code == 200
        after = backup_values(c, "wal")
        d = changed(before, after)
        assert d.pop("success") == 1 and d.pop("count") == 1 and d.pop("last_ts") > 0
        assert d == {"last_bytes": -written}

        # B-tree success.
        before = backup_values(c, "btree")
        r = btree_backup(c, "snaps/a.db")
        assert r.status_code == 200
        after = backup_values(c, "btree")
        d = changed(before, after)
        assert d.pop("last_ts") > 0
        assert d == {"success": 1, "bytes": r.json()["bytes"], "count": 1, "last_bytes": r.json()["bytes"]}

        # Bad input (400) and unknown namespace (404) are not backup attempts.
        before_w, before_b = backup_values(c, "wal"), backup_values(c, "btree")
        assert btree_backup(c, "../x").status_code == 400
        assert wal_backup(c, {"backupDir": "/abs"}).status_code == 400
        assert wal_backup(c, {"backupDir": "x", "afterSegmentId": -1}).status_code == 400
        assert btree_backup(c, "x.db", ns="nope").status_code == 404
        assert backup_values(c, "wal") == before_w and backup_values(c, "btree") == before_b

        # A failure after validation (409: same name, different content) counts.
        put(c, "changed", b"1")
        before = backup_values(c, "btree")
        r = btree_backup(c, "snaps/a.db")
        assert r.status_code == 409 and "already exists with different content" in r.text
        after = backup_values(c, "btree")
        assert changed(before, after) == {"failure": 1, "consecutive": 1, "count": 1}
        # ... and the next success resets the consecutive-failure gauge.
        assert btree_backup(c, "snaps/b.db").status_code == 200
        assert backup_values(c, "btree")["consecutive"] == 0

        # WAL gauges.
        s = metric_samples(c)
        sealed = sorted(int(p.name[:9]) for p in (srv.data_dir / NS / "wal").glob("*.wal"))[:-1]
        assert sample(s, "unisondb_wal_sealed_segment_max_id", namespace=NS) == sealed[-1]
        assert sample(s, "unisondb_wal_oldest_segment_id", namespace=NS) == sealed[0]
        assert sample(s, "unisondb_wal_active_segment_age_seconds", namespace=NS) >= 0


def test_wal_gap_is_a_clear_error(server_factory: Callable[..., Server], tmp_path: Path) -> None:
    data = tmp_path / "data"
    srv = server_factory(data, "users", extra_args=["--wal-segment-size", "64KiB"])
    with srv.client() as c:
        fill_segments(c, 400_000, "g")
    srv.stop()
    # Restart with retention 0: the first housekeeping pass deletes every sealed segment
    # the durable checkpoint has passed.
    srv = server_factory(data, "users", extra_args=["--wal-segment-size", "64KiB", "--wal-retention", "0s"])
    with srv.client() as c:
        put(c, "trigger", b"housekeeping")
        deadline = time.monotonic() + 10
        oldest = 0.0
        while time.monotonic() < deadline:
            oldest = sample(metric_samples(c), "unisondb_wal_oldest_segment_id", namespace=NS)
            if oldest > 3:
                break
            time.sleep(0.05)
        assert oldest > 3, "retention did not delete the old segments"
        # Let the retention pass finish (it deletes one segment at a time).
        while time.monotonic() < deadline:
            time.sleep(0.3)
            again = sample(metric_samples(c), "unisondb_wal_oldest_segment_id", namespace=NS)
            if again == oldest:
                break
            oldest = again
        before = backup_values(c, "wal")
        r = wal_backup(c, {"afterSegmentId": 1, "backupDir": "wal/g"})
        assert r.status_code == 409
        msg = r.json()["error"]
        # Retention may still be deleting while we ask: read the oldest id from the answer
        # and check the answer is consistent with it (and at least what the metric showed).
        m = re.search(r"oldest segment still on disk is (\d+)", msg)
        assert m is not None, msg
        now_oldest = int(m.group(1))
        assert now_oldest >= oldest
        assert f"segment ids 2-{now_oldest - 1} are no longer on disk" in msg
        assert "WAL retention (--wal-retention) deleted them" in msg
        assert changed(before, backup_values(c, "wal")) == {
            "failure": 1,
            "consecutive": 1,
            "count": 1,
            "gap": 1,
        }
        assert not (srv.data_dir / "backups" / NS / "wal" / "g").exists()
        # Resuming right at the oldest segment on disk, or from 0 ("all"), is no gap.
        assert wal_backup(c, {"afterSegmentId": now_oldest - 1, "backupDir": "wal/g"}).status_code == 200
        assert wal_backup(c, {"afterSegmentId": 0, "backupDir": "wal/g"}).status_code == 200


def _documented_backup_metrics() -> dict[str, tuple[str, bool]]:
    """{name: (type, has kind label)} from the table under "### Metrics" in OPERATIONS.md."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "OPERATIONS.md").read_text()
    section = doc.split("### Metrics", 1)[1].split("\n### ", 1)[0]
    rows = re.findall(r"^\| `(unisondb_[a-z_]+)` \| (\w+)( \(`namespace`\))? \|", section, re.M)
    return {name: (kind, not ns_only) for name, kind, ns_only in rows}


def test_every_documented_series_exists_at_0_on_a_fresh_server(
    server_factory: Callable[..., Server], tmp_path: Path
) -> None:
    documented = _documented_backup_metrics()
    assert len(documented) >= 11 and "unisondb_backup_last_bytes" in documented
    srv = server_factory(tmp_path / "data", "default", "users")
    with srv.client() as c:
        s = metric_samples(c)
    missing = []
    for name, (kind, per_kind) in sorted(documented.items()):
        sample_name = f"{name}_count" if kind == "histogram" else name
        for ns in ("default", "users"):
            for labels in (
                [{"namespace": ns, "kind": k} for k in ("wal", "btree")] if per_kind else [{"namespace": ns}]
            ):
                key = (sample_name, tuple(sorted(labels.items())))
                if key not in s:
                    missing.append(f"{sample_name}{labels}")
                elif name.startswith("unisondb_backup_"):
                    assert s[key] == 0, (key, s[key])
    assert not missing, missing


def test_backup_phases_are_in_metrics(server_factory: Callable[..., Server], tmp_path: Path) -> None:
    """``unisondb_backup_phase_seconds_total`` shows where each kind of backup spent its time
    (backup/phases.py), and the phases never add up to more than the whole backups."""
    srv = server_factory(tmp_path / "data", "default", "users", extra_args=["--wal-segment-size", "64KiB"])
    with srv.client() as c:
        fill_segments(c, 200_000, "p")
        assert wal_backup(c, {"backupDir": "wal/p", "rotate": True}).status_code == 200
        assert btree_backup(c, "snap/p.db").status_code == 200
        s = metric_samples(c)
        for kind, names in (
            ("wal", ("read", "write", "sidecar")),
            ("btree", ("copy", "hash", "sync", "sidecar")),
        ):
            spent = {
                n: sample(s, "unisondb_backup_phase_seconds_total", namespace=NS, kind=kind, phase=n)
                for n in names
            }
            assert all(v > 0 for v in spent.values()), (kind, spent)
            total = sample(s, "unisondb_backup_duration_seconds_sum", namespace=NS, kind=kind)
            assert sum(spent.values()) <= total, (kind, spent, total)
