"""bench/run.py end to end where it starts nothing: sections not chosen and a big database
that does not fit on the disk. The report must still hold every goal row, each saying why
it has no figure, and nothing may be left in the scratch directory."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[3] / "bench"
sys.path.insert(0, str(BENCH))

import goals  # noqa: E402
import peers  # noqa: E402


def test_rows_skipped_for_disk_space_and_for_only_say_why(tmp_path: Path) -> None:
    missing = [b for b in peers.BINARIES if shutil.which(b) is None and b not in peers.OPTIONAL]
    if missing:
        pytest.skip(f"the benchmark's tools are not installed: {missing}")
    out = tmp_path / "report.md"
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH / "run.py"),
            "--quick",
            "--no-install",
            "--only",
            "wal,restore",
            "--db-size",
            "64TiB",  # 12 × this is never free: the big sections must be skipped, not tried
            "--server-args",
            "--ack wal",
            "--out",
            str(out),
            "--work-dir",
            str(tmp_path / "work"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = out.read_text()
    rows = {r[0].strip("`"): r for r in goals.parse_tables(text)["Goals"][1:]}
    assert set(rows) == {g.id for g in goals.GOALS}
    for rid in ("10.wal_backup", "10.restore", "10.restore_rss"):
        assert rows[rid][3].startswith("skipped: ") and "GiB free" in rows[rid][3], rows[rid]
    for rid in ("10.snapshot", "11.put_vs_etcd", "11.rss_anon_http", "10.put_during_snapshots"):
        assert rows[rid][3] == "not run (`--only restore,wal`)", rows[rid]
    assert "`--ack wal` (`--server-args`)" in text
    assert "the same row in `bench/results/" in text  # compared with a committed report
    assert list((tmp_path / "work").iterdir()) == []
