"""Helpers shared by the restore integration tests (``test_restore_*.py``), plus self-tests.

Kept in a ``test_restore_*`` module so the restore tests stay within the files their owner
may touch; the other modules import it as ``test_restore_support`` (pytest puts this
directory on ``sys.path``).

``History`` drives an in-process ``Engine`` with small segments, records every write in a
model (LSN → entries), takes snapshots and WAL backups exactly as the backup API lays them
out (``<file>`` + ``<file>.sha256`` in sha256sum format), and answers "what is the whole
keyspace at LSN n".
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import lmdb

from unisondb.config import EngineConfig
from unisondb.storage import layout, segment
from unisondb.storage.btree import Checkpoint
from unisondb.storage.engine import Engine
from unisondb.storage.record import Entry, EntryKind

NS = "users"
REPO = Path(__file__).resolve().parents[2]
UNISONDB = [sys.executable, "-m", "unisondb"]


def write_sidecar(path: Path) -> Path:
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    side = path.with_name(path.name + ".sha256")
    side.write_text(f"{digest}  {path.name}\n")
    return side


def read_keyspace(data_dir: Path, ns: str = NS) -> dict[bytes, bytes]:
    """Every key/value of ``<data_dir>/<ns>/db`` (read-only, no lock file written)."""
    db = layout.btree_dir(data_dir, ns)
    env = lmdb.open(str(db), readonly=True, lock=False, max_dbs=4, subdir=True)
    try:
        kv = env.open_db(b"kv", create=False)
        with env.begin() as txn:
            return {bytes(k): bytes(v) for k, v in txn.cursor(db=kv)}
    finally:
        env.close()


def read_checkpoint(data_dir: Path, ns: str = NS) -> Checkpoint:
    db = layout.btree_dir(data_dir, ns)
    env = lmdb.open(str(db), readonly=True, lock=False, max_dbs=4, subdir=True)
    try:
        meta = env.open_db(b"meta", create=False)
        with env.begin() as txn:
            raw = txn.get(b"checkpoint", db=meta)
        assert raw is not None, "no checkpoint"
        return Checkpoint.decode(bytes(raw))
    finally:
        env.close()


def tree_digest(path: Path) -> str:
    """Hash of every file name and content under ``path`` (LOCK files excluded)."""
    h = hashlib.sha256()
    if not path.exists():
        return "absent"
    for dirpath, dirnames, files in os.walk(path):
        dirnames.sort()
        rel = os.path.relpath(dirpath, path)
        h.update(f"D {rel}\n".encode())
        for name in sorted(files):
            if name == "LOCK":
                continue
            p = Path(dirpath) / name
            h.update(f"F {rel}/{name} {p.stat().st_size}\n".encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def wal_times(*dirs: Path) -> dict[int, int]:
    """LSN → record time for every record in the segments under ``dirs`` (one timeline)."""
    out: dict[int, int] = {}
    for d in dirs:
        for p in sorted(d.rglob("*.wal")):
            for rec, _s, _e in segment.scan(p).records:
                out[rec.lsn] = rec.time_ns
    return out


def run_cli(*args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*UNISONDB, *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


@dataclass
class History:
    root: Path
    ns: str = NS
    segment_size: int = 4096
    keys: int = 40
    seed: int = 1
    value_size: int = 24
    #: LSN the history continues from (a restored namespace), for ``last_lsn``.
    base_lsn: int = 0
    engine: Engine | None = None
    ops: dict[int, tuple[Entry, ...]] = field(default_factory=dict)
    last_backed_up: int = 0
    rng: random.Random = field(default_factory=random.Random)

    def __post_init__(self) -> None:
        self.rng.seed(self.seed)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.backup_root.mkdir(parents=True, exist_ok=True)

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def backup_root(self) -> Path:
        return layout.backup_root(self.data_dir, self.ns)

    @property
    def config(self) -> EngineConfig:
        return EngineConfig(segment_size=self.segment_size, segment_max_age=0, retention=10 * 365 * 86400.0)

    def open(self, data_dir: Path | None = None) -> Engine:
        if data_dir is not None:
            self.root = data_dir.parent
        self.engine = Engine.open(self.data_dir, self.ns, self.config)
        return self.engine

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None

    def restart(self) -> None:
        self.close()
        self.open()

    @property
    def eng(self) -> Engine:
        assert self.engine is not None, "engine not open"
        return self.engine

    @property
    def last_lsn(self) -> int:
        return max(self.ops, default=self.base_lsn)

    def _value(self, lsn: int) -> bytes:
        return (b"v%06d-" % lsn + bytes(self.rng.randrange(97, 123) for _ in range(32)))[: self.value_size]

    def write_random(self, n: int) -> list[int]:
        lsns = []
        for _ in range(n):
            roll = self.rng.random()
            nxt = self.last_lsn + 1
            if roll < 0.65:
                entries = [Entry(EntryKind.PUT, self._key(), self._value(nxt))]
            elif roll < 0.8:
                entries = [Entry(EntryKind.DELETE, self._key())]
            else:
                entries = [
                    Entry(EntryKind.PUT, self._key(), self._value(nxt))
                    for _ in range(self.rng.randrange(2, 5))
                ]
                entries.append(Entry(EntryKind.DELETE, self._key()))
            lsn = self.eng.write(entries)
            assert lsn == nxt, (lsn, nxt)
            self.ops[lsn] = tuple(entries)
            lsns.append(lsn)
        return lsns

    def put(self, key: bytes, value: bytes) -> int:
        entries = (Entry(EntryKind.PUT, key, value),)
        lsn = self.eng.write(entries)
        self.ops[lsn] = entries
        return lsn

    def _key(self) -> bytes:
        return b"key-%03d" % self.rng.randrange(self.keys)

    def state_at(
        self,
        lsn: int,
        base: dict[bytes, bytes] | None = None,
        ops: dict[int, tuple[Entry, ...]] | None = None,
    ) -> dict[bytes, bytes]:
        state = dict(base or {})
        source = self.ops if ops is None else ops
        for n in sorted(source):
            if n > lsn:
                break
            for e in source[n]:
                if e.kind == EntryKind.PUT:
                    state[e.key] = e.value
                else:
                    state.pop(e.key, None)
        return state

    def snapshot(self, name: str) -> tuple[Path, Checkpoint]:
        path = self.backup_root / "snapshots" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            cp = self.eng.snapshot_to(f)  # (catches up: every acknowledged write is in it)
        write_sidecar(path)
        return path, cp

    def backup_wal(self, dirname: str, *, rotate: bool = True) -> Path:
        """Seal the active segment and copy every sealed segment not yet backed up."""
        if rotate:
            self.eng.rotate()
        dest = self.backup_root / dirname
        dest.mkdir(parents=True, exist_ok=True)
        for info in self.eng.wal.sealed_segments():
            if info.segment_id > self.last_backed_up:
                shutil.copy2(info.path, dest / info.path.name)
                write_sidecar(dest / info.path.name)
                self.last_backed_up = info.segment_id
        return dest

    def times(self) -> dict[int, int]:
        return wal_times(layout.wal_dir(self.data_dir, self.ns))


# --- self-tests of the helpers ---


def test_history_model_matches_engine(tmp_path: Path) -> None:
    h = History(tmp_path)
    h.open()
    h.write_random(50)
    h.restart()
    h.write_random(50)
    h.close()
    assert read_keyspace(h.data_dir) == h.state_at(h.last_lsn)
    assert read_checkpoint(h.data_dir).applied_lsn == 100
    assert sorted(h.times()) == list(range(1, 101))


def test_tree_digest_sees_content_changes(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "f").write_bytes(b"x")
    before = tree_digest(tmp_path)
    (tmp_path / "a" / "LOCK").write_bytes(b"123")
    assert tree_digest(tmp_path) == before
    (tmp_path / "a" / "f").write_bytes(b"y")
    assert tree_digest(tmp_path) != before
