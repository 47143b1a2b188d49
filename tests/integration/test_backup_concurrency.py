"""Snapshots and WAL backups while 16 writers PUT and small segments rotate.

One load run (module fixture) against a real server with ``--wal-segment-size 64KiB``:
16 threads each PUT ``w<w>-<i>`` with increasing ``i`` (the next PUT only after the previous
one was acknowledged) and overwrite ``hot-<w>``; meanwhile the main thread alternates
B-tree snapshots and incremental WAL backups (some with ``rotate``). Then the server is
stopped and its WAL — the source of truth — is read back record by record, so for every
snapshot the exact expected state at its reported LSN can be rebuilt and compared.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from serverproc import wait_applied
from test_backup_helpers import (
    NS,
    OwnServer,
    apply_records,
    b64,
    backup_root,
    batch_put,
    get,
    read_snapshot,
    sha256sum_check,
    tmp_files,
    wal_records,
)

from unisondb.storage.record import Record

WRITERS = 16
LOAD_SECONDS = 4.0
MIN_SNAPSHOTS = 6
PRELOAD_BYTES = 10 << 20  # so a snapshot takes long enough to overlap with acknowledged PUTs


def value_of(w: int, i: int) -> bytes:
    return f"{w}:{i}:".encode().ljust(300, b"v")


@dataclass
class LoadRun:
    data_dir: Path
    snapshots: list[tuple[float, float, dict[str, Any]]] = field(default_factory=list)
    wal_responses: list[list[dict[str, Any]]] = field(default_factory=list)
    #: (writer, index, time acknowledged)
    acks: list[tuple[int, int, float]] = field(default_factory=list)
    records: list[Record] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def state_at(self, lsn: int) -> dict[bytes, bytes]:
        state: dict[bytes, bytes] = {}
        apply_records(state, self.records[:lsn])
        return state


def _writer(url: str, w: int, stop: threading.Event, run: LoadRun, lock: threading.Lock) -> None:
    with httpx.Client(base_url=url, timeout=30) as c:
        i = 0
        while not stop.is_set():
            r = c.put(f"/api/v1/{NS}/kv/w{w:02d}-{i:06d}", json={"value": b64(value_of(w, i))})
            t = time.monotonic()
            if r.status_code != 200:
                run.errors.append(f"writer {w} put {i}: {r.status_code} {r.text}")
                return
            with lock:
                run.acks.append((w, i, t))
            if i % 10 == 0:
                r = c.put(f"/api/v1/{NS}/kv/hot-{w}", json={"value": b64(b"%d" % i)})
                if r.status_code != 200:
                    run.errors.append(f"writer {w} hot {i}: {r.status_code} {r.text}")
                    return
            i += 1


@pytest.fixture(scope="module")
def load_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoadRun]:
    base = tmp_path_factory.mktemp("load")
    srv = OwnServer(base / "data", NS, extra_args=["--wal-segment-size", "64KiB"])
    run = LoadRun(srv.data_dir)
    try:
        with srv.client() as c:
            for n in range(PRELOAD_BYTES // (640 << 10)):
                batch_put(c, {f"pre-{n}-{j}": bytes([n % 256]) * (64 << 10) for j in range(10)})
            stop = threading.Event()
            lock = threading.Lock()
            threads = [
                threading.Thread(target=_writer, args=(srv.url, w, stop, run, lock)) for w in range(WRITERS)
            ]
            for t in threads:
                t.start()
            started = time.monotonic()
            last_seg = 0
            n = 0
            while n < MIN_SNAPSHOTS or time.monotonic() - started < LOAD_SECONDS:
                t0 = time.monotonic()
                r = c.post(f"/api/v1/{NS}/btree/backup", json={"path": f"snaps/s{n:02d}.db"})
                t1 = time.monotonic()
                assert r.status_code == 200, r.text
                run.snapshots.append((t0, t1, r.json()))
                r = c.post(
                    f"/api/v1/{NS}/wal/backup",
                    json={"afterSegmentId": last_seg, "backupDir": "wal/inc", "rotate": n % 2 == 1},
                )
                assert r.status_code == 200, r.text
                backups = r.json()["backups"]
                run.wal_responses.append(backups)
                if backups:
                    last_seg = backups[-1]["segmentId"]
                n += 1
            stop.set()
            for t in threads:
                t.join()
            r = c.post(
                f"/api/v1/{NS}/wal/backup",
                json={"afterSegmentId": last_seg, "backupDir": "wal/inc", "rotate": True},
            )
            assert r.status_code == 200, r.text
            run.wal_responses.append(r.json()["backups"])
        assert srv.stop() == 0, srv.log()
        run.records = wal_records(srv.data_dir / NS / "wal")
        yield run
    finally:
        srv.kill9()


def test_snapshots_under_load_are_exact_states(load_run: LoadRun) -> None:
    run = load_run
    assert not run.errors, run.errors[:5]
    assert len(run.acks) > 1000, "the load was too light to mean anything"
    assert len(run.snapshots) >= MIN_SNAPSHOTS
    lsns = [resp["lsn"] for _t0, _t1, resp in run.snapshots]
    assert lsns == sorted(lsns) and lsns[0] < lsns[-1]
    overlapping = 0
    for t0, t1, resp in run.snapshots:
        path = Path(resp["path"])
        data, cp = read_snapshot(path)  # opens as an LMDB environment
        assert cp.applied_lsn == resp["lsn"] and cp.timeline == resp["timeline"]
        assert cp.segment_id == resp["segmentId"]
        assert resp["bytes"] == path.stat().st_size
        # Exactly the state after LSN `lsn`: everything at or before it, nothing after.
        assert data == run.state_at(resp["lsn"]), f"{path.name} is not the state at its LSN"
        # Each writer's keys form a prefix of its acknowledged sequence ...
        for w in range(WRITERS):
            idx = sorted(int(k[4:]) for k in data if k.startswith(b"w%02d-" % w))
            assert idx == list(range(len(idx)))
        # ... and every PUT acknowledged before the request was sent is in it.
        for w, i, t_ack in run.acks:
            if t_ack < t0:
                assert data[b"w%02d-%06d" % (w, i)] == value_of(w, i)
            elif t_ack < t1:
                overlapping += 1
    print(
        f"acks={len(run.acks)} snapshots={len(run.snapshots)} overlapping={overlapping} "
        f"segments={sum(len(b) for b in run.wal_responses)}"
    )
    assert overlapping > 0, "no PUT was acknowledged while a snapshot was running"
    sha256sum_check(backup_root(run.data_dir) / "snaps")


def test_wal_backups_under_load_are_complete_and_identical(load_run: LoadRun) -> None:
    run = load_run
    wal_dir = run.data_dir / NS / "wal"
    inc = backup_root(run.data_dir) / "wal" / "inc"
    seen: list[int] = [b["segmentId"] for batch in run.wal_responses for b in batch]
    assert all(b["copied"] for batch in run.wal_responses for b in batch)
    assert seen == sorted(set(seen)), "a segment was backed up twice or out of order"
    sources = sorted(int(p.name[:9]) for p in wal_dir.glob("*.wal"))
    # Everything except the (empty) active segment the server stopped with.
    assert seen == sources[:-1]
    assert len(seen) >= 10, "too few segments rotated to mean anything"
    for seg in seen:
        name = f"{seg:09d}.wal"
        assert (inc / name).read_bytes() == (wal_dir / name).read_bytes()
    sha256sum_check(inc)
    assert tmp_files(backup_root(run.data_dir)) == []


DOC_RESTORE_COPY = """\
rm -rf "$DATA_DIR/db"/*
mkdir -p "$DATA_DIR/db"

# Copy snapshot to data directory (engine-specific)
# For LMDB:
cp /tmp/restore.db "$DATA_DIR/db/data.mdb"
"""


def test_snapshot_under_load_restores_to_exactly_its_lsn(load_run: LoadRun, tmp_path: Path) -> None:
    """The document's "Full Restore" copy steps, into a fresh data dir, then a real server."""
    run = load_run
    _t0, _t1, resp = run.snapshots[len(run.snapshots) // 2]
    expected = run.state_at(resp["lsn"])
    data_dir = tmp_path / "restored"
    restore_db = tmp_path / "restore.db"
    shutil.copyfile(resp["path"], restore_db)
    script = f'NAMESPACE="{NS}"\nDATA_DIR="{data_dir}/$NAMESPACE"\n' + DOC_RESTORE_COPY.replace(
        "/tmp/restore.db", str(restore_db)
    )
    subprocess.run(["bash", "-c", script], check=True)
    assert sorted(p.name for p in (data_dir / NS).rglob("*")) == ["data.mdb", "db"]
    srv = OwnServer(data_dir, NS)
    try:
        with srv.client() as c:
            cp = c.get(f"/api/v1/{NS}/checkpoint").json()
            assert cp["lsn"] == resp["lsn"]
            keys = [k.decode() for k in expected]
            local = threading.local()
            clients: list[httpx.Client] = []

            def check(chunk: list[str]) -> list[str]:
                if not hasattr(local, "client"):
                    local.client = srv.client()
                    clients.append(local.client)
                return [k for k in chunk if get(local.client, k) != expected[k.encode()]]

            chunks = [keys[i : i + 200] for i in range(0, len(keys), 200)]
            with ThreadPoolExecutor(4) as pool:
                wrong = [k for bad in pool.map(check, chunks) for k in bad]
            for client in clients:
                client.close()
            assert not wrong, wrong[:5]
            # The first PUT of each writer that the snapshot does not hold is absent.
            for w in range(WRITERS):
                n = sum(1 for k in expected if k.startswith(b"w%02d-" % w))
                assert get(c, f"w{w:02d}-{n:06d}") is None
            # The restored namespace takes writes with the next LSN.
            c.put(f"/api/v1/{NS}/kv/after-restore", json={"value": b64(b"x")})
            assert c.get(f"/api/v1/{NS}/stats").json()["lastLsn"] == resp["lsn"] + 1
            assert wait_applied(c, f"/api/v1/{NS}/stats") == resp["lsn"] + 1
            assert c.get(f"/api/v1/{NS}/checkpoint").json()["lsn"] == resp["lsn"] + 1
        assert srv.stop() == 0
    finally:
        srv.kill9()
    data, _cp = read_snapshot(data_dir / NS / "db" / "data.mdb")
    expected[b"after-restore"] = b"x"
    assert data == expected
