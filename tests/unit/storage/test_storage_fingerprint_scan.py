"""The fast content scan (``fingerprint.scan_lmdb``/``start_scan``) computes exactly the
state fingerprint defined in fingerprint.py, however the keyspace is cut into ranges and
whichever process hashes them; a worker that fails is redone in-process. Real LMDB files,
real worker processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import lmdb
import pytest

from unisondb.errors import CorruptSnapshot
from unisondb.storage import fingerprint
from unisondb.storage.fingerprint import Fingerprint, item_hash

MAP = 1 << 26


def _db(path: Path, n: int) -> dict[bytes, bytes]:
    pairs = {b"key-%07d" % i: os.urandom(i % 300) for i in range(n)}
    env = lmdb.open(str(path), subdir=False, max_dbs=4, map_size=MAP)
    try:
        kv = env.open_db(b"kv")
        with env.begin(write=True, db=kv) as txn:
            for k, v in pairs.items():
                txn.put(k, v)
    finally:
        env.close()
    return pairs


def _reference(pairs: dict[bytes, bytes]) -> bytes:
    """The definition, written out: sum of SHAKE-256 items modulo 2**2048."""
    total = sum(item_hash(k, v) for k, v in pairs.items()) % (1 << 2048)
    return total.to_bytes(256, "little")


@pytest.mark.parametrize("n", [0, 1, 2, 3, 7, 1000])
def test_every_cut_gives_the_defined_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, n: int) -> None:
    path = tmp_path / "data.mdb"
    want = _reference(_db(path, n))
    monkeypatch.setattr(fingerprint, "PARALLEL_MIN_PAIRS", 1)  # cut even tiny keyspaces
    assert fingerprint.scan_lmdb(path, MAP, workers=1).state() == want
    for workers in (2, 3, 4):
        assert fingerprint.scan_lmdb(path, MAP, workers=workers).state() == want
        assert fingerprint.start_scan(path, MAP, workers=workers).result().state() == want
    assert Fingerprint.of_items([]).state() == bytes(256)


def test_a_worker_that_cannot_run_is_redone_here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "data.mdb"
    want = _reference(_db(path, 500))
    monkeypatch.setattr(fingerprint, "PARALLEL_MIN_PAIRS", 1)
    real = subprocess.Popen

    def broken(args: list[str], **kw: object) -> subprocess.Popen[bytes]:
        # A real process that dies at once, as a worker killed by the OOM killer would.
        return real([sys.executable, "-c", "raise SystemExit(3)"], **kw)  # type: ignore[call-overload,no-any-return]

    monkeypatch.setattr(fingerprint.subprocess, "Popen", broken)
    assert fingerprint.scan_lmdb(path, MAP, workers=3).state() == want
    assert fingerprint.start_scan(path, MAP, workers=2).result().state() == want


def test_a_keyspace_that_changes_between_cut_and_scan_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "data.mdb"
    _db(path, 400)
    monkeypatch.setattr(fingerprint, "PARALLEL_MIN_PAIRS", 1)
    # Cut the ranges, then add keys before the workers start: the ranges no longer end
    # where they were cut, which the workers notice.
    env = lmdb.open(str(path), subdir=False, readonly=True, lock=False, max_dbs=4, map_size=MAP)
    with env.begin(db=env.open_db(b"kv", create=False)) as txn:
        ranges = fingerprint._ranges(txn, 400, 2)
    env.close()
    env = lmdb.open(str(path), subdir=False, max_dbs=4, map_size=MAP)
    with env.begin(write=True, db=env.open_db(b"kv")) as txn:
        txn.put(b"key-0000100x", b"inserted after the cut")
    env.close()
    with pytest.raises(CorruptSnapshot, match="changed while its key/value pairs were being hashed"):
        fingerprint.ScanJob(path, MAP, b"kv", ranges).result()


def _niceness(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    return int(stat.rpartition(")")[2].split()[16])  # field 19, counted after "(comm)"


def test_a_background_scan_runs_its_workers_niced(tmp_path: Path) -> None:
    """A restore's content check runs niced (inventory.BACKGROUND_CHECK_NICE), so the
    restore's own copy, walk and replay keep their core; the sum is the same."""
    path = tmp_path / "data.mdb"
    want = _reference(_db(path, 200_000))  # enough pairs to see the worker while it hashes
    base = os.getpriority(os.PRIO_PROCESS, 0)
    job = fingerprint.start_scan(path, MAP, workers=1, nice=7)
    procs = job._procs
    assert procs is not None and len(procs) == 1
    seen: set[int] = set()
    while procs[0].poll() is None:
        nice = _niceness(procs[0].pid)
        if nice is not None:
            seen.add(nice)
        time.sleep(0.002)  # a poll interval, not a wait for a guessed moment
    assert job.result().state() == want
    assert min(base + 7, 19) in seen, seen
    plain = fingerprint.start_scan(path, MAP, workers=1)
    assert plain._procs is not None
    assert _niceness(plain._procs[0].pid) in (base, None)
    assert plain.result().state() == want
