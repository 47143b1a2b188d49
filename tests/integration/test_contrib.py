"""Checks for the operator files in contrib/: backup scripts, systemd units, alert rules.

External checkers and where they come from (Debian packages):
  promtool         -> prometheus     required when CI is set, else skipped if missing
  shellcheck       -> shellcheck     required when CI is set, else skipped if missing
  systemd-analyze  -> systemd        skipped if missing (the only check that may skip in CI)
"""

from __future__ import annotations

import configparser
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONTRIB = ROOT / "contrib"
SYSTEMD = CONTRIB / "systemd"
PROMETHEUS = CONTRIB / "prometheus"
SCRIPTS = [CONTRIB / "unison-backup.sh", CONTRIB / "unison-wal-archive.sh"]
# Sourced by both scripts from their own directory; not a command.
COMMON = CONTRIB / "unison-backup-common.sh"
SHELL_FILES = [*SCRIPTS, COMMON]
UNITS = sorted([*SYSTEMD.glob("*.service"), *SYSTEMD.glob("*.timer")])
RULES = PROMETHEUS / "unisondb-alerts.yml"
RULE_TESTS = PROMETHEUS / "unisondb-alerts.test.yml"

# Alerts the document's "Alert on" list requires (see contrib/prometheus/).
REQUIRED_ALERTS = {
    "UnisonDBBackupConsecutiveFailures",
    "UnisonDBBackupFailuresNoSuccess",
    "UnisonDBBackupTooOld",
    "UnisonDBBackupMissing",
    "UnisonDBSnapshotSizeAnomaly",
    "UnisonDBWALBackupGap",
}


def require_tool(name: str, package: str) -> str:
    """Path of ``name``; in CI a missing tool fails the test, locally it skips it."""
    path = shutil.which(name)
    if path:
        return path
    msg = f"{name} is not installed (Debian package: {package})"
    if os.environ.get("CI", "").lower() not in ("", "0", "false", "no"):
        pytest.fail(f"{msg}; CI must install it")
    pytest.skip(msg)


def run(
    *args: str | Path, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120, check=False
    )


def script_env(tmp_path: Path, **settings: str) -> dict[str, str]:
    """Environment for a script run that must stop before it talks to a server: an
    address nothing listens on, data and state under ``tmp_path``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("UPLOAD_CMD", "STATE_FILE", "ARCHIVE_DIR", "COMPRESS")
    }
    env.update(
        UNISON_URL="http://127.0.0.1:9",
        DATA_DIR=str(tmp_path / "data"),
        STATE_DIR=str(tmp_path / "state"),
        NAMESPACE="users",
    )
    env.update(settings)
    return env


# --- scripts ---------------------------------------------------------------------------


@pytest.mark.parametrize("script", SHELL_FILES, ids=lambda p: p.name)
def test_script_syntax(script: Path) -> None:
    res = run("bash", "-n", script)
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_is_executable_bash_strict(script: Path) -> None:
    assert script.stat().st_mode & stat.S_IXUSR, f"{script.name} is not executable"
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in text
    assert "rotate: " in text
    # The helpers come from the common file in the script's own (symlink-resolved)
    # directory, with a directive that lets shellcheck follow it.
    assert '"${BASH_SOURCE[0]}"' in text and "readlink -f" in text
    assert f"# shellcheck source={COMMON.name}\nsource " in text


def _functions(text: str) -> set[str]:
    return set(re.findall(r"^([A-Za-z_][A-Za-z0-9_]*)\(\) \{", text, re.M))


def test_common_file() -> None:
    text = COMMON.read_text()
    assert text.startswith("# shellcheck shell=bash\n"), "no shebang: it is sourced, not run"
    assert "--fail-with-body" in text
    shared = _functions(text)
    assert {
        "log",
        "err",
        "die",
        "config_error",
        "take_lock",
        "under_root",
        "api",
        "verify",
        "sidecar",
        "upload",
        "state_get",
        "state_merge",
        "last_segment",
        "segment_ids",
    } <= shared
    # Nothing it defines is defined again in a script: one copy of each helper.
    for script in SCRIPTS:
        again = shared & _functions(script.read_text())
        assert not again, f"{script.name} redefines {sorted(again)}"


def test_common_file_is_not_a_command() -> None:
    res = run("bash", COMMON)
    assert res.returncode == 2
    assert "not to be run" in res.stderr


@pytest.mark.parametrize("script", SHELL_FILES, ids=lambda p: p.name)
def test_shellcheck(script: Path) -> None:
    """-x follows the scripts' `source` of the common file (found through its
    `# shellcheck source=` directive), so functions and variables defined there count;
    the common file itself is checked as a file of its own."""
    shellcheck = require_tool("shellcheck", "shellcheck")
    res = run(shellcheck, "--shell=bash", "--severity=style", "--external-sources", script)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_without_common_file(script: Path, tmp_path: Path) -> None:
    """Installed without unison-backup-common.sh, a script stops at once with exit 2
    (bad installation, like a missing tool) and says which file it looked for."""
    copy = tmp_path / "bin" / script.name
    copy.parent.mkdir()
    shutil.copy2(script, copy)
    res = run(copy, env=script_env(tmp_path))
    assert res.returncode == 2, res.stdout + res.stderr
    assert res.stdout == ""
    prog = script.name.removesuffix(".sh")
    assert res.stderr == (
        f"{prog}: ERROR: {tmp_path}/bin/{COMMON.name} is missing or "
        f"unreadable; it must be installed next to {copy}\n"
    )
    assert not (tmp_path / "state").exists(), "it must stop before taking the lock"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_through_symlink_finds_common_file(script: Path, tmp_path: Path) -> None:
    """A symlink to a script (e.g. /usr/local/bin -> /usr/local/lib/unison) loads the
    common file from the script's real directory: the settings check it defines runs."""
    link = tmp_path / "unison-job"
    link.symlink_to(script)
    res = run(link, env=script_env(tmp_path, NAMESPACE="bad!"))
    prog = script.name.removesuffix(".sh")
    assert res.returncode == 2, res.stdout + res.stderr
    assert res.stderr == f"{prog}: ERROR: NAMESPACE 'bad!' is not a valid namespace name\n"


# Runs the real tool, then does exactly what a server start does to the backup root at that
# moment (unisondb.storage.fsutil.clean_tmp_files, the server's own code). A fake only for
# the timing: a real restart cannot be made to land inside one `tar` call reliably.
SERVER_START_SHIM = """#!/usr/bin/env bash
real=$(PATH=$SHIM_REAL_PATH command -v "${0##*/}")
"$real" "$@"
rc=$?
"$SHIM_PYTHON" -c 'import sys; from pathlib import Path
from unisondb.storage.fsutil import clean_tmp_files
for p in clean_tmp_files(Path(sys.argv[1])): print(p, file=open(sys.argv[2], "a"))' \
  "$SHIM_ROOT" "$SHIM_LOG"
exit $rc
"""


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_files_in_flight_survive_a_server_start(
    script: Path, tmp_path: Path, server_factory: Any
) -> None:
    """The scripts' own half-written files (the WAL tarball, every sidecar) must not end
    in .tmp: the server deletes *.tmp under the backup root when it starts, so a restart
    during a run (systemd, a crash) pulled them from under the job and failed it."""
    import sys

    import httpx

    data = tmp_path / "data"
    srv = server_factory(data, "users")
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        for i in range(20):
            r = c.put(f"/api/v1/users/kv/k{i}", json={"value": "dg=="})
            assert r.status_code == 200, r.text
    root = data / "backups" / "users"
    shims = tmp_path / "shims"
    shims.mkdir()
    for tool in ("tar", "sha256sum", "gzip", "zstd"):
        (shims / tool).write_text(SERVER_START_SHIM)
        (shims / tool).chmod(0o755)
    # What a run killed mid-write left: removed by the next run of the script that wrote it.
    left_dir = root / ("snapshots" if script.name == "unison-backup.sh" else "wal/archive")
    left_dir.mkdir(parents=True, exist_ok=True)
    (left_dir / ".old.sha256.partial").write_text("cut")
    log = tmp_path / "removed.log"
    env = script_env(
        tmp_path,
        UNISON_URL=srv.url,
        DATA_DIR=str(data),
        FORCE_SNAPSHOT="1",
        COMPRESS="gzip",
        SHIM_REAL_PATH=os.environ["PATH"],
        SHIM_PYTHON=sys.executable,
        SHIM_ROOT=str(root),
        SHIM_LOG=str(log),
    )
    env["PATH"] = f"{shims}:{os.environ['PATH']}"
    res = run(script, env=env)
    removed = log.read_text() if log.exists() else ""
    assert res.returncode == 0, res.stdout + res.stderr + "\nremoved: " + removed
    assert removed == "", f"a server start would have deleted: {removed}"
    sidecars = sorted(root.rglob("*.sha256"))
    assert sidecars, sorted(root.rglob("*"))
    for side in sidecars:  # every sidecar is whole and matches its file
        if not side.with_suffix("").exists():
            continue  # kept for the raw file, checked again after decompression
        chk = run("sha256sum", "--strict", "-c", side.name, cwd=side.parent)
        assert chk.returncode == 0, chk.stdout + chk.stderr
    leftovers = [
        p for p in root.rglob("*") if p.name.startswith(".") or p.name.endswith((".tmp", ".partial"))
    ]
    assert leftovers == []


# --- systemd units ---------------------------------------------------------------------


def test_unit_files_present() -> None:
    names = {p.name for p in UNITS}
    assert {"unisondb.service", "unison-backup.service", "unison-backup.timer"} <= names


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_unit_has_no_inline_comments(unit: Path) -> None:
    """systemd ignores a whole setting line with a trailing `# comment` (the document's
    timer did that); comments must be on lines of their own."""
    for n, line in enumerate(unit.read_text().splitlines(), 1):
        s = line.strip()
        if not s or s.startswith(("#", ";", "[")):
            continue
        assert "#" not in s, f"{unit.name}:{n}: comment on a setting line: {line!r}"


def _parse_unit(unit: Path) -> configparser.RawConfigParser:
    cp = configparser.RawConfigParser(strict=False, comment_prefixes=("#", ";"), inline_comment_prefixes=None)
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    cp.read(unit)
    return cp


def test_backup_timer_runs_every_6_hours_once() -> None:
    lines = (SYSTEMD / "unison-backup.timer").read_text().splitlines()
    calendars = [ln.split("=", 1)[1].strip() for ln in lines if ln.startswith("OnCalendar=")]
    assert calendars == ["*-*-* 00/6:00:00"]
    timer = _parse_unit(SYSTEMD / "unison-backup.timer")
    assert timer.get("Timer", "Persistent") == "true"
    assert timer.get("Install", "WantedBy") == "timers.target"


def test_server_unit_settings() -> None:
    svc = _parse_unit(SYSTEMD / "unisondb.service")
    assert svc.get("Service", "ExecStart") == (
        "/usr/local/bin/unisondb --data-dir /var/unison/data --http-addr 127.0.0.1:8080 --namespace users"
    )
    assert svc.get("Service", "Restart") == "on-failure"
    assert svc.get("Service", "KillSignal") == "SIGTERM"
    assert svc.get("Service", "User") == "unison"
    assert svc.has_option("Service", "TimeoutStopSec")
    assert svc.has_option("Service", "LimitNOFILE")


def test_backup_unit_settings() -> None:
    svc = _parse_unit(SYSTEMD / "unison-backup.service")
    assert svc.get("Service", "Type") == "oneshot"
    assert svc.get("Service", "User") == "unison"
    assert svc.get("Service", "ExecStart") == "/usr/local/bin/unison-backup.sh"


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    """`systemd-analyze verify` on every unit. It warns about bad lines but still exits 0,
    so any message naming one of our units fails the test. It also insists that ExecStart
    binaries exist, so the units are checked as copies whose /usr/local/bin/ points at a
    scratch directory holding the contrib scripts and a stand-in for the server binary."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian package: systemd)")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for script in SHELL_FILES:
        shutil.copy2(script, bindir / script.name)
    server = bindir / "unisondb"
    server.write_text("#!/bin/sh\nexit 0\n")
    server.chmod(0o755)
    units = tmp_path / "units"
    units.mkdir()
    copies = []
    for unit in UNITS:
        copy = units / unit.name
        copy.write_text(unit.read_text().replace("/usr/local/bin/", f"{bindir}/"))
        copies.append(copy)

    def complaints(paths: list[Path]) -> tuple[int, list[str]]:
        res = run(analyze, "verify", *paths, cwd=units)
        names = {p.name for p in paths}
        lines = [ln for ln in (res.stdout + res.stderr).splitlines() if any(n in ln for n in names)]
        return res.returncode, lines

    rc, lines = complaints(copies)
    assert rc == 0 and not lines, "\n".join(lines)

    # The checker itself must see the document's broken timer line.
    bad_dir = tmp_path / "doc"
    bad_dir.mkdir()
    shutil.copy2(units / "unison-backup.service", bad_dir / "unison-backup.service")
    bad = bad_dir / "unison-backup.timer"
    bad.write_text(
        "[Unit]\nDescription=x\n\n[Timer]\nOnCalendar=daily\n"
        "OnCalendar=*:0/6  # Every 6 hours\nPersistent=true\n\n"
        "[Install]\nWantedBy=timers.target\n"
    )
    _, lines = complaints([bad])
    assert any("Failed to parse calendar" in ln for ln in lines), lines

    # The schedule: 00:00, 06:00, 12:00, 18:00.
    res = run(analyze, "calendar", "--iterations=8", "*-*-* 00/6:00:00")
    assert res.returncode == 0, res.stderr
    assert "Normalized form: *-*-* 00/6:00:00" in res.stdout
    times = re.findall(r"(?:Next elapse|Iter\. #\d+): \w+ \S+ (\d\d:\d\d:\d\d)", res.stdout)
    assert len(times) == 8, res.stdout
    assert set(times) <= {"00:00:00", "06:00:00", "12:00:00", "18:00:00"}, times


# --- Prometheus rules ------------------------------------------------------------------


def test_alert_rules_cover_the_document() -> None:
    text = RULES.read_text()
    alerts = set(re.findall(r"^\s*- alert: (\S+)\s*$", text, re.M))
    assert alerts == REQUIRED_ALERTS
    tested = set(re.findall(r"alertname: (\S+)", RULE_TESTS.read_text()))
    assert tested == REQUIRED_ALERTS
    for metric in (
        "unisondb_backup_consecutive_failures",
        "unisondb_backup_failure_total",
        "unisondb_backup_last_timestamp_seconds",
        "unisondb_backup_last_bytes",
        "unisondb_backup_wal_gap_total",
    ):
        assert metric in text


def test_promtool_check_rules() -> None:
    promtool = require_tool("promtool", "prometheus")
    res = run(promtool, "check", "rules", RULES)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"SUCCESS: {len(REQUIRED_ALERTS)} rules found" in res.stdout


def test_promtool_test_rules() -> None:
    promtool = require_tool("promtool", "prometheus")
    res = run(promtool, "test", "rules", RULE_TESTS.name, cwd=PROMETHEUS)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS" in res.stdout


# --- bearer token (UNISON_TOKEN_FILE) ----------------------------------------------------

ADMIN_TOKEN = "contrib-admin-token-0123456789"


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from serverproc import start_server

    tmp = tmp_path_factory.mktemp("contrib-auth")
    tokens = tmp / "tokens"
    tokens.write_text(f"{ADMIN_TOKEN} admin\n")
    tokens.chmod(0o600)
    srv = start_server(tmp / "data", ("users",), ["--auth-token-file", str(tokens)])
    import httpx

    r = httpx.put(
        srv.url + "/api/v1/users/kv/k",
        json={"value": "dg=="},
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
    )
    assert r.status_code == 200, r.text
    yield srv
    srv.stop()


@pytest.mark.parametrize(
    "token_text,ok",
    [
        (f"# the archive job's token\n{ADMIN_TOKEN}\n", True),
        (f"{ADMIN_TOKEN} admin\n", True),  # a line of the server's own file works too
        (None, False),  # no UNISON_TOKEN_FILE: the server says 401
    ],
)
def test_wal_archive_sends_the_token_from_unison_token_file(
    auth_server: Any, tmp_path: Path, token_text: str | None, ok: bool
) -> None:
    settings = {
        "UNISON_URL": auth_server.url,
        "DATA_DIR": str(auth_server.data_dir),
        "ARCHIVE_DIR": f"wal/t{len(token_text or '')}",
        "COMPRESS": "none",
    }
    if token_text is not None:
        token_file = tmp_path / "token"
        token_file.write_text(token_text)
        token_file.chmod(0o600)
        settings["UNISON_TOKEN_FILE"] = str(token_file)
    res = run(CONTRIB / "unison-wal-archive.sh", env=script_env(tmp_path, **settings))
    if ok:
        assert res.returncode == 0, res.stdout + res.stderr
        assert ADMIN_TOKEN not in res.stdout + res.stderr
    else:
        assert res.returncode != 0
        assert "authentication required" in res.stderr, res.stderr


def test_unreadable_or_empty_token_file_is_a_setting_error(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("# nothing here\n")
    for path, words in ((tmp_path / "missing", "is not a readable file"), (empty, "holds no token")):
        res = run(CONTRIB / "unison-wal-archive.sh", env=script_env(tmp_path, UNISON_TOKEN_FILE=str(path)))
        assert res.returncode == 2, res.stderr
        assert words in res.stderr
