#!/usr/bin/env python3
"""HTTP throughput of durable PUTs and GETs, with fsyncs per acknowledged write.

Run by hand (not part of the test suite); needs Debian's `hey` and `wrk`:

    apt-get install -y hey wrk
    .venv/bin/python bench/bench_http.py [--seconds 10] [--connections 16] [--runs 3]

Starts a server on a scratch data dir on 127.0.0.1, drives it with `hey` (PUT, 100-byte
values) and `wrk` (GET), reads /metrics before and after to compute fsyncs per write, and
stops the server by its PID. Prints a Markdown table of medians over the runs. A baseline
measured in the same run — raw fdatasync rate of the same disk, one process, one fsync per
write — puts the group-commit number in context.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx
import lib
from prometheus_client.parser import text_string_to_metric_families
from serverproc import start_server


def metric(url: str, name: str) -> float:
    total = 0.0
    for fam in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for s in fam.samples:
            if s.name == name:
                total += s.value
    return total


def raw_fsync_rate(directory: Path, seconds: float = 2.0) -> float:
    """Writes/s with one 120-byte append + fdatasync per write: the no-group-commit limit."""
    path = directory / "raw-fsync.bin"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    n = 0
    deadline = time.perf_counter() + seconds
    try:
        while time.perf_counter() < deadline:
            os.write(fd, b"x" * 120)
            os.fdatasync(fd)
            n += 1
    finally:
        os.close(fd)
        path.unlink()
    return n / seconds


def hey_put(url: str, seconds: int, conns: int) -> tuple[float, float, float]:
    body = json.dumps({"value": lib.b64(b"v" * 100)})
    r = lib.hey(f"{url}/api/v1/default/kv/bench-key", seconds, conns, method="PUT", body=body)
    return r.rps, r.p50, r.p99


def wrk_get(url: str, seconds: int, conns: int) -> tuple[float, float, float]:
    r = lib.wrk(f"{url}/api/v1/default/kv/bench-key", seconds, conns)
    return r.rps, r.p50, r.p99


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    for tool in ("hey", "wrk"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found: apt-get install -y hey wrk")
    work = Path(tempfile.mkdtemp(prefix="unisondb-bench-"))
    raw = raw_fsync_rate(work)
    srv = start_server(work / "data", ("default",))
    puts, gets, fsync_ratio = [], [], []
    try:
        for _ in range(args.runs):
            f0 = metric(srv.url, "unisondb_wal_fsyncs_total")
            w0 = metric(srv.url, "unisondb_writes_total")
            puts.append(hey_put(srv.url, args.seconds, args.connections))
            f1 = metric(srv.url, "unisondb_wal_fsyncs_total")
            w1 = metric(srv.url, "unisondb_writes_total")
            fsync_ratio.append((f1 - f0) / max(w1 - w0, 1))
            gets.append(wrk_get(srv.url, args.seconds, args.connections))
    finally:
        srv.stop()
        shutil.rmtree(work, ignore_errors=True)

    def med(rows: list[tuple[float, float, float]], i: int) -> float:
        return statistics.median(r[i] for r in rows)

    put_rps = med(puts, 0)
    print(f"\n{args.runs} runs × {args.seconds}s, {args.connections} connections, 100-byte values\n")
    print("| measurement | median | p50 ms | p99 ms |")
    print("|---|---|---|---|")
    print(f"| durable PUT req/s (hey) | {put_rps:,.0f} | {med(puts, 1):.2f} | {med(puts, 2):.2f} |")
    print(f"| GET req/s (wrk) | {med(gets, 0):,.0f} | {med(gets, 1):.2f} | {med(gets, 2):.2f} |")
    print(f"| fsyncs per acknowledged PUT | {statistics.median(fsync_ratio):.3f} | | |")
    print(f"| raw append+fdatasync/s, 1 process (same disk) | {raw:,.0f} | | |")
    print(f"\nPUT throughput / raw one-fsync-per-write rate = {put_rps / raw:.2f}x")


if __name__ == "__main__":
    main()
