#!/usr/bin/env python3
"""The lean HTTP path (issue 11 item 4): ``--http-lean on`` vs ``off``, Redis 7 and etcd 3.4.

    .venv/bin/python bench/bench_lean.py [--runs 3] [--seconds 4] [--flags "--ack wal"] [--out FILE]
        [--baseline CHECKOUT]

Starts, all on 127.0.0.1, two UnisonDB servers that differ only in ``--http-lean`` (both
get ``--flags``), one Redis 7 and one etcd 3.4. Each run (the order rotates) drives:
GET of one 100-byte value with ``hey -c 16`` against both servers and
``redis-benchmark -c 16 -t get`` against Redis; durable PUTs of 100-byte values with
``hey -c 16`` against both servers and etcd's v3 JSON gateway. With ``--baseline DIR`` a
third server runs the ``unisondb`` package of another checkout (e.g. main) with
``--http-lean on``: the A/B of a change to the lean path itself. Medians over the runs, the
1-minute load average of each run beside it; every process is stopped by its PID.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import httpx  # noqa: E402
import lib  # noqa: E402
import peers  # noqa: E402
from bench_writepath import NS, VALUE, put_load  # noqa: E402
from bench_writepath import Uni as _Uni  # noqa: E402


class Uni(_Uni):
    """bench_writepath's server, with the key the GETs read written once; with ``checkout``,
    the ``unisondb`` package of that source tree instead of this one."""

    def __init__(
        self, name: str, data_dir: Path, log_path: Path, flags: list[str], checkout: Path | None = None
    ) -> None:
        if checkout is None:
            super().__init__(name, data_dir, log_path, flags)
        else:
            self.port = lib.free_port()
            self.url = f"http://127.0.0.1:{self.port}"
            # env execs the interpreter: the PID stays the server's (for cpu_seconds).
            # -P: without it ``-m`` puts the working directory first on sys.path, and a
            # bench started from a checkout would run that checkout's code as the baseline.
            cmd = ["env", f"PYTHONPATH={checkout}", sys.executable, "-P", "-m", "unisondb"]
            cmd += ["--data-dir", str(data_dir), "--http-addr", f"127.0.0.1:{self.port}"]
            cmd += ["--namespace", NS, *flags]
            peers.Managed.__init__(self, name, cmd, log_path)
            self.wait_until(lambda: httpx.get(self.url + "/health", timeout=1).status_code == 200, 120, "up")
        httpx.put(self.kv(), json={"value": lib.b64(VALUE)}, timeout=30).raise_for_status()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (a rate-independent cost per request
    on a shared machine, where req/s mostly measures the neighbours)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def get_load(target: object, seconds: float, conns: int) -> lib.Load:
    if isinstance(target, Uni):
        return lib.hey(target.kv(), seconds, conns)
    assert isinstance(target, peers.Redis)
    # About `seconds` worth at Redis's loopback GET rate; without -r every GET reads the one key set below.
    cmd = ["redis-benchmark", "-h", "127.0.0.1", "-p", str(target.port), "-c", str(conns)]
    cmd += ["-t", "get", "-n", str(int(40_000 * seconds)), "-d", str(len(VALUE)), "--csv"]
    return lib.parse_redis_csv(lib.run(cmd, seconds * 20 + 60).stdout)["GET"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--conns", type=int, default=16)
    ap.add_argument("--flags", default="", help="more UnisonDB flags for both servers, e.g. '--ack wal'")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--baseline", type=Path, help="another checkout (its unisondb package) as a third server")
    args = ap.parse_args()
    for tool in ("hey", "etcd", "redis-server", "redis-benchmark"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found: apt-get install -y hey etcd-server redis-server redis-tools")
    work = Path(tempfile.mkdtemp(prefix="unisondb-lean-", dir=os.environ.get("BENCH_DIR")))
    rows: dict[str, dict[str, list[float]]] = {}
    loads: list[str] = []
    flags = args.flags.split()
    try:
        unis = {
            f"lean {m}": Uni(f"lean-{m}", work / m, work / f"{m}.log", [*flags, "--http-lean", m])
            for m in ("on", "off")
        }
        if args.baseline is not None:
            base = args.baseline.resolve()
            unis["baseline lean on"] = Uni(
                "baseline", work / "base", work / "base.log", [*flags, "--http-lean", "on"], base
            )
        redis = peers.Redis(work / "redis", work / "redis.log")
        redis.cli("set", "key:__rand_int__", VALUE.decode())  # redis-benchmark's GET key
        etcd = peers.Etcd(work / "etcd", work / "etcd.log")
        gets: dict[str, object] = {**unis, "redis 7": redis}
        puts: dict[str, object] = {**unis, "etcd 3.4": etcd}
        for fn, table in ((get_load, gets), (put_load, puts)):
            for t in table.values():  # warm-up, not counted (too short for hey's percentiles)
                try:
                    fn(t, 2, args.conns)
                except lib.BenchError:
                    pass
        for run in range(args.runs):
            loads.append(lib.loadavg())
            print(f"run {run + 1}/{args.runs} (load {loads[-1]})", flush=True)
            for what, table, fn in (("get", gets, get_load), ("put", puts, put_load)):
                names = list(table)
                for name in names[run % len(names) :] + names[: run % len(names)]:
                    target = table[name]
                    rows.setdefault(name, {})
                    cpu0 = cpu_seconds(target.pid) if isinstance(target, Uni) else 0.0
                    load = fn(target, args.seconds, args.conns)
                    if isinstance(target, Uni):
                        used = cpu_seconds(target.pid) - cpu0
                        rows[name].setdefault(f"{what}.cpu_us", []).append(
                            used / max(1.0, load.rps * args.seconds) * 1e6
                        )
                    for stat in ("rps", "p50", "p99"):
                        rows.setdefault(name, {}).setdefault(f"{what}.{stat}", []).append(getattr(load, stat))
                    print(f"  {what} {name}: {load.rps:,.0f}/s p99 {load.p99:.2f} ms", flush=True)
    finally:
        peers.stop_all()
        shutil.rmtree(work, ignore_errors=True)

    med = {t: {k: statistics.median(v) for k, v in d.items()} for t, d in rows.items()}
    lines = [
        f"Runs: {args.runs} × {args.seconds:g} s per load, interleaved (order rotates per run); "
        f"{args.conns} connections, 100-byte values, one key; medians. UnisonDB flags: "
        f"`{args.flags or '(defaults)'}` + `--http-lean on|off`.",
        "",
        f"1-minute load average at the start of each run: {', '.join(loads)}",
        "",
        "| target | GET/s | vs Redis | GET p99 ms | server CPU µs/GET | PUT/s | vs etcd | PUT p99 ms "
        "| server CPU µs/PUT |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, m in med.items():
        get = (
            f"{m['get.rps']:,.0f} | {m['get.rps'] / med['redis 7']['get.rps']:.2f}× | {m['get.p99']:.2f} | "
            + (f"{m['get.cpu_us']:.0f}" if "get.cpu_us" in m else "—")
            if "get.rps" in m
            else "— | — | — | —"
        )
        put = (
            f"{m['put.rps']:,.0f} | {m['put.rps'] / med['etcd 3.4']['put.rps']:.2f}× | {m['put.p99']:.2f} | "
            + (f"{m['put.cpu_us']:.0f}" if "put.cpu_us" in m else "—")
            if "put.rps" in m
            else "— | — | — | —"
        )
        lines.append(f"| {name} | {get} | {put} |")
    on, off = med["lean on"], med["lean off"]
    lines += [
        "",
        f"lean on / off: GET {on['get.rps'] / off['get.rps']:.2f}× the req/s, "
        f"{on['get.cpu_us'] / off['get.cpu_us']:.2f}× the server CPU per request; "
        f"PUT {on['put.rps'] / off['put.rps']:.2f}× the req/s, "
        f"{on['put.cpu_us'] / off['put.cpu_us']:.2f}× the CPU",
        "",
    ]
    if "baseline lean on" in med:
        base = med["baseline lean on"]
        lines += [
            f"lean on / baseline ({args.baseline}) lean on: "
            f"GET {on['get.rps'] / base['get.rps']:.2f}× the req/s, "
            f"{on['get.cpu_us'] / base['get.cpu_us']:.2f}× the CPU per request; "
            f"PUT {on['put.rps'] / base['put.rps']:.2f}× the req/s, "
            f"{on['put.cpu_us'] / base['put.cpu_us']:.2f}× the CPU",
            "",
        ]
    lines += [
        "Every run (req/s):",
        "",
    ]
    for name, d in rows.items():
        for what in ("get", "put"):
            if f"{what}.rps" in d:
                lines.append(f"- {what.upper()} {name}: " + ", ".join(f"{x:,.0f}" for x in d[f"{what}.rps"]))
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(f"<!-- generated {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC -->\n" + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
