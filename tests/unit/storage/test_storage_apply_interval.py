"""``apply_interval``: under load the applier commits LMDB at most once per interval, in
one larger transaction, and at once whenever something waits for LMDB.

Real WAL and LMDB. The interval is set to an hour, so anything that must not wait for it
(a catch-up, a seal, a full table) would hang the test (pytest-timeout) if it did; no test
sleeps for the interval to pass. Tests that keep LMDB behind on purpose also make the
applier's idle gap an hour (``_hold``), so a slow machine's pause between two writes does
not apply them early.
"""

from __future__ import annotations

import time
import types
from collections.abc import Callable

import pytest

from unisondb.config import EngineConfig
from unisondb.storage import applier
from unisondb.storage.engine import Engine

HOUR = EngineConfig(ack="wal", apply_interval=3600.0)


def _hold(eng: Engine) -> Engine:
    assert eng._applier is not None
    eng._applier.idle_gap = 3600.0
    return eng


def _until(cond: Callable[[], bool], seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.001)


def test_writes_after_a_commit_wait_for_the_interval_and_go_in_one_transaction(
    open_engine: Callable[..., Engine],
) -> None:
    eng = _hold(open_engine(HOUR))
    eng.put(b"first", b"0")
    # The first write after a quiet spell is applied at once (no waiter asks for it).
    _until(lambda: eng.applied_lsn == eng.last_lsn)
    assert eng._applier is not None
    txns = eng._applier.transactions
    for i in range(10):
        eng.put(b"k%d" % i, b"v%d" % i)
    assert eng.lmdb_lag == 10  # within the interval: still only in the table (and the WAL)
    assert eng.get(b"k9") == b"v9" and eng.btree.get(b"k9") is None
    assert eng.catch_up(timeout=10)  # a waiter makes the next transaction start now
    assert eng._applier.transactions == txns + 1
    assert eng.lmdb_lag == 0 and eng.btree.get(b"k9") == b"v9"


def test_a_seal_does_not_wait_for_the_interval(open_engine: Callable[..., Engine]) -> None:
    eng = _hold(open_engine(HOUR))
    eng.put(b"a", b"1")
    _until(lambda: eng.lmdb_lag == 0)
    eng.put(b"b", b"2")
    assert eng.lmdb_lag == 1
    sealed = eng.rotate()  # the footer needs the state after "b": drains the table now
    assert sealed is not None and eng.lmdb_lag == 0 and eng.btree.get(b"b") == b"2"


def test_a_full_table_does_not_wait_for_the_interval(open_engine: Callable[..., Engine]) -> None:
    eng = open_engine(EngineConfig(ack="wal", apply_interval=3600.0, memtable_max_lag=4))
    for i in range(40):  # backpressure every 4 records: each needs a commit at once
        eng.put(b"k%d" % i, b"v%d" % i)
    assert eng.table_full_waits > 0
    assert eng.lmdb_lag <= 4
    assert all(eng.get(b"k%d" % i) == b"v%d" % i for i in range(40))


def test_interval_zero_commits_whenever_records_wait(open_engine: Callable[..., Engine]) -> None:
    eng = open_engine(EngineConfig(ack="wal", apply_interval=0.0))
    for i in range(5):
        eng.put(b"k%d" % i, b"v")
        _until(lambda: eng.lmdb_lag == 0)  # nothing asks, yet LMDB follows at once


def test_once_writes_pause_lmdb_catches_up_without_waiting_for_the_interval(
    open_engine: Callable[..., Engine],
) -> None:
    eng = open_engine(HOUR)  # the idle gap as shipped (5 ms)
    eng.put(b"first", b"0")
    _until(lambda: eng.lmdb_lag == 0)
    for i in range(10):
        eng.put(b"k%d" % i, b"v%d" % i)
    # Nobody asks for LMDB, the interval is an hour: only the pause in writes applies them
    # (a full disk met later by LMDB than by the WAL would otherwise stall writes after it).
    _until(lambda: eng.lmdb_lag == 0)
    assert eng.btree.get(b"k9") == b"v9"


def test_the_first_commit_is_due_at_once_on_a_freshly_booted_machine(
    open_engine: Callable[..., Engine], monkeypatch: pytest.MonkeyPatch
) -> None:
    # time.monotonic() counts from boot: on a machine up for one second it reads ~1.0. An
    # applier that took "no commit yet" as a commit at time 0 held the first transaction
    # back for the whole interval there (found on a freshly booted CI machine).
    offset = time.monotonic() - 1.0
    booted = types.SimpleNamespace(monotonic=lambda: time.monotonic() - offset)
    monkeypatch.setattr(applier, "time", booted)
    eng = _hold(open_engine(HOUR))
    eng.put(b"a", b"1")
    _until(lambda: eng.lmdb_lag == 0)
    assert eng.btree.get(b"a") == b"1"
