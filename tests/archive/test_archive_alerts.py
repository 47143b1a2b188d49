"""The archive alert rules (contrib/prometheus/unisondb-archive-alerts.yml): promtool checks and tests
them (skipped locally without promtool, required in CI), and every metric they use is one the server
exports."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "contrib" / "prometheus"
RULES = PROMETHEUS / "unisondb-archive-alerts.yml"
TESTS = PROMETHEUS / "unisondb-archive-alerts.test.yml"
ALERTS = {"UnisonDBArchiveRPOHigh", "UnisonDBArchiveDown", "UnisonDBArchiveSnapshotTooOld"}


def promtool() -> str:
    path = shutil.which("promtool")
    if path:
        return path
    if os.environ.get("CI", "").lower() not in ("", "0", "false", "no"):
        pytest.fail("promtool is not installed (Debian package: prometheus); CI must install it")
    pytest.skip("promtool is not installed (Debian package: prometheus)")


def test_rules_name_the_alerts_and_metrics_the_server_exports() -> None:
    text = RULES.read_text()
    assert set(re.findall(r"^\s*- alert: (\S+)\s*$", text, re.M)) == ALERTS
    assert set(re.findall(r"alertname: (\S+)", TESTS.read_text())) == ALERTS
    source = (ROOT / "unisondb" / "metrics.py").read_text()
    for metric in set(re.findall(r"\bunisondb_archive_\w+", text)):
        assert f'"{metric}"' in source, metric


def test_promtool_check_and_test_rules() -> None:
    tool = promtool()
    res = subprocess.run([tool, "check", "rules", str(RULES)], capture_output=True, text=True)
    assert res.returncode == 0 and f"SUCCESS: {len(ALERTS)} rules found" in res.stdout, (
        res.stdout + res.stderr
    )
    res = subprocess.run([tool, "test", "rules", TESTS.name], cwd=PROMETHEUS, capture_output=True, text=True)
    assert res.returncode == 0 and "SUCCESS" in res.stdout, res.stdout + res.stderr
