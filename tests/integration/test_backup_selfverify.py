"""Backups that prove themselves (issue 8 item 3, findings 3, 6 and 7), on a real server.

* A snapshot carries a self-verifying trailer: the document's manual ``cp`` procedure
  serves it, and refuses it when its content changed, without any sidecar; so do
  ``unisondb restore`` and ``unisondb backup verify``.
* A kill -9 between a snapshot's rename and its sidecar is completed at the next start
  (the moment is hit exactly through the ``UNISONDB_TEST_HOLD`` seam, not a timer).
* A WAL backup checks every record of a segment before vouching for it.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from serverproc import wait_hold_reached
from test_backup_helpers import (
    NS,
    Server,
    backup_root,
    btree_backup,
    fill_segments,
    get,
    metric_samples,
    put,
    read_snapshot,
    sample,
    sha256sum_check,
    tmp_files,
    wal_backup,
)

from unisondb.storage import segment, snapfile


def unisondb(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "unisondb", *args], capture_output=True, text=True, timeout=120
    )


def write_keys(c: httpx.Client, n: int, tag: str = "k") -> dict[str, bytes]:
    vals = {f"{tag}{i:04d}": hashlib.sha256(f"{tag}{i}".encode()).digest() * 8 for i in range(n)}
    for k, v in vals.items():
        put(c, k, v)
    return vals


def flip(path: Path, offset: int, mask: int = 0x5A, count: int = 1) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        old = f.read(count)
        f.seek(offset)
        f.write(bytes(b ^ mask for b in old))


def manual_full_restore(data_dir: Path, snapshot: Path) -> None:
    """The document's *Full Restore* steps 3-4, verbatim apart from the paths."""
    script = f"""
set -e
zstd -q -f {snapshot} -o /tmp/restore-$$.db.zst
zstd -q -d -f /tmp/restore-$$.db.zst -o /tmp/restore-$$.db
NAMESPACE="{NS}"
DATA_DIR="{data_dir}/$NAMESPACE"
rm -rf "$DATA_DIR/db"/*
mkdir -p "$DATA_DIR/db"
cp /tmp/restore-$$.db "$DATA_DIR/db/data.mdb"
rm -f /tmp/restore-$$.db /tmp/restore-$$.db.zst
"""
    subprocess.run(["bash", "-c", script], check=True)


# --- the snapshot file ---


def test_snapshot_is_self_verifying_and_the_manual_restore_serves_it(
    server_factory: Callable[..., Server], tmp_path: Path
) -> None:
    data = tmp_path / "data"
    srv = server_factory(data, NS)
    with srv.client() as c:
        vals = write_keys(c, 300)
        r = btree_backup(c, "snaps/s.db")
        assert r.status_code == 200, r.text
    body = r.json()
    snap = backup_root(data) / "snaps" / "s.db"
    # The sidecar still checks the whole file, and the API's numbers are the file's.
    sha256sum_check(snap.parent)
    assert body["bytes"] == snap.stat().st_size
    assert body["sha256"] == hashlib.sha256(snap.read_bytes()).hexdigest()
    trailer = snapfile.verify(snap)
    assert trailer.namespace == NS and trailer.data_len == snap.stat().st_size - 4096
    assert trailer.decode_checkpoint().applied_lsn == body["lsn"] == 300
    # py-lmdb opens the file as it is, trailer and all.
    kv, cp = read_snapshot(snap)
    assert cp.applied_lsn == 300 and {k.decode(): v for k, v in kv.items()} == vals
    srv.stop()

    manual_full_restore(data, snap)
    srv = server_factory(data, NS)
    with srv.client() as c:
        assert all(get(c, k) == v for k, v in vals.items())
        put(c, "after-restore", b"ok")  # LMDB writes where the trailer was: it is gone
    live = data / NS / "db" / "data.mdb"
    assert snapfile.read_trailer(live) is None
    assert "startup.snapshot_installed" in srv.log()
    srv.stop()
    srv = server_factory(data, NS)  # a second start: nothing to install, data intact
    with srv.client() as c:
        assert get(c, "after-restore") == b"ok" and get(c, "k0299") == vals["k0299"]
    assert srv.log().count("startup.snapshot_installed") == 0


def test_changed_snapshot_is_refused_without_any_sidecar(
    server_factory: Callable[..., Server], tmp_path: Path
) -> None:
    """Finding 3: four bytes flipped in a value; the sidecar thrown away (as the scripts do)."""
    data = tmp_path / "data"
    srv = server_factory(data, NS)
    with srv.client() as c:
        vals = write_keys(c, 200)
        assert btree_backup(c, "snaps/s.db").status_code == 200
    srv.stop()
    snap = backup_root(data) / "snaps" / "s.db"
    (snap.parent / "s.db.sha256").unlink()
    raw = snap.read_bytes()
    at = raw.index(vals["k0100"])
    flip(snap, at + 40, count=4)

    r = unisondb("restore", "--data-dir", str(tmp_path / "r"), "-n", NS, "--snapshot", str(snap), "--dry-run")
    assert r.returncode == 6, r.stdout + r.stderr
    assert f"{snap} is corrupt" in r.stderr and "use another copy" in r.stderr
    r = unisondb("backup", "verify", "--snapshot", str(snap))
    assert r.returncode != 0 and f"{snap} is corrupt" in r.stdout + r.stderr

    manual_full_restore(data, snap)
    live = data / NS / "db" / "data.mdb"
    before = live.read_bytes()
    srv = server_factory(data, NS, wait=False)
    assert srv.proc.wait(timeout=60) == 6  # the error tree's exit code, not a signal
    errors = [ln for ln in srv.log().splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, srv.log()
    assert f"{live} is corrupt" in errors[0] and "copy another snapshot" in errors[0]
    assert live.read_bytes() == before  # refused before LMDB opened it: nothing changed


def test_startup_check_of_an_installed_snapshot_costs_one_hash_pass(
    server_factory: Callable[..., Server], tmp_path: Path
) -> None:
    """What the check costs is logged; a plain data.mdb is not hashed at all."""
    data = tmp_path / "data"
    srv = server_factory(data, NS)
    with srv.client() as c:
        write_keys(c, 50)
        assert btree_backup(c, "s.db").status_code == 200
    srv.stop()
    manual_full_restore(data, backup_root(data) / "s.db")
    srv = server_factory(data, NS)
    line = next(ln for ln in srv.log().splitlines() if "startup.snapshot_installed" in ln)
    assert "verify_seconds=" in line and f"path={data / NS / 'db' / 'data.mdb'}" in line


# --- kill -9 between the rename and the sidecar ---


def hold_at(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, point: str) -> Path:
    fifo = tmp_path / f"hold-{point}"
    os.mkfifo(fifo)
    monkeypatch.setenv("UNISONDB_TEST_HOLD", f"{point}:{fifo}")
    return fifo


def kill_in_sidecar_window(srv: Server, fifo: Path, path: str) -> None:
    def request() -> None:
        try:
            httpx.post(f"{srv.url}/api/v1/{NS}/btree/backup", json={"path": path}, timeout=60)
        except httpx.TransportError:
            pass  # killed under it: expected

    t = threading.Thread(target=request)
    t.start()
    reached = wait_hold_reached(fifo, srv, timeout=60)
    srv.kill9()
    t.join()
    reached.unlink()


def test_kill9_between_rename_and_sidecar_is_completed_at_start(
    server_factory: Callable[..., Server], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "data"
    fifo = hold_at(monkeypatch, tmp_path, "snapshot-published")
    srv = server_factory(data, NS)
    with srv.client() as c:
        vals = write_keys(c, 100)
    kill_in_sidecar_window(srv, fifo, "snaps/s.db")
    snaps = backup_root(data) / "snaps"
    assert sorted(p.name for p in snaps.iterdir()) == ["s.db"]  # published, no sidecar
    snapfile.verify(snaps / "s.db")  # ... and it proves itself

    monkeypatch.delenv("UNISONDB_TEST_HOLD")
    srv = server_factory(data, NS)
    assert sorted(p.name for p in snaps.iterdir()) == ["s.db", "s.db.sha256"]
    sha256sum_check(snaps)
    assert "startup.snapshot_sidecar_written" in srv.log()
    with srv.client() as c:
        # A retry of the same request: the same state is already there → 200, not 409.
        r = btree_backup(c, "snaps/s.db")
        assert r.status_code == 200, r.text
        assert r.json()["copied"] is False
        assert r.json()["sha256"] == hashlib.sha256((snaps / "s.db").read_bytes()).hexdigest()
        # A different state under the same name is still refused: names are never reused.
        put(c, "more", b"x")
        r = btree_backup(c, "snaps/s.db")
        assert r.status_code == 409 and "different content" in r.json()["error"]
        assert get(c, "k0001") == vals["k0001"]
    sha256sum_check(snaps)


def test_kill9_window_then_restart_before_the_sidecar_retry_gets_200(
    server_factory: Callable[..., Server], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Even when startup could not write the sidecar, the retry completes it."""
    data = tmp_path / "data"
    fifo = hold_at(monkeypatch, tmp_path, "snapshot-published")
    srv = server_factory(data, NS)
    with srv.client() as c:
        write_keys(c, 20)
    kill_in_sidecar_window(srv, fifo, "s.db")
    monkeypatch.delenv("UNISONDB_TEST_HOLD")
    root = backup_root(data)
    srv = server_factory(data, NS)
    (root / "s.db.sha256").unlink()  # as if startup had not been able to write it
    with srv.client() as c:
        r = btree_backup(c, "s.db")
        assert r.status_code == 200 and r.json()["copied"] is False, r.text
    sha256sum_check(root)


def test_damaged_interrupted_snapshot_is_renamed_corrupt_at_start(
    server_factory: Callable[..., Server], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "data"
    fifo = hold_at(monkeypatch, tmp_path, "snapshot-published")
    srv = server_factory(data, NS)
    with srv.client() as c:
        write_keys(c, 50)
    kill_in_sidecar_window(srv, fifo, "s.db")
    monkeypatch.delenv("UNISONDB_TEST_HOLD")
    root = backup_root(data)
    flip(root / "s.db", 5000)
    srv = server_factory(data, NS)
    assert sorted(p.name for p in root.iterdir()) == ["s.db.corrupt"]
    assert "startup.snapshot_corrupt" in srv.log()
    with srv.client() as c:  # the name is free again for a good snapshot
        assert btree_backup(c, "s.db").status_code == 200
    sha256sum_check(root)


# --- the WAL backup checks what it vouches for (finding 7) ---


def test_wal_backup_refuses_a_segment_with_a_flipped_byte(
    server_factory: Callable[..., Server], tmp_path: Path
) -> None:
    data = tmp_path / "data"
    srv = server_factory(data, NS, extra_args=["--wal-segment-size", "64KiB"])
    dest = backup_root(data) / "wal"
    with srv.client() as c:
        fill_segments(c, 300_000, "w")
        r = wal_backup(c, {"backupDir": "first"})  # a good archive copy exists
        assert r.status_code == 200
        sealed = sorted((data / NS / "wal").glob("*.wal"))[:-1]  # the last one is active
        assert len(sealed) >= 3
        bad = sealed[1]
        scanned = segment.scan(bad)
        flip(bad, bad.stat().st_size // 2)
        before = sample(metric_samples(c), "unisondb_backup_failure_total", namespace=NS, kind="wal")
        r = wal_backup(c, {"backupDir": "wal"})
        assert r.status_code == 500, r.text
        err = r.json()["error"]
        assert err.startswith(f"refusing to back up damaged WAL segment {int(bad.stem)}: {bad} at offset ")
        offset = int(err.split(" at offset ")[1].split(":")[0])
        record_starts = [s for _r, s, _e in scanned.records]
        assert offset in record_starts and offset <= bad.stat().st_size // 2
        assert "take a new B-tree snapshot" in err and "\n" not in err
        # The segment before it is published and vouched for; nothing of the bad one.
        assert sorted(p.name for p in dest.iterdir()) == [sealed[0].name, sealed[0].name + ".sha256"]
        sha256sum_check(dest)
        assert tmp_files(dest) == []
        assert (
            sample(metric_samples(c), "unisondb_backup_failure_total", namespace=NS, kind="wal") == before + 1
        )
        # The archive copy taken before the damage is never re-vouched for bad bytes:
        r = wal_backup(c, {"backupDir": "first"})
        assert r.status_code == 500
        sha256sum_check(backup_root(data) / "first")
        put(c, "still", b"serving")
        assert get(c, "still") == b"serving"


def test_wal_backup_of_intact_segments_still_byte_identical(
    server_factory: Callable[..., Server], tmp_path: Path
) -> None:
    data = tmp_path / "data"
    srv = server_factory(data, NS, extra_args=["--wal-segment-size", "64KiB"])
    with srv.client() as c:
        fill_segments(c, 200_000, "w")
        r = wal_backup(c, {"backupDir": "a", "rotate": True})
        assert r.status_code == 200
    dest = backup_root(data) / "a"
    copies = sorted(dest.glob("*.wal"))
    assert copies
    for p in copies:
        assert p.read_bytes() == (data / NS / "wal" / p.name).read_bytes()
    sha256sum_check(dest)
