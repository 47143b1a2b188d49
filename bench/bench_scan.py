#!/usr/bin/env python3
"""State-fingerprint content scan (issue 10, priority 1): what checking a snapshot's content
costs, old loop vs the current one. Run by hand, not part of the test suite:

    .venv/bin/python bench/bench_scan.py [--keys 1000000] [--runs 3] [--value-size 100]

Builds one LMDB file of ``--keys`` pairs (keys ``user:%010d``, ``--value-size``-byte values)
in a scratch directory and times, interleaved and alternating in order run by run:

* ``old``: the loop as it was before this change (``Fingerprint.of_items`` over
  ``item_hash``: a fresh SHAKE-256 context per pair, ``bytes()`` copies of key and value),
  copied verbatim below so the comparison stays possible after the change;
* ``seq``: ``fingerprint.scan_lmdb(..., workers=1)`` (one process);
* ``par``: ``fingerprint.scan_lmdb(...)`` with the default worker count (key ranges hashed by
  worker processes, ``min(cores, 4)``);
* ``cursor``: a bare cursor pass (the floor).

Every variant must produce the same state (checked). Prints medians of ``--runs``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

import lmdb

from unisondb.storage import fingerprint

_PREFIX = b"unisondb-fp-1"
_KEYLEN = struct.Struct("<H")


def old_item_hash(key: bytes, value: bytes) -> int:
    h = hashlib.shake_256(_PREFIX)
    h.update(_KEYLEN.pack(len(key)))
    h.update(key)
    h.update(value)
    return int.from_bytes(h.digest(256), "little")


def old_scan(path: Path, map_size: int) -> int:
    env = lmdb.open(str(path), subdir=False, readonly=True, lock=False, max_dbs=4, map_size=map_size)
    try:
        kv = env.open_db(b"kv", create=False)
        with env.begin(db=kv) as txn:
            total = 0
            for key, value in txn.cursor().iternext(keys=True, values=True):
                total += old_item_hash(bytes(key), bytes(value))
            return total & ((1 << 2048) - 1)
    finally:
        env.close()


def cursor_scan(path: Path, map_size: int) -> int:
    env = lmdb.open(str(path), subdir=False, readonly=True, lock=False, max_dbs=4, map_size=map_size)
    try:
        kv = env.open_db(b"kv", create=False)
        with env.begin(db=kv) as txn:
            return sum(1 for _ in txn.cursor().iternext(keys=True, values=True))
    finally:
        env.close()


def build(path: Path, keys: int, value_size: int) -> int:
    map_size = max(1 << 26, keys * (value_size + 64) * 2)
    env = lmdb.open(str(path), subdir=False, max_dbs=4, map_size=map_size, sync=False)
    kv = env.open_db(b"kv")
    pad = os.urandom(value_size)
    for lo in range(0, keys, 100_000):
        with env.begin(write=True, db=kv) as txn:
            for i in range(lo, min(keys, lo + 100_000)):
                txn.put(b"user:%010d" % i, (b"%012d" % i + pad)[:value_size], append=True)
    env.sync(True)
    env.close()
    return map_size


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keys", type=int, default=1_000_000)
    ap.add_argument("--value-size", type=int, default=100)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-scan-") as tmp:
        path = Path(tmp) / "data.mdb"
        t0 = time.perf_counter()
        map_size = build(path, args.keys, args.value_size)
        print(f"built {args.keys:,} pairs in {time.perf_counter() - t0:.1f} s; load {os.getloadavg()}")
        variants = {
            "old": lambda: old_scan(path, map_size),
            "seq": lambda: int.from_bytes(fingerprint.scan_lmdb(path, map_size, workers=1).state(), "little"),
            "par": lambda: int.from_bytes(fingerprint.scan_lmdb(path, map_size).state(), "little"),
            "cursor": lambda: cursor_scan(path, map_size),
        }
        times: dict[str, list[float]] = {k: [] for k in variants}
        ref: int | None = None
        for run in range(args.runs):
            order = list(variants) if run % 2 == 0 else list(reversed(variants))
            for name in order:
                t = time.perf_counter()
                got = variants[name]()
                times[name].append(time.perf_counter() - t)
                if name != "cursor":
                    ref = got if ref is None else ref
                    if got != ref:
                        print(f"MISMATCH: {name}", file=sys.stderr)
                        return 1
        print(f"workers (par): {fingerprint.default_workers()}; load after {os.getloadavg()}")
        old = statistics.median(times["old"])
        for name, ts in times.items():
            med = statistics.median(ts)
            print(
                f"{name:7s} median {med:6.2f} s  {args.keys / med:>10,.0f} pairs/s  "
                f"old/this {old / med:4.2f}x  runs {' '.join(f'{t:.2f}' for t in ts)}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
