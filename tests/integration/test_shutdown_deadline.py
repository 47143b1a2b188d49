"""SIGTERM during a long snapshot (issue 12, item 3): a deadline, a JSON answer, nothing late.

The snapshot is made "long" through the ``UNISONDB_TEST_HOLD=snapshot-copy:<fifo>`` seam:
the copy stops inside LMDB's read transaction and never goes on (the FIFO is never
written), the worst case of an uninterruptible ``mdb_env_copyfd``. Real server process,
real signal, real files.
"""

from __future__ import annotations

import base64
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
from serverproc import start_server, wait_hold_reached

TIMEOUT = 4.0


def test_sigterm_during_a_snapshot_answers_json_publishes_nothing_and_exits_in_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fifo = tmp_path / "hold"
    os.mkfifo(fifo)
    monkeypatch.setenv("UNISONDB_TEST_HOLD", f"snapshot-copy:{fifo}")
    data = tmp_path / "data"
    srv = start_server(data, ("default",), ["--shutdown-timeout", f"{TIMEOUT:g}s"])
    try:
        with srv.client() as c:
            for i in range(20):
                r = c.put(f"/api/v1/default/kv/k{i}", json={"value": base64.b64encode(b"v%d" % i).decode()})
                assert r.status_code == 200
        answer: list[httpx.Response] = []
        t = threading.Thread(
            target=lambda: answer.append(
                srv.client().post("/api/v1/default/btree/backup", json={"path": "snaps/s.db"})
            )
        )
        t.start()
        wait_hold_reached(fifo, srv, timeout=20)  # the copy is now inside LMDB
        started = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        srv.proc.wait(timeout=TIMEOUT + 5)
        took = time.monotonic() - started
        t.join(timeout=10)
    finally:
        srv.stop(signal.SIGKILL)
    assert took <= TIMEOUT + 1.0, f"exited {took:.1f}s after SIGTERM (timeout {TIMEOUT}s)"
    assert answer, "the snapshot's client got no answer"
    r = answer[0]
    assert r.status_code == 503, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert "shutting down" in r.json()["error"]
    log = srv.log()
    assert "server.stopped" in log and "engine.close_abandoned_reader" in log, log
    snaps = data / "backups" / "default" / "snaps"
    # Nothing published, and no .tmp left, after the stop.
    assert not list(snaps.iterdir()), list(snaps.iterdir())
    monkeypatch.delenv("UNISONDB_TEST_HOLD")
    again = start_server(data, ("default",))
    try:
        with again.client() as c:
            assert c.get("/api/v1/default/kv/k19").status_code == 200
            r = c.post("/api/v1/default/btree/backup", json={"path": "snaps/s.db"})
            assert r.status_code == 200, r.text
    finally:
        again.stop(signal.SIGKILL)


def test_sigterm_with_nothing_running_exits_cleanly_and_quickly(tmp_path: Path) -> None:
    srv = start_server(tmp_path / "data", ("default",), ["--shutdown-timeout", "3s"])
    try:
        with srv.client() as c:
            assert c.put("/api/v1/default/kv/a", json={"value": "MQ=="}).status_code == 200
        started = time.monotonic()
        assert srv.stop(signal.SIGTERM, timeout=10) == 0, srv.log()
        assert time.monotonic() - started < 3
    finally:
        srv.stop(signal.SIGKILL)
    assert "engine.close_abandoned_reader" not in srv.log()
