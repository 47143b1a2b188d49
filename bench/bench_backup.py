#!/usr/bin/env python3
"""Backup benchmark (run by hand, not part of the test suite).

Measures, in one run on one machine, against a real ``unisondb`` server process:

1. B-tree snapshot (``POST /btree/backup``) of a database of ``--size-gb`` vs ``cp`` of its
   ``data.mdb`` followed by an fsync of the copy (the same durability the snapshot gives);
2. WAL backup (``POST /wal/backup``) of ``--segments`` sealed segments vs ``cp`` of the same
   files + fsync;
3. PUT throughput with 16 concurrent clients, alone and while a snapshot loop runs
   back to back (``hey`` if installed — Debian package ``hey`` — else an httpx thread pool).

Prints a Markdown table with ratios. Timings are the best of ``--repeat`` alternating runs,
each side starting from the same page-cache state (sources read in first, or with
``--cold`` the cache dropped). The snapshot also hashes (sha256) and writes a sidecar,
``cp`` does neither. The baseline PUT rate is the mean of a run before and one after the
run with the snapshot loop.

    .venv/bin/python bench/bench_backup.py --size-gb 1 --segments 100
    .venv/bin/python bench/bench_backup.py --size-gb 0.25 --put-seconds 5   # quick
"""

from __future__ import annotations

import argparse
import base64
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from unisondb.config import EngineConfig
from unisondb.storage.engine import Engine
from unisondb.storage.record import Entry, EntryKind

NS = "bench"
VALUE = 1024


def build_database(data_dir: Path, size: int, segment_size: int) -> None:
    """Write ``size`` bytes of incompressible values in 1 MiB records, in-process."""
    eng = Engine.open(data_dir, NS, EngineConfig(segment_size=segment_size, map_size=max(1 << 30, size * 3)))
    try:
        chunk = 1 << 20
        n = 0
        for i in range(size // chunk):
            eng.write(
                [
                    Entry(EntryKind.PUT, b"k%07d-%03d" % (i, j), os.urandom(VALUE))
                    for j in range(chunk // VALUE)
                ]
            )
            n += chunk
        eng.rotate()
    finally:
        eng.close()


class Server:
    def __init__(self, data_dir: Path, segment_size: int) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(data_dir.parent / "server.log", "wb")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "unisondb",
                "--data-dir",
                str(data_dir),
                "--http-addr",
                f"127.0.0.1:{self.port}",
                "--namespace",
                NS,
                "--wal-segment-size",
                str(segment_size),
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.1)
        raise SystemExit("server did not start; see server.log")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=120)
        self.log.close()


def timed(fn: object) -> float:
    t = time.perf_counter()
    fn()  # type: ignore[operator]
    return time.perf_counter() - t


def prepare_cache(sources: list[Path], cold: bool) -> None:
    """Same start for both sides: sources in the page cache (or, with --cold, nothing)."""
    subprocess.run(["sync"], check=True)
    if cold:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    else:
        for p in sources:
            with open(p, "rb") as f:
                while f.read(1 << 24):
                    pass


def best_of(n: int, cold: bool, sources: list[Path], ours: object, baseline: object) -> tuple[float, float]:
    """Best time of ``n`` alternating runs of each (the machine's disk is shared and noisy)."""
    t_ours: list[float] = []
    t_base: list[float] = []
    for _ in range(n):
        prepare_cache(sources, cold)
        t_ours.append(timed(ours))
        prepare_cache(sources, cold)
        t_base.append(timed(baseline))
    return min(t_ours), min(t_base)


def cp_and_fsync(sources: list[Path], dest_dir: Path) -> None:
    dest_dir.mkdir(parents=True, exist_ok=True)
    subprocess.run(["cp", *map(str, sources), str(dest_dir)], check=True)
    subprocess.run(["sync", *[str(dest_dir / s.name) for s in sources]], check=True)


def put_throughput(url: str, seconds: float, clients: int = 16) -> float:
    body = '{"value":"' + base64.b64encode(os.urandom(256)).decode() + '"}'
    target = f"{url}/api/v1/{NS}/kv/"
    if shutil.which("hey"):
        out = subprocess.run(
            [
                "hey",
                "-z",
                f"{seconds}s",
                "-c",
                str(clients),
                "-m",
                "PUT",
                "-T",
                "application/json",
                "-d",
                body,
                target + "hey-key",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        m = re.search(r"Requests/sec:\s+([\d.]+)", out)
        assert m, out
        codes = re.findall(r"\[(\d{3})\]\s+(\d+) responses", out)
        bad = [c for c in codes if c[0] != "200"]
        assert not bad, f"non-200 responses under load: {bad}"
        return float(m.group(1))
    stop = time.monotonic() + seconds
    counts = [0] * clients

    def worker(n: int) -> None:
        with httpx.Client(timeout=60) as c:
            i = 0
            while time.monotonic() < stop:
                r = c.put(f"{target}py-{n}-{i}", content=body)
                assert r.status_code == 200, r.text
                counts[n] += 1
                i += 1

    t = time.monotonic()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(worker, range(clients)))
    return sum(counts) / (time.monotonic() - t)


def copy_ab(root: Path, size_gb: float, repeat: int) -> int:
    """In-process, interleaved: LMDB's compacting copy (``BTree.snapshot_to``, the snapshot's
    copy before issue 10) vs its plain copy (``BTree.copy_plain_to``, now the default) vs
    ``cp`` + fsync, each followed by an fsync of the copy; medians of ``repeat``."""
    import statistics

    from unisondb.storage.btree import BTree, Checkpoint
    from unisondb.storage.record import Entry, EntryKind, Record

    bt = BTree(root / "db", map_size=1 << 36, durable=False)
    value = os.urandom(4000)
    n = int(size_gb * (1 << 30) / 4096)
    cp = Checkpoint()
    for lo in range(0, n, 10_000):
        recs = [
            Record(i + 1, i, (Entry(EntryKind.PUT, b"k%010d" % i, value[i % 64 :] + value[: i % 64]),))
            for i in range(lo, min(n, lo + 10_000))
        ]
        cp = bt.apply(recs, cp.advance(recs[-1].lsn, 0, 0, 0))
    bt.sync()
    src = root / "db" / "data.mdb"
    print(f"data.mdb {src.stat().st_size / 2**20:.0f} MiB, free fraction {bt.free_fraction():.3f}")

    def timed(fn: Callable[[Any], object]) -> float:
        out = root / "copy.db"
        t = time.perf_counter()
        with open(out, "wb") as f:
            fn(f)
            f.flush()
            os.fsync(f.fileno())
        took = time.perf_counter() - t
        out.unlink()
        return took

    variants: dict[str, Callable[[Any], object]] = {
        "compacting": bt.snapshot_to,
        "plain": bt.copy_plain_to,
        "cp+fsync": lambda f: shutil.copyfileobj(open(src, "rb"), f, 1 << 20),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(repeat):
        for name in variants if r % 2 == 0 else list(reversed(variants)):
            times[name].append(timed(variants[name]))
    base = statistics.median(times["cp+fsync"])
    for name, ts in times.items():
        med = statistics.median(ts)
        print(
            f"{name:11s} median {med:6.2f} s  {med / base:4.2f}x cp  runs {' '.join(f'{t:.2f}' for t in ts)}"
        )
    print(f"load {os.getloadavg()}")
    bt.close()
    return 0


# --- snapshot: one pass, cold map, PUTs during snapshots with and without pacing (issue 10) ---


def _snap_server(
    data: Path, extra: list[str], pacing_on: bool = True, pacing: dict[str, float] | None = None
) -> Server:
    """A server process on ``data``; ``pacing_on=False`` turns adaptive pacing off
    (``MAX_SLOWDOWN = 1``) for the A/B, ``pacing`` sets other constants of
    ``unisondb.backup.pacing`` (a variant to compare), through a ``-c`` wrapper (no flag
    for either)."""
    srv = Server.__new__(Server)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        srv.port = s.getsockname()[1]
    srv.url = f"http://127.0.0.1:{srv.port}"
    srv.log = open(data.parent / "server.log", "ab")
    code = (
        "import sys; import unisondb.backup.pacing as p; "
        + ("" if pacing_on else "p.MAX_SLOWDOWN = 1.0; ")
        + "".join(f"p.{k} = {v!r}; " for k, v in (pacing or {}).items())
        + "from unisondb.cli import main; sys.exit(main())"
    )
    argv = [sys.executable, "-c", code, "--data-dir", str(data), "--http-addr", f"127.0.0.1:{srv.port}"]
    srv.proc = subprocess.Popen(
        [*argv, "--namespace", NS, *extra], stdout=srv.log, stderr=subprocess.STDOUT, cwd=data.parent
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(srv.url + "/health", timeout=1).status_code == 200:
                return srv
        except httpx.TransportError:
            time.sleep(0.2)
    raise SystemExit("server did not start; see server.log")


def _evict(path: Path) -> None:
    """Drop one file from the page cache (a cold start for it, without touching the others)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _hey(url: str, seconds: float, clients: int = 16) -> tuple[float, float]:
    """(PUT req/s, p99 seconds) with ``hey``."""
    body = '{"value":"' + base64.b64encode(os.urandom(256)).decode() + '"}'
    out = subprocess.run(
        ["hey", "-z", f"{seconds}s", "-c", str(clients), "-m", "PUT", "-T", "application/json"]
        + ["-d", body, f"{url}/api/v1/{NS}/kv/hey-key"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    p99 = re.search(r"99%+ in ([\d.]+) secs", out)
    assert rps and p99, out
    bad = [c for c in re.findall(r"\[(\d{3})\]\s+(\d+) responses", out) if c[0] != "200"]
    assert not bad, f"non-200 responses under load: {bad}"
    return float(rps.group(1)), float(p99.group(1))


def parse_variant(text: str) -> dict[str, float]:  # int where the text is one
    """``NAME=VALUE[,NAME=VALUE]`` (constants of ``unisondb.backup.pacing``)."""
    out: dict[str, float] = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        if not name.isupper() or not value:
            raise SystemExit(f"--pacing-variant: want NAME=VALUE[,NAME=VALUE], got {text!r}")
        out[name] = int(value) if value.lstrip("-").isdigit() else float(value)
    return out


def snapshot_ab(
    scratch: Path,
    size_gb: float,
    repeat: int,
    put_seconds: float,
    variants: tuple[str, ...] = (),
    put_only: bool = False,
    unpaced: bool = True,
) -> int:
    """Same run, interleaved, medians of ``repeat``, against a real server:
    1. snapshot (HTTP) vs ``cp`` + ``sync`` of ``data.mdb``, warm page cache;
    2. the first snapshot after a server start (fresh map), page cache warm and with
       ``data.mdb`` evicted first (cold), vs ``cp`` + ``sync`` from a cold cache;
    3. PUT req/s and p99 (``hey``, 16 clients) without snapshots, during back-to-back
       snapshots with pacing (the default), without (``MAX_SLOWDOWN = 1``; not with
       ``unpaced=False``) and with each of ``variants`` (``NAME=VALUE,...``: constants of
       ``unisondb.backup.pacing``); ``put_only`` skips 1 and 2.
    """
    import statistics

    data = scratch / "data"
    size = int(size_gb * (1 << 30))
    t = timed(lambda: build_database(data, size, 64 << 20))
    mdb = data / NS / "db" / "data.mdb"
    print(f"built {mdb.stat().st_size / 2**20:.0f} MiB data.mdb in {t:.0f} s", file=sys.stderr)
    loads: list[float] = []

    def med(xs: list[float]) -> str:
        return f"{statistics.median(xs):.2f}"

    def cp() -> float:
        t = timed(lambda: cp_and_fsync([mdb], scratch / "cp"))
        shutil.rmtree(scratch / "cp")
        return t

    def snap(url: str) -> float:
        t0 = time.perf_counter()
        r = httpx.post(f"{url}/api/v1/{NS}/btree/backup", json={"path": "ab/s.db"}, timeout=3600)
        took = time.perf_counter() - t0
        assert r.status_code == 200, r.text
        os.unlink(r.json()["path"])
        os.unlink(r.json()["path"] + ".sha256")
        return took

    # 1 + 2
    if put_only:
        repeat_snap = 0
    else:
        repeat_snap = repeat
    res: dict[str, list[float]] = {k: [] for k in ("snap", "cp", "first_warm", "first_cold", "cp_cold")}
    for r in range(repeat_snap):
        loads.append(os.getloadavg()[0])
        srv = _snap_server(data, [])
        try:
            res["first_warm"].append(snap(srv.url))  # fresh process: fresh map, warm cache
            for k in ("snap", "cp") if r % 2 == 0 else ("cp", "snap"):
                res[k].append(snap(srv.url) if k == "snap" else cp())
        finally:
            srv.stop()
        _evict(mdb)
        res["cp_cold"].append(cp())
        _evict(mdb)
        srv = _snap_server(data, [])
        try:
            res["first_cold"].append(snap(srv.url))
        finally:
            srv.stop()
    if repeat_snap:
        base = statistics.median(res["cp"])
        print(
            f"\nsnapshot A/B, {mdb.stat().st_size / 2**20:.0f} MiB data.mdb, "
            f"load {[round(x, 1) for x in loads]}"
        )
        for k, v in res.items():
            ref = statistics.median(res["cp_cold"]) if k in ("first_cold", "cp_cold") else base
            runs = " ".join(f"{x:.2f}" for x in v)
            print(f"| {k} | {med(v)} s | {statistics.median(v) / ref:.2f}x | {runs} |")

    # 3: each mode's run is compared with the run without snapshots just before it, on the
    # same server process (the machine's speed drifts between rounds).
    modes: dict[str, tuple[bool, dict[str, float]]] = {"paced": (True, {})}
    if unpaced:
        modes["unpaced"] = (False, {})
    for v in variants:
        modes[v] = (True, parse_variant(v))
    put: dict[str, list[tuple[float, float]]] = {m: [] for m in modes}
    ratios: dict[str, list[tuple[float, float]]] = {m: [] for m in modes}
    counts: dict[str, int] = dict.fromkeys(modes, 0)
    loads = []
    names = list(modes)
    for r in range(repeat):
        order = names[r % len(names) :] + names[: r % len(names)]
        for mode in order:
            loads.append(os.getloadavg()[0])
            on, consts = modes[mode]
            srv = _snap_server(data, [], pacing_on=on, pacing=consts)
            try:
                alone = _hey(srv.url, put_seconds / 2)
                stop = threading.Event()

                def loop(url: str = srv.url, m: str = mode, stop: threading.Event = stop) -> None:
                    while not stop.is_set():
                        snap(url)
                        counts[m] += 1

                th = threading.Thread(target=loop)
                th.start()
                try:
                    during = _hey(srv.url, put_seconds)
                finally:
                    stop.set()
                    th.join()
                put[mode].append(during)
                ratios[mode].append((during[0] / alone[0], during[1] / alone[1]))
            finally:
                srv.stop()
    print(f"\nPUT during back-to-back snapshots ÷ alone just before, load {[round(x, 1) for x in loads]}")
    for k, v in put.items():
        rps = statistics.median(x[0] for x in v)
        p99 = statistics.median(x[1] for x in v)
        rr = statistics.median(x[0] for x in ratios[k])
        rp = statistics.median(x[1] for x in ratios[k])
        runs = " ".join(
            f"{a:.0f}/{b * 1000:.1f}ms ({x:.2f}x)" for (a, b), (x, _y) in zip(v, ratios[k], strict=True)
        )
        print(
            f"| {k} | {rps:.0f} /s ({rr:.2f}x) | p99 {p99 * 1000:.1f} ms ({rp:.2f}x) "
            f"| snapshots {counts[k]} | {runs} |"
        )
    return 0


# --- WAL backup A/B: this tree vs another checkout (main) vs cp + sync, same run ---

_WAL_RUNNER = """
import sys, time
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from unisondb.backup import paths, phases
from unisondb.backup.wal_backup import backup_wal
from unisondb.config import EngineConfig
from unisondb.storage import layout
from unisondb.storage.engine import Engine
data, ns, dest = Path(sys.argv[2]), sys.argv[3], sys.argv[4]
eng = Engine.open(data, ns, EngineConfig(segment_size=int(sys.argv[5])))
try:
    parts = paths.parse_relative(dest, "backupDir", is_file=False)
    target = paths.resolve(layout.backup_root(data, ns), parts, "backupDir", is_file=False)
    with phases.collecting() as spent:
        t, cpu = time.perf_counter(), time.process_time()
        copies = backup_wal(eng, target, 0)
        took = time.perf_counter() - t
        spent["cpu"] = time.process_time() - cpu  # every thread of the process
    assert all(c.copied for c in copies), "destination was not empty"
    print("RESULT", len(copies), took, " ".join(f"{k}={v:.2f}" for k, v in sorted(spent.items())))
finally:
    eng.close()
"""


def build_wal(data_dir: Path, segments: int, segment_size: int, record: int) -> list[Path]:
    """``segments`` sealed segments of ``segment_size`` bytes of ``record``-byte records."""
    eng = Engine.open(data_dir, NS, EngineConfig(segment_size=segment_size, map_size=1 << 34))
    per = max(1, record // VALUE)
    stop = threading.Event()

    def writer(w: int) -> None:  # 8 of them: group commits, not one fsync per record
        i = 0
        while not stop.is_set():
            eng.write(
                [Entry(EntryKind.PUT, b"w%d-%09d-%03d" % (w, i, j), os.urandom(VALUE)) for j in range(per)]
            )
            i += 1
            if len(eng.sealed_segments()) >= segments:
                stop.set()

    try:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(writer, range(8)))
    finally:
        eng.close()
    return sorted((data_dir / NS / "wal").glob("*.wal"))[:segments]


def wal_ab(root: Path, args: argparse.Namespace) -> int:
    """Interleaved, same run: WAL backup of the same ``--segments`` sealed segments by this
    tree and by ``--other-src`` (a main checkout), vs ``cp`` + ``sync`` of the files; each
    from a warm page cache (sources read in first, as a backup of recent segments finds
    them); medians of ``--repeat``, and the 1-minute load average next to every run."""
    import statistics

    seg_size = args.segment_mib << 20
    data = root / "data"
    t = time.perf_counter()
    segs = build_wal(data, args.segments, seg_size, args.record_kib << 10)
    total = sum(p.stat().st_size for p in segs)
    took = time.perf_counter() - t
    print(f"built {len(segs)} segments, {total / 2**20:.0f} MiB in {took:.0f} s", flush=True)
    here = str(Path(__file__).resolve().parent.parent)
    variants: dict[str, Callable[[str], float]] = {}
    phase_log: list[str] = []

    def ours(src: str) -> Callable[[str], float]:
        def run(dest: str) -> float:
            out = subprocess.run(
                [sys.executable, "-c", _WAL_RUNNER, src, str(data), NS, dest, str(seg_size)],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            (line,) = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]  # logs go to stdout too
            _tag, n, took, *spent = line.split()
            assert int(n) >= len(segs), line
            phase_log.append(f"{Path(src).name}: {float(took):.2f} s {' '.join(spent)}")
            return float(took)

        return run

    def cp_sync(dest: str) -> float:
        d = root / dest
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t = time.perf_counter()
        cp_and_fsync(segs, d)
        took = time.perf_counter() - t
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
        phase_log.append(f"cp+sync: {took:.2f} s cpu={cpu:.2f}")
        return took

    variants["this tree"] = ours(here)
    for other in args.other_src:
        variants[other.name] = ours(str(other))
    variants["cp+sync"] = cp_sync
    times: dict[str, list[float]] = {k: [] for k in variants}
    loads: list[float] = []
    names = list(variants)
    for r in range(args.repeat):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            prepare_cache(segs, cold=False)
            dest = f"ab-{name}-{r}"
            times[name].append(variants[name](dest))
            loads.append(os.getloadavg()[0])
            shutil.rmtree(root / dest, ignore_errors=True)
            shutil.rmtree(data / "backups" / NS / dest, ignore_errors=True)
    base = statistics.median(times["cp+sync"])
    print(f"\nWAL backup of {len(segs)} segments ({total / 2**20:.0f} MiB, {args.record_kib} KiB records)")
    print(f"load average (1 min) during the runs: {min(loads):.1f}-{max(loads):.1f}")
    print("phases (seconds, backup/phases.py) per run:\n  " + "\n  ".join(phase_log) + "\n")
    print("| variant | median | vs cp + sync | runs |")
    print("|---|---:|---:|---|")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| {name} | {med:.2f} s | {med / base:.2f}x | {' '.join(f'{x:.2f}' for x in ts)} |")
    return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gb", type=float, default=1.0, help="database size (default 1)")
    ap.add_argument("--segments", type=int, default=100, help="sealed WAL segments (100)")
    ap.add_argument("--put-seconds", type=float, default=10.0)
    ap.add_argument("--repeat", type=int, default=3, help="best of N for the timings (3)")
    ap.add_argument("--cold", action="store_true", help="drop the page cache before every timing (root only)")
    ap.add_argument("--dir", type=Path, default=None, help="scratch dir (default: a tmp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch dir")
    ap.add_argument(
        "--copy-ab", action="store_true", help="only the in-process copy A/B (compacting vs plain vs cp)"
    )
    ap.add_argument(
        "--snapshot-ab",
        action="store_true",
        help="only the snapshot A/B: vs cp+sync, first snapshot after a start, PUT with/without pacing",
    )
    ap.add_argument(
        "--pacing-variant",
        action="append",
        default=[],
        metavar="NAME=VALUE[,NAME=VALUE]",
        help="--snapshot-ab: also PUT during snapshots with these unisondb.backup.pacing constants "
        "(repeatable), e.g. MAX_SLOWDOWN=8",
    )
    ap.add_argument("--put-only", action="store_true", help="--snapshot-ab: only the PUT part")
    ap.add_argument("--no-unpaced", action="store_true", help="--snapshot-ab: no run without pacing")
    ap.add_argument(
        "--wal-ab",
        action="store_true",
        help="only the WAL backup A/B (this tree vs --other-src vs cp + sync), in-process servers-free",
    )
    ap.add_argument(
        "--other-src",
        type=Path,
        action="append",
        default=[],
        help="--wal-ab: a checkout to compare with (e.g. main; repeatable; named by its directory)",
    )
    ap.add_argument("--segment-mib", type=int, default=16, help="--wal-ab segment size (16, the default)")
    ap.add_argument("--record-kib", type=int, default=64, help="--wal-ab record size (64 KiB)")
    args = ap.parse_args()
    size = int(args.size_gb * (1 << 30))
    segment_size = max(64 << 10, size // args.segments)
    scratch = Path(tempfile.mkdtemp(prefix="bench-backup-", dir=args.dir))
    data = scratch / "data"
    rows: list[tuple[str, str, str, str]] = []
    if args.snapshot_ab:
        try:
            return snapshot_ab(
                scratch,
                args.size_gb,
                args.repeat,
                args.put_seconds,
                tuple(args.pacing_variant),
                args.put_only,
                not args.no_unpaced,
            )
        finally:
            if not args.keep:
                shutil.rmtree(scratch, ignore_errors=True)
    if args.wal_ab:
        try:
            sys.exit(wal_ab(scratch, args))
        finally:
            if not args.keep:
                shutil.rmtree(scratch, ignore_errors=True)
    if args.copy_ab:
        try:
            return copy_ab(scratch, args.size_gb, args.repeat)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    try:
        t = timed(lambda: build_database(data, size, segment_size))
        print(f"built {size / 2**30:.2f} GiB in {t:.1f}s (segment size {segment_size})", file=sys.stderr)
        srv = Server(data, segment_size)
        try:
            mdb = data / NS / "db" / "data.mdb"
            with httpx.Client(base_url=srv.url, timeout=3600) as c:
                resp: dict[str, object] = {}

                def snap() -> None:
                    r = c.post(f"/api/v1/{NS}/btree/backup", json={"path": "bench/s1.db"})
                    assert r.status_code == 200, r.text
                    resp.update(r.json())
                    os.unlink(str(resp["path"]))
                    os.unlink(str(resp["path"]) + ".sha256")

                def cp_mdb() -> None:
                    cp_and_fsync([mdb], scratch / "cp-mdb")
                    shutil.rmtree(scratch / "cp-mdb")

                t_snap, t_cp = best_of(args.repeat, args.cold, [mdb], snap, cp_mdb)
                rows.append(
                    (
                        f"snapshot of {mdb.stat().st_size / 2**20:.0f} MiB data.mdb "
                        f"(snapshot file {int(str(resp['bytes'])) / 2**20:.0f} MiB)",
                        f"{t_snap:.2f} s",
                        f"{t_cp:.2f} s",
                        f"{t_snap / t_cp:.2f}x",
                    )
                )

                segs = sorted((data / NS / "wal").glob("*.wal"))[:-1]
                seg_bytes = sum(p.stat().st_size for p in segs)

                def wal() -> None:
                    r = c.post(f"/api/v1/{NS}/wal/backup", json={"backupDir": "bench-wal"})
                    assert r.status_code == 200, r.text
                    assert len(r.json()["backups"]) == len(segs)
                    shutil.rmtree(data / "backups" / NS / "bench-wal")

                def cp_wal() -> None:
                    cp_and_fsync(segs, scratch / "cp-wal")
                    shutil.rmtree(scratch / "cp-wal")

                t_wal, t_cpw = best_of(args.repeat, args.cold, segs, wal, cp_wal)
                rows.append(
                    (
                        f"WAL backup of {len(segs)} segments ({seg_bytes / 2**20:.0f} MiB)",
                        f"{t_wal:.2f} s",
                        f"{t_cpw:.2f} s",
                        f"{t_wal / t_cpw:.2f}x",
                    )
                )

                base = put_throughput(srv.url, args.put_seconds / 2)
                stop = threading.Event()
                snaps = [0]

                def snapshot_loop() -> None:
                    with httpx.Client(base_url=srv.url, timeout=3600) as sc:
                        while not stop.is_set():
                            r = sc.post(f"/api/v1/{NS}/btree/backup", json={"path": "bench/loop.db"})
                            assert r.status_code == 200, r.text
                            os.unlink(r.json()["path"])
                            os.unlink(r.json()["path"] + ".sha256")
                            snaps[0] += 1

                loop = threading.Thread(target=snapshot_loop)
                loop.start()
                try:
                    during = put_throughput(srv.url, args.put_seconds)
                finally:
                    stop.set()
                    loop.join()
                base = (base + put_throughput(srv.url, args.put_seconds / 2)) / 2
                tool = "hey" if shutil.which("hey") else "httpx pool"
                rows.append(
                    (
                        f"PUT/s, 16 clients ({tool}); with: {snaps[0]} snapshots ran",
                        f"{during:.0f} /s",
                        f"{base:.0f} /s",
                        f"{during / base:.2f}x",
                    )
                )
        finally:
            srv.stop()
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    cache = "cold page cache" if args.cold else "warm page cache"
    print(
        f"\nUnisonDB backup benchmark: {args.size_gb} GiB of values, {os.cpu_count()} CPUs, "
        f"{cache}, best of {args.repeat}\n"
    )
    print("| what | UnisonDB | baseline (cp + fsync / no snapshot) | ratio |")
    print("|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} |")


if __name__ == "__main__":
    main()
