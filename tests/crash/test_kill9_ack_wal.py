"""kill -9 with writes acknowledged but not yet in LMDB (``--ack wal``): recovery replays them.

The server's applier is held before its first LMDB transaction through the
``UNISONDB_TEST_HOLD=apply:<fifo>`` seam (an exact point, not a timer), so every write
below is acknowledged from the WAL and the in-memory table alone; then the process is
SIGKILLed and restarted.
"""

from __future__ import annotations

import base64
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import lmdb
import pytest

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
        reached = Path(str(fifo) + ".reached")
        deadline = time.monotonic() + 30
        while not reached.exists():  # the applier is at the hold, before its first commit
            assert time.monotonic() < deadline, srv.log()
            time.sleep(0.01)
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
