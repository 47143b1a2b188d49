"""Backup faults: permission denied, no space left (faked and real), kill -9 mid-snapshot.

After every failure: the exact documented error, no ``.tmp`` and no partial file, the
failure counted in the metrics, and the server still serving.
"""

from __future__ import annotations

import errno
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import anyio
import httpx
import lmdb
import pytest
from starlette.types import ASGIApp
from test_backup_helpers import (
    NS,
    Server,
    backup_root,
    btree_backup,
    fill_segments,
    get,
    immutable,
    put,
    read_snapshot,
    sha256sum_check,
    tmp_files,
    wal_backup,
)

from unisondb.api.app import build_app
from unisondb.backup import files, snapshot
from unisondb.config import EngineConfig
from unisondb.metrics import Metrics
from unisondb.storage.btree import Checkpoint
from unisondb.storage.engine import Engine
from unisondb.storage.record import Entry, EntryKind


def assert_clean(directory: Path, *names: str) -> None:
    """No .tmp anywhere below ``directory`` and none of ``names`` (nor their sidecars)."""
    assert tmp_files(directory) == []
    for name in names:
        assert not (directory / name).exists(), name
        assert not (directory / (name + ".sha256")).exists(), name


# --- permission denied (real: chattr +i, which stops root too) ---


def test_permission_denied_both_endpoints(server_factory: Callable[..., Server], tmp_path: Path) -> None:
    srv = server_factory(tmp_path / "data", "default", "users", extra_args=["--wal-segment-size", "64KiB"])
    root = backup_root(srv.data_dir)
    ro = root / "ro"
    ro.mkdir()
    with srv.client() as c:
        fill_segments(c, 150_000, "p")
        with immutable(ro):
            for resp in (
                btree_backup(c, "ro/s.db"),  # cannot create s.db.tmp
                btree_backup(c, "ro/new/s.db"),  # cannot create new/
                wal_backup(c, {"backupDir": "ro"}),  # cannot create *.wal.tmp
                wal_backup(c, {"backupDir": "ro/new"}),
            ):
                assert resp.status_code == 500, resp.text
                assert resp.json() == {"error": f"permission denied: {ro}"}
            assert list(ro.iterdir()) == []
            put(c, "still", b"serving")
            assert get(c, "still") == b"serving"
            body = c.get("/metrics").text
            assert f'unisondb_backup_failure_total{{kind="btree",namespace="{NS}"}} 2.0' in body
            assert f'unisondb_backup_failure_total{{kind="wal",namespace="{NS}"}} 2.0' in body
        assert btree_backup(c, "ro/s.db").status_code == 200
        assert wal_backup(c, {"backupDir": "ro"}).status_code == 200
        sha256sum_check(ro)
    assert tmp_files(root) == []


# --- no space left on device: FAKE (in-process) ---
# A full disk cannot be produced on demand on every machine, so these two tests fake the
# moment the disk fills up, and say so:
# * WAL: ``unisondb.backup.files.copy_range`` — the one function every copied WAL byte goes
#   through (a kernel copy) — and ``files.write_all`` (sidecars) raise a real
#   OSError(ENOSPC) once a byte budget is used up;
# * snapshot: LMDB writes the copy itself (C code, no Python seam), so
#   ``unisondb.backup.snapshot.copy_env`` writes part of a copy and then raises exactly
#   what py-lmdb raises on a full disk (``test_lmdb_reports_enospc_as_the_fake_does``
#   checks that against /dev/full).
# Everything else is real: engine, files, cleanup, the HTTP app (in-process via ASGI).
# ``test_enospc_real_full_filesystem`` below does it for real where a tmpfs can be mounted.


class InProcess:
    """The real ASGI app over an in-process engine, called through httpx's ASGI transport."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    def post(self, url: str, json: dict[str, Any]) -> httpx.Response:
        async def go() -> httpx.Response:
            transport = httpx.ASGITransport(app=self.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://in-process") as c:
                return await c.post(url, json=json)

        return anyio.run(go)


@pytest.fixture
def inproc(tmp_path: Path) -> Iterator[tuple[InProcess, Engine, Metrics]]:
    eng = Engine.open(tmp_path / "data", NS, EngineConfig(segment_size=3 << 20))
    metrics = Metrics()
    metrics.init_namespace(NS)
    try:
        yield InProcess(build_app({NS: eng}, metrics, data_dir=str(tmp_path / "data"))), eng, metrics
    finally:
        eng.close()


def enospc_after(monkeypatch: pytest.MonkeyPatch, budget: int) -> None:
    real = files.write_all
    used = 0

    def fake_write_all(fd: int, data: bytes | memoryview) -> None:
        nonlocal used
        if used + len(data) > budget:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        used += len(data)
        real(fd, data)

    real_copy = files.copy_range

    def fake_copy_range(src: int, dst: int, size: int, throttle: Callable[[int], None] | None = None) -> None:
        nonlocal used
        if used + size > budget:
            real_copy(src, dst, budget - used)  # the disk fills up part-way through the copy
            used = budget
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        used += size
        real_copy(src, dst, size, throttle)

    monkeypatch.setattr(files, "write_all", fake_write_all)
    monkeypatch.setattr(files, "copy_range", fake_copy_range)


def failures(metrics: Metrics, kind: str) -> float:
    value = metrics.registry.get_sample_value(
        "unisondb_backup_failure_total", {"namespace": NS, "kind": kind}
    )
    return value or 0.0


def test_lmdb_reports_enospc_as_the_fake_does(tmp_path: Path) -> None:
    """What py-lmdb raises when the disk is full (/dev/full): the fake above mimics it."""
    env = lmdb.open(str(tmp_path / "env"), map_size=1 << 24)
    try:
        with env.begin(write=True) as txn:
            txn.put(b"k", os.urandom(1 << 20))
        fd = os.open("/dev/full", os.O_WRONLY)
        try:
            with pytest.raises(lmdb.DiskError) as err:
                env.copyfd(fd, compact=True)
        finally:
            os.close(fd)
    finally:
        env.close()
    assert str(err.value) == "mdb_env_copyfd3: " + os.strerror(errno.ENOSPC)


def test_enospc_mid_snapshot_fake(
    inproc: tuple[InProcess, Engine, Metrics], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    client, eng, metrics = inproc
    for i in range(64):
        eng.put(b"k%03d" % i, os.urandom(64 << 10))  # ~4 MiB: the copy is several chunks
    root = backup_root(tmp_path / "data")

    def copy_env_disk_full(engine: Engine, f: BinaryIO) -> Checkpoint:
        os.write(f.fileno(), b"\0" * (2 << 20))  # part of the copy got written ...
        raise lmdb.DiskError("mdb_env_copyfd3: " + os.strerror(errno.ENOSPC))  # ... then full

    monkeypatch.setattr(snapshot, "copy_env", copy_env_disk_full)
    r = client.post(f"/api/v1/{NS}/btree/backup", json={"path": "snaps/s.db"})
    assert r.status_code == 507
    assert r.json() == {"error": f"no space left on device: {root / 'snaps' / 's.db'}"}
    assert_clean(root / "snaps", "s.db")
    assert failures(metrics, "btree") == 1
    # The engine keeps serving, and once there is space the same request works.
    eng.put(b"after", b"enospc")
    monkeypatch.undo()
    r = client.post(f"/api/v1/{NS}/btree/backup", json={"path": "snaps/s.db"})
    assert r.status_code == 200, r.text
    data, cp = read_snapshot(root / "snaps" / "s.db")
    assert data[b"after"] == b"enospc" and cp.applied_lsn == r.json()["lsn"] == 65
    sha256sum_check(root / "snaps")


def test_enospc_mid_wal_copy_fake(
    inproc: tuple[InProcess, Engine, Metrics], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    client, eng, metrics = inproc
    for i in range(110):
        eng.put(b"k%03d" % i, os.urandom(64 << 10))  # ~7 MiB: two sealed 3 MiB segments
    eng.rotate()
    sealed = eng.wal.sealed_segments()
    assert len(sealed) >= 2
    first = sealed[0]
    dest = backup_root(tmp_path / "data") / "wal" / "x"
    # Enough for segment 1 and its sidecar, then ENOSPC in the middle of segment 2.
    enospc_after(monkeypatch, first.size + 200 + (3 << 19))
    r = client.post(f"/api/v1/{NS}/wal/backup", json={"backupDir": "wal/x"})
    assert r.status_code == 507
    second = f"{sealed[1].segment_id:09d}.wal"
    assert r.json() == {"error": f"no space left on device: {dest / second}"}
    assert_clean(dest, second)
    first_name = f"{first.segment_id:09d}.wal"
    assert (dest / first_name).read_bytes() == first.path.read_bytes()  # complete, verified
    sha256sum_check(dest)
    assert failures(metrics, "wal") == 1
    monkeypatch.undo()
    r = client.post(f"/api/v1/{NS}/wal/backup", json={"backupDir": "wal/x"})
    assert r.status_code == 200, r.text
    assert [(b["segmentId"], b["copied"]) for b in r.json()["backups"]] == [
        (s.segment_id, s.segment_id != first.segment_id) for s in sealed
    ]
    sha256sum_check(dest)


def test_enospc_on_the_snapshot_sidecar_fake(
    inproc: tuple[InProcess, Engine, Metrics], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Finding 6: only the .sha256 hits ENOSPC. The snapshot is withdrawn; a retry works.

    Fake through ``files.write_all``: the 4096-byte trailer is the last snapshot byte it
    writes, so a budget of exactly 4096 lets the snapshot be published and fails the
    sidecar. ``test_enospc_on_the_snapshot_sidecar_real`` does it on a full tmpfs.
    """
    client, eng, metrics = inproc
    for i in range(16):
        eng.put(b"k%03d" % i, os.urandom(8 << 10))
    root = backup_root(tmp_path / "data")
    enospc_after(monkeypatch, 4096)
    r = client.post(f"/api/v1/{NS}/btree/backup", json={"path": "snaps/s.db"})
    assert r.status_code == 507, r.text
    assert r.json() == {"error": f"no space left on device: {root / 'snaps' / 's.db.sha256'}"}
    assert list((root / "snaps").iterdir()) == []  # no snapshot, no sidecar, no .tmp
    assert failures(metrics, "btree") == 1
    monkeypatch.undo()
    r = client.post(f"/api/v1/{NS}/btree/backup", json={"path": "snaps/s.db"})
    assert r.status_code == 200, r.text
    assert r.json()["copied"] is True
    sha256sum_check(root / "snaps")


def test_enospc_on_the_wal_sidecar_withdraws_the_segment_fake(
    inproc: tuple[InProcess, Engine, Metrics], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    client, eng, metrics = inproc
    for i in range(60):
        eng.put(b"k%03d" % i, os.urandom(64 << 10))
    eng.rotate()
    first = eng.wal.sealed_segments()[0]
    dest = backup_root(tmp_path / "data") / "wal" / "x"
    enospc_after(monkeypatch, first.size)  # the segment fits, its sidecar does not
    r = client.post(f"/api/v1/{NS}/wal/backup", json={"backupDir": "wal/x"})
    assert r.status_code == 507, r.text
    name = f"{first.segment_id:09d}.wal"
    assert r.json() == {"error": f"no space left on device: {dest / (name + '.sha256')}"}
    assert list(dest.iterdir()) == []
    assert failures(metrics, "wal") == 1


def mount_tmpfs(at: Path, size: int, remount: bool = False) -> None:
    opts = f"remount,size={size}" if remount else f"size={size}"
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(at)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(
            f"cannot mount a small tmpfs here (needs root/CAP_SYS_ADMIN): "
            f"{r.stderr.strip()}; the faked ENOSPC tests still run"
        )


def test_enospc_on_the_snapshot_sidecar_real(server_factory: Callable[..., Server], tmp_path: Path) -> None:
    """A tmpfs exactly as big as the snapshot: the snapshot fits, its sidecar does not."""
    srv = server_factory(tmp_path / "data", NS)
    root = backup_root(srv.data_dir)
    full = root / "full"
    full.mkdir()
    with srv.client() as c:
        fill_segments(c, 200_000, "big")
        probe = btree_backup(c, "probe.db")  # the same state: the same size
        assert probe.status_code == 200
        size = probe.json()["bytes"]
        mount_tmpfs(full, size)
        try:
            r = btree_backup(c, "full/s.db")
            assert r.status_code == 507, r.text
            assert r.json() == {"error": f"no space left on device: {full / 's.db.sha256'}"}
            assert list(full.iterdir()) == []
            r = btree_backup(c, "full/s.db")  # still full: the same answer, nothing left
            assert r.status_code == 507 and list(full.iterdir()) == []
            mount_tmpfs(full, size + (64 << 10), remount=True)
            r = btree_backup(c, "full/s.db")
            assert r.status_code == 200, r.text
            sha256sum_check(full)
        finally:
            subprocess.run(["umount", str(full)], check=True)


# --- no space left on device: REAL (a 1 MiB tmpfs mounted inside the backup root) ---


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Callable[[Path], None]]:
    mounted: list[Path] = []

    def mount(at: Path) -> None:
        at.mkdir(parents=True)
        r = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(at)], capture_output=True, text=True
        )
        if r.returncode != 0:
            pytest.skip(
                f"cannot mount a small tmpfs here (needs root/CAP_SYS_ADMIN): "
                f"{r.stderr.strip()}; the faked ENOSPC tests still run"
            )
        mounted.append(at)

    yield mount
    for at in mounted:
        subprocess.run(["umount", str(at)], check=True)


def test_enospc_real_full_filesystem(
    server_factory: Callable[..., Server], tmp_path: Path, tiny_fs: Callable[[Path], None]
) -> None:
    srv = server_factory(tmp_path / "data", "default", "users", extra_args=["--wal-segment-size", "256KiB"])
    root = backup_root(srv.data_dir)
    full = root / "full"
    tiny_fs(full)
    with srv.client() as c:
        fill_segments(c, 3 << 20, "big")  # ~3 MiB of random values: neither copy fits
        r = btree_backup(c, "full/s.db")
        assert r.status_code == 507, r.text
        assert r.json() == {"error": f"no space left on device: {full / 's.db'}"}
        assert_clean(full, "s.db")
        r = wal_backup(c, {"backupDir": "full"})
        assert r.status_code == 507, r.text
        assert r.json()["error"].startswith(f"no space left on device: {full}/")
        assert tmp_files(full) == []
        partial = Path(r.json()["error"].split(": ", 1)[1])
        assert not partial.exists()
        done = sorted(full.glob("*.wal"))
        assert done and all(p.read_bytes() == (srv.data_dir / NS / "wal" / p.name).read_bytes() for p in done)
        sha256sum_check(full)
        put(c, "still", b"serving")
        assert get(c, "still") == b"serving"


# --- kill -9 in the middle of a snapshot ---


def test_kill9_mid_snapshot_leaves_no_tmp_after_restart(
    server_factory: Callable[..., Server], tmp_path: Path
) -> None:
    data = tmp_path / "data"
    eng = Engine.open(data, NS)
    for i in range(50):  # 50 MiB of values (1 MiB batches), written in-process for speed
        eng.write([Entry(EntryKind.PUT, b"big-%02d-%02d" % (i, j), os.urandom(64 << 10)) for j in range(16)])
    eng.close()
    root = backup_root(data)
    for attempt in range(3):
        srv = server_factory(data, "users")
        name = f"snaps/kill-{attempt}.db"
        tmp = root / (name + ".tmp")

        def request(url: str = srv.url, name: str = name) -> None:
            try:
                httpx.post(f"{url}/api/v1/{NS}/btree/backup", json={"path": name}, timeout=60)
            except httpx.TransportError:
                pass  # the server was killed under it: expected

        t = threading.Thread(target=request)
        t.start()
        deadline = time.monotonic() + 30
        while not tmp.exists() and time.monotonic() < deadline and t.is_alive():
            time.sleep(0.0005)
        srv.kill9()
        t.join()
        if tmp.exists():
            break
    else:
        pytest.fail("the snapshot always finished before the kill; make the database bigger")
    assert not (root / name).exists()
    srv = server_factory(data, "users")
    assert tmp_files(root) == []
    assert "startup.removed_tmp_files" in srv.log()
    with srv.client() as c:
        assert get(c, "big-49-15") is not None
        put(c, "after-kill", b"ok")
        assert btree_backup(c, name).status_code == 200
    sha256sum_check(root / "snaps")
