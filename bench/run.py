#!/usr/bin/env python3
"""UnisonDB side by side with its peers and with the physical limit, in one run.

    .venv/bin/python bench/run.py            # full: 3 interleaved rounds, ~2.2 GiB data.mdb (~15 min)
    .venv/bin/python bench/run.py --quick    # sanity check of the harness (< 3 min)
    .venv/bin/python bench/run.py --only http,snaploop --server-args "--ack wal"

Installs the Debian packages it drives if their binaries are missing (etcd-server,
etcd-client, redis-server, redis-tools, hey; wrk is optional), then, all on 127.0.0.1,
runs the sections (``--only`` picks some):

``http``
    durable PUTs (hey, 16 connections, 100-byte values), single-client PUTs and GETs against
    a UnisonDB server, etcd 3.4 (``/v3/kv/put``, ``/v3/kv/range``) and Redis 7 with
    ``appendfsync always`` (redis-benchmark); writes per fsync, in-memory table and LMDB lag
    from ``/metrics`` and the server's RssAnon during the loads; limits measured in this
    process (16 threads on an in-process ``Engine``, raw py-lmdb gets, raw ``write + fdatasync``).
``snapshot``
    a database built in-process with ``Engine.write`` snapshotted over HTTP vs ``cp`` + ``sync``
    of its ``data.mdb`` vs ``etcdctl snapshot save`` of an etcd holding the same keys and values;
    the first snapshot after a server start with data.mdb dropped from the page cache vs the next.
``wal``
    WAL backup of 100 sealed segments vs ``cp`` + ``sync``.
``snaploop``
    PUT req/s and p99 with back-to-back snapshots vs without.
``restore``
    ``unisondb restore`` of a snapshot + N WAL records (default 1 M) vs ``cp`` + raw py-lmdb
    insert of the same records; of the snapshot alone vs ``cp``; vs ``etcdctl snapshot
    restore``; peak RSS (ru_maxrss) of each.

Every comparison is measured in rounds (``--runs``, 3 in full mode), both sides back to back in
each round and the order alternating (``lib.interleave``); a row's result is the median of the
per-round ratios. Writes ``bench/results/<date>.md`` (``quick-<date>.md`` with --quick) whose
"Goals" table holds every goal of issues 10 and 11 (``goals.py``) next to the newest committed
full report's value. Every subprocess has a timeout, the whole run has a deadline, and every
server it starts is stopped by its PID.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))

try:
    import httpx
    import lmdb
    from prometheus_client.parser import text_string_to_metric_families

    from unisondb.config import EngineConfig, parse_size
    from unisondb.storage import segment
    from unisondb.storage.engine import Engine
    from unisondb.storage.record import Entry, EntryKind, Record
except ImportError as exc:  # pragma: no cover - guidance only
    raise SystemExit(
        f"{exc}: run from the project's venv, e.g.\n"
        "  python3 -m venv .venv && .venv/bin/pip install -e '.[test]'\n"
        "  .venv/bin/python bench/run.py --quick"
    ) from exc

import goals  # noqa: E402
import lib  # noqa: E402
import peers  # noqa: E402
from lib import (  # noqa: E402
    COMMANDS,
    BenchError,
    Load,
    fmt_mib,
    fmt_ms,
    fmt_rate,
    fmt_s,
    median,
    median_load,
    note,
    paired_ratios,
    ratio,
)

NS = "default"
KEY = b"bench-key"
PY_DISTS = (
    "unisondb",
    "lmdb",
    "starlette",
    "uvicorn",
    "uvloop",
    "httptools",
    "orjson",
    "prometheus_client",
    "httpx",
)


SECTIONS = ("http", "snapshot", "wal", "snaploop", "restore")
#: The sections that need the big database (built once, in-process).
BIG = ("snapshot", "wal", "snaploop", "restore")


@dataclass(frozen=True)
class Plan:
    mode: str
    runs: int
    load_s: float
    db_bytes: int
    restore_records: int
    #: Duration of each PUT load with / without the snapshot loop (a 2 GiB snapshot is slow).
    loop_s: float = 2
    segments: int = 100
    conns: int = 16
    value_size: int = 100
    big_value: int = 1024
    deadline_s: float = 45 * 60
    #: Extra flags for every UnisonDB server this run starts (``--server-args``).
    server_args: tuple[str, ...] = ()

    def disk_needed(self) -> int:
        """Peak scratch use of the big-database sections, with a margin: data.mdb (~2× the
        values), its WAL (~1×), etcd's copy (~2.6×), the restore's snapshot and one restored
        copy (~2× each)."""
        return 12 * self.db_bytes + (1 << 30)


#: 1088 MiB of 1 KiB values gives a data.mdb of ~2.2 GiB (the issue's "≥ 2 GiB").
FULL = Plan("full", runs=3, load_s=5, db_bytes=1088 << 20, restore_records=1_000_000, loop_s=10)
#: Two rounds (the medians are means): enough to exercise every path, < 3 min on a quiet machine.
QUICK = Plan(
    "quick", runs=2, load_s=1, db_bytes=8 << 20, restore_records=10_000, loop_s=1, deadline_s=10 * 60
)


# --- results, filled as the run goes ---


@dataclass
class Results:
    http: dict[str, list[Load]] = field(default_factory=dict)
    times: dict[str, list[float]] = field(default_factory=dict)
    values: dict[str, list[float]] = field(default_factory=dict)
    info: dict[str, str] = field(default_factory=dict)
    loadavg: list[tuple[str, str]] = field(default_factory=list)
    #: 1-minute load average right after each measurement of a series.
    loads: dict[str, list[float]] = field(default_factory=dict)
    #: section → why it was not measured (disk space, --only, a failure before it).
    skipped: dict[str, str] = field(default_factory=dict)

    def _mark(self, name: str) -> str:
        la = lib.load1()
        self.loads.setdefault(name, []).append(la)
        return f"(load {la:.1f})"

    def load(self, name: str, x: Load) -> None:
        self.http.setdefault(name, []).append(x)
        print(
            f"  {name}: {x.rps:,.0f}/s p50 {x.p50:.2f} ms p99 {x.p99:.2f} ms {self._mark(name)}", flush=True
        )

    def time(self, name: str, seconds: float) -> None:
        self.times.setdefault(name, []).append(seconds)
        print(f"  {name}: {seconds:.3f} s {self._mark(name)}", flush=True)

    def value(self, name: str, v: float) -> None:
        self.values.setdefault(name, []).append(v)
        print(f"  {name}: {v:,.3f} {self._mark(name)}", flush=True)

    def phase(self, name: str) -> None:
        la = lib.loadavg()
        self.loadavg.append((name, la))
        print(f"== {name} (load average {la})", flush=True)


# --- processes ---


class UnisonServer(peers.Managed):
    def __init__(
        self,
        data_dir: Path,
        log_path: Path,
        plan: Plan,
        segment_size: int | None = None,
    ) -> None:
        self.port = lib.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [
            sys.executable,
            "-m",
            "unisondb",
            "--data-dir",
            str(data_dir),
            "--http-addr",
            f"127.0.0.1:{self.port}",
            "--namespace",
            NS,
        ]
        if segment_size:
            cmd += ["--wal-segment-size", str(segment_size)]
        cmd += plan.server_args  # last: the lead's A/B flags win over the harness's own
        super().__init__("unisondb", cmd, log_path)
        #: Peak anonymous memory (heap), sampled: VmHWM also counts mapped data.mdb pages.
        self.rss = lib.RssSampler(self.pid, interval=0.2).__enter__()
        self.wait_until(
            lambda: httpx.get(self.url + "/health", timeout=1).status_code == 200, 300, "GET /health"
        )

    def stop(self, timeout: float = 60.0) -> int | None:
        self.rss.__exit__()
        return super().stop(timeout)

    def kv(self, key: bytes = KEY) -> str:
        return f"{self.url}/api/v1/{NS}/kv/{key.decode()}"

    def metric(self, name: str) -> float:
        text = httpx.get(self.url + "/metrics", timeout=30).text
        return sum(
            s.value for fam in text_string_to_metric_families(text) for s in fam.samples if s.name == name
        )

    def post(self, path: str, body: dict[str, object], timeout: float = 1800) -> dict[str, object]:
        note(f"curl -sf -X POST {self.url}/api/v1/{NS}/{path} -d '{json.dumps(body)}'")
        r = httpx.post(f"{self.url}/api/v1/{NS}/{path}", json=body, timeout=timeout)
        if r.status_code != 200:
            raise BenchError(f"POST {path} {body}: {r.status_code} {r.text[:1000]}")
        out: dict[str, object] = r.json()
        return out


class MetricsPeaks:
    """Scrapes ``/metrics`` every ``interval`` s in a thread; keeps each gauge's highest value.

    For the in-memory table and LMDB lag under a load: a scrape costs the server well under
    1 ms, a few per second are noise next to a 16-connection load."""

    def __init__(self, server: UnisonServer, names: tuple[str, ...], interval: float = 0.2) -> None:
        self.server, self.names, self.interval = server, names, interval
        self.peak: dict[str, float] = {}
        self.scrapes = self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> MetricsPeaks:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _loop(self) -> None:
        with httpx.Client(timeout=5) as cl:
            while not self._stop.wait(self.interval):
                try:
                    text = cl.get(self.server.url + "/metrics").text
                except httpx.HTTPError:
                    self.errors += 1
                    continue
                self.scrapes += 1
                for fam in text_string_to_metric_families(text):
                    for smp in fam.samples:
                        if smp.name in self.names:
                            self.peak[smp.name] = max(self.peak.get(smp.name, 0.0), smp.value)


def warm(paths: list[Path]) -> None:
    """Read files into the page cache so both sides of a comparison start alike."""
    subprocess.run(["sync"], check=True, timeout=600)
    for p in paths:
        with open(p, "rb") as f:
            while f.read(1 << 24):
                pass


def cp_sync(sources: list[Path], dest: Path) -> float:
    """``cp`` + ``sync FILE…`` (fsync of each copy): the physical limit of a file backup."""
    dest.mkdir(parents=True, exist_ok=True)
    names = (
        sources[0].name
        if len(sources) == 1
        else f"{{{sources[0].name},...,{sources[-1].name}}} ({len(sources)} files)"
    )
    note(f"cp {sources[0].parent}/{names} {dest}/ && sync {dest}/{names}")
    t = time.perf_counter()
    lib.run(["cp", *map(str, sources), str(dest)], 1800, log=False)
    lib.run(["sync", *[str(dest / s.name) for s in sources]], 1800, log=False)
    return time.perf_counter() - t


def values_for(i: int, n: int, size: int) -> list[bytes]:
    blob = random.Random(i).randbytes(n * size)
    return [blob[j * size : (j + 1) * size] for j in range(n)]


def big_key(i: int, j: int) -> bytes:
    return b"k%07d-%04d" % (i, j)


# --- phase 1: HTTP PUT / GET ---


def engine_limit(data_dir: Path, seconds: float, threads: int, value: bytes) -> tuple[Load, float]:
    """16 threads calling ``Engine.write`` in one process: group commit, no HTTP."""
    eng = Engine.open(data_dir, NS, EngineConfig())
    try:
        entry = [Entry(EntryKind.PUT, KEY, value)]
        deadline = [0.0]
        lats: list[list[float]] = [[] for _ in range(threads)]

        def worker(n: int) -> None:
            out = lats[n]
            pc = time.perf_counter
            while True:
                t0 = pc()
                if t0 >= deadline[0]:
                    return
                eng.write(entry)
                out.append(pc() - t0)

        deadline[0] = time.perf_counter() + min(1.0, seconds / 2)  # warm-up
        with ThreadPoolExecutor(threads) as ex:
            list(ex.map(worker, range(threads)))
        lats = [[] for _ in range(threads)]
        g0, w0 = eng.stats.group_commits, eng.stats.ops_flushed
        t0 = time.perf_counter()
        deadline[0] = t0 + seconds
        with ThreadPoolExecutor(threads) as ex:
            list(ex.map(worker, range(threads)))
        elapsed = time.perf_counter() - t0
        flat = sorted(x for lst in lats for x in lst)
        groups = (eng.stats.group_commits - g0) / max(1, eng.stats.ops_flushed - w0)
        return Load(
            len(flat) / elapsed, lib.percentile(flat, 50) * 1000, lib.percentile(flat, 99) * 1000
        ), groups
    finally:
        eng.close()


def lmdb_get_limit(db_dir: Path, seconds: float) -> Load:
    """Raw py-lmdb gets of the same key, one read transaction per get (as the server does)."""
    env = lmdb.open(str(db_dir), readonly=True, max_dbs=4, lock=True, readahead=False)
    try:
        kv = env.open_db(b"kv", create=False)
        lats: list[float] = []
        pc = time.perf_counter
        t0 = pc()
        end = t0 + seconds
        while True:
            a = pc()
            if a >= end:
                break
            with env.begin(db=kv, buffers=False) as txn:
                v = txn.get(KEY)
            lats.append(pc() - a)
        elapsed = pc() - t0
        assert v is not None
    finally:
        env.close()
    lats.sort()
    return Load(len(lats) / elapsed, lib.percentile(lats, 50) * 1000, lib.percentile(lats, 99) * 1000)


def raw_fsync(directory: Path, seconds: float, per_sync: int) -> float:
    """Writes/s appending 128-byte records, ``per_sync`` records per write + fdatasync."""
    path = directory / f"raw-fsync-{per_sync}.bin"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    buf = b"x" * 128 * per_sync
    n = 0
    t0 = time.perf_counter()
    try:
        while time.perf_counter() - t0 < seconds:
            os.write(fd, buf)
            os.fdatasync(fd)
            n += per_sync
    finally:
        os.close(fd)
        path.unlink()
    return n / (time.perf_counter() - t0)


def redis_bench(r: peers.Redis, test: str, n: int, conns: int, size: int) -> Load:
    out = lib.run(
        [
            "redis-benchmark",
            "-h",
            "127.0.0.1",
            "-p",
            str(r.port),
            "-t",
            test,
            "-c",
            str(conns),
            "-d",
            str(size),
            "-n",
            str(n),
            "--csv",
        ],
        300,
    ).stdout
    return lib.parse_redis_csv(out)[test.upper()]


TABLE_METRICS = ("unisondb_memtable_bytes", "unisondb_lmdb_lag_records")


def phase_http(plan: Plan, work: Path, res: Results) -> None:
    res.phase("HTTP PUT/GET")
    c, s = plan.conns, plan.load_s
    value = b"v" * plan.value_size
    put_body = json.dumps({"value": lib.b64(value)})
    uni = UnisonServer(work / "http-uni", work / "http-uni.log", plan)
    etcd = peers.Etcd(work / "http-etcd", work / "http-etcd.log")
    redis = peers.Redis(work / "http-redis", work / "http-redis.log")
    COMMANDS.aliases[lib.b64(value)] = "$V"
    COMMANDS.aliases[lib.b64(KEY)] = "$K"
    etcd_put = json.dumps({"key": lib.b64(KEY), "value": lib.b64(value)})
    etcd_get = json.dumps({"key": lib.b64(KEY)})
    etcd_get_s = json.dumps({"key": lib.b64(KEY), "serializable": True})
    have_wrk = shutil.which("wrk") is not None
    try:
        # warm-ups (not counted); the key exists before the first GET
        lib.hey(uni.kv(), 1, c, method="PUT", body=put_body)
        lib.hey(etcd.url + "/v3/kv/put", 1, c, method="POST", body=etcd_put)
        warm_set = redis_bench(redis, "set", 20_000, c, plan.value_size)
        warm_get = redis_bench(redis, "get", 20_000, c, plan.value_size)
        # redis-benchmark has no duration flag: size -n for about load_s seconds
        n_set = max(10_000, int(warm_set.rps * s))
        n_get = max(10_000, int(warm_get.rps * s))

        def uni_put() -> None:
            f0, w0 = uni.metric("unisondb_wal_fsyncs_total"), uni.metric("unisondb_writes_total")
            with MetricsPeaks(uni, TABLE_METRICS) as peaks:
                res.load("uni.put", lib.hey(uni.kv(), s, c, method="PUT", body=put_body))
            f1, w1 = uni.metric("unisondb_wal_fsyncs_total"), uni.metric("unisondb_writes_total")
            res.value("uni.writes_per_fsync", (w1 - w0) / max(1.0, f1 - f0))
            res.value("uni.memtable_peak", peaks.peak.get("unisondb_memtable_bytes", 0.0))
            res.value("uni.lmdb_lag_peak", peaks.peak.get("unisondb_lmdb_lag_records", 0.0))
            res.value("uni.metrics_scrapes", peaks.scrapes)

        def put(name: str, url: str, conns: int, method: str, body: str) -> Callable[[], None]:
            return lambda: res.load(name, lib.hey(url, s, conns, method=method, body=body))

        def get(name: str, url: str, method: str = "GET", body: str | None = None) -> Callable[[], None]:
            return lambda: res.load(name, lib.hey(url, s, c, method=method, body=body))

        steps: dict[str, Callable[[], None]] = {
            "uni.put": uni_put,
            "etcd.put": put("etcd.put", etcd.url + "/v3/kv/put", c, "POST", etcd_put),
            "redis.set": lambda: res.load("redis.set", redis_bench(redis, "set", n_set, c, plan.value_size)),
            "uni.get.hey": get("uni.get.hey", uni.kv()),
            "redis.get": lambda: res.load("redis.get", redis_bench(redis, "get", n_get, c, plan.value_size)),
            "etcd.get": get("etcd.get", etcd.url + "/v3/kv/range", "POST", etcd_get),
            "etcd.get.serializable": get(
                "etcd.get.serializable", etcd.url + "/v3/kv/range", "POST", etcd_get_s
            ),
            "uni.get.wrk": lambda: res.load("uni.get.wrk", lib.wrk(uni.kv(), s, c)),
            "uni.put.c1": put("uni.put.c1", uni.kv(), 1, "PUT", put_body),
            "etcd.put.c1": put("etcd.put.c1", etcd.url + "/v3/kv/put", 1, "POST", etcd_put),
        }
        groups = [
            ["uni.put", "etcd.put", "redis.set"],
            ["uni.get.hey", "redis.get", "etcd.get", "etcd.get.serializable"]
            + (["uni.get.wrk"] if have_wrk else []),
            ["uni.put.c1", "etcd.put.c1"],
        ]
        for i in range(plan.runs):
            print(f" round {i + 1}/{plan.runs}", flush=True)
            # The server's anonymous memory (heap): VmHWM also counts data.mdb's mapped pages.
            with lib.RssSampler(uni.pid, interval=0.1) as rss:
                for name in lib.interleave(groups, i):
                    steps[name]()
            res.value("rss_anon.uni.http", rss.anon_kib)
            res.value("rss.uni.http", rss.hwm_kib)
            note(
                f"in-process: Engine.open($WORK/limit-{i}, '{NS}'); {c} threads × "
                f"engine.write([Entry(PUT, b'bench-key', {plan.value_size} B)]) for {s:g} s"
            )
            load, groups_per_write = engine_limit(work / f"limit-{i}", s, c, value)
            res.load("limit.engine", load)
            res.value("limit.engine.fsyncs_per_put", groups_per_write)
            note(
                f"in-process: lmdb.open($WORK/limit-{i}/{NS}/db, readonly=True); "
                f"begin() + get(b'bench-key') per read, 1 thread, {min(s, 2):g} s"
            )
            res.load("limit.lmdb_get", lmdb_get_limit(work / f"limit-{i}" / NS / "db", min(s, 2)))
            shutil.rmtree(work / f"limit-{i}")
            note(
                f"in-process: os.write(128 B) + os.fdatasync per write, {min(s, 2):g} s; "
                "and 16 records per write + fdatasync"
            )
            res.value("limit.fsync1", raw_fsync(work, min(s, 2), 1))
            res.value("limit.fsync16", raw_fsync(work, min(s, 2), 16))
        res.value("rss.etcd.http", etcd.vmhwm_kib())
        res.value("rss.redis.http", redis.vmhwm_kib())
        res.info["uni.get.body"] = httpx.get(uni.kv(), timeout=30).text.strip()
    finally:
        uni.stop()
        etcd.stop()
        redis.stop()
    for d in ("http-uni", "http-etcd", "http-redis"):
        shutil.rmtree(work / d, ignore_errors=True)


# --- phase 2: backups ---


@dataclass
class BigDb:
    data: Path
    segment_size: int
    per_record: int
    records: int

    @property
    def keys(self) -> int:
        return self.per_record * self.records


def build_big(plan: Plan, work: Path, res: Results) -> BigDb:
    segment_size = max(64 << 10, plan.db_bytes // (plan.segments + 10))
    per_record = max(1, min(1000, segment_size // 2 // (plan.big_value + 64)))
    records = plan.db_bytes // (per_record * plan.big_value)
    db = BigDb(work / "big", segment_size, per_record, records)
    note(
        f"in-process: Engine.open($WORK/big, '{NS}', EngineConfig(segment_size={segment_size})); "
        f"{records} × engine.write([{per_record} × Entry(PUT, b'k%07d-%04d', "
        f"{plan.big_value} random bytes)])"
    )
    eng = Engine.open(
        db.data, NS, EngineConfig(segment_size=segment_size, map_size=max(1 << 30, plan.db_bytes * 4))
    )
    t = time.perf_counter()
    try:
        for i in range(records):
            vals = values_for(i, per_record, plan.big_value)
            eng.write([Entry(EntryKind.PUT, big_key(i, j), v) for j, v in enumerate(vals)])
    finally:
        eng.close()
    res.info["build.uni"] = f"{time.perf_counter() - t:.1f} s"
    print(f"  built {db.keys:,} keys in {res.info['build.uni']}", flush=True)
    return db


def load_etcd(etcd: peers.Etcd, db: BigDb, plan: Plan, res: Results) -> None:
    note(
        f"POST {etcd.url}/v3/kv/txn × {db.records}, each {db.per_record} requestPut of the "
        "same keys and values (4 client threads)"
    )
    local = threading.local()
    clients: list[httpx.Client] = []

    def one(i: int) -> None:
        client = getattr(local, "c", None)
        if client is None:
            client = local.c = httpx.Client(timeout=300)
            clients.append(client)
        vals = values_for(i, db.per_record, plan.big_value)
        etcd.put_many(client, [(big_key(i, j), v) for j, v in enumerate(vals)])

    t = time.perf_counter()
    try:
        with ThreadPoolExecutor(4) as ex:
            list(ex.map(one, range(db.records)))
    finally:
        for cl in clients:
            cl.close()
    res.info["build.etcd"] = f"{time.perf_counter() - t:.1f} s"
    n = etcd.count()
    if n != db.keys:
        raise BenchError(f"etcd holds {n} keys, expected {db.keys}")
    print(f"  loaded etcd with {n:,} keys in {res.info['build.etcd']}", flush=True)


def put_loop_load(uni: UnisonServer, plan: Plan, body: str, with_snapshots: bool) -> tuple[Load, int]:
    if not with_snapshots:
        return lib.hey(uni.kv(), plan.loop_s, plan.conns, method="PUT", body=body), 0
    stop = threading.Event()
    done = [0]
    errors: list[BaseException] = []

    def loop() -> None:
        try:
            with httpx.Client(timeout=1800) as cl:
                while not stop.is_set():
                    r = cl.post(f"{uni.url}/api/v1/{NS}/btree/backup", json={"path": "bench/loop.db"})
                    if r.status_code != 200:
                        raise BenchError(f"snapshot in loop: {r.status_code} {r.text[:500]}")
                    p = Path(r.json()["path"])
                    p.unlink()
                    p.with_name(p.name + ".sha256").unlink()
                    done[0] += 1
        except BaseException as exc:
            errors.append(exc)

    note(
        f"while: curl -X POST {uni.url}/api/v1/{NS}/btree/backup -d "
        '\'{"path":"bench/loop.db"}\' back to back (then rm the file + sidecar)'
    )
    t = threading.Thread(target=loop)
    t.start()
    try:
        load = lib.hey(uni.kv(), plan.loop_s, plan.conns, method="PUT", body=body)
    finally:
        stop.set()
        t.join(timeout=1800)
    if errors:
        raise errors[0]
    return load, done[0]


def disk_shortfall(work: Path, need: int, what: str) -> str | None:
    """None if ``need`` bytes are free under ``work``, else why the rows are skipped."""
    free = lib.free_bytes(work)
    if free >= need:
        return None
    return f"skipped: {free / 2**30:.1f} GiB free, {what} needs {need / 2**30:.1f} GiB"


def drop_and_restart(
    uni: UnisonServer, db: BigDb, plan: Plan, work: Path, res: Results, i: int
) -> UnisonServer:
    """Stop the server, drop data.mdb from the page cache, start a new server on it."""
    uni.stop()
    mdb = db.data / NS / "db" / "data.mdb"
    note(f"python: fsync + posix_fadvise(POSIX_FADV_DONTNEED) on {mdb}")
    lib.drop_from_page_cache(mdb)
    resident = lib.resident_bytes(mdb)
    if resident is not None:
        res.value("snapshot.cold.resident_fraction", resident / max(1, mdb.stat().st_size))
    return UnisonServer(db.data, work / f"big-uni-cold-{i}.log", plan, db.segment_size)


def section_snapshot(
    plan: Plan, work: Path, res: Results, db: BigDb, uni: UnisonServer, etcd: peers.Etcd, etcd_snap: Path
) -> UnisonServer:
    """Warm snapshot vs ``cp`` vs ``etcdctl snapshot save`` (interleaved); then cold vs warm.
    Returns the server now running (the cold rounds restart it)."""
    res.phase("snapshot")
    mdb = db.data / NS / "db" / "data.mdb"
    etcd_db = etcd.data_dir / "member" / "snap" / "db"
    res.info["uni.mdb_bytes"] = fmt_mib(mdb.stat().st_size)
    res.values["uni.mdb_bytes"] = [float(mdb.stat().st_size)]

    def uni_snapshot(name: str, i: int, warm_first: bool = True) -> None:
        if warm_first:
            warm([mdb])
        t = time.perf_counter()
        snap = uni.post("btree/backup", {"path": f"bench/{name}-{i}.db"})
        res.time(name, time.perf_counter() - t)
        res.info["uni.snapshot_bytes"] = fmt_mib(int(str(snap["bytes"])))
        sp = Path(str(snap["path"]))
        sp.unlink()
        sp.with_name(sp.name + ".sha256").unlink(missing_ok=True)

    def cp_mdb(i: int) -> None:
        warm([mdb])
        res.time("cp.mdb", cp_sync([mdb], work / "cp-mdb"))
        shutil.rmtree(work / "cp-mdb")

    def etcd_save(i: int) -> None:
        warm([etcd_db])
        etcd_snap.unlink(missing_ok=True)
        t = time.perf_counter()
        lib.run(["etcdctl", "--endpoints", etcd.endpoint, "snapshot", "save", str(etcd_snap)], 1800)
        res.time("etcd.snapshot", time.perf_counter() - t)

    steps: dict[str, Callable[[int], None]] = {
        "uni.snapshot": lambda i: uni_snapshot("uni.snapshot", i),
        "cp.mdb": cp_mdb,
        "etcd.snapshot": etcd_save,
    }
    for i in range(plan.runs):
        print(f" round {i + 1}/{plan.runs}", flush=True)
        for name in lib.interleave([["uni.snapshot", "cp.mdb", "etcd.snapshot"]], i):
            steps[name](i)
    res.info["etcd.snapshot_bytes"] = fmt_mib(etcd_snap.stat().st_size)

    res.phase("snapshot: first after a server start (cold) vs the next")
    for i in range(plan.runs):
        print(f" round {i + 1}/{plan.runs}", flush=True)
        uni = drop_and_restart(uni, db, plan, work, res, i)
        uni_snapshot("uni.snapshot.cold", i, warm_first=False)
        uni_snapshot("uni.snapshot.warm", i, warm_first=False)
    return uni


def section_wal(plan: Plan, work: Path, res: Results, db: BigDb, uni: UnisonServer) -> None:
    res.phase("WAL backup")
    wal_dir = db.data / NS / "wal"
    ids = sorted(int(p.stem) for p in wal_dir.glob("*.wal"))
    sealed = ids[:-1]  # the server started a fresh active segment
    if len(sealed) < plan.segments:
        raise BenchError(f"only {len(sealed)} sealed segments, need {plan.segments}")
    chosen = sealed[-plan.segments :]
    after = sealed[-plan.segments - 1] if len(sealed) > plan.segments else 0
    files = [wal_dir / f"{sid:09d}.wal" for sid in chosen]
    if not all(f.exists() for f in files):
        raise BenchError(f"segment file names are not NNNNNNNNN.wal: {files[:2]}")
    res.info["wal.bytes"] = fmt_mib(sum(f.stat().st_size for f in files))

    def uni_wal(i: int) -> None:
        warm(files)
        t = time.perf_counter()
        out = uni.post(
            "wal/backup", {"afterSegmentId": after, "backupDir": f"bench/wal-{i}", "rotate": False}
        )
        res.time("uni.wal_backup", time.perf_counter() - t)
        backups = out["backups"]
        assert isinstance(backups, list)
        if len(backups) != plan.segments:
            raise BenchError(f"WAL backup copied {len(backups)} segments, expected {plan.segments}")
        shutil.rmtree(db.data / "backups" / NS / "bench" / f"wal-{i}")

    def cp_wal(i: int) -> None:
        warm(files)
        res.time("cp.wal", cp_sync(files, work / "cp-wal"))
        shutil.rmtree(work / "cp-wal")

    steps: dict[str, Callable[[int], None]] = {"uni.wal_backup": uni_wal, "cp.wal": cp_wal}
    for i in range(plan.runs):
        print(f" round {i + 1}/{plan.runs}", flush=True)
        for name in lib.interleave([["uni.wal_backup", "cp.wal"]], i):
            steps[name](i)


def section_snaploop(plan: Plan, res: Results, uni: UnisonServer) -> None:
    res.phase("PUT with/without back-to-back snapshots")
    body = json.dumps({"value": lib.b64(b"v" * plan.value_size)})
    lib.hey(uni.kv(), 1, plan.conns, method="PUT", body=body)  # warm-up
    for i in range(plan.runs):
        print(f" round {i + 1}/{plan.runs}", flush=True)
        with lib.RssSampler(uni.pid, interval=0.1) as rss:
            for name in lib.interleave([["uni.put.noloop", "uni.put.snaploop"]], i):
                load, n = put_loop_load(uni, plan, body, name == "uni.put.snaploop")
                res.load(name, load)
                if n:
                    res.value("snaploop.snapshots", n)
        res.value("rss_anon.uni.big", rss.anon_kib)
        res.value("rss.uni.big", rss.hwm_kib)


def phase_big(plan: Plan, work: Path, res: Results, sections: set[str]) -> None:
    """Build the big database once; run the chosen sections of BIG on it."""
    chosen = [x for x in BIG if x in sections]
    why = disk_shortfall(work, plan.disk_needed(), f"the {fmt_mib(plan.db_bytes)} database")
    if why:
        print(f"  {why}", flush=True)
        for x in chosen:
            res.skipped[x] = why
        return
    res.phase("build the big database")
    db = build_big(plan, work, res)
    etcd: peers.Etcd | None = None
    uni: UnisonServer | None = None
    etcd_snap = work / "etcd-snap.db"
    try:
        if "snapshot" in sections or "restore" in sections:
            etcd = peers.Etcd(work / "big-etcd", work / "big-etcd.log")
            load_etcd(etcd, db, plan, res)
            res.info["etcd.db_bytes"] = fmt_mib((etcd.data_dir / "member" / "snap" / "db").stat().st_size)
        uni = UnisonServer(db.data, work / "big-uni.log", plan, db.segment_size)
        if "snapshot" in sections:
            assert etcd is not None
            uni = section_snapshot(plan, work, res, db, uni, etcd, etcd_snap)
        elif etcd is not None:  # the restore section restores etcd's snapshot too
            lib.run(["etcdctl", "--endpoints", etcd.endpoint, "snapshot", "save", str(etcd_snap)], 1800)
        if etcd is not None:
            etcd.stop()
            shutil.rmtree(etcd.data_dir, ignore_errors=True)
        if "wal" in sections:
            section_wal(plan, work, res, db, uni)
        if "snaploop" in sections:
            section_snaploop(plan, res, uni)
        if "restore" in sections:
            res.phase("restore: prepare inputs")
            base = uni.post("btree/backup", {"path": "restore/base.db"})
            uni.stop()
            uni = None
            phase_restore(plan, work, res, db, base, etcd_snap)
    finally:
        if uni is not None:
            uni.stop()
        if etcd is not None:
            etcd.stop()


# --- phase 3: restore ---


def write_restore_records(db: BigDb, plan: Plan, res: Results) -> None:
    n = plan.restore_records
    note(
        f"in-process: Engine.open($WORK/big, '{NS}'); {n:,} × engine.submit([Entry(PUT, "
        f"b'r%09d', {plan.value_size} B)]) (one record each, group-committed); engine.rotate()"
    )
    eng = Engine.open(
        db.data, NS, EngineConfig(segment_size=db.segment_size, map_size=max(1 << 30, plan.db_bytes * 4))
    )
    t = time.perf_counter()
    try:
        value = b"w" * plan.value_size
        step = 100_000
        for start in range(0, n, step):
            futs = [
                eng.submit([Entry(EntryKind.PUT, b"r%09d" % i, value)])
                for i in range(start, min(n, start + step))
            ]
            for f in futs:
                f.result()
        eng.rotate()
    finally:
        eng.close()
    res.info["build.restore_wal"] = f"{time.perf_counter() - t:.1f} s"


def raw_restore_limit(snap: Path, records: list[Record], dest: Path, batch: int) -> tuple[float, float]:
    """cp + sync of the snapshot, then raw py-lmdb puts of the same records (same env flags
    and transaction size as the restore). Returns (cp seconds, insert seconds)."""
    dest.mkdir(parents=True)
    t = time.perf_counter()
    lib.run(["cp", str(snap), str(dest / "data.mdb")], 1800)
    lib.run(["sync", str(dest / "data.mdb")], 1800)
    t_cp = time.perf_counter() - t
    env = lmdb.open(
        str(dest),
        map_size=max(1 << 30, snap.stat().st_size * 4),
        max_dbs=4,
        sync=True,
        metasync=False,
        readahead=False,
    )
    try:
        kv = env.open_db(b"kv")
        t = time.perf_counter()
        for start in range(0, len(records), batch):
            with env.begin(write=True, db=kv) as txn:
                for rec in records[start : start + batch]:
                    for e in rec.entries:
                        txn.put(e.key, e.value)
        env.sync(True)
        t_ins = time.perf_counter() - t
    finally:
        env.close()
    return t_cp, t_ins


def restore_cmd(target: Path, snap: Path, wal: Path | None) -> list[str]:
    cmd = [sys.executable, "-m", "unisondb", "restore", "--data-dir", str(target), "--namespace", NS]
    cmd += ["--snapshot", str(snap)] + (["--wal", str(wal)] if wal else []) + ["--json"]
    return cmd


def phase_restore(
    plan: Plan, work: Path, res: Results, db: BigDb, base: dict[str, object], etcd_snap: Path
) -> None:
    write_restore_records(db, plan, res)
    uni = UnisonServer(db.data, work / "big-uni-2.log", plan, db.segment_size)
    try:
        seg = int(str(base["segmentId"]))
        uni.post(
            "wal/backup", {"afterSegmentId": max(0, seg - 1), "backupDir": "restore/wal", "rotate": True}
        )
    finally:
        uni.stop()
    backups = db.data / "backups" / NS / "restore"
    snap, wal = backups / "base.db", backups / "wal"
    snap_lsn = int(str(base["lsn"]))
    records = [
        rec
        for p in sorted(wal.glob("*.wal"))
        for rec, _s, _e in segment.scan(p).records
        if rec.lsn > snap_lsn
    ]
    if len(records) != plan.restore_records:
        raise BenchError(f"{len(records)} WAL records after the snapshot, expected {plan.restore_records}")
    wal_files = sorted(wal.glob("*.wal"))
    res.info["restore.snapshot_bytes"] = fmt_mib(snap.stat().st_size)
    res.info["restore.wal"] = (
        f"{len(records):,} records in {len(wal_files)} segments, "
        f"{fmt_mib(sum(p.stat().st_size for p in wal_files))}"
    )
    try:
        from unisondb.restore.apply import REPLAY_BATCH

        batch = int(REPLAY_BATCH)
    except ImportError:
        batch = 20_000
    res.info["restore.batch"] = str(batch)
    # Each step writes one restored copy and deletes it; the snapshot stays.
    why = disk_shortfall(work, 2 * snap.stat().st_size + (1 << 30), "a restored copy of the snapshot")
    if why:
        print(f"  {why}", flush=True)
        res.skipped["restore"] = why
        return

    def uni_restore(i: int, with_wal: bool) -> None:
        name = "uni.restore" if with_wal else "uni.restore.snaponly"
        target = work / f"{name}-{i}"
        warm([snap, *wal_files] if with_wal else [snap])
        m = lib.run_maxrss(restore_cmd(target, snap, wal if with_wal else None), 1800, work)
        if m.returncode != 0:
            raise BenchError(
                f"unisondb restore failed ({m.returncode}):\n{m.stdout[-2000:]}\n{m.stderr[-3000:]}"
            )
        summary = json.loads(m.stdout)["summary"]
        want = plan.restore_records if with_wal else 0
        if summary["recordsReplayed"] != want:
            raise BenchError(f"restore replayed {summary['recordsReplayed']} records, expected {want}")
        res.time(name, m.wall)
        for k, v in summary["seconds"].items():
            res.values.setdefault(f"{name}.{k}", []).append(float(v))
        res.value(f"rss.{name}", m.maxrss_kib)
        shutil.rmtree(target)

    def raw_limit(i: int) -> None:
        warm([snap])
        note(
            f"in-process: cp base.db $WORK/raw-{i}/data.mdb && sync; lmdb.open(sync=True, "
            f"metasync=False); txn.put of the same {plan.restore_records:,} pre-decoded "
            f"records, {batch} per write txn; env.sync()"
        )
        t_cp, t_ins = raw_restore_limit(snap, records, work / f"raw-{i}", batch)
        res.time("limit.restore.cp", t_cp)
        res.time("limit.restore.insert", t_ins)
        res.time("limit.restore", t_cp + t_ins)
        shutil.rmtree(work / f"raw-{i}")

    def etcd_restore(i: int) -> None:
        warm([etcd_snap])
        peer = f"http://127.0.0.1:{lib.free_port()}"
        target = work / f"etcd-restore-{i}"
        cmd = ["etcdctl", "snapshot", "restore", str(etcd_snap), "--data-dir", str(target), "--name", "r"]
        cmd += ["--initial-cluster", f"r={peer}", "--initial-advertise-peer-urls", peer]
        m = lib.run_maxrss(cmd, 1800, work)
        if m.returncode != 0:
            raise BenchError(f"etcdctl snapshot restore failed ({m.returncode}):\n{m.stderr[-3000:]}")
        res.time("etcd.restore", m.wall)
        res.value("rss.etcd.restore", m.maxrss_kib)
        shutil.rmtree(target)

    steps: dict[str, Callable[[int], None]] = {
        "uni.restore": lambda i: uni_restore(i, True),
        "limit.restore": raw_limit,
        "uni.restore.snaponly": lambda i: uni_restore(i, False),
        "etcd.restore": etcd_restore,
    }
    groups = [["uni.restore", "limit.restore", "uni.restore.snaponly"]]
    if etcd_snap.exists():
        groups.append(["etcd.restore"])
    res.phase("restore")
    for i in range(plan.runs):
        print(f" round {i + 1}/{plan.runs}", flush=True)
        for name in lib.interleave(groups, i):
            steps[name](i)


# --- the report ---

#: The section whose run measures each goal row.
ROW_SECTION = {
    "10.snapshot": "snapshot",
    "10.snapshot_cold": "snapshot",
    "10.wal_backup": "wal",
    "10.restore": "restore",
    "10.restore_snapshot_only": "restore",
    "10.put_during_snapshots": "snaploop",
    "10.put_p99_during_snapshots": "snaploop",
    "10.restore_rss": "restore",
    "11.rss_anon_big": "snaploop",
}


def goal_rows(plan: Plan, res: Results, previous: dict[str, goals.Previous]) -> list[goals.Row]:
    """One row per goal of issues 10 and 11, from the series of this run."""
    H, T, V = res.http, res.times, res.values
    kib = 1024.0

    def loads(*series: str) -> list[float]:
        return [x for n in series for x in res.loads.get(n, [])]

    def time_ratio(row: goals.Row, ours: str, theirs: str) -> None:
        row.runs = paired_ratios(T.get(ours, []), T.get(theirs, []))
        row.ours, row.peer = fmt_s(median(T.get(ours, []))), fmt_s(median(T.get(theirs, [])))
        row.loads = loads(ours, theirs)

    def load_ratio(row: goals.Row, ours: str, theirs: str, what: str, label: str) -> None:
        a, b = H.get(ours, []), H.get(theirs, [])
        get = (lambda x: x.rps) if what == "rps" else (lambda x: x.p99 / 1000)
        row.runs = paired_ratios([get(x) for x in a], [get(x) for x in b])
        fmt = fmt_rate if what == "rps" else (lambda v: goals.fmt_quantity(v, "ms"))
        row.ours = fmt(median(get(x) for x in a))
        row.peer = f"{label}: {fmt(median(get(x) for x in b))}"
        row.loads = loads(ours, theirs)

    def absolute(row: goals.Row, series: str, scale: float = 1.0, *, load_of: str = "") -> None:
        row.runs = [x * scale for x in V.get(series, [])]
        row.ours = goals.fmt_quantity(median(row.runs), row.goal.unit)
        row.loads = loads(load_of or series)

    rows: list[goals.Row] = []
    for g in goals.GOALS:
        row = goals.Row(g)
        rows.append(row)
        section = ROW_SECTION.get(g.id, "http")
        if section in res.skipped:
            row.skipped = res.skipped[section]
            continue
        if g.id == "10.snapshot":
            time_ratio(row, "uni.snapshot", "cp.mdb")
            size = median(V.get("uni.mdb_bytes", []))
            row.note = f"data.mdb {fmt_mib(size)}"
            if plan.mode == "full" and size < 2 << 30:
                row.note += " (**below the issue's 2 GiB**)"
        elif g.id == "10.snapshot_cold":
            time_ratio(row, "uni.snapshot.cold", "uni.snapshot.warm")
            left = V.get("snapshot.cold.resident_fraction")
            if left:
                row.note = f"{median(left):.0%} of data.mdb still cached after the drop (fincore)"
        elif g.id == "10.wal_backup":
            time_ratio(row, "uni.wal_backup", "cp.wal")
            row.note = res.info.get("wal.bytes", "")
        elif g.id == "10.restore":
            time_ratio(row, "uni.restore", "limit.restore")
            row.note = (
                f"snapshot {res.info.get('restore.snapshot_bytes', '?')} + {plan.restore_records:,} records"
            )
        elif g.id == "10.restore_snapshot_only":
            time_ratio(row, "uni.restore.snaponly", "limit.restore.cp")
        elif g.id == "10.put_during_snapshots":
            load_ratio(row, "uni.put.snaploop", "uni.put.noloop", "rps", "without")
            n = V.get("snaploop.snapshots")
            if n:
                row.note = f"{median(n):.0f} snapshot(s) per {plan.loop_s:g} s load"
        elif g.id == "10.put_p99_during_snapshots":
            load_ratio(row, "uni.put.snaploop", "uni.put.noloop", "p99", "without")
        elif g.id == "10.restore_rss":
            absolute(row, "rss.uni.restore", kib)
            snaponly = V.get("rss.uni.restore.snaponly")
            if snaponly:
                row.peer = f"snapshot only: {fmt_mib(median(snaponly) * kib)}"
        elif g.id == "11.put_vs_etcd":
            load_ratio(row, "uni.put", "etcd.put", "rps", "etcd")
        elif g.id == "11.put_p99_vs_etcd":
            load_ratio(row, "uni.put", "etcd.put", "p99", "etcd")
        elif g.id == "11.get_vs_redis":
            load_ratio(row, "uni.get.hey", "redis.get", "rps", "Redis")
        elif g.id == "11.single_client_p50":
            ours = [x.p50 / 1000 for x in H.get("uni.put.c1", [])]
            row.ours = goals.fmt_quantity(median(ours), "ms")
            etcd = H.get("etcd.put.c1", [])
            row.peer = f"etcd: {goals.fmt_quantity(median(x.p50 / 1000 for x in etcd), 'ms')}"
            row.loads = loads("uni.put.c1")
            prev = previous.get(g.id)
            if prev and prev.ours:
                row.runs = [x / prev.ours for x in ours]
            else:
                row.note = "no previous single-client figure: this run sets it"
            row.note = "; ".join(x for x in (row.note, "hey reports 0.1 ms steps") if x)
        elif g.id == "11.writes_per_fsync":
            absolute(row, "uni.writes_per_fsync", load_of="uni.put")
        elif g.id in ("11.memtable_bytes", "11.lmdb_lag"):
            absolute(
                row,
                "uni.memtable_peak" if g.id == "11.memtable_bytes" else "uni.lmdb_lag_peak",
                load_of="uni.put",
            )
            n = V.get("uni.metrics_scrapes")
            if n:
                row.note = (
                    f"highest of {median(n):.0f} /metrics scrapes per load (every 0.2 s); 0 with `--ack lmdb`"
                )
        elif g.id == "11.rss_anon_http":
            absolute(row, "rss_anon.uni.http", kib, load_of="uni.put")
        elif g.id == "11.rss_anon_big":
            absolute(row, "rss_anon.uni.big", kib, load_of="uni.put.snaploop")
        if not row.runs and not row.skipped and row.ours == "—":
            row.skipped = res.skipped.get("*", "not measured (the run stopped before it)")
    return rows


def write_report(
    plan: Plan,
    res: Results,
    path: Path,
    machine: list[tuple[str, str]],
    started: dt.datetime,
    elapsed: float,
    error: str | None,
    argv: list[str],
    work: Path,
    prev_path: Path | None,
) -> None:
    md = lib.Markdown()
    md.h(1, f"UnisonDB benchmarks — {started:%Y-%m-%d} ({plan.mode} mode)")
    cmd = ".venv/bin/python bench/run.py" + ("".join(f" {a}" for a in argv))
    md.p(
        f"Command: `{cmd}` — started {started:%Y-%m-%d %H:%M:%S %Z}, took {elapsed / 60:.1f} "
        f"min. {plan.runs} round(s) of each measurement, **medians** shown; loads of "
        f"{plan.load_s:g} s, {plan.conns} connections, {plan.value_size}-byte values. Everything "
        "on 127.0.0.1, server and load generator sharing the same cores."
    )
    if error:
        md.p(
            f"**The run did not finish:** `{error}` — the rows below are what was measured before it stopped."
        )
    md.p(
        "Server flags: "
        + (f"`{shlex.join(plan.server_args)}` (`--server-args`)" if plan.server_args else "the defaults")
        + ". Ratio = UnisonDB ÷ peer: above 1 is better for req/s; below 1 is better for "
        "latency, time and memory."
    )

    def shown(p: Path) -> Path:
        return p.resolve().relative_to(ROOT) if p.resolve().is_relative_to(ROOT) else p

    previous: dict[str, goals.Previous] = {}
    if prev_path is not None:
        previous = goals.parse_report(prev_path.read_text(errors="replace"))
    md.h(2, "Goals")
    md.p(
        "Every goal of issues 10 and 11. **result** = the median of the per-round values "
        f"(**per run**; {plan.runs} round(s), both sides measured back to back in each round, "
        "the order alternating); for a ratio, each round's UnisonDB figure ÷ the same round's "
        "peer. UnisonDB / peer = medians of each side. **load** = the 1-minute load average "
        "right after each measurement of the row (2 cores: above 2 something else competed). "
        + (
            f"**previous** = the same row in `{shown(prev_path)}` "
            f"(started {goals.started_at(prev_path.read_text(errors='replace')) or '?'}), "
            "**change** = result ÷ previous (better/worse by the goal's direction, same within 5 %)."
            if prev_path
            else "No previous full report was found: every row is new."
        )
    )
    if plan.mode != "full":
        md.p(
            f"**{plan.mode} mode**: tiny sizes, {plan.runs} round(s) — a check of the harness; "
            "its figures are not comparable with a full report's."
        )
    md.table(
        goals.HEADER,
        goals.table_rows(goal_rows(plan, res, previous), previous),
        align="l" * len(goals.HEADER),
    )

    H, T, V = res.http, res.times, res.values

    def ld(name: str) -> Load | None:
        return median_load(H[name]) if name in H else None

    def tm(name: str) -> float:
        return median(T.get(name, []))

    def val(name: str) -> float:
        return median(V.get(name, []))

    rows: list[list[str]] = []

    def add(meas: str, ours: str, peer: str, theirs: str, r: str) -> None:
        rows.append([meas, ours, peer, theirs, r])

    def rate_rows(meas: str, ours_name: str, peer_list: list[tuple[str, str]]) -> None:
        ours = ld(ours_name)
        if ours is None:
            return
        first = True
        for label, pname in peer_list:
            p = ld(pname)
            add(
                meas if first else "〃",
                fmt_rate(ours.rps) if ours and first else "",
                label,
                fmt_rate(p.rps) if p else "—",
                ratio(ours.rps, p.rps) if ours and p else "—",
            )
            first = False

    def lat_rows(meas: str, ours_name: str, peer_list: list[tuple[str, str]]) -> None:
        ours = ld(ours_name)
        if ours is None:
            return
        first = True
        for label, pname in peer_list:
            p = ld(pname)
            add(
                meas if first else "〃",
                f"{fmt_ms(ours.p50)} / {fmt_ms(ours.p99)}" if ours and first else "",
                label,
                f"{fmt_ms(p.p50)} / {fmt_ms(p.p99)}" if p else "—",
                f"{ratio(ours.p50, p.p50)} / {ratio(ours.p99, p.p99)}" if ours and p else "—",
            )
            first = False

    put_peers = [
        ("etcd 3.4 `POST /v3/kv/put` (hey)", "etcd.put"),
        ("Redis 7 `appendfsync always` SET (redis-benchmark)", "redis.set"),
        ("**limit**: in-process Engine, 16 threads, no HTTP", "limit.engine"),
    ]
    get_peers = [
        ("etcd 3.4 `POST /v3/kv/range` linearizable (hey)", "etcd.get"),
        ("etcd 3.4 `/v3/kv/range` serializable (hey)", "etcd.get.serializable"),
        ("Redis 7 GET (redis-benchmark)", "redis.get"),
        ("**limit**: raw py-lmdb get, 1 thread", "limit.lmdb_get"),
    ]
    rate_rows(f"durable PUT req/s, HTTP, {plan.conns} conns, {plan.value_size} B (hey)", "uni.put", put_peers)
    rate_rows(f"GET req/s, HTTP, {plan.conns} conns (hey)", "uni.get.hey", get_peers)
    lat_rows("PUT latency p50 / p99", "uni.put", put_peers)
    lat_rows("GET latency p50 / p99 (hey)", "uni.get.hey", get_peers)

    if "uni.snapshot" in T:
        snap = (
            f"B-tree snapshot, {res.info.get('uni.mdb_bytes', '?')} data.mdb → "
            f"{res.info.get('uni.snapshot_bytes', '?')} file (HTTP)"
        )
        add(
            snap,
            fmt_s(tm("uni.snapshot")),
            "**limit**: `cp data.mdb` + `sync` of the copy",
            fmt_s(tm("cp.mdb")),
            ratio(tm("uni.snapshot"), tm("cp.mdb")),
        )
        add(
            "〃",
            "",
            f"`etcdctl snapshot save` (same keys/values; db "
            f"{res.info.get('etcd.db_bytes', '?')} → {res.info.get('etcd.snapshot_bytes', '?')})",
            fmt_s(tm("etcd.snapshot")),
            ratio(tm("uni.snapshot"), tm("etcd.snapshot")),
        )
    if "uni.wal_backup" in T:
        add(
            f"WAL backup of {plan.segments} segments ({res.info.get('wal.bytes', '?')})",
            fmt_s(tm("uni.wal_backup")),
            "**limit**: `cp` of the same files + `sync`",
            fmt_s(tm("cp.wal")),
            ratio(tm("uni.wal_backup"), tm("cp.wal")),
        )
    if "uni.restore" in T:
        add(
            f"restore: snapshot ({res.info.get('restore.snapshot_bytes', '?')}) + "
            f"{plan.restore_records:,} WAL records (`unisondb restore`, wall)",
            fmt_s(tm("uni.restore")),
            "**limit**: `cp` + `sync` snapshot, raw py-lmdb insert of the same records",
            f"{fmt_s(tm('limit.restore'))} ({fmt_s(tm('limit.restore.cp'))} + "
            f"{fmt_s(tm('limit.restore.insert'))})",
            ratio(tm("uni.restore"), tm("limit.restore")),
        )
        add(
            "〃",
            "",
            "`etcdctl snapshot restore` (etcd's snapshot of the backup rows)",
            fmt_s(tm("etcd.restore")),
            ratio(tm("uni.restore"), tm("etcd.restore")),
        )
    if "uni.put.snaploop" in H:
        a, b = ld("uni.put.snaploop"), ld("uni.put.noloop")
        assert a and b
        add(
            f"PUT req/s while a snapshot loop runs ({val('snaploop.snapshots'):.0f} snapshot(s) "
            f"completed per {plan.loop_s:g} s load, median)",
            fmt_rate(a.rps),
            "the same without the loop",
            fmt_rate(b.rps),
            ratio(a.rps, b.rps),
        )
        add(
            "〃 p50 / p99",
            f"{fmt_ms(a.p50)} / {fmt_ms(a.p99)}",
            "the same without the loop",
            f"{fmt_ms(b.p50)} / {fmt_ms(b.p99)}",
            f"{ratio(a.p50, b.p50)} / {ratio(a.p99, b.p99)}",
        )
    kib = 1024.0
    if "rss.uni.http" in V:
        add(
            "peak RSS (VmHWM) of the server after the HTTP loads",
            fmt_mib(val("rss.uni.http") * kib),
            "etcd / Redis, same loads (for reference)",
            f"{fmt_mib(val('rss.etcd.http') * kib)} / {fmt_mib(val('rss.redis.http') * kib)}",
            "—",
        )
    if "rss.uni.big" in V:
        add(
            "peak RSS of the server with the big database, after snapshots + snapshot loop",
            fmt_mib(val("rss.uni.big") * kib),
            "—",
            "",
            "—",
        )
    if "rss_anon.uni.big" in V:
        add(
            "〃 anonymous memory only (peak RssAnon, sampled every 0.1 s; VmHWM also counts "
            "the pages of data.mdb mapped by LMDB)",
            f"{fmt_mib(val('rss_anon.uni.http') * kib)} (HTTP loads), "
            f"{fmt_mib(val('rss_anon.uni.big') * kib)} (big database)",
            "—",
            "",
            "—",
        )
    if "rss.uni.restore" in V:
        add(
            "peak RSS of `unisondb restore` (ru_maxrss)",
            fmt_mib(val("rss.uni.restore") * kib),
            "`etcdctl snapshot restore` (for reference)",
            fmt_mib(val("rss.etcd.restore") * kib),
            "—",
        )
    md.h(2, "Results")
    md.table(
        ["measurement", "UnisonDB", "compared with (same run)", "peer", "UnisonDB / peer"],
        rows,
        align="lrlrr",
    )

    md.h(2, "Context")
    ctx: list[list[str]] = []
    if "uni.writes_per_fsync" in V:
        ctx.append(["writes per WAL fsync, HTTP PUT load (/metrics)", f"{val('uni.writes_per_fsync'):.2f}"])
        ctx.append(
            ["group commits per write, in-process Engine limit", f"{val('limit.engine.fsyncs_per_put'):.3f}"]
        )
        ctx.append(
            ["raw `write(128 B)` + `fdatasync`, one per write (one thread)", fmt_rate(val("limit.fsync1"))]
        )
        ctx.append(
            [
                "raw `write(16 × 128 B)` + `fdatasync` (records/s; disk limit at 16 in flight)",
                fmt_rate(val("limit.fsync16")),
            ]
        )
        g = ld("uni.get.wrk")
        if g:
            ctx.append(
                [
                    "UnisonDB GET with wrk (p50 / p99)",
                    f"{fmt_rate(g.rps)} ({fmt_ms(g.p50)} / {fmt_ms(g.p99)})",
                ]
            )
        if "uni.get.body" in res.info:
            ctx.append(["UnisonDB GET response body", f"`{res.info['uni.get.body']}`"])
    if "uni.restore.replay" in V:
        ctx.append(
            [
                "`unisondb restore` phases (median s): verify / copy / replay / publish",
                " / ".join(f"{val('uni.restore.' + k):.2f}" for k in ("verify", "copy", "replay", "publish")),
            ]
        )
        ctx.append(
            [
                "restore replay rate vs raw insert (records/s)",
                f"{plan.restore_records / val('uni.restore.replay'):,.0f} vs "
                f"{plan.restore_records / tm('limit.restore.insert'):,.0f}",
            ]
        )
        ctx.append(
            [
                "restore input",
                f"{res.info.get('restore.wal', '?')}; LMDB txn of "
                f"{res.info.get('restore.batch', '?')} records (both sides)",
            ]
        )
    for k, label in (
        ("build.uni", "build of the big database, in-process `Engine.write` (see commands)"),
        ("build.etcd", "load of the same keys/values into etcd (`/v3/kv/txn`)"),
        ("build.restore_wal", "writing the restore's WAL records in-process"),
    ):
        if k in res.info:
            ctx.append([label, res.info[k]])
    md.table(["what", "value"], ctx, align="lr")

    md.h(2, "Every run")
    every: list[list[str]] = []

    def la(name: str) -> str:
        return ", ".join(f"{x:.1f}" for x in res.loads.get(name, []))

    for name, loads in H.items():
        every.append(
            [name, ", ".join(f"{x.rps:,.0f}/s ({fmt_ms(x.p50)} / {fmt_ms(x.p99)})" for x in loads), la(name)]
        )
    for name, ts in T.items():
        every.append([name, ", ".join(f"{x:.3f} s" for x in ts), la(name)])
    for name, vs in V.items():
        every.append([name, ", ".join(f"{x:,.3f}" for x in vs), la(name)])
    md.table(["series", "values (req/s: p50/p99)", "load (1 min) after each"], every, align="lll")

    md.h(2, "Machine")
    la = "; ".join(f"{name}: {v}" for name, v in res.loadavg)
    md.table(["", ""], [*machine, ("load average (1/5/15 min) at each phase", la)], align="ll")
    md.p(
        "The machine is shared with other engineers' test runs; a load average above the "
        "core count means something else was competing for the CPU during that phase."
    )

    md.h(2, "How the data was built")
    md.p(
        "- The big database was written **in-process with the Engine's write API** "
        "(`Engine.open(...)` + `engine.write([...])`, one WAL record of up to 1000 1-KiB "
        "random values each, group-committed and fsynced like the server does), not over "
        "HTTP; a UnisonDB server was then started on that data directory. etcd received the "
        "very same keys and values through its JSON gateway (`/v3/kv/txn`, one transaction "
        "per UnisonDB record).\n"
        "- The restore input is a real snapshot (`POST /btree/backup`) and a real WAL backup "
        "(`POST /wal/backup`) of one-entry records written after it (in-process `Engine.submit`).\n"
        "- PUT/GET runs use one key (`bench-key`) for all systems, so the GETs always hit; "
        "etcd is a single member, Redis runs with `--appendonly yes --appendfsync always`.\n"
        "- Snapshot, WAL-backup and restore timings start from a warm page cache on both "
        "sides (sources read in first). UnisonDB's snapshot also sha256-hashes the copy and "
        "writes a sidecar; `cp` does neither."
    )

    md.h(2, "Commands")
    md.p(
        f"`$WORK` = the scratch directory (`{work}`); `$V` = `{lib.b64(b'v' * plan.value_size)}` "
        f"(base64 of {plan.value_size} × `v`); `$K` = `{lib.b64(KEY)}` (base64 of `bench-key`). "
        "In-process steps are described in words; `×N` = run N times. Ports are picked free "
        "at run time."
    )
    md.code("\n".join(f"{c}" + (f"    # ×{n}" if n > 1 else "") for c, n in COMMANDS.unique()), "sh")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(md.render())


# --- main ---


class Deadline(Exception):
    pass


def parse_sections(values: list[str] | None) -> set[str]:
    """``--only http,snapshot --only restore`` → the sections; ``backup`` = every BIG section."""
    if not values:
        return set(SECTIONS)
    out: set[str] = set()
    for v in values:
        for x in filter(None, (p.strip() for p in v.split(","))):
            if x == "backup":
                out.update(BIG)
            elif x in SECTIONS:
                out.add(x)
            else:
                raise SystemExit(
                    f"--only: unknown section {x!r}; choose from {', '.join(SECTIONS)} (or backup)"
                )
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes, 1 s loads, 2 rounds (< 3 min); writes quick-<date>.md",
    )
    ap.add_argument("--runs", type=int, help="rounds of each measurement (default 3)")
    ap.add_argument("--seconds", type=float, help="duration of each load (full: 5, snapshot-loop loads 10)")
    ap.add_argument("--db-size", help="size of the big database's values (full: 1088MiB → ~2.2 GiB data.mdb)")
    ap.add_argument("--restore-records", type=int, help="WAL records to restore (full: 1000000)")
    ap.add_argument(
        "--only",
        action="append",
        metavar="SECTION[,SECTION]",
        help=f"run only these sections: {', '.join(SECTIONS)} (backup = all but http); repeatable",
    )
    ap.add_argument(
        "--server-args",
        default="",
        metavar="'FLAGS'",
        help="extra flags for every UnisonDB server started (shell-split), e.g. --server-args='--ack wal' "
        "(write the '=' when FLAGS is a single flag: --server-args=--http-lean)",
    )
    ap.add_argument(
        "--compare",
        type=Path,
        help="previous report to compare with (default: the newest committed full report in bench/results)",
    )
    ap.add_argument(
        "--deadline", type=float, metavar="MINUTES", help="deadline of the whole run (full 45, quick 10)"
    )
    ap.add_argument("--out", type=Path, help="report path (default bench/results/...)")
    ap.add_argument(
        "--work-dir",
        type=Path,
        default=BENCH / "work",
        help="parent of the scratch directory (default bench/work, git-ignored)",
    )
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory")
    ap.add_argument("--no-install", action="store_true", help="do not apt-get anything")
    args = ap.parse_args()
    sections = parse_sections(args.only)
    plan = QUICK if args.quick else FULL
    over: dict[str, object] = {"server_args": tuple(shlex.split(args.server_args))}
    if args.runs:
        over["runs"] = args.runs
    if args.seconds:
        over["load_s"] = over["loop_s"] = args.seconds
    if args.db_size:
        over["db_bytes"] = parse_size(args.db_size)
    if args.restore_records:
        over["restore_records"] = args.restore_records
    if args.deadline:
        over["deadline_s"] = args.deadline * 60
    plan = Plan(**{**plan.__dict__, **over})
    started = dt.datetime.now().astimezone()
    out = args.out or (
        BENCH / "results" / (("quick-" if plan.mode == "quick" else "") + f"{started:%Y-%m-%d}.md")
    )
    prev_path = args.compare
    if prev_path is None:
        results_dir = BENCH / "results"
        candidates = goals.committed_reports(results_dir)
        prev_path = goals.newest_full_report(
            candidates if candidates is not None else sorted(results_dir.glob("*.md")), exclude=out
        )
    elif not prev_path.is_file():
        raise SystemExit(f"--compare {prev_path}: no such file")
    if not args.no_install:
        installed = peers.ensure_installed()
        if installed:
            print(f"installed: {' '.join(installed)}", flush=True)
    missing = [b for b in peers.BINARIES if shutil.which(b) is None and b not in peers.OPTIONAL]
    if missing:
        raise SystemExit(f"missing tools {missing}: apt-get install -y {' '.join(peers.DEBS)}")

    args.work_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"run-{started:%Y%m%d-%H%M%S}-", dir=args.work_dir))
    COMMANDS.scratch = str(work)
    res = Results()
    for x in SECTIONS:
        if x not in sections:
            res.skipped[x] = f"not run (`--only {','.join(sorted(sections))}`)"
    machine = lib.machine(work, peers.DEBS, PY_DISTS)

    def on_signal(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    def on_alarm(_signum: int, _frame: object) -> None:
        raise Deadline(f"the run exceeded its {plan.deadline_s / 60:.0f}-minute deadline")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(int(plan.deadline_s))
    t0 = time.perf_counter()
    error: str | None = None
    print(f"UnisonDB benchmark ({plan.mode}), sections {sorted(sections)}, scratch dir {work}", flush=True)
    if prev_path:
        print(f"comparing with {prev_path}", flush=True)
    try:
        if "http" in sections:
            phase_http(plan, work, res)
        if sections & set(BIG):
            phase_big(plan, work, res, sections)
        res.phase("done")
    except (BenchError, Deadline, KeyboardInterrupt) as exc:
        error = f"{type(exc).__name__}: {exc}"
        print(f"error: {error}", file=sys.stderr, flush=True)
        res.skipped["*"] = f"not measured: the run stopped ({type(exc).__name__})"
    finally:
        signal.alarm(0)
        peers.stop_all()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    write_report(
        plan, res, out, machine, started, time.perf_counter() - t0, error, sys.argv[1:], work, prev_path
    )
    print(f"report: {out}", flush=True)
    return 1 if error else 0


if __name__ == "__main__":
    raise SystemExit(main())
