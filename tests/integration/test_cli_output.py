"""What the offline commands print where the walk-through of issue 8 found them wrong:
usage errors in the one-line form, ``restore``'s default data dir, remote URLs, ``wal
list|inspect -n`` as a check that fails, and empty segments shown as empty.

Real files throughout (an in-process engine writes the WAL and LMDB files); the exit-code
cases run ``python -m unisondb`` as a process, as an operator's script would.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from test_restore_support import NS, UNISONDB, History, read_keyspace, run_cli

from unisondb.cli import main
from unisondb.storage import layout

Base = tuple[History, Path, Path]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Base:
    h = History(tmp_path_factory.mktemp("cliout"))
    h.open()
    h.write_random(30)
    snap, _ = h.snapshot("s.db")
    h.write_random(40)
    wal = h.backup_wal("wal/a")  # rotates: the live WAL ends with an empty active segment
    h.close()
    return h, snap, wal


def cli(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


ONE_LINE = re.compile(r"^error: [^\n]+ \(hint: [^\n]+\)\n$")


# --- usage errors ---


@pytest.mark.parametrize(
    "args",
    [
        ["restore", "--snapshot", "x.db"],  # missing -n
        ["restore", "-n", NS],  # missing --snapshot
        ["restore", "-n", NS, "--snapshot", "x.db", "--bogus"],  # unknown option
        ["restore", "-n", NS, "--snapshot", "x.db", "--target-lsn", "ten"],  # bad value
        ["wal", "list"],  # missing --wal-dir
        ["wal", "inspect", "--wal-dir", ".", "-s"],  # option without its value
        ["backup", "verify"],  # our own UsageError
        ["backup", "nosuch"],  # unknown command
        ["--log-format", "xml"],  # bad choice (server flags)
    ],
    ids=lambda a: "_".join(a)[:40],
)
def test_usage_errors_are_one_documented_line(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = cli(capsys, *args)
    assert rc == 2, err
    assert ONE_LINE.match(err), err
    assert "--help" in err and "Usage:" not in err and out == ""


def test_usage_error_line_from_a_real_process(tmp_path: Path) -> None:
    proc = run_cli("restore", "--snapshot", tmp_path / "x.db")
    assert proc.returncode == 2
    assert proc.stderr == (
        "error: missing option '--namespace' / '-n' (hint: see 'unisondb restore --help')\n"
    )


# --- restore --data-dir defaults to ./data, like the server ---


def test_restore_defaults_to_the_servers_data_dir(base: Base, tmp_path: Path) -> None:
    h, snap, wal = base
    proc = subprocess.run(
        [*UNISONDB, "restore", "-n", NS, "--snapshot", snap, "--wal", wal],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"into {tmp_path / 'data' / NS}" in proc.stdout
    assert read_keyspace(tmp_path / "data") == h.state_at(h.last_lsn)
    proc = subprocess.run(
        [*UNISONDB, "restore", "--help"], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert "./data" in " ".join(proc.stdout.split())


# --- remote URLs ---


@pytest.mark.parametrize(
    ("args", "where"),
    [
        (["restore", "-n", NS, "--snapshot", "s3://backups/unison/users/s.db"], "aws s3 cp"),
        (
            ["restore", "-n", NS, "--snapshot", "SNAP", "--wal", "s3://backups/unison/users/wal/"],
            "aws s3 cp --recursive",
        ),
        (["backup", "verify", "--snapshot", "https://example.invalid/s.db"], "curl"),
        (["backup", "list", "--backup-dir", "gs://bucket/users/"], "gsutil cp -r"),
        (["wal", "list", "--wal-dir", "s3://bucket/wal/"], "aws s3 cp"),
    ],
    ids=["snapshot-s3", "wal-s3", "verify-https", "list-gs", "wal-list-s3"],
)
def test_remote_urls_are_refused_not_mangled(
    base: Base, tmp_path: Path, args: list[str], where: str, capsys: pytest.CaptureFixture[str]
) -> None:
    _h, snap, _wal = base
    args = [str(snap) if a == "SNAP" else a for a in args]
    data = tmp_path / "d"
    rc, _out, err = cli(capsys, "--data-dir", data, *args)
    assert rc == 2, err
    assert ONE_LINE.match(err), err
    assert "remote URLs are not supported yet" in err and where in err
    url = next(a for a in args if "://" in a)
    assert url in err  # named as given, not as the local path s3:/...
    assert not data.exists()


# --- wal list|inspect -n NS is a check ---


def test_wal_namespace_mismatch_fails_with_one_line(base: Base, capsys: pytest.CaptureFixture[str]) -> None:
    _h, _snap, wal = base
    for args in (
        ["wal", "list", "--wal-dir", wal, "-n", "default"],
        ["wal", "list", "--wal-dir", wal, "-n", "default", "--json"],
        ["wal", "inspect", "--wal-dir", wal, "-n", "default"],
        ["wal", "inspect", "--wal-dir", wal, "-n", "default", "-s", "1", "--json"],
    ):
        rc, out, err = cli(capsys, *args)
        assert rc == 5, (args, err)
        assert err.startswith("error: WAL segments from another namespace (not 'default'): 000000001.wal"), (
            err
        )
        assert ONE_LINE.match(err), err
        assert "False" not in out
    rc, out, err = cli(capsys, "wal", "inspect", "--wal-dir", wal, "-n", "default", "-s", "1")
    assert "NO: written by another namespace" in out
    for args in (["wal", "list", "--wal-dir", wal, "-n", NS], ["wal", "inspect", "--wal-dir", wal, "-n", NS]):
        rc, out, err = cli(capsys, *args)
        assert rc == 0 and err == "", err
    assert "yes (users)" in out


def test_wal_namespace_mismatch_exit_code_of_a_process(base: Base) -> None:
    _h, _snap, wal = base
    proc = run_cli("wal", "list", "--wal-dir", wal, "-n", "default")
    assert proc.returncode == 5 and proc.stderr.count("\n") == 1, proc.stderr


# --- empty segments ---


def test_empty_segment_is_shown_as_empty(
    base: Base, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    h, snap, wal = base
    live = layout.wal_dir(h.data_dir, NS)
    empty = sorted(live.glob("*.wal"))[-1]
    # The document's manual archive copies wal/* as it is, the empty active segment too.
    backup = tmp_path / "backup"
    shutil.copytree(wal, backup / "wal")
    shutil.copy2(empty, backup / "wal" / empty.name)
    shutil.copy2(snap, backup / "s.db")
    first = h.last_lsn + 1
    backwards = f"{first}..{first - 1}"

    rc, out, err = cli(capsys, "wal", "list", "--wal-dir", live)
    assert rc == 0, err
    [row] = [ln for ln in out.splitlines() if ln.startswith(empty.name[:9])]
    assert re.search(rf"\b{first}\s+\(empty\)\s+0\s", row), row
    rc, out, err = cli(capsys, "wal", "inspect", "--wal-dir", live, "-s", empty.name[:9])
    assert re.search(r"lastLsn\s+\(empty\)", out), out

    rc, out, err = cli(capsys, "backup", "list", "--backup-dir", backup)
    assert rc == 0, err
    assert f"{empty.name}  timeline 1: LSN {first}.. (empty), no records" in out
    assert backwards not in out
    rc, out, err = cli(capsys, "backup", "list", "--backup-dir", backup, "--json")
    doc = json.loads(out)
    assert [e["firstLsn"] for e in doc["wal"]["empty"]] == [first]

    rc, out, err = cli(
        capsys,
        "restore",
        "--data-dir",
        tmp_path / "d",
        "-n",
        NS,
        "--snapshot",
        backup / "s.db",
        "--wal",
        backup / "wal",
        "--dry-run",
    )
    assert rc == 0, err
    assert backwards not in out
