"""A snapshot whose content no longer matches its recorded fingerprint is refused by restore
(dry run included) and verify without any sidecar — also a plain LMDB copy with no trailer."""

from __future__ import annotations

from pathlib import Path

import lmdb
import pytest

from unisondb.backup.snapshot import write_snapshot
from unisondb.config import EngineConfig
from unisondb.restore import restore
from unisondb.restore.errors import BackupCorrupt
from unisondb.restore.verify import verify_backup_set
from unisondb.storage import snapfile
from unisondb.storage.engine import Engine

NS = "users"


def _snapshot(tmp_path: Path) -> Path:
    eng = Engine.open(tmp_path / "src", NS, EngineConfig())
    try:
        for i in range(300):
            eng.put(b"k%03d" % i, b"value-%d" % i)
        snap = tmp_path / "s.db"
        with open(snap, "w+b") as f:
            write_snapshot(eng, f.fileno(), snap)
    finally:
        eng.close()
    return snap


def _alter_one_value(snap: Path) -> None:
    """What a damaged value area looks like to LMDB: a different value, same checkpoint.
    (The trailer is stripped first: this is the plain-copy case the trailer cannot cover.)"""
    snapfile.strip(snap)
    env = lmdb.open(str(snap), subdir=False, max_dbs=4, lock=False)
    try:
        kv = env.open_db(b"kv")
        with env.begin(write=True, db=kv) as txn:
            txn.put(b"k150", b"value-15X")
    finally:
        env.close()


def test_an_intact_snapshot_restores(tmp_path: Path) -> None:
    snap = _snapshot(tmp_path)
    out = restore(tmp_path / "ok", NS, snap, [], dry_run=True)
    assert out.verified.end_lsn == 300


def test_an_altered_value_is_refused_without_any_sidecar(tmp_path: Path) -> None:
    snap = _snapshot(tmp_path)
    _alter_one_value(snap)
    assert not snap.with_name(snap.name + ".sha256").exists()
    with pytest.raises(BackupCorrupt, match="does not hold the state it recorded"):
        restore(tmp_path / "r", NS, snap, [], dry_run=True)
    with pytest.raises(BackupCorrupt, match="does not hold the state it recorded"):
        restore(tmp_path / "r", NS, snap, [])
    assert not (tmp_path / "r" / NS).exists()
    rep, _snap, _inv = verify_backup_set(snap, [], NS)
    assert not rep.ok and any("does not hold the state" in p for p in rep.problems)


def test_a_value_overwritten_in_one_transaction_is_a_sound_snapshot(tmp_path: Path) -> None:
    """py-lmdb's ``lmdb.verify`` refused this valid file (the longer overflow run of the
    big value is kept); the structural check must accept it and restore must work."""
    from unisondb.restore.inventory import inspect_snapshot
    from unisondb.storage.record import Entry, EntryKind

    eng = Engine.open(tmp_path / "src", NS, EngineConfig())
    try:
        eng.write([Entry(EntryKind.PUT, b"k", b"x" * 20000), Entry(EntryKind.PUT, b"k", b"s")])
        for i in range(50):
            eng.put(b"a%d" % i, b"v" * 3000)
        snap = tmp_path / "s.db"
        with open(snap, "w+b") as f:
            write_snapshot(eng, f.fileno(), snap)
    finally:
        eng.close()
    assert inspect_snapshot(snap, structural=True).keys == 51
    out = restore(tmp_path / "r", NS, snap, [])
    assert out.summary is not None and out.summary.end_lsn == 51
