"""A full data volume is a state, not a death (issue 12, item 2): real server, real tmpfs.

Each test mounts its own 8 MiB tmpfs (root only; skipped with the reason otherwise), puts
the data directory on it, fills it with a filler file and deletes the filler again. Nothing
is faked: the ENOSPC (or LMDB's EIO for it) comes from the kernel. What is checked:

* 507 with the document's message ``no space left on device: <path>``;
* the namespace stays readable while the disk is full;
* writes resume by themselves once space is freed (no restart);
* every acknowledged write is there after a restart, and a write answered 507 although
  durable is counted in ``unisondb_writes_durable_but_failed_total``;
* starting on a full disk prints one error line, exits with the error tree's code, and
  leaves no ``.tmp`` behind.
"""

from __future__ import annotations

import base64
import errno
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from serverproc import ServerProcess, start_server

NO_SPACE = "no space left on device: "
#: Retry quickly so "resumes by itself" is observed in well under a second.
FAST_RETRY = ["--disk-full-retry", "50ms"]


def _b64(data: bytes) -> dict[str, str]:
    return {"value": base64.b64encode(data).decode()}


def _free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


@dataclass
class SmallDisk:
    """An 8 MiB tmpfs at ``mnt`` with a data directory on it, and the servers started on it."""

    mnt: Path
    logs: Path
    servers: list[ServerProcess] = field(default_factory=list)
    fillers: int = 0

    @property
    def data_dir(self) -> Path:
        return self.mnt / "data"

    def start(self, *extra: str) -> ServerProcess:
        # The log lives off the small disk: it must not take space or fail to be written.
        srv = start_server(
            self.data_dir,
            ("default",),
            [*FAST_RETRY, *extra],
            log_path=self.logs / f"server-{len(self.servers)}.log",
        )
        self.servers.append(srv)
        return srv

    def fill(self, leave: int = 0) -> Path:
        """Write a filler file until only ``leave`` bytes are free (0: until ENOSPC)."""
        self.fillers += 1
        path = self.mnt / f"filler-{self.fillers}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            block = b"\0" * 65536
            while True:
                room = _free(self.mnt) - leave
                if room <= 0:
                    break
                try:
                    os.write(fd, block[: min(len(block), room)])
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC
                    break
        finally:
            os.close(fd)
        return path


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[SmallDisk]:
    if os.geteuid() != 0:
        pytest.skip("the disk-full tests mount a small tmpfs, which needs root")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(
            f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode}); "
            "the disk-full tests need a small real file system"
        )
    d = SmallDisk(mnt, tmp_path)
    try:
        yield d
    finally:
        for srv in d.servers:
            srv.stop(signal.SIGKILL)
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _metric(client: httpx.Client, name: str) -> float:
    text = client.get("/metrics").text
    m = re.search(rf'^{name}\{{namespace="default"\}} (\S+)$', text, re.M)
    assert m, f"{name} missing from /metrics"
    return float(m.group(1))


def _eventually(check: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _check_after_restart(disk: SmallDisk, srv: ServerProcess, acked: dict[str, bytes]) -> None:
    assert srv.stop() == 0, srv.log()
    again = disk.start()
    with again.client() as c:
        for key, value in acked.items():
            r = c.get(f"/api/v1/default/kv/{key}")
            assert r.status_code == 200, (key, r.text)
            assert base64.b64decode(r.json()["value"]) == value, key


def test_wal_enospc_is_507_reads_go_on_and_writes_resume_when_space_is_freed(disk: SmallDisk) -> None:
    srv = disk.start()
    acked: dict[str, bytes] = {}
    with srv.client() as c:
        assert c.put("/api/v1/default/kv/a", json=_b64(b"1")).status_code == 200
        acked["a"] = b"1"
        # "a" is acknowledged at the WAL fsync and applied to LMDB just after: fill the disk
        # only once LMDB has it, or its commit (not the WAL) meets the full disk first.
        _eventually(lambda: _metric(c, "unisondb_lmdb_lag_records") == 0, "LMDB to apply 'a'")
        filler = disk.fill()
        big = os.urandom(200_000)
        r = c.put("/api/v1/default/kv/big", json=_b64(big))
        assert r.status_code == 507, r.text
        assert r.json()["error"].startswith(NO_SPACE), r.text
        assert "/wal/" in r.json()["error"]
        assert c.get("/api/v1/default/kv/a").status_code == 200  # still readable
        # A rotation on the full disk (WAL backup with rotate) fails with 507, not a stop.
        r = c.post("/api/v1/default/wal/backup", json={"backupDir": "w", "rotate": True})
        assert r.status_code == 507, r.text
        assert r.json()["error"].startswith(NO_SPACE), r.text
        assert c.get("/health").status_code == 200
        filler.unlink()
        # No restart: the next write (or the retry of a stalled rotation) just works.
        _eventually(
            lambda: c.put("/api/v1/default/kv/big", json=_b64(big)).status_code == 200,
            "writes to resume after the filler was deleted",
        )
        acked["big"] = big
        r = c.post("/api/v1/default/wal/backup", json={"backupDir": "w", "rotate": True})
        assert r.status_code == 200, r.text
        assert _metric(c, "unisondb_writes_durable_but_failed_total") == 0
    assert not list(disk.data_dir.rglob("*.tmp"))
    _check_after_restart(disk, srv, acked)


def _fill_so_lmdb_fails(disk: SmallDisk) -> tuple[Path, bytes]:
    """Leave room for a value's WAL record but not for its LMDB pages as well."""
    filler = disk.fill(leave=512 << 10)
    return filler, os.urandom(320 << 10)


def test_lmdb_enospc_stalls_writes_and_acknowledges_the_durable_write_once_space_returns(
    disk: SmallDisk,
) -> None:
    # --ack lmdb: a write waits for LMDB, so LMDB's refusal comes before the answer.
    srv = disk.start("--ack", "lmdb", "--disk-full-hold", "60s")
    acked = {f"k{i}": b"v%d" % i for i in range(5)}
    with srv.client() as c:
        for key, value in acked.items():
            assert c.put(f"/api/v1/default/kv/{key}", json=_b64(value)).status_code == 200
        filler, big = _fill_so_lmdb_fails(disk)
        answer: list[httpx.Response] = []
        writer = threading.Thread(
            target=lambda: answer.append(srv.client().put("/api/v1/default/kv/big", json=_b64(big)))
        )
        writer.start()
        # The record is durable in the WAL; LMDB could not take it: writes are stalled.
        _eventually(lambda: _metric(c, "unisondb_writes_stalled") == 1, "the stall")
        r = c.put("/api/v1/default/kv/other", json=_b64(b"x"))
        assert r.status_code == 507, r.text
        assert r.json()["error"].startswith(NO_SPACE) and "data.mdb" in r.json()["error"]
        assert c.get("/api/v1/default/kv/k1").status_code == 200  # reads go on
        assert not answer, "a durable write must not be answered while a retry may succeed"
        filler.unlink()
        writer.join(timeout=30)
        assert answer and answer[0].status_code == 200, answer and answer[0].text
        acked["big"] = big
        assert _metric(c, "unisondb_writes_stalled") == 0
        assert _metric(c, "unisondb_writes_durable_but_failed_total") == 0
        assert c.put("/api/v1/default/kv/after", json=_b64(b"y")).status_code == 200
        acked["after"] = b"y"
    assert "engine.resumed" in srv.log()
    _check_after_restart(disk, srv, acked)


def test_a_durable_write_answered_507_is_counted_and_applied_once_space_returns(disk: SmallDisk) -> None:
    srv = disk.start("--ack", "lmdb", "--disk-full-hold", "0s")  # (durable-but-failed: --ack lmdb only)
    with srv.client() as c:
        assert c.put("/api/v1/default/kv/a", json=_b64(b"1")).status_code == 200
        filler, big = _fill_so_lmdb_fails(disk)
        r = c.put("/api/v1/default/kv/big", json=_b64(big))
        assert r.status_code == 507, r.text
        assert r.json()["error"].startswith(NO_SPACE), r.text
        # Answered failed, but durable: documented, and counted.
        assert _metric(c, "unisondb_writes_durable_but_failed_total") == 1
        # (Not asserted: that it is invisible now. LMDB's aborted commit left its pages
        # allocated, so a retry 50 ms later may already fit and apply it.)
        filler.unlink()
        _eventually(
            lambda: c.get("/api/v1/default/kv/big").status_code == 200, "the pending record to be applied"
        )
        _eventually(
            lambda: c.put("/api/v1/default/kv/b", json=_b64(b"2")).status_code == 200, "writes to resume"
        )
    srv.kill9()  # even without a clean stop, the WAL has it
    again = disk.start()
    with again.client() as c:
        assert base64.b64decode(c.get("/api/v1/default/kv/big").json()["value"]) == big
        assert c.get("/api/v1/default/kv/b").status_code == 200


def test_ack_wal_lmdb_enospc_after_the_answer_keeps_the_write_visible_and_stalls_new_ones(
    disk: SmallDisk,
) -> None:
    """``--ack wal`` (the default): the write is answered once its WAL record is durable;
    LMDB refuses it afterwards, in the applier. It stays visible (the in-memory table),
    new writes and rotations get 507 while LMDB refuses, reads go on, the applier's retry
    takes it once space returns, and nothing is ever answered 507 although durable."""
    srv = disk.start()
    acked = {f"k{i}": b"v%d" % i for i in range(5)}
    with srv.client() as c:
        assert c.get("/api/v1/default/stats").json()["ack"] == "wal"
        for key, value in acked.items():
            assert c.put(f"/api/v1/default/kv/{key}", json=_b64(value)).status_code == 200
        filler, big = _fill_so_lmdb_fails(disk)
        r = c.put("/api/v1/default/kv/big", json=_b64(big))
        assert r.status_code == 200, r.text  # durable in the WAL: acknowledged
        acked["big"] = big
        _eventually(lambda: _metric(c, "unisondb_writes_stalled") == 1, "the applier's stall")
        got = c.get("/api/v1/default/kv/big")  # read-your-writes although LMDB refused it
        assert got.status_code == 200 and base64.b64decode(got.json()["value"]) == big
        stats = c.get("/api/v1/default/stats").json()
        assert stats["lmdbLagRecords"] >= 1 and stats["memtableBytes"] > len(big)
        assert stats["appliedLsn"] < stats["lastLsn"]
        r = c.put("/api/v1/default/kv/other", json=_b64(b"x"))
        assert r.status_code == 507, r.text
        assert r.json()["error"].startswith(NO_SPACE) and "data.mdb" in r.json()["error"]
        r = c.post("/api/v1/default/wal/backup", json={"backupDir": "w", "rotate": True})
        assert r.status_code == 507, r.text  # a seal needs LMDB to hold the segment's records
        assert c.get("/api/v1/default/kv/k1").status_code == 200  # reads go on
        filler.unlink()
        _eventually(lambda: _metric(c, "unisondb_writes_stalled") == 0, "the applier's retry")
        assert c.put("/api/v1/default/kv/after", json=_b64(b"y")).status_code == 200
        acked["after"] = b"y"
        _eventually(lambda: c.get("/api/v1/default/stats").json()["lmdbLagRecords"] == 0, "LMDB to catch up")
        assert _metric(c, "unisondb_writes_durable_but_failed_total") == 0
    assert "engine.resumed" in srv.log()
    _check_after_restart(disk, srv, acked)


def test_enospc_during_a_snapshot_is_507_leaves_nothing_and_the_namespace_keeps_working(
    disk: SmallDisk,
) -> None:
    srv = disk.start()
    with srv.client() as c:
        for i in range(12):
            assert c.put(f"/api/v1/default/kv/k{i}", json=_b64(os.urandom(100_000))).status_code == 200
        # LMDB applies acknowledged writes up to apply_interval later: let it hold them
        # before the disk fills, so that only the snapshot meets the full disk.
        _eventually(lambda: _metric(c, "unisondb_lmdb_lag_records") == 0, "LMDB to apply the writes")
        filler = disk.fill(leave=400 << 10)
        r = c.post("/api/v1/default/btree/backup", json={"path": "snaps/s1.db"})
        assert r.status_code == 507, r.text
        assert r.json()["error"].startswith(NO_SPACE), r.text
        snaps = disk.data_dir / "backups" / "default" / "snaps"
        assert not [p.name for p in snaps.iterdir()], "nothing published, no .tmp left"
        assert c.put("/api/v1/default/kv/after", json=_b64(b"y")).status_code == 200
        filler.unlink()
        r = c.post("/api/v1/default/btree/backup", json={"path": "snaps/s1.db"})
        assert r.status_code == 200, r.text


def _run_cli(data_dir: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "unisondb",
            "--data-dir",
            str(data_dir),
            "--http-addr",
            "127.0.0.1:1",
        ],  # never reached: startup fails first
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_starting_on_a_full_disk_is_one_error_line_and_leaves_nothing(disk: SmallDisk) -> None:
    filler = disk.fill()
    done = _run_cli(disk.data_dir)
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert done.returncode == 6, done.stderr  # StorageError's exit code (NoSpace)
    assert len(lines) == 1 and lines[0].startswith("error: " + NO_SPACE), done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    assert not list(disk.data_dir.rglob("*.tmp"))
    filler.unlink()


def test_restarting_an_existing_namespace_on_a_full_disk_serves_reads(disk: SmallDisk) -> None:
    """The clean stop left an empty segment, which the start replaces: the start itself
    needs no new space, so the server comes up; reads work, writes get 507 until space
    is freed, and nothing was lost."""
    srv = disk.start()
    with srv.client() as c:
        for i in range(20):
            assert c.put(f"/api/v1/default/kv/k{i}", json=_b64(b"v" * 3000)).status_code == 200
    assert srv.stop() == 0
    filler = disk.fill()
    srv = disk.start()
    with srv.client() as c:
        for i in range(20):
            assert c.get(f"/api/v1/default/kv/k{i}").status_code == 200
        r = c.put("/api/v1/default/kv/big", json=_b64(os.urandom(200_000)))
        assert r.status_code == 507 and r.json()["error"].startswith(NO_SPACE), r.text
        filler.unlink()
        _eventually(
            lambda: c.put("/api/v1/default/kv/x", json=_b64(b"1")).status_code == 200, "writes to resume"
        )
    assert not list(disk.data_dir.rglob("*.tmp"))
