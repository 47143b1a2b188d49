#!/usr/bin/env python3
"""The write path (issue 11) against etcd 3.4, interleaved in one run.

    .venv/bin/python bench/bench_writepath.py [--runs 3] [--seconds 5] [--out FILE]

Starts, all on 127.0.0.1, three UnisonDB servers that differ only in write-path flags —
``before`` (``--wal-preallocate 0 --group-commit-window 0 --ack lmdb``: the write path
before this work), ``zero+window`` (the new defaults: zero-filled segments, adaptive group
commit, ``--ack lmdb``) and ``ack-wal`` (the defaults plus ``--ack wal``) — and one
etcd 3.4. Each run drives every target in turn (the order rotates per run) with ``hey``:
durable PUTs, 16 connections, 100-byte values; then one connection (single-client
latency). Writes per fsync come from /metrics before and after each load; the in-memory
table and LMDB lag of ``ack-wal`` are sampled from /stats during its load. Medians over
the runs; every process is stopped by its PID. Needs ``hey`` and ``etcd``
(``apt-get install -y hey etcd-server etcd-client``).

``--engine`` measures the engine alone, in this process, the way the HTTP layer drives it:
one uvloop event loop (the server's), ``--conns`` coroutines each awaiting ``engine.submit_async(...)`` of one
100-byte PUT in turn (``asyncio.wrap_future(engine.submit(...))`` with ``--wrap-future`` or
where ``submit_async`` does not exist) of one key (``--keys N``: N keys, 0: a new key per
write), ``--seconds`` per run; it prints writes/s, writes
per WAL fsync, LMDB transactions per second and the process's CPU per write (the figure
that a loaded machine disturbs least). It imports ``unisondb`` from ``sys.path``, so an A/B
against another checkout is ``PYTHONPATH=<checkout> python bench/bench_writepath.py --engine``
(interleave the two commands; medians).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import httpx  # noqa: E402
import lib  # noqa: E402
import peers  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

NS = "default"
KEY = b"bench-key"
VALUE = b"v" * 100
CONFIGS: dict[str, list[str]] = {
    "before": ["--wal-preallocate", "0", "--group-commit-window", "0", "--ack", "lmdb"],
    "zero+window": ["--ack", "lmdb"],
    "ack-wal": ["--ack", "wal"],
}


#: Targets that run another checkout's code (``--checkout``): name -> its directory.
CHECKOUTS: dict[str, Path] = {}


class Uni(peers.Managed):
    def __init__(self, name: str, data_dir: Path, log_path: Path, flags: list[str]) -> None:
        self.port = lib.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # ``env`` execs the interpreter: the PID stays the server's.
        # -P: without it ``-m`` puts the working directory first on sys.path, and a bench
        # started from a checkout would run that checkout's code as the other one.
        where = ["env", f"PYTHONPATH={CHECKOUTS[name]}"] if name in CHECKOUTS else []
        cmd = [*where, sys.executable, "-P", "-m", "unisondb", "--data-dir", str(data_dir)]
        cmd += ["--http-addr", f"127.0.0.1:{self.port}", "--namespace", NS, *flags]
        super().__init__(name, cmd, log_path)
        self.wait_until(lambda: httpx.get(self.url + "/health", timeout=1).status_code == 200, 120, "health")

    def cpu_seconds(self) -> float:
        """User + system CPU the server used so far (``/proc/<pid>/stat``)."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def kv(self) -> str:
        return f"{self.url}/api/v1/{NS}/kv/{KEY.decode()}"

    def metric(self, name: str) -> float:
        text = httpx.get(self.url + "/metrics", timeout=30).text
        return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)

    def stats(self) -> dict[str, object]:
        out: dict[str, object] = httpx.get(f"{self.url}/api/v1/{NS}/stats", timeout=30).json()
        return out


def sample_table(uni: Uni, stop: threading.Event, peaks: dict[str, float]) -> None:
    """Poll /stats during a load: the largest in-memory table and LMDB lag seen."""
    with httpx.Client(timeout=5) as c:
        while not stop.wait(0.1):
            try:
                s = c.get(f"{uni.url}/api/v1/{NS}/stats").json()
            except httpx.HTTPError:
                continue
            peaks["bytes"] = max(peaks.get("bytes", 0), float(s.get("memtableBytes", 0)))
            peaks["lag"] = max(peaks.get("lag", 0), float(s.get("lmdbLagRecords", 0)))


def put_load(target: object, seconds: float, conns: int) -> lib.Load:
    if isinstance(target, Uni):
        body = json.dumps({"value": lib.b64(VALUE)})
        return lib.hey(target.kv(), seconds, conns, method="PUT", body=body)
    assert isinstance(target, peers.Etcd)
    body = json.dumps({"key": lib.b64(KEY), "value": lib.b64(VALUE)})
    return lib.hey(target.url + "/v3/kv/put", seconds, conns, method="POST", body=body)


def thread_cpu() -> dict[str, float]:
    """CPU seconds (user + system; and system alone as ``<name>/sys``) of each thread of
    this process, by thread name."""
    out: dict[str, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    names = {t.native_id: t.name.split("-default")[0] for t in threading.enumerate()}
    for task in Path("/proc/self/task").iterdir():
        try:
            name = names.get(int(task.name), "other")
            fields = (task / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
        out[name + "/sys"] = out.get(name + "/sys", 0.0) + int(fields[12]) / tick
    return out


def engine_rate(
    seconds: float, conns: int, flags: dict[str, object], wrap: bool, keys: int = 1
) -> dict[str, float]:
    """One in-process run (``--engine``): see the module docstring."""
    import asyncio
    import time

    from unisondb.storage.engine import Engine
    from unisondb.storage.options import EngineConfig
    from unisondb.storage.record import Entry, EntryKind

    with tempfile.TemporaryDirectory(prefix="unisondb-engine-", dir=os.environ.get("BENCH_DIR")) as d:
        eng = Engine.open(Path(d), NS, EngineConfig(**flags))  # type: ignore[arg-type]
        entry = [Entry(EntryKind.PUT, KEY, VALUE)]
        serial = iter(range(1 << 62))

        async def client(until: float, counts: list[int]) -> None:
            nonlocal entry
            loop = asyncio.get_running_loop()
            direct = hasattr(eng, "submit_async") and not wrap
            while time.monotonic() < until:
                if keys != 1:  # --keys: many keys (0: a new one per write)
                    n = next(serial)
                    entry = [Entry(EntryKind.PUT, KEY + b"%d" % (n % keys if keys else n), VALUE)]
                if direct:
                    await eng.submit_async(entry, loop)
                else:
                    await asyncio.wrap_future(eng.submit(entry))
                counts[0] += 1

        async def load(secs: float) -> tuple[int, float]:
            counts = [0]
            t0 = time.monotonic()
            await asyncio.gather(*(client(t0 + secs, counts) for _ in range(conns)))
            return counts[0], time.monotonic() - t0

        import uvloop  # the server's loop (server.py)

        def run(coro: Any) -> Any:
            loop = uvloop.new_event_loop()
            try:
                return loop.run_until_complete(coro)
            finally:
                loop.close()

        try:
            run(load(0.5))  # warm-up
            f0, g0 = eng.wal_stats().fsyncs, eng.stats.group_commits
            a0 = eng._applier.transactions if eng._applier is not None else 0
            c0, t0 = time.process_time(), thread_cpu()
            n, took = run(load(seconds))
            cpu, t1 = time.process_time() - c0, thread_cpu()
            f1, g1 = eng.wal_stats().fsyncs, eng.stats.group_commits
            a1 = eng._applier.transactions if eng._applier is not None else g1 - g0
        finally:
            eng.close()
    return {
        "rate": n / took,
        "writes_per_fsync": n / max(1, f1 - f0),
        "lmdb_txns_per_s": (a1 - a0) / took,
        "cpu_us_per_write": cpu / max(1, n) * 1e6,
        **{f"cpu_us.{k}": (v - t0.get(k, 0.0)) / max(1, n) * 1e6 for k, v in t1.items()},
    }


def engine_main(args: argparse.Namespace) -> int:
    if args.switch_interval:
        sys.setswitchinterval(args.switch_interval)
    flags: dict[str, object] = {}
    for spec in args.set:
        k, _, v = spec.partition("=")
        flags[k] = type(getattr(__import__("unisondb.storage.options").storage.options.EngineConfig(), k))(v)
    load = os.getloadavg()[0]
    rows = [
        engine_rate(args.seconds, args.conns, flags, args.wrap_future, args.keys) for _ in range(args.runs)
    ]
    for r in rows:
        print(
            f"  {r['rate']:,.0f} writes/s, {r['writes_per_fsync']:.1f} writes/fsync, "
            f"{r['lmdb_txns_per_s']:,.0f} LMDB txns/s, {r['cpu_us_per_write']:.0f} us CPU/write ("
            + ", ".join(f"{k[7:]} {v:.0f}" for k, v in r.items() if k.startswith("cpu_us.") and v >= 0.5)
            + ")"
        )
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    print(
        f"engine {args.conns} conns {flags or ''}{' wrap_future' if args.wrap_future else ''}"
        f"{f' keys={args.keys}' if args.keys != 1 else ''}: "
        f"median {med['rate']:,.0f} writes/s, "
        f"{med['writes_per_fsync']:.1f} writes/fsync, {med['lmdb_txns_per_s']:,.0f} LMDB txns/s, "
        f"{med['cpu_us_per_write']:.0f} us CPU/write "
        f"(load {load:.2f} -> {os.getloadavg()[0]:.2f})"
    )
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engine", action="store_true", help="the engine alone, in this process")
    ap.add_argument(
        "--wrap-future",
        action="store_true",
        help="--engine: asyncio.wrap_future(submit()) even where submit_async exists",
    )
    ap.add_argument(
        "--keys", type=int, default=1, help="--engine: keys written (1: one, as over HTTP; 0: new per write)"
    )
    ap.add_argument("--switch-interval", type=float, default=0.0, help="--engine: sys.setswitchinterval")
    ap.add_argument(
        "--set", action="append", default=[], metavar="FIELD=VALUE", help="--engine: an EngineConfig field"
    )
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--conns", type=int, default=16)
    ap.add_argument("--out", type=Path)
    ap.add_argument(
        "--also",
        action="append",
        default=[],
        metavar="NAME=FLAGS",
        help='one more UnisonDB target, e.g. "ack-wal-2ms=--ack wal --group-commit-window 2ms"',
    )
    ap.add_argument(
        "--checkout",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="one more target: the server of another checkout (e.g. main=../main), default flags",
    )
    ap.add_argument("--no-old", action="store_true", help="leave out the 'before' and 'zero+window' targets")
    args = ap.parse_args()
    if args.engine:
        return engine_main(args)
    if args.no_old:
        for old in ("before", "zero+window"):
            CONFIGS.pop(old, None)
    for spec in args.checkout:
        name, _, where = spec.partition("=")
        CHECKOUTS[name] = Path(where).resolve()
        CONFIGS[name] = []
    for spec in args.also:
        name, _, flags = spec.partition("=")
        CONFIGS[name] = flags.split()
    for tool in ("hey", "etcd"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found: apt-get install -y hey etcd-server etcd-client")
    work = Path(tempfile.mkdtemp(prefix="unisondb-writepath-", dir=os.environ.get("BENCH_DIR")))
    uptime_before = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    rows: dict[str, dict[str, list[float]]] = {}

    def add(target: str, what: str, v: float) -> None:
        rows.setdefault(target, {}).setdefault(what, []).append(v)

    try:
        targets: dict[str, object] = {
            name: Uni(name, work / name, work / f"{name}.log", flags) for name, flags in CONFIGS.items()
        }
        targets["etcd 3.4"] = peers.Etcd(work / "etcd", work / "etcd.log")
        for t in targets.values():  # warm-up, not counted
            put_load(t, 1, args.conns)
        names = list(targets)
        for run in range(args.runs):
            order = names[run % len(names) :] + names[: run % len(names)]
            print(f"run {run + 1}/{args.runs}: {order}", flush=True)
            for name in order:
                t = targets[name]
                stop, peaks = threading.Event(), dict[str, float]()
                sampler = None
                if isinstance(t, Uni):
                    f0, w0 = t.metric("unisondb_wal_fsyncs_total"), t.metric("unisondb_writes_total")
                    c0 = t.cpu_seconds()
                    sampler = threading.Thread(target=sample_table, args=(t, stop, peaks))
                    sampler.start()
                load = put_load(t, args.seconds, args.conns)
                stop.set()
                add(name, "put16.rps", load.rps)
                add(name, "put16.p50", load.p50)
                add(name, "put16.p99", load.p99)
                if isinstance(t, Uni):
                    assert sampler is not None
                    sampler.join()
                    c1 = t.cpu_seconds()
                    f1, w1 = t.metric("unisondb_wal_fsyncs_total"), t.metric("unisondb_writes_total")
                    add(name, "writes_per_fsync", (w1 - w0) / max(1.0, f1 - f0))
                    add(name, "cpu_us_per_put", (c1 - c0) / max(1.0, w1 - w0) * 1e6)
                    add(name, "table_bytes_peak", peaks.get("bytes", 0))
                    add(name, "lmdb_lag_peak", peaks.get("lag", 0))
                one = put_load(t, args.seconds, 1)
                add(name, "put1.rps", one.rps)
                add(name, "put1.p50", one.p50)
                add(name, "put1.p99", one.p99)
                extra = ""
                if isinstance(t, Uni):
                    extra = f", {rows[name]['writes_per_fsync'][-1]:.1f} w/fsync, "
                    extra += f"{rows[name]['cpu_us_per_put'][-1]:.0f} us CPU/PUT"
                print(
                    f"  {name}: 16c {load.rps:,.0f}/s p99 {load.p99:.2f} ms{extra}; "
                    f"1c p50 {one.p50:.3f} ms (load {os.getloadavg()[0]:.2f})",
                    flush=True,
                )
        rss = {
            name: (t.vmhwm_kib(), lib.proc_status(t.pid).get("RssAnon", 0))
            for name, t in targets.items()
            if isinstance(t, peers.Managed)
        }
    finally:
        peers.stop_all()
        shutil.rmtree(work, ignore_errors=True)
    uptime_after = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()

    med = {t: {k: statistics.median(v) for k, v in d.items()} for t, d in rows.items()}
    etcd = med["etcd 3.4"]
    base = "before" if "before" in med else next(iter(CHECKOUTS), "ack-wal")
    before = med[base]
    lines = [
        f"Runs: {args.runs} × {args.seconds:g} s per load, interleaved (order rotates per run); "
        f"hey, {args.conns} connections (and 1), 100-byte values, one key; medians.",
        "",
        f"`uptime` before: `{uptime_before}`  ",
        f"`uptime` after: `{uptime_after}`",
        "",
        "| target | PUT/s 16 conns | vs etcd | p50 ms | p99 ms | writes/fsync | server CPU µs/PUT "
        "| 1-client PUT p50 ms "
        f"| vs {base} | 1-client PUT/s | table peak | LMDB lag peak | VmHWM MiB | RssAnon MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, m in med.items():
        wpf = f"{m['writes_per_fsync']:.1f}" if "writes_per_fsync" in m else "—"
        cpu = f"{m['cpu_us_per_put']:.0f}" if "cpu_us_per_put" in m else "—"
        wal_mode = name in CONFIGS and "--ack lmdb" not in " ".join(
            CONFIGS.get(name, [])
        )  # (wal: the default)
        tb = f"{m['table_bytes_peak'] / 1024:.0f} KiB" if wal_mode else "—"
        lag = f"{m['lmdb_lag_peak']:.0f}" if wal_mode else "—"
        lines.append(
            f"| {name} | {m['put16.rps']:,.0f} | {m['put16.rps'] / etcd['put16.rps']:.2f}× | "
            f"{m['put16.p50']:.2f} | {m['put16.p99']:.2f} | {wpf} | {cpu} | {m['put1.p50']:.3f} | "
            f"{m['put1.p50'] / before['put1.p50']:.2f}× | {m['put1.rps']:,.0f} | {tb} | {lag} | "
            f"{rss.get(name, (0, 0))[0] / 1024:.0f} | {rss.get(name, (0, 0))[1] / 1024:.0f} |"
        )
    lines += ["", "Every run (PUT/s with 16 connections):", ""]
    for name, d in rows.items():
        lines.append(f"- {name}: " + ", ".join(f"{x:,.0f}" for x in d["put16.rps"]))
    lines += ["", "Every run (1-client PUT p50 ms):", ""]
    for name, d in rows.items():
        lines.append(f"- {name}: " + ", ".join(f"{x:.3f}" for x in d["put1.p50"]))
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(f"<!-- generated {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC -->\n" + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
