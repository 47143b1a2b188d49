"""kill -9 with writes acknowledged but not yet in LMDB (``--ack wal``): recovery replays them.

The server's applier is held before its first LMDB transaction through the
``UNISONDB_TEST_HOLD=apply:<fifo>`` seam (an exact point, not a timer), so every write
below is acknowledged from the WAL and the in-memory table alone; then the process is
SIGKILLed and restarted. A second test holds it with a small table (``memtable_max_lag``)
under concurrent clients, so the table fills and writes wait (backpressure, shown in
``/stats`` and ``/metrics``), and kills the server while writes are waiting; a third
checks read-your-writes for every client of a real server under concurrent load.
"""

from __future__ import annotations

import base64
import os
import random
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import lmdb
import pytest
from serverproc import wait_hold_reached

from unisondb.storage import layout
from unisondb.storage.btree import CHECKPOINT_KEY, Checkpoint

if TYPE_CHECKING:
    from serverproc import ServerProcess

NS = "default"
API = f"/api/v1/{NS}"


def _applied_lsn_on_disk(data: Path) -> int:
    env = lmdb.open(str(layout.btree_dir(data, NS)), readonly=True, max_dbs=4, lock=False, create=False)
    try:
        with env.begin(db=env.open_db(b"meta", create=False)) as txn:
            raw = txn.get(CHECKPOINT_KEY)
    finally:
        env.close()
    return 0 if raw is None else Checkpoint.decode(raw).applied_lsn


def _metric(text: str, name: str) -> float:
    m = re.search(rf'^{name}\{{namespace="default"\}} (\S+)$', text, re.M)
    assert m, f"{name} missing from /metrics"
    return float(m.group(1))


def test_kill9_with_acknowledged_writes_not_in_lmdb_replays_them(
    server_factory: Callable[..., ServerProcess], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "data"
    fifo = tmp_path / "hold-apply"
    os.mkfifo(fifo)
    monkeypatch.setenv("UNISONDB_TEST_HOLD", f"apply:{fifo}")
    srv = server_factory(data, NS, extra_args=["--ack", "wal"])
    values = {f"k{i}": os.urandom(40) for i in range(100)}
    with srv.client() as c:
        for key, value in values.items():
            r = c.put(f"{API}/kv/{key}", json={"value": base64.b64encode(value).decode()})
            assert r.status_code == 200, r.text
        wait_hold_reached(fifo, srv)  # the applier is at the hold, before its first commit
        for key, value in values.items():  # read-your-writes from the table
            r = c.get(f"{API}/kv/{key}")
            assert r.status_code == 200 and base64.b64decode(r.json()["value"]) == value
        stats = c.get(f"{API}/stats").json()
        assert stats["lastLsn"] == 100 and stats["appliedLsn"] == 0
        assert stats["lmdbLagRecords"] == 100 and stats["memtableBytes"] > 0
        text = c.get("/metrics").text
        assert _metric(text, "unisondb_lmdb_lag_records") == 100
        assert _metric(text, "unisondb_memtable_bytes") > 0
    srv.kill9()
    assert _applied_lsn_on_disk(data) == 0, "LMDB was not behind at the kill"
    monkeypatch.delenv("UNISONDB_TEST_HOLD")
    again = server_factory(data, NS, extra_args=["--ack", "wal"])
    with again.client() as c:
        text = c.get("/metrics").text
        assert _metric(text, "unisondb_recovery_records_replayed") == 100
        for key, value in values.items():
            r = c.get(f"{API}/kv/{key}")
            assert r.status_code == 200, (key, r.text)
            assert base64.b64decode(r.json()["value"]) == value
        assert c.get(f"{API}/stats").json()["appliedLsn"] == 100


MAX_LAG = 20


def test_a_full_table_holds_writers_back_and_kill9_loses_no_acknowledged_write(
    server_factory: Callable[..., ServerProcess], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """LMDB held at its first transaction, a table of at most 20 records, 4 clients each
    writing one counter key (growing versions) and unique keys: the table fills, the
    writer waits (no client gets an answer), ``/stats`` and ``/metrics`` show the lag at
    the bound and the waits; kill -9 then; after the restart every acknowledged write is
    there and each counter holds a version between its last acknowledged and last sent
    one (nothing lost, nothing reordered)."""
    data = tmp_path / "data"
    conf = tmp_path / "unisondb.toml"
    conf.write_text(f'[wal]\nack = "wal"\nmemtable_max_lag = {MAX_LAG}\n')
    fifo = tmp_path / "hold-apply"
    os.mkfifo(fifo)
    monkeypatch.setenv("UNISONDB_TEST_HOLD", f"apply:{fifo}")
    srv = server_factory(data, NS, extra_args=["--config", str(conf)])
    acked: dict[str, bytes] = {}
    counter_acked = [0] * 4
    counter_sent = [0] * 4
    lock = threading.Lock()
    stop = threading.Event()

    def client(t: int) -> None:
        with httpx.Client(base_url=srv.url + API, timeout=60) as c:
            i = 0
            while not stop.is_set():
                i += 1
                if i % 2:
                    key, value = f"w{t}-{i}", os.urandom(30)
                else:
                    with lock:
                        counter_sent[t] = i
                    key, value = f"counter-{t}", b"%d" % i
                try:
                    r = c.put(f"/kv/{key}", json={"value": base64.b64encode(value).decode()})
                except httpx.HTTPError:
                    return  # the kill
                assert r.status_code == 200, r.text
                with lock:
                    if key.startswith("counter"):
                        counter_acked[t] = i
                    else:
                        acked[key] = value

    clients = [threading.Thread(target=client, args=(t,), daemon=True) for t in range(4)]
    for th in clients:
        th.start()
    wait_hold_reached(fifo, srv)  # the applier is at the hold, before its first commit
    with srv.client() as c:
        deadline = time.monotonic() + 30
        while (stats := c.get(f"{API}/stats").json())["memtableFullWaits"] < 1:
            assert time.monotonic() < deadline, f"no backpressure: {stats}"
        # Held back: the bound plus at most the group written before the table was full.
        assert MAX_LAG <= stats["lmdbLagRecords"] <= MAX_LAG + 4, stats
        assert stats["appliedLsn"] == 0 and stats["lastLsn"] == stats["lmdbLagRecords"]
        assert stats["memtableBytes"] > 0
        text = c.get("/metrics").text
        assert _metric(text, "unisondb_memtable_full_waits_total") >= 1
        assert _metric(text, "unisondb_lmdb_lag_records") == stats["lmdbLagRecords"]
        assert _metric(text, "unisondb_memtable_bytes") == stats["memtableBytes"]
        # The writers wait: nothing more is acknowledged while the table is full.
        assert c.get(f"{API}/stats").json()["lastLsn"] == stats["lastLsn"]
        for key, value in list(acked.items()):  # read-your-writes from the full table
            assert base64.b64decode(c.get(f"{API}/kv/{key}").json()["value"]) == value
    srv.kill9()
    stop.set()
    for th in clients:
        th.join(timeout=60)
    assert _applied_lsn_on_disk(data) == 0, "LMDB was not behind at the kill"
    monkeypatch.delenv("UNISONDB_TEST_HOLD")
    again = server_factory(data, NS, extra_args=["--config", str(conf)])
    with again.client() as c:
        assert _metric(c.get("/metrics").text, "unisondb_recovery_records_replayed") == stats["lastLsn"]
        for key, value in acked.items():
            r = c.get(f"{API}/kv/{key}")
            assert r.status_code == 200 and r.json()["found"], (key, r.text)
            assert base64.b64decode(r.json()["value"]) == value
        for t in range(4):
            body = c.get(f"{API}/kv/counter-{t}").json()
            got = int(base64.b64decode(body["value"])) if body["found"] else 0
            assert counter_acked[t] <= got <= counter_sent[t], (t, got, counter_acked, counter_sent)


def test_read_your_writes_for_every_client_of_a_real_server(
    server_factory: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    """8 clients over HTTP, each reading back every write (PUT or DELETE) right after its
    answer, while the applier moves a small table into LMDB underneath (it drops keys
    constantly: a read that missed the table must find the key in LMDB)."""
    conf = tmp_path / "unisondb.toml"
    conf.write_text('[wal]\nack = "wal"\nmemtable_max_lag = 16\n')
    srv = server_factory(tmp_path / "data", NS, extra_args=["--config", str(conf)])
    errors: list[str] = []

    def client(n: int) -> None:
        rng = random.Random(n)
        with httpx.Client(base_url=srv.url + API, timeout=60) as c:
            for i in range(120):
                key = f"c{n}-{rng.randrange(12)}"
                if rng.random() < 0.2:
                    assert c.delete(f"/kv/{key}").status_code == 200
                    want = None
                else:
                    want = base64.b64encode(b"%d-%d" % (n, i)).decode()
                    assert c.put(f"/kv/{key}", json={"value": want}).status_code == 200
                body = c.get(f"/kv/{key}").json()
                got = body["value"] if body["found"] else None
                if got != want:
                    errors.append(f"client {n} op {i}: {key} read {got!r}, wrote {want!r}")

    threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=300)
    assert not errors, errors[:5]
    with srv.client() as c:
        stats = c.get(f"{API}/stats").json()
        assert stats["ack"] == "wal" and stats["lastLsn"] == 8 * 120
