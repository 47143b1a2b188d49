"""Restore benchmark (run by hand): how long does ``unisondb restore`` take, and where.

Builds, in a scratch directory:

* a B-tree snapshot of ``--snapshot-keys`` keys (a real UnisonDB LMDB file with its
  checkpoint, written through ``storage.btree`` and copied with ``snapshot_to``), and
* ``--records`` WAL records after it (one put each, ``--value-size`` bytes, over
  ``--keys`` distinct keys) in sealed 16 MiB segments with ``.sha256`` sidecars,

then runs ``unisondb restore --json`` as a subprocess (what an operator runs) and reports
its phases (verify, snapshot copy, WAL replay, publish), the replay rate, and the peak RSS
of that process tree (``getrusage(RUSAGE_CHILDREN)``: the largest of the restore and its
content-check worker). For comparison it times ``cp`` + fsync of the snapshot and inserts the very same
records with raw py-lmdb in this process, into a copy of the same snapshot — same
environment flags (``sync=True``, ``metasync=False``), ``REPLAY_BATCH`` records per transaction — once from
pre-decoded records (the floor for LMDB writes from Python) and once decoding the
segments as it goes (the floor for "read WAL + write LMDB"); ``restoreVsCpPlusRawInsert``
is the issue's goal ratio. Peak RSS includes mapped LMDB pages (file-backed); the restore
gives them back between batches (``storage/mapped.py``), so it does not grow with the B-tree.

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
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lmdb
from run import raw_restore_limit  # the report's own limit: one implementation

from unisondb.restore.apply import REPLAY_BATCH
from unisondb.storage import record, segment, snapfile
from unisondb.storage.btree import BTree, Checkpoint
from unisondb.storage.history import Lineage
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


def build(
    root: Path,
    snapshot_keys: int,
    records: int,
    keys: int,
    value_size: int,
    *,
    wal_value_size: int | None = None,
    new_keys: bool = False,
) -> tuple[Path, Path]:
    """``wal_value_size``: the WAL's values (default ``value_size``); ``new_keys``: the WAL
    writes keys the snapshot does not hold, in order (``b"r%09d"``, as ``bench/run.py``'s
    restore input does) instead of ``keys`` distinct keys spread over the snapshot's.

    Source B-tree → self-verifying snapshot (trailer + sidecar, as POST /btree/backup
    writes it) → WAL segments on the snapshot's history whose headers and footers carry
    the true state fingerprints (the records are applied to the source B-tree too, as the
    server does), so a restore proves every boundary."""
    src = root / "src"
    bt = BTree(src / "db", map_size=1 << 34, durable=False)
    lineage = Lineage.create()
    cp = Checkpoint(time_ns=T0).on_lineage(lineage, 1)
    batch: list[Record] = []
    for i in range(snapshot_keys):
        batch.append(
            Record(i + 1, T0 + i, (Entry(EntryKind.PUT, key(i, snapshot_keys), value(i, value_size)),))
        )
        if len(batch) == 50_000 or i == snapshot_keys - 1:
            cp = bt.apply(batch, cp.advance(i + 1, 0, 0, T0 + i))
            batch = []
    snap = root / "backups" / "snapshot.db"
    snap.parent.mkdir(parents=True)
    with open(snap, "w+b") as f:
        cp = bt.snapshot_to(f)
        f.flush()
        f.seek(0)
        h = hashlib.sha256()
        while chunk := f.read(4 << 20):
            h.update(chunk)
        f.seek(0, os.SEEK_END)
        f.write(snapfile.encode_trailer(f.tell(), h.digest(), NS, cp.encode()))
    sidecar(snap)
    wal_dir = root / "backups" / "wal"
    if records == 0:  # the document's full restore: a snapshot alone
        wal_dir.mkdir()
        bt.close()
        return snap, wal_dir
    wal = Wal.open(wal_dir, NS)
    lsn = snapshot_keys + 1
    seg_id = 1
    wal.start_segment(seg_id, lineage, lsn, cp.fingerprint)
    chunk_b: list[bytes] = []
    meta: list[tuple[int, int, int]] = []
    recs: list[Record] = []
    size = segment.HEADER_SIZE

    def flush() -> None:
        nonlocal cp
        wal.append(b"".join(chunk_b), meta)
        wal.sync()
        cp = bt.apply(recs, cp.advance(recs[-1].lsn, seg_id, size, recs[-1].time_ns))

    for i in range(records):
        t = T0 + snapshot_keys + i
        k = b"r%09d" % i if new_keys else key(i * 7919, keys)
        entry = Entry(EntryKind.PUT, k, value(lsn, wal_value_size or value_size))
        data = record.encode(lsn, t, [entry])
        if size + len(data) > 16 << 20:
            flush()
            wal.rotate(lsn, cp.fingerprint)
            seg_id += 1
            chunk_b, meta, recs, size = [], [], [], segment.HEADER_SIZE
        chunk_b.append(data)
        meta.append((lsn, t, len(data)))
        recs.append(Record(lsn, t, (entry,)))
        size += len(data)
        lsn += 1
    flush()
    wal.seal_active_if_nonempty(cp.fingerprint)
    wal.close()
    bt.close()
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


def limit(root: Path, snap: Path, wal_dir: Path) -> tuple[float, float]:
    """The issue's physical limit, as ``bench/run.py`` measures it: ``cp`` + ``sync`` of the
    snapshot into a directory, then raw py-lmdb puts of the WAL's records (decoded before
    the clock starts) into that copy, ``REPLAY_BATCH`` per transaction, same environment
    flags as the restore's (``sync=True``, ``metasync=False``), and ``env.sync(True)``.
    Returns (copy seconds, insert seconds)."""
    records = [rec for p in sorted(wal_dir.glob("*.wal")) for rec, _s, _e in segment.scan(p).records]
    dest = root / "limit"
    try:
        return raw_restore_limit(snap, records, dest, REPLAY_BATCH)
    finally:
        shutil.rmtree(dest, ignore_errors=True)


def copy_and_sync(root: Path, snap: Path) -> float:
    """Seconds for ``cp`` of the snapshot plus an fsync: the copy half of the floor."""
    dest = root / "cp-copy.db"
    started = time.perf_counter()
    subprocess.run(["cp", str(snap), str(dest)], check=True)
    fd = os.open(dest, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    seconds = time.perf_counter() - started
    dest.unlink()
    return seconds


def build_from_args(root: Path, args: argparse.Namespace) -> tuple[Path, Path]:
    """``build`` with the sizes the command line asked for."""
    return build(
        root,
        args.snapshot_keys,
        args.records,
        args.keys,
        args.value_size,
        wal_value_size=args.wal_value_size,
        new_keys=args.new_keys,
    )


def ab(args: argparse.Namespace) -> int:
    """Interleaved same-run A/B of ``unisondb restore``: A = the package under ``--ab SRC``
    (PYTHONPATH), B = this checkout; order alternates run by run; medians of wall time,
    phases and peak RSS."""
    root = Path(tempfile.mkdtemp(prefix="bench-restore-ab-", dir=args.dir))
    try:
        if args.input is not None:  # an input built before (``build``'s layout)
            snap, wal_dir = args.input / "backups" / "snapshot.db", args.input / "backups" / "wal"
        else:
            snap, wal_dir = build_from_args(root, args)
        sides = ("A", "B")
        times: dict[str, list[float]] = {k: [] for k in sides}
        cpu: dict[str, list[float]] = {k: [] for k in sides}
        rss: dict[str, list[float]] = {k: [] for k in sides}
        phases: dict[str, list[dict[str, float]]] = {k: [] for k in sides}
        limits: list[tuple[float, float]] = []
        loads = [os.getloadavg()]
        for i in range(args.runs):
            if args.limit:
                limits.append(limit(root, snap, wal_dir))
            for side in sides if i % 2 == 0 else sides[::-1]:
                # PYTHONPATH picks the package; the scratch dir as cwd keeps ``-m`` from
                # putting this checkout first on sys.path for side A too.
                env = dict(os.environ)
                env["PYTHONPATH"] = str(args.ab if side == "A" else Path(__file__).resolve().parents[1])
                target = root / f"data-{side}-{i}"
                cmd = [sys.executable, "-m", "unisondb", "restore", "--data-dir", str(target)]
                cmd += ["--namespace", args.namespace, "--snapshot", str(snap), "--json"]
                if args.records:
                    cmd += ["--wal", str(wal_dir)]
                t = time.perf_counter()
                proc = subprocess.run(
                    [sys.executable, "-c", _RSS_WRAPPER, *cmd],
                    capture_output=True,
                    text=True,
                    env=env,
                    cwd=root,
                )
                times[side].append(time.perf_counter() - t)
                if proc.returncode != 0:
                    print(proc.stderr, file=sys.stderr)
                    return 1
                out, _, tail = proc.stdout.rpartition("\nPEAK ")
                peak, used = tail.split()
                rss[side].append(round(float(peak) / 1024, 1))
                cpu[side].append(round(float(used), 2))
                phases[side].append(json.loads(out)["summary"]["seconds"])
                shutil.rmtree(target)
            loads.append(os.getloadavg())
        med = {k: statistics.median(v) for k, v in times.items()}
        result = {
            "snapshotKeys": args.snapshot_keys,
            "snapshotBytes": snap.stat().st_size,
            "records": args.records,
            "walBytes": sum(p.stat().st_size for p in wal_dir.glob("*.wal")),
            "runs": args.runs,
            "wallSeconds": times,
            "cpuSeconds": cpu,
            "peakRssMiB": rss,
            "phases": phases,
            "medianA": round(med["A"], 3),
            "medianB": round(med["B"], 3),
            "ratioBoverA": round(med["B"] / med["A"], 3),
            "loadavg": loads,
        }
        if limits:
            # Each round's limit next to that round's restores; the goal ratio of a side is
            # its median wall time over the median limit.
            floor = statistics.median(c + n for c, n in limits)
            result["limitSeconds"] = [[round(c, 3), round(n, 3)] for c, n in limits]
            result["limitMedian"] = round(floor, 3)
            result["goalRatioA"] = round(med["A"] / floor, 3)
            result["goalRatioB"] = round(med["B"] / floor, 3)
        print(json.dumps(result, indent=1))
        return 0
    finally:
        shutil.rmtree(root, ignore_errors=True)


#: Runs the command, then prints the peak RSS (KiB) of its process tree's largest member
#: and the CPU seconds (user + system) of the whole tree.
_RSS_WRAPPER = (
    "import resource, subprocess, sys; p = subprocess.run(sys.argv[1:]); "
    "r = resource.getrusage(resource.RUSAGE_CHILDREN); "
    "print('\\nPEAK', r.ru_maxrss, r.ru_utime + r.ru_stime); "
    "sys.exit(p.returncode)"
)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--snapshot-keys", type=int, default=500_000)
    ap.add_argument("--records", type=int, default=500_000)
    ap.add_argument("--keys", type=int, default=1_000_000, help="distinct keys the WAL writes")
    ap.add_argument("--value-size", type=int, default=100)
    ap.add_argument("--wal-value-size", type=int, default=None, help="default: --value-size")
    ap.add_argument(
        "--new-keys",
        action="store_true",
        help="the WAL writes new keys in order (bench/run.py's restore input) instead of --keys spread ones",
    )
    ap.add_argument("--dir", type=Path, default=None, help="scratch dir (default: temp dir)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument(
        "--ab",
        type=Path,
        default=None,
        metavar="SRC",
        help="A/B instead: restore with the unisondb package under SRC (PYTHONPATH, e.g. a "
        "worktree of main) and with this checkout, interleaved, --runs times each",
    )
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument(
        "--namespace",
        default=NS,
        help="with --input: the input's namespace (bench/run.py's inputs are 'default')",
    )
    ap.add_argument(
        "--limit",
        action="store_true",
        help="with --ab: also measure the issue's limit (cp + sync, raw py-lmdb insert) once per round",
    )
    ap.add_argument(
        "--input",
        type=Path,
        default=None,
        metavar="DIR",
        help="with --ab: restore this input (a scratch dir left by build(): backups/snapshot.db, "
        "backups/wal) "
        "instead of building one",
    )
    args = ap.parse_args()
    if args.ab is not None:
        return ab(args)
    root = Path(tempfile.mkdtemp(prefix="bench-restore-", dir=args.dir))
    try:
        t = time.perf_counter()
        snap, wal_dir = build_from_args(root, args)
        build_s = time.perf_counter() - t
        loads = [os.getloadavg()]
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
        cp_s = copy_and_sync(root, snap)
        raw_pre_s, n = raw_lmdb(root, snap, wal_dir, predecoded=True)
        raw_dec_s, _ = raw_lmdb(root, snap, wal_dir, predecoded=False)
        sec = summary["seconds"]
        floor = cp_s + raw_pre_s
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
            "cpAndSyncSeconds": round(cp_s, 2),
            # The goal: restore wall time over cp + raw py-lmdb insert of the same records.
            "restoreVsCpPlusRawInsert": round(wall / floor, 2),
            "replayVsRawPredecoded": round(sec["replay"] / raw_pre_s, 2),
            "replayVsRawWithDecode": round(sec["replay"] / raw_dec_s, 2),
            "cpu": os.cpu_count(),
            "loadavg": loads + [os.getloadavg()],
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
            print(
                f"restore / (cp + sync {cp_s:.2f} s + raw insert {raw_pre_s:.2f} s) = "
                f"{result['restoreVsCpPlusRawInsert']}x; load {result['loadavg']}"
            )
        return 0
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
