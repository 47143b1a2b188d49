"""Restore benchmark (run by hand): how long does ``unisondb restore`` take, and where.

Builds, in a scratch directory:

* a B-tree snapshot of ``--snapshot-keys`` keys (a real UnisonDB LMDB file with its
  checkpoint, written through ``storage.btree`` and copied with ``snapshot_to``), and
* ``--records`` WAL records after it (one put each, ``--value-size`` bytes, over
  ``--keys`` distinct keys) in sealed 16 MiB segments with ``.sha256`` sidecars,

then runs ``unisondb restore --json`` as a subprocess (what an operator runs) and reports
its phases (verify, snapshot copy, WAL replay, publish), the replay rate, and the peak RSS
of that process (``getrusage(RUSAGE_CHILDREN)``). For comparison it inserts the very same
records with raw py-lmdb in this process, into a copy of the same snapshot — same
environment flags (``sync=True``, ``metasync=False``), same transaction size — once from
pre-decoded records (the floor for LMDB writes from Python) and once decoding the
segments as it goes (the floor for "read WAL + write LMDB"). Peak RSS includes the pages
of the LMDB file that are mapped (file-backed, reclaimable), so it grows with the B-tree.

    .venv/bin/python bench/bench_restore.py                       # defaults (about 1 min)
    .venv/bin/python bench/bench_restore.py --snapshot-keys 2000000 --records 2000000 --json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lmdb

from unisondb.restore.apply import REPLAY_BATCH
from unisondb.storage import record, segment
from unisondb.storage.btree import BTree, Checkpoint
from unisondb.storage.record import Entry, EntryKind, Record
from unisondb.storage.wal import Wal

NS = "bench"
T0 = 1_736_346_600_000_000_000  # 2025-01-08T14:30:00Z


def key(i: int, keys: int) -> bytes:
    return b"user:%010d" % (i % keys)


def value(i: int, size: int) -> bytes:
    return (b"%012d|" % i * (size // 13 + 1))[:size]


def sidecar(path: Path) -> None:
    h = hashlib.sha256(path.read_bytes()).hexdigest()
    path.with_name(path.name + ".sha256").write_text(f"{h}  {path.name}\n")


def build(root: Path, snapshot_keys: int, records: int, keys: int, value_size: int) -> tuple[Path, Path]:
    src = root / "src"
    bt = BTree(src / "db", map_size=1 << 34)
    batch: list[Record] = []
    for i in range(snapshot_keys):
        batch.append(
            Record(i + 1, T0 + i, (Entry(EntryKind.PUT, key(i, snapshot_keys), value(i, value_size)),))
        )
        if len(batch) == 50_000 or i == snapshot_keys - 1:
            bt.apply(batch, Checkpoint(i + 1, 0, 0, 1, T0 + i))
            batch = []
    snap = root / "backups" / "snapshot.db"
    snap.parent.mkdir(parents=True)
    with open(snap, "wb") as f:
        bt.snapshot_to(f)
    bt.close()
    sidecar(snap)
    wal_dir = root / "backups" / "wal"
    wal = Wal.open(wal_dir, NS)
    lsn = snapshot_keys + 1
    wal.start_segment(1, 1, lsn)
    chunk: list[bytes] = []
    meta: list[tuple[int, int, int]] = []
    size = segment.HEADER_SIZE
    for i in range(records):
        t = T0 + snapshot_keys + i
        data = record.encode(lsn, t, [Entry(EntryKind.PUT, key(i * 7919, keys), value(lsn, value_size))])
        if size + len(data) > 16 << 20:
            wal.append(b"".join(chunk), meta)
            wal.sync()
            wal.rotate(lsn)
            chunk, meta, size = [], [], segment.HEADER_SIZE
        chunk.append(data)
        meta.append((lsn, t, len(data)))
        size += len(data)
        lsn += 1
    wal.append(b"".join(chunk), meta)
    wal.sync()
    wal.seal_active_if_nonempty()
    wal.close()
    for p in wal_dir.glob("*.wal"):
        sidecar(p)
    return snap, wal_dir


def raw_lmdb(root: Path, snap: Path, wal_dir: Path, *, predecoded: bool) -> tuple[float, int]:
    """Insert the WAL's records with plain py-lmdb into a copy of the snapshot (the same
    starting tree the restore replays into); return (seconds, records)."""
    scans = [segment.scan(p) for p in sorted(wal_dir.glob("*.wal"))] if predecoded else None
    path = root / ("raw-pre" if predecoded else "raw-decode")
    path.mkdir()
    shutil.copyfile(snap, path / "data.mdb")
    env = lmdb.open(str(path), map_size=1 << 34, max_dbs=4, sync=True, metasync=False, readahead=False)
    db = env.open_db(b"kv")
    started = time.perf_counter()
    n = 0
    sources = scans if scans is not None else (segment.scan(p) for p in sorted(wal_dir.glob("*.wal")))
    for scan in sources:
        recs = scan.records
        for start in range(0, len(recs), REPLAY_BATCH):
            with env.begin(write=True, db=db) as txn:
                for rec, _s, _e in recs[start : start + REPLAY_BATCH]:
                    for e in rec.entries:
                        txn.put(e.key, e.value)
                    n += 1
    seconds = time.perf_counter() - started
    env.close()
    shutil.rmtree(path)
    return seconds, n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--snapshot-keys", type=int, default=500_000)
    ap.add_argument("--records", type=int, default=500_000)
    ap.add_argument("--keys", type=int, default=1_000_000, help="distinct keys the WAL writes")
    ap.add_argument("--value-size", type=int, default=100)
    ap.add_argument("--dir", type=Path, default=None, help="scratch dir (default: temp dir)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-restore-", dir=args.dir))
    try:
        t = time.perf_counter()
        snap, wal_dir = build(root, args.snapshot_keys, args.records, args.keys, args.value_size)
        build_s = time.perf_counter() - t
        wal_bytes = sum(p.stat().st_size for p in wal_dir.glob("*.wal"))
        cmd = [
            sys.executable,
            "-m",
            "unisondb",
            "restore",
            "--data-dir",
            str(root / "data"),
            "--namespace",
            NS,
            "--snapshot",
            str(snap),
            "--wal",
            str(wal_dir),
            "--json",
        ]
        t = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t
        if proc.returncode != 0:
            print(proc.stderr, file=sys.stderr)
            return 1
        summary = json.loads(proc.stdout)["summary"]
        peak_rss_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        raw_pre_s, n = raw_lmdb(root, snap, wal_dir, predecoded=True)
        raw_dec_s, _ = raw_lmdb(root, snap, wal_dir, predecoded=False)
        sec = summary["seconds"]
        result = {
            "command": " ".join(cmd),
            "snapshotKeys": args.snapshot_keys,
            "snapshotBytes": snap.stat().st_size,
            "walRecords": args.records,
            "walBytes": wal_bytes,
            "segments": len(list(wal_dir.glob("*.wal"))),
            "valueSize": args.value_size,
            "buildSeconds": round(build_s, 2),
            "restore": {
                "wallSeconds": round(wall, 2),
                **sec,
                "recordsPerSecond": summary["recordsPerSecond"],
                "peakRssMiB": round(peak_rss_mib, 1),
            },
            "rawLmdbPredecoded": {"seconds": round(raw_pre_s, 2), "recordsPerSecond": round(n / raw_pre_s)},
            "rawLmdbWithDecode": {"seconds": round(raw_dec_s, 2), "recordsPerSecond": round(n / raw_dec_s)},
            "replayVsRawPredecoded": round(sec["replay"] / raw_pre_s, 2),
            "replayVsRawWithDecode": round(sec["replay"] / raw_dec_s, 2),
            "cpu": os.cpu_count(),
        }
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            r = result["restore"]
            assert isinstance(r, dict)
            print(
                f"snapshot {args.snapshot_keys} keys ({result['snapshotBytes'] / 2**20:.0f} MiB), "
                f"WAL {args.records} records ({wal_bytes / 2**20:.0f} MiB, "
                f"{result['segments']} segments)"
            )
            print(
                f"restore  wall {r['wallSeconds']} s = verify {r['verify']} s + copy "
                f"{r['copy']} s + replay {r['replay']} s + publish {r['publish']} s "
                f"(+ process start); peak RSS {r['peakRssMiB']} MiB"
            )
            print(f"replay   {r['recordsPerSecond']} records/s")
            print(
                f"raw lmdb {result['rawLmdbPredecoded']['recordsPerSecond']} records/s "  # type: ignore[index]
                f"pre-decoded, {result['rawLmdbWithDecode']['recordsPerSecond']} records/s "  # type: ignore[index]
                "with segment decode"
            )
            print(
                f"replay takes {result['replayVsRawPredecoded']}x the raw pre-decoded time, "
                f"{result['replayVsRawWithDecode']}x raw decode+insert"
            )
        return 0
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
