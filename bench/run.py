#!/usr/bin/env python3
"""UnisonDB side by side with its peers and with the physical limit, in one run.

    .venv/bin/python bench/run.py            # full: medians of 3 runs, 1 GiB database (~10-15 min)
    .venv/bin/python bench/run.py --quick    # sanity check of the harness (< 2 min)

Installs the Debian packages it drives if their binaries are missing (etcd-server,
etcd-client, redis-server, redis-tools, wrk, hey), then, all on 127.0.0.1:

1. HTTP: durable PUTs (hey, 16 connections, 100-byte values) and GETs (hey and wrk)
   against a UnisonDB server, etcd 3.4 (``/v3/kv/put``, ``/v3/kv/range``) and Redis 7
   with ``appendfsync always`` (redis-benchmark); limits measured in this process: 16
   threads writing to an in-process ``Engine`` (group-committed WAL + LMDB, no HTTP), raw
   py-lmdb gets, raw ``write + fdatasync``.
2. Backups: a database built in-process with ``Engine.write`` (1000 entries of 1 KiB per
   record), snapshotted over HTTP vs ``cp`` of its ``data.mdb`` vs ``etcdctl snapshot save``
   of an etcd holding the same keys and values; WAL backup of 100 sealed segments vs ``cp``;
   PUT req/s with and without a snapshot loop.
3. Restore: ``unisondb restore`` of a snapshot + N WAL records (default 1 M) vs ``cp`` +
   raw py-lmdb insert of the same records vs ``etcdctl snapshot restore``.

Writes ``bench/results/<date>.md`` (``quick-<date>.md`` with --quick). Every subprocess has
a timeout, the whole run has a deadline, and every server it starts is stopped by its PID.
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


@dataclass(frozen=True)
class Plan:
    mode: str
    runs: int
    load_s: float
    db_bytes: int
    restore_records: int
    #: Duration of each PUT load with / without the snapshot loop (a 1 GiB snapshot is slow).
    loop_s: float = 2
    segments: int = 100
    conns: int = 16
    value_size: int = 100
    big_value: int = 1024
    deadline_s: float = 40 * 60


FULL = Plan("full", runs=3, load_s=5, db_bytes=1 << 30, restore_records=1_000_000, loop_s=10)
QUICK = Plan("quick", runs=1, load_s=2, db_bytes=16 << 20, restore_records=20_000, deadline_s=5 * 60)


# --- results, filled as the run goes ---


@dataclass
class Results:
    http: dict[str, list[Load]] = field(default_factory=dict)
    times: dict[str, list[float]] = field(default_factory=dict)
    values: dict[str, list[float]] = field(default_factory=dict)
    info: dict[str, str] = field(default_factory=dict)
    loadavg: list[tuple[str, str]] = field(default_factory=list)

    def load(self, name: str, x: Load) -> None:
        self.http.setdefault(name, []).append(x)
        print(f"  {name}: {x.rps:,.0f}/s p50 {x.p50:.2f} ms p99 {x.p99:.2f} ms", flush=True)

    def time(self, name: str, seconds: float) -> None:
        self.times.setdefault(name, []).append(seconds)
        print(f"  {name}: {seconds:.3f} s", flush=True)

    def value(self, name: str, v: float) -> None:
        self.values.setdefault(name, []).append(v)
        print(f"  {name}: {v:,.3f}", flush=True)

    def phase(self, name: str) -> None:
        la = lib.loadavg()
        self.loadavg.append((name, la))
        print(f"== {name} (load average {la})", flush=True)


# --- processes ---


class UnisonServer(peers.Managed):
    def __init__(self, data_dir: Path, log_path: Path, segment_size: int | None = None) -> None:
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


def run_measured(cmd: list[str], timeout: float, cwd: Path) -> tuple[int, str, str, float, int]:
    """Run ``cmd``; return (exit code, stdout, stderr, wall seconds, peak RSS in KiB).

    Peak RSS is the process's VmHWM, sampled every 20 ms until it exits (VmHWM only grows).
    Not ``wait4``'s ru_maxrss: Linux carries the parent's RSS at fork into it.
    """
    COMMANDS.add(shlex.join(cmd))
    with tempfile.TemporaryFile(dir=cwd) as out, tempfile.TemporaryFile(dir=cwd) as err:
        t = time.perf_counter()
        # Popen returns once the child has exec'd, so every sample is of the new program.
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, preexec_fn=lib.die_with_parent)
        with lib.RssSampler(proc.pid, interval=0.02) as rss:
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                raise BenchError(f"timed out after {timeout:.0f}s: {shlex.join(cmd)}") from None
        wall = time.perf_counter() - t
        out.seek(0)
        err.seek(0)
        return (
            proc.returncode,
            out.read().decode(errors="replace"),
            err.read().decode(errors="replace"),
            wall,
            rss.hwm_kib,
        )


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


def phase_http(plan: Plan, work: Path, res: Results) -> None:
    res.phase("HTTP PUT/GET")
    c, s = plan.conns, plan.load_s
    value = b"v" * plan.value_size
    put_body = json.dumps({"value": lib.b64(value)})
    uni = UnisonServer(work / "http-uni", work / "http-uni.log")
    etcd = peers.Etcd(work / "http-etcd", work / "http-etcd.log")
    redis = peers.Redis(work / "http-redis", work / "http-redis.log")
    COMMANDS.aliases[lib.b64(value)] = "$V"
    COMMANDS.aliases[lib.b64(KEY)] = "$K"
    etcd_put = json.dumps({"key": lib.b64(KEY), "value": lib.b64(value)})
    etcd_get = json.dumps({"key": lib.b64(KEY)})
    etcd_get_s = json.dumps({"key": lib.b64(KEY), "serializable": True})
    try:
        # warm-ups (not counted); the key exists before the first GET
        lib.hey(uni.kv(), 1, c, method="PUT", body=put_body)
        lib.hey(etcd.url + "/v3/kv/put", 1, c, method="POST", body=etcd_put)
        warm_set = redis_bench(redis, "set", 20_000, c, plan.value_size)
        warm_get = redis_bench(redis, "get", 20_000, c, plan.value_size)
        # redis-benchmark has no duration flag: size -n for about load_s seconds
        n_set = max(10_000, int(warm_set.rps * s))
        n_get = max(10_000, int(warm_get.rps * s))
        for i in range(plan.runs):
            print(f" run {i + 1}/{plan.runs}", flush=True)
            f0, w0 = uni.metric("unisondb_wal_fsyncs_total"), uni.metric("unisondb_writes_total")
            res.load("uni.put", lib.hey(uni.kv(), s, c, method="PUT", body=put_body))
            f1, w1 = uni.metric("unisondb_wal_fsyncs_total"), uni.metric("unisondb_writes_total")
            res.value("uni.fsyncs_per_put", (f1 - f0) / max(1.0, w1 - w0))
            res.load("uni.get.hey", lib.hey(uni.kv(), s, c))
            res.load("uni.get.wrk", lib.wrk(uni.kv(), s, c))
            res.load("etcd.put", lib.hey(etcd.url + "/v3/kv/put", s, c, method="POST", body=etcd_put))
            res.load("etcd.get", lib.hey(etcd.url + "/v3/kv/range", s, c, method="POST", body=etcd_get))
            res.load(
                "etcd.get.serializable",
                lib.hey(etcd.url + "/v3/kv/range", s, c, method="POST", body=etcd_get_s),
            )
            res.load("redis.set", redis_bench(redis, "set", n_set, c, plan.value_size))
            res.load("redis.get", redis_bench(redis, "get", n_get, c, plan.value_size))
            note(
                f"in-process: Engine.open($WORK/limit-{i}, '{NS}'); {c} threads × "
                f"engine.write([Entry(PUT, b'bench-key', {plan.value_size} B)]) for {s:g} s"
            )
            load, groups = engine_limit(work / f"limit-{i}", s, c, value)
            res.load("limit.engine", load)
            res.value("limit.engine.fsyncs_per_put", groups)
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
        res.value("rss.uni.http", uni.vmhwm_kib())
        uni.rss.sample()
        res.value("rss_anon.uni.http", uni.rss.anon_kib)
        res.value("rss.etcd.http", etcd.vmhwm_kib())
        res.value("rss.redis.http", redis.vmhwm_kib())
        res.info["uni.get.body"] = httpx.get(uni.kv()).text
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


def phase_backup(plan: Plan, work: Path, res: Results) -> tuple[BigDb, dict[str, object], Path]:
    """Returns the big database, the restore snapshot's response and etcd's snapshot."""
    res.phase("backups: build")
    db = build_big(plan, work, res)
    etcd: peers.Etcd | None = None
    uni: UnisonServer | None = None
    try:
        etcd = peers.Etcd(work / "big-etcd", work / "big-etcd.log")
        load_etcd(etcd, db, plan, res)
        etcd_db = work / "big-etcd" / "member" / "snap" / "db"
        res.info["etcd.db_bytes"] = fmt_mib(etcd_db.stat().st_size)
        etcd_snap = work / "etcd-snap.db"
        res.phase("backups: snapshots")
        uni = UnisonServer(db.data, work / "big-uni.log", db.segment_size)
        mdb = db.data / NS / "db" / "data.mdb"
        res.info["uni.mdb_bytes"] = fmt_mib(mdb.stat().st_size)
        for i in range(plan.runs):
            print(f" run {i + 1}/{plan.runs}", flush=True)
            warm([mdb])
            t = time.perf_counter()
            snap = uni.post("btree/backup", {"path": f"bench/snap-{i}.db"})
            res.time("uni.snapshot", time.perf_counter() - t)
            res.info["uni.snapshot_bytes"] = fmt_mib(int(str(snap["bytes"])))
            sp = Path(str(snap["path"]))
            sp.unlink()
            sp.with_name(sp.name + ".sha256").unlink()
            warm([mdb])
            res.time("cp.mdb", cp_sync([mdb], work / "cp-mdb"))
            shutil.rmtree(work / "cp-mdb")
            warm([etcd_db])
            etcd_snap.unlink(missing_ok=True)
            t = time.perf_counter()
            lib.run(["etcdctl", "--endpoints", etcd.endpoint, "snapshot", "save", str(etcd_snap)], 1800)
            res.time("etcd.snapshot", time.perf_counter() - t)
        res.info["etcd.snapshot_bytes"] = fmt_mib(etcd_snap.stat().st_size)
        etcd.stop()

        res.phase("backups: WAL")
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
        for i in range(plan.runs):
            print(f" run {i + 1}/{plan.runs}", flush=True)
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
            warm(files)
            res.time("cp.wal", cp_sync(files, work / "cp-wal"))
            shutil.rmtree(work / "cp-wal")

        res.phase("backups: PUT with/without a snapshot loop")
        body = json.dumps({"value": lib.b64(b"v" * plan.value_size)})
        lib.hey(uni.kv(), 1, plan.conns, method="PUT", body=body)  # warm-up
        for i in range(plan.runs):
            print(f" run {i + 1}/{plan.runs}", flush=True)
            order = (False, True) if i % 2 == 0 else (True, False)
            for loop in order:
                load, n = put_loop_load(uni, plan, body, loop)
                res.load("uni.put.snaploop" if loop else "uni.put.noloop", load)
                if loop:
                    res.value("snaploop.snapshots", n)
        res.value("rss.uni.big", uni.vmhwm_kib())
        uni.rss.sample()
        res.value("rss_anon.uni.big", uni.rss.anon_kib)

        res.phase("restore: prepare inputs")
        base = uni.post("btree/backup", {"path": "restore/base.db"})
    finally:
        if uni is not None:
            uni.stop()
        if etcd is not None:
            etcd.stop()
    return db, base, etcd_snap


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


def phase_restore(
    plan: Plan, work: Path, res: Results, db: BigDb, base: dict[str, object], etcd_snap: Path
) -> None:
    write_restore_records(db, plan, res)
    uni = UnisonServer(db.data, work / "big-uni-2.log", db.segment_size)
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

    res.phase("restore")
    for i in range(plan.runs):
        print(f" run {i + 1}/{plan.runs}", flush=True)
        target = work / f"restore-{i}"
        warm([snap, *wal_files])
        rc, out, err, wall, rss = run_measured(
            [
                sys.executable,
                "-m",
                "unisondb",
                "restore",
                "--data-dir",
                str(target),
                "--namespace",
                NS,
                "--snapshot",
                str(snap),
                "--wal",
                str(wal),
                "--json",
            ],
            1800,
            work,
        )
        if rc != 0:
            raise BenchError(f"unisondb restore failed ({rc}):\n{out[-2000:]}\n{err[-3000:]}")
        summary = json.loads(out)["summary"]
        if summary["recordsReplayed"] != plan.restore_records:
            raise BenchError(f"restore replayed {summary['recordsReplayed']} records")
        res.time("uni.restore", wall)
        for k in ("verify", "copy", "replay", "publish"):
            res.values.setdefault(f"uni.restore.{k}", []).append(summary["seconds"][k])
        res.value("rss.uni.restore", rss)
        shutil.rmtree(target)

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

        warm([etcd_snap])
        peer = f"http://127.0.0.1:{lib.free_port()}"
        rc, out, err, wall, rss = run_measured(
            [
                "etcdctl",
                "snapshot",
                "restore",
                str(etcd_snap),
                "--data-dir",
                str(work / f"etcd-restore-{i}"),
                "--name",
                "r",
                "--initial-cluster",
                f"r={peer}",
                "--initial-advertise-peer-urls",
                peer,
            ],
            1800,
            work,
        )
        if rc != 0:
            raise BenchError(f"etcdctl snapshot restore failed ({rc}):\n{err[-3000:]}")
        res.time("etcd.restore", wall)
        res.value("rss.etcd.restore", rss)
        shutil.rmtree(work / f"etcd-restore-{i}")


# --- the report ---


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
) -> None:
    md = lib.Markdown()
    md.h(1, f"UnisonDB benchmarks — {started:%Y-%m-%d} ({plan.mode} mode)")
    cmd = ".venv/bin/python bench/run.py" + ("".join(f" {a}" for a in argv))
    md.p(
        f"Command: `{cmd}` — started {started:%Y-%m-%d %H:%M:%S %Z}, took {elapsed / 60:.1f} "
        f"min. {plan.runs} run(s) of each measurement, **medians** shown; loads of "
        f"{plan.load_s:g} s, {plan.conns} connections, {plan.value_size}-byte values. Everything "
        "on 127.0.0.1, server and load generator sharing the same cores."
    )
    if error:
        md.p(
            f"**The run did not finish:** `{error}` — the rows below are what was measured before it stopped."
        )
    md.p(
        "Ratio = UnisonDB ÷ peer: above 1 is better for req/s; below 1 is better for "
        "latency, time and memory."
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
            f"{res.info.get('uni.snapshot_bytes', '?')} compacted file (HTTP)"
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
            "〃 anonymous memory only (peak RssAnon, sampled every 0.2 s; VmHWM also counts "
            "the pages of data.mdb mapped by LMDB)",
            f"{fmt_mib(val('rss_anon.uni.http') * kib)} (HTTP loads), "
            f"{fmt_mib(val('rss_anon.uni.big') * kib)} (big database)",
            "—",
            "",
            "—",
        )
    if "rss.uni.restore" in V:
        add(
            "peak RSS of `unisondb restore`",
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
    if "uni.fsyncs_per_put" in V:
        ctx.append(["WAL fsyncs per acknowledged HTTP PUT (/metrics)", f"{val('uni.fsyncs_per_put'):.3f}"])
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
    for name, loads in H.items():
        every.append([name, ", ".join(f"{x.rps:,.0f}/s ({fmt_ms(x.p50)} / {fmt_ms(x.p99)})" for x in loads)])
    for name, ts in T.items():
        every.append([name, ", ".join(f"{x:.3f} s" for x in ts)])
    for name, vs in V.items():
        every.append([name, ", ".join(f"{x:,.3f}" for x in vs)])
    md.table(["series", "values (req/s: p50/p99)"], every, align="ll")

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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--quick", action="store_true", help="small sizes, 1 run, 2 s loads (< 2 min); writes quick-<date>.md"
    )
    ap.add_argument("--runs", type=int, help="runs per measurement (full: 3)")
    ap.add_argument("--seconds", type=float, help="duration of each load (full: 5)")
    ap.add_argument("--db-size", help="size of the big database's values (full: 1GiB)")
    ap.add_argument("--restore-records", type=int, help="WAL records to restore (full: 1000000)")
    ap.add_argument(
        "--only",
        choices=("http", "backup"),
        action="append",
        help="run only these phases (restore needs backup)",
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
    plan = QUICK if args.quick else FULL
    over: dict[str, object] = {}
    if args.runs:
        over["runs"] = args.runs
    if args.seconds:
        over["load_s"] = over["loop_s"] = args.seconds
    if args.db_size:
        over["db_bytes"] = parse_size(args.db_size)
    if args.restore_records:
        over["restore_records"] = args.restore_records
    if over:
        plan = Plan(**{**plan.__dict__, **over})
    started = dt.datetime.now().astimezone()
    out = args.out or (
        BENCH / "results" / (("quick-" if plan.mode == "quick" else "") + f"{started:%Y-%m-%d}.md")
    )
    if not args.no_install:
        installed = peers.ensure_installed()
        if installed:
            print(f"installed: {' '.join(installed)}", flush=True)
    missing = [b for b in peers.BINARIES if shutil.which(b) is None]
    if missing:
        raise SystemExit(f"missing tools {missing}: apt-get install -y {' '.join(peers.DEBS)}")

    args.work_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"run-{started:%Y%m%d-%H%M%S}-", dir=args.work_dir))
    COMMANDS.scratch = str(work)
    res = Results()
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
    phases: set[str] = set(args.only or ("http", "backup"))
    print(f"UnisonDB benchmark ({plan.mode}), scratch dir {work}", flush=True)
    try:
        if "http" in phases:
            phase_http(plan, work, res)
        if "backup" in phases:
            db, base, etcd_snap = phase_backup(plan, work, res)
            phase_restore(plan, work, res, db, base, etcd_snap)
        res.phase("done")
    except (BenchError, Deadline, KeyboardInterrupt) as exc:
        error = f"{type(exc).__name__}: {exc}"
        print(f"error: {error}", file=sys.stderr, flush=True)
    finally:
        signal.alarm(0)
        peers.stop_all()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    write_report(plan, res, out, machine, started, time.perf_counter() - t0, error, sys.argv[1:], work)
    print(f"report: {out}", flush=True)
    return 1 if error else 0


if __name__ == "__main__":
    raise SystemExit(main())
