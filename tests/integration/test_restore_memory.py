"""A restore's peak memory does not grow with its input (issue 10: ≤ 150 MiB at any size).

Two real inputs — a self-verifying snapshot with its sidecar and sealed WAL segments on its
history, written through ``BTree`` and ``Wal`` — one about 6× the other, each restored by
``python -m unisondb restore`` in a fresh process. The peak RSS of the restore's whole
process tree (``RUSAGE_CHILDREN`` of a wrapper process that runs only that command,
content-check worker included) is compared. Before the restore gave back the LMDB pages it
maps (``storage/mapped.py``) and bounded its transactions by memory, the large input's
peak was higher by about the size of the B-tree it replayed into (~100 MiB here); now the
difference must stay under ``GROWTH_LIMIT``.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from unisondb.storage import record, segment, snapfile
from unisondb.storage.btree import BTree, Checkpoint
from unisondb.storage.history import Lineage
from unisondb.storage.record import Entry, EntryKind, Record
from unisondb.storage.wal import Wal

NS = "mem"
T0 = 1_736_346_600_000_000_000
VALUE = 3000  # bytes: big enough that a few thousand keys make a file of many MiB
#: Allowed growth of the peak RSS from the small input to the large one. The large one's
#: B-tree is ~110 MiB bigger; holding its pages (or a transaction as big as its WAL) would
#: exceed this.
GROWTH_LIMIT_MIB = 40

_WRAPPER = (
    "import resource, subprocess, sys; p = subprocess.run(sys.argv[1:]); "
    "print('PEAK', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
    "sys.exit(p.returncode)"
)


def _value(i: int) -> bytes:
    return hashlib.shake_256(b"%d" % i).digest(VALUE)


def _sidecar(path: Path) -> None:
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    path.with_name(path.name + ".sha256").write_text(f"{digest}  {path.name}\n")


def _build(root: Path, keys: int, records: int) -> tuple[Path, Path]:
    """Snapshot of ``keys`` pairs, then ``records`` puts (new keys) in sealed segments."""
    bt = BTree(root / "src" / "db", map_size=1 << 32, durable=False)
    lineage = Lineage.create()
    cp = Checkpoint(time_ns=T0).on_lineage(lineage, 1)
    for lo in range(0, keys, 5000):
        batch = [
            Record(i + 1, T0 + i, (Entry(EntryKind.PUT, b"k%08d" % i, _value(i)),))
            for i in range(lo, min(keys, lo + 5000))
        ]
        cp = bt.apply(batch, cp.advance(batch[-1].lsn, 0, 0, batch[-1].time_ns))
    snap = root / "backups" / "snap.db"
    snap.parent.mkdir(parents=True)
    with open(snap, "w+b") as f:
        cp = bt.snapshot_to(f)
        f.flush()
        f.seek(0)
        digest = hashlib.sha256(f.read()).digest()
        f.write(snapfile.encode_trailer(f.tell(), digest, NS, cp.encode()))
    _sidecar(snap)
    wal_dir = root / "backups" / "wal"
    wal = Wal.open(wal_dir, NS)
    seg_id, lsn, size = 1, keys + 1, segment.HEADER_SIZE
    wal.start_segment(seg_id, lineage, lsn, cp.fingerprint)
    pending: list[tuple[bytes, tuple[int, int, int], Record]] = []

    def flush() -> None:
        nonlocal cp
        wal.append(b"".join(p[0] for p in pending), [p[1] for p in pending])
        wal.sync()
        recs = [p[2] for p in pending]
        cp = bt.apply(recs, cp.advance(recs[-1].lsn, seg_id, size, recs[-1].time_ns))
        pending.clear()

    for i in range(records):
        t = T0 + lsn
        entry = Entry(EntryKind.PUT, b"w%08d" % (i * 7919 % records), _value(lsn))
        data = record.encode(lsn, t, [entry])
        if size + len(data) > 16 << 20:
            flush()
            wal.rotate(lsn, cp.fingerprint)
            seg_id, size = seg_id + 1, segment.HEADER_SIZE
        pending.append((data, (lsn, t, len(data)), Record(lsn, t, (entry,))))
        size += len(data)
        lsn += 1
        if len(pending) >= 2000:
            flush()
    if pending:
        flush()
    wal.seal_active_if_nonempty(cp.fingerprint)
    wal.close()
    bt.close()
    for p in wal_dir.glob("*.wal"):
        _sidecar(p)
    return snap, wal_dir


def _peak_restore_mib(root: Path, snap: Path, wal_dir: Path) -> float:
    cmd = [sys.executable, "-m", "unisondb", "restore", "--data-dir", str(root / "data")]
    cmd += ["--namespace", NS, "--snapshot", str(snap), "--wal", str(wal_dir), "--json"]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    proc = subprocess.run(
        [sys.executable, "-c", _WRAPPER, *cmd], capture_output=True, text=True, env=env, cwd=root, timeout=600
    )
    assert proc.returncode == 0, proc.stderr
    out, _, peak = proc.stdout.rpartition("PEAK ")
    summary = json.loads(out)["summary"]
    assert summary["proof"]["endProven"], summary
    return int(peak) / 1024


@pytest.mark.timeout(900)
def test_restore_peak_rss_does_not_grow_with_the_input(tmp_path: Path) -> None:
    small = tmp_path / "small"
    large = tmp_path / "large"
    s_snap, s_wal = _build(small, keys=3_000, records=3_000)
    l_snap, l_wal = _build(large, keys=24_000, records=18_000)
    grown = l_snap.stat().st_size - s_snap.stat().st_size
    assert grown > 60 << 20, "the large input must be much larger for the comparison to mean anything"
    small_mib = _peak_restore_mib(small, s_snap, s_wal)
    large_mib = _peak_restore_mib(large, l_snap, l_wal)
    assert large_mib - small_mib < GROWTH_LIMIT_MIB, (small_mib, large_mib, grown >> 20)
    assert large_mib < 150, large_mib
