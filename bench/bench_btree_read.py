#!/usr/bin/env python3
"""The per-GET cost of the B-tree's read side, A/B in one process.

    .venv/bin/python bench/bench_btree_read.py [--keys 100000] [--gets 200000] [--runs 5]

A = the read lock as it was before (a ``@contextmanager`` generator taking a
``threading.Condition`` on entry and on exit, copied verbatim below); B = the lock in
``unisondb/storage/btree.py`` today. Both wrap the same LMDB lookup on the same
environment (``env.begin(buffers=False)`` + ``txn.get``), and a bare lookup without any
lock is the floor. Runs alternate A/B/bare order run by run; medians of ``--runs``.
Prints ns per GET, the ratios, and the 1-minute load average.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import lmdb

from unisondb.storage.btree import _ReadWriteLock


class OldReadWriteLock:
    """Verbatim copy of the read side before the change (the baseline)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if self._readers == 0:
                    self._cond.notify_all()


def _bench(
    env: lmdb.Environment,
    db: object,
    keys: list[bytes],
    read: Callable[[], AbstractContextManager[None]] | None,
) -> float:
    started = time.perf_counter_ns()
    if read is None:
        for k in keys:
            with env.begin(db=db, buffers=False) as txn:
                txn.get(k)
    else:
        for k in keys:
            with read(), env.begin(db=db, buffers=False) as txn:
                txn.get(k)
    return (time.perf_counter_ns() - started) / len(keys)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keys", type=int, default=100_000)
    ap.add_argument("--gets", type=int, default=200_000)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-btree-read-") as tmp:
        env = lmdb.open(tmp, map_size=1 << 30, max_dbs=4, readahead=False)
        db = env.open_db(b"kv")
        rng = random.Random(1)
        with env.begin(write=True, db=db) as txn:
            for i in range(args.keys):
                txn.put(b"key-%08d" % i, rng.randbytes(100))
        gets = [b"key-%08d" % rng.randrange(args.keys) for _ in range(args.gets)]
        old, new = OldReadWriteLock(), _ReadWriteLock()
        variants: dict[str, Callable[[], AbstractContextManager[None]] | None] = {
            "A old lock": old.read,
            "B new lock": new.read,
            "bare (no lock)": None,
        }
        results: dict[str, list[float]] = {name: [] for name in variants}
        names = list(variants)
        for run in range(args.runs):
            order = names[run % len(names) :] + names[: run % len(names)]
            for name in order:
                results[name].append(_bench(env, db, gets, variants[name]))
        env.close()
    med = {name: statistics.median(v) for name, v in results.items()}
    print(
        f"load (1 min) {os.getloadavg()[0]:.2f}; {args.gets:,} GETs of {args.keys:,} keys, "
        f"medians of {args.runs}"
    )
    for name, v in results.items():
        print(f"  {name:16s} {med[name]:8.0f} ns/GET   runs: {' '.join(f'{x:.0f}' for x in v)}")
    bare = med["bare (no lock)"]
    print(
        f"  lock cost: old {med['A old lock'] - bare:.0f} ns, new {med['B new lock'] - bare:.0f} ns; "
        f"GET new/old {med['B new lock'] / med['A old lock']:.2f}x"
    )


if __name__ == "__main__":
    main()
