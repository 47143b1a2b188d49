#!/usr/bin/env python3
"""Two per-GET costs of the read path, each A/B in one process.

    .venv/bin/python bench/bench_read_path.py [--keys 100000] [--gets 200000] [--runs 5]

1. The B-tree's read lock.
A = the read lock as it was before (a ``@contextmanager`` generator taking a
``threading.Condition`` on entry and on exit, copied verbatim below); B = the lock in
``unisondb/storage/btree.py`` today. Both wrap the same LMDB lookup on the same
environment (``env.begin(buffers=False)`` + ``txn.get``), and a bare lookup without any
lock is the floor. Runs alternate A/B/bare order run by run; medians of ``--runs``.
Prints ns per GET, the ratios, and the 1-minute load average.

2. Recording one request in /metrics. A = prometheus_client's ``Counter`` + ``Histogram``
(label children cached, as ``api/app.py`` did before); B = ``metrics.RequestStats``.
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
from prometheus_client import CollectorRegistry, Counter, Histogram

from unisondb.metrics import LATENCY_BUCKETS, RequestStats
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


def _bench_metrics(n: int, record: Callable[[float], None]) -> float:
    started = time.perf_counter_ns()
    for i in range(n):
        record((i % 97) * 1e-5)
    return (time.perf_counter_ns() - started) / n


def metrics_ab(n: int, runs: int) -> None:
    r = CollectorRegistry()
    counter = Counter("c", "c", ["route", "method", "status"], registry=r).labels("kv_get", "GET", "200")
    hist = Histogram("h", "h", ["route"], buckets=LATENCY_BUCKETS, registry=r).labels("kv_get")

    def old(seconds: float) -> None:
        counter.inc()
        hist.observe(seconds)

    stats = RequestStats(LATENCY_BUCKETS)

    def new(seconds: float) -> None:
        stats.record("kv_get", "GET", 200, seconds)

    res: dict[str, list[float]] = {"A prometheus_client": [], "B RequestStats": []}
    for run in range(runs):
        pairs = [("A prometheus_client", old), ("B RequestStats", new)]
        for name, fn in pairs if run % 2 == 0 else pairs[::-1]:
            res[name].append(_bench_metrics(n, fn))
    med = {k: statistics.median(v) for k, v in res.items()}
    print(f"record one request, load (1 min) {os.getloadavg()[0]:.2f}, medians of {runs}")
    for name, v in res.items():
        print(f"  {name:20s} {med[name]:8.0f} ns   runs: {' '.join(f'{x:.0f}' for x in v)}")
    print(f"  new/old {med['B RequestStats'] / med['A prometheus_client']:.2f}x")


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
    metrics_ab(args.gets, args.runs)


if __name__ == "__main__":
    main()
