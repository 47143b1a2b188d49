"""The offline commands as an operator runs them: exit codes, ``error:`` lines, ``--json``,
``--dry-run`` changing nothing, ``backup verify|list`` reports, and ``wal list|inspect``
never modifying a file.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from serverproc import ServerProcess
from test_restore_support import NS, History, read_keyspace, run_cli, tree_digest

from unisondb.cli import main
from unisondb.storage import segment

Base = tuple[History, Path, Path]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Base:
    h = History(tmp_path_factory.mktemp("cli"))
    h.open()
    h.write_random(60)
    snap, _ = h.snapshot("s.db")
    h.write_random(150)
    wal = h.backup_wal("wal/a")
    h.close()
    return h, snap, wal


def cli(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def restore_args(data: Path, snap: Path, wal: Path, *extra: str) -> list[str | Path]:
    return ["restore", "--data-dir", data, "--namespace", NS, "--snapshot", snap, "--wal", wal, *extra]


def test_restore_text_and_json_output(base: Base, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    h, snap, wal = base
    rc, out, err = cli(capsys, *restore_args(tmp_path / "d", snap, wal, "--target-lsn", "100"))
    assert rc == 0, err
    assert "Restored namespace 'users' to LSN 100" in out
    assert "replayed   40 records" in out and "new timeline 2" in out
    rc, out, err = cli(capsys, *restore_args(tmp_path / "d", snap, wal, "--force", "--json"))
    assert rc == 0, err
    doc = json.loads(out)
    assert doc["dryRun"] is False
    assert doc["summary"]["lsn"] == h.last_lsn and doc["summary"]["recordsReplayed"] == 150
    assert doc["summary"]["replacedExisting"] is True
    assert set(doc["summary"]["seconds"]) == {"verify", "copy", "replay", "contentWait", "publish", "total"}
    assert doc["plan"]["snapshot"]["sidecar"] == "ok"
    assert all(s["sidecar"] == "ok" for s in doc["plan"]["wal"]["replay"])
    assert read_keyspace(tmp_path / "d") == h.state_at(h.last_lsn)


def test_dry_run_changes_nothing(base: Base, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _h, snap, wal = base
    data = tmp_path / "d"
    # into a data dir that does not exist: nothing is created
    rc, out, err = cli(capsys, *restore_args(data, snap, wal, "--dry-run"))
    assert rc == 0, err
    assert out.startswith("[DRY RUN] Restore plan") and "210 " not in err
    assert not data.exists()
    # over existing data: identical tree, no lock file, no staging dir
    cli(capsys, *restore_args(data, snap, wal, "--target-lsn", "70"))
    before = tree_digest(data)
    lock_before = (data / NS / "LOCK").read_bytes()
    rc, out, err = cli(capsys, *restore_args(data, snap, wal, "--dry-run", "--json"))
    assert rc == 0, err
    plan = json.loads(out)
    assert plan["dryRun"] is True and plan["summary"] is None
    assert plan["plan"]["result"]["lsn"] == 210
    assert plan["plan"]["existing"]["hasData"] is True
    assert any("requires --force" in w for w in plan["plan"]["warnings"])
    assert tree_digest(data) == before
    assert (data / NS / "LOCK").read_bytes() == lock_before
    assert sorted(p.name for p in data.iterdir()) == [NS]  # no lock file, no staging dir


def test_exit_codes_and_error_lines(base: Base, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _h, snap, wal = base
    data = tmp_path / "d"
    assert cli(capsys, *restore_args(data, snap, wal, "--target-lsn", "80"))[0] == 0
    cases: list[tuple[list[str | Path], int, str]] = [
        (restore_args(data, snap, wal), 5, "already holds data"),
        (restore_args(data, tmp_path / "nope.db", wal), 4, "snapshot not found"),
        (restore_args(data, snap, tmp_path / "nowal"), 4, "WAL directory not found"),
        (
            restore_args(data, snap, wal, "--target-lsn", "5", "--target-time", "2025-01-08T14:30:00Z"),
            2,
            "at most one of",
        ),
        (restore_args(data, snap, wal, "--target-time", "yesterday"), 2, "RFC 3339"),
        (restore_args(data, snap, wal, "--target-lsn", "10", "--force"), 2, "before the snapshot"),
        (restore_args(data, snap, wal, "--target-lsn", "9999", "--force"), 2, "beyond"),
        (
            ["restore", "--data-dir", data, "--namespace", "backups", "--snapshot", snap],
            2,
            "invalid namespace",
        ),
    ]
    before = tree_digest(data)
    for args, code, text in cases:
        rc, _out, err = cli(capsys, *args)
        assert (rc, text in err, err.startswith("error: ")) == (code, True, True), (args, err)
    assert tree_digest(data) == before
    rc, _out, err = cli(capsys, "restore", "--data-dir", data, "--snapshot", snap)
    assert rc == 2 and "--namespace" in err  # click usage error


def test_real_exit_code_and_group_level_data_dir(base: Base, tmp_path: Path) -> None:
    _h, snap, wal = base
    data = tmp_path / "d"
    proc = run_cli("--data-dir", data, "restore", "-n", NS, "--snapshot", snap, "--wal", wal)
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("--data-dir", data, "restore", "-n", NS, "--snapshot", snap, "--wal", wal)
    assert proc.returncode == 5 and proc.stderr.startswith("error: ")


def test_refuses_while_the_server_runs(
    base: Base,
    tmp_path: Path,
    server_factory: Callable[..., ServerProcess],
    capsys: pytest.CaptureFixture[str],
) -> None:
    _h, snap, wal = base
    data = tmp_path / "d"
    srv = server_factory(data, NS)
    before = tree_digest(data / NS)
    rc, _out, err = cli(capsys, *restore_args(data, snap, wal, "--force"))
    assert rc == 3 and "locked" in err and f"pid {srv.proc.pid}" in err
    assert tree_digest(data / NS) == before
    # --dry-run shows it as a warning (and still exits 0: it only plans)
    rc, out, _err = cli(capsys, *restore_args(data, snap, wal, "--dry-run"))
    assert rc == 0 and "stop the server before restoring" in out
    srv.stop()
    assert cli(capsys, *restore_args(data, snap, wal, "--force"))[0] == 0


def test_backup_verify_ok_and_replay(base: Base, capsys: pytest.CaptureFixture[str]) -> None:
    h, snap, wal = base
    rc, out, err = cli(
        capsys, "backup", "verify", "--snapshot", snap, "--wal", wal, "--namespace", NS, "--replay", "--json"
    )
    assert rc == 0, err
    rep = json.loads(out)
    assert rep["ok"] and not rep["problems"]
    assert rep["snapshot"]["lmdb"] == "ok" and rep["snapshot"]["sidecar"] == "ok"
    assert rep["restorable"]["toLsn"] == h.last_lsn
    assert rep["replay"]["lsn"] == h.last_lsn and rep["replay"]["records"] == 150
    assert rep["replay"]["keys"] == len(h.state_at(h.last_lsn))
    # The drill served the restored namespace from a real server on loopback.
    srv = rep["replay"]["server"]
    assert srv["servedLsn"] == h.last_lsn and srv["servedFingerprint"] == rep["replay"]["fingerprint"]
    assert srv["sampledKeys"] > 0 and srv["mismatchedKeys"] == []
    # The backup ends at a sealed segment: the served state is proven equal to the original.
    assert rep["replay"]["proof"]["endProven"] is True
    secs = rep["replay"]["seconds"]
    assert secs["serverStart"] > 0 and secs["total"] >= secs["replay"] + secs["serverStart"]
    rc, out, _ = cli(capsys, "backup", "verify", "--snapshot", snap, "--wal", wal, "--replay")
    assert rc == 0 and "OK: the backup set is restorable" in out and "measured RTO" in out


def test_drill_fails_when_the_served_state_differs(base: Base, tmp_path: Path) -> None:
    """The drill checks what a real server serves, not only what the restore wrote."""
    from unisondb.restore import drill, restore

    _h, snap, wal = base
    out = restore(tmp_path / "d", NS, snap, [wal])
    assert out.summary is not None
    keys, sample = drill.sample_keys(tmp_path / "d", NS)
    assert keys and sample
    tampered = [(k, v + b"!") for k, v in sample[:3]] + sample[3:]
    res = drill.run_drill(tmp_path / "d", NS, out.summary.end_lsn, "00" * 32, tampered)
    assert any("fingerprint" in p for p in res.problems)
    assert len(res.mismatched) == 3 and res.served_lsn == out.summary.end_lsn


def test_backup_verify_names_every_problem(
    base: Base, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _h, snap, wal = base
    copy = tmp_path / "wal"
    shutil.copytree(wal, copy)
    segs = sorted(copy.glob("*.wal"))
    gone = segment.read_summary(segs[2])
    assert gone.footer is not None
    segs[2].unlink()
    data = bytearray(segs[4].read_bytes())
    data[segment.HEADER_SIZE + 40] ^= 1  # inside the first record
    segs[4].write_bytes(bytes(data))
    rc, out, err = cli(capsys, "backup", "verify", "--snapshot", snap, "--wal", copy, "--json", "--replay")
    assert rc == 6 and err.startswith("error: backup verification failed")
    rep = json.loads(out)
    text = "\n".join(rep["problems"])
    assert f"LSNs {gone.header.first_lsn}..{gone.footer.last_lsn}" in text
    assert str(segs[4]) in text and "sha256" in text
    assert rep["replay"] is None  # never replays a set that failed its checks
    assert [h["firstLsn"] for h in rep["holes"]] == [gone.header.first_lsn]


def test_backup_list(base: Base, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    h, snap, wal = base
    root = tmp_path / "b"
    shutil.copytree(h.backup_root, root)
    (root / "snapshots" / "old.db.zst").write_bytes(b"\x28\xb5\x2f\xfd" + b"\0" * 20)
    victim = sorted((root / "wal" / "a").glob("*.wal"))[3]
    victim.unlink()
    rc, out, err = cli(capsys, "backup", "list", "--backup-dir", root, "--json")
    assert rc == 0, err
    doc = json.loads(out)
    [s] = doc["snapshots"]
    assert (s["lsn"], s["timeline"], s["bytes"]) == (60, 1, snap.stat().st_size)
    assert s["time"].endswith("Z") and s["sidecar"] is True
    assert s["restorableTo"]["lsn"] < h.last_lsn and s["restorableTo"]["holesAfter"]
    assert doc["compressed"][0]["format"] == "zstd"
    [tl] = doc["wal"]["histories"]
    assert (tl["timeline"], tl["earliestLsn"], tl["latestLsn"]) == (1, 1, h.last_lsn)
    assert tl["history"] == s["history"] and tl["parent"] is None
    assert len(tl["holes"]) == 1 and victim.name in tl["holes"][0]["text"]
    # The restorable window: from the snapshot up to the hole.
    assert tl["window"]["earliestLsn"] == 60
    assert tl["window"]["latestLsn"] == s["restorableTo"]["lsn"]
    rc, out, _ = cli(capsys, "backup", "list", "--backup-dir", root)
    assert rc == 0 and "WAL: LSN 1.." in out and "hole: missing" in out
    assert "restorable: LSN 60.." in out


def _snapshot_files(d: Path) -> dict[str, tuple[bytes, int, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns, p.stat().st_mode) for p in sorted(d.iterdir())}


def test_wal_list_and_inspect_never_modify_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    h = History(tmp_path)
    h.open()
    h.write_random(123)  # several sealed segments and an active one (close seals nothing)
    h.close()
    wal = h.data_dir / NS / "wal"
    with open(sorted(wal.glob("*.wal"))[-1], "ab") as f:
        f.write(b"\x01\x02torn")  # a torn tail in the newest (active) segment
    before = _snapshot_files(wal)
    os.utime(wal, ns=(1, 1))
    dir_before = wal.stat().st_mtime_ns
    runs: list[list[str | Path]] = [
        ["wal", "list", "--wal-dir", wal],
        ["wal", "list", "--wal-dir", wal, "--json"],
        ["wal", "inspect", "--wal-dir", wal, "--records"],
        ["wal", "inspect", "--wal-dir", wal, "--json", "-n", NS],
        ["wal", "inspect", "--wal-dir", wal, "--segment-id", "1", "--json"],
    ]
    for args in runs:
        rc, out, err = cli(capsys, *args)
        assert rc == 0, err
        if "--json" in args:
            json.loads(out)
    rows = json.loads(cli(capsys, "wal", "list", "--wal-dir", wal, "--json")[1])
    assert rows[-1]["status"] == "active" and rows[-1]["crc"] == "torn tail"
    assert all(r["status"] == "sealed" and r["crc"] == "ok" for r in rows[:-1])
    assert rows[0]["firstLsn"] == 1 and rows[-1]["lastLsn"] == 123
    one = json.loads(cli(capsys, "wal", "inspect", "--wal-dir", wal, "-s", "1", "--json", "--records")[1])
    assert one["segmentId"] == 1 and one["recordList"][0]["lsn"] == 1
    rc, _out, err = cli(capsys, "wal", "inspect", "--wal-dir", wal, "-s", "999")
    assert rc == 4 and "segment 999 not found" in err
    assert _snapshot_files(wal) == before
    assert wal.stat().st_mtime_ns == dir_before  # no file created, renamed or deleted


def test_progress_bar_on_a_terminal_only(base: Base, tmp_path: Path) -> None:
    import pty
    import subprocess

    from test_restore_support import REPO, UNISONDB

    _h, snap, wal = base
    master, slave = pty.openpty()
    try:
        proc = subprocess.run(
            [
                *UNISONDB,
                "restore",
                "--data-dir",
                str(tmp_path / "d"),
                "-n",
                NS,
                "--snapshot",
                str(snap),
                "--wal",
                str(wal),
                "--json",
            ],
            stdout=subprocess.PIPE,
            stderr=slave,
            cwd=REPO,
            timeout=60,
            env=dict(os.environ, COLUMNS="100"),
        )
        os.close(slave)
        slave = -1
        chunks = []
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:
                break
            if not data:
                break
            chunks.append(data)
    finally:
        if slave >= 0:
            os.close(slave)
        os.close(master)
    tty = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0
    json.loads(proc.stdout)  # stdout stays clean JSON
    assert "replay WAL" in tty and "copy snapshot" in tty
    # Not a terminal: no progress output at all.
    plain = run_cli("restore", "--data-dir", tmp_path / "e", "-n", NS, "--snapshot", snap, "--wal", wal)
    assert plain.returncode == 0 and plain.stderr == ""
