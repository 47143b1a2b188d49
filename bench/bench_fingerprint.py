#!/usr/bin/env python3
"""Cost of maintaining the state fingerprint on the write path (issue 8: goal ≤ 5 % of
durable PUT throughput). Run by hand, not part of the test suite:

    .venv/bin/python bench/bench_fingerprint.py [--quick] [--out FILE] [--no-http]

Same-run, interleaved A/B; every figure is the median of ``--runs`` runs (≥ 3), and the
order of A and B alternates from run to run so a load spike on the shared machine does not
land on one side only.

* A = the current code: ``BTree.apply`` reads each old value with ``txn.replace``/``txn.pop``
  and updates the 2048-bit AdHash (``Fingerprint.add/remove``) in the write transaction.
* B = fingerprint maintenance switched off **inside this benchmark process only**:
  ``BTree.apply`` is replaced, for the duration of a B run, by ``apply_without_fingerprint``
  below — the pre-fingerprint body (``txn.put``/``txn.delete``, no hashing) that writes the
  checkpoint with its ``fp_state`` unchanged. That is a monkeypatch of a class attribute,
  not a product flag; the server's own code has no way to turn the fingerprint off.
  For HTTP, the B server is ``python bench/bench_fingerprint.py --serve-without-fingerprint
  <unisondb args>``, which applies the same patch and then runs the normal CLI.

Measurements:

(a) durable writes/s of an in-process ``Engine`` (real fsync, group commit): 16 threads,
    each ``engine.submit([PUT]).result()`` in a loop, 100-byte values, half new keys and
    half overwrites of a 1,000-key hot set;
(b) ``BTree.apply`` of 100k one-entry records in 1k-record transactions (durable commits,
    the same key mix) vs raw py-lmdb ``put`` of the same pairs in the same transactions
    (the physical baseline), with and without the fingerprint, plus a variant that keeps
    ``replace``/``pop`` but makes ``Fingerprint.add/remove`` no-ops (splits the cost into
    old-value reads vs hashing);
(c) ``item_hash`` alone (µs per pair) and ``BTree.scan_fingerprint`` of a 1M-key database
    (pairs/s: what checking a snapshot's content at restore costs) next to a bare cursor scan;
(d) HTTP durable PUT req/s (hey, 16 connections, overwrites of one key) against two servers.

Scratch data goes to ``bench/work/`` (git-ignored) and is deleted at the end.
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import lib
import lmdb

from unisondb.storage.btree import CHECKPOINT_KEY, BTree, Checkpoint
from unisondb.storage.engine import Engine
from unisondb.storage.fingerprint import Fingerprint, item_hash
from unisondb.storage.record import Entry, EntryKind, Record

NS = "default"
VALUE = b"v" * 100
HOT_KEYS = 1000
BENCH_DIR = Path(__file__).resolve().parent / "work"


# --- the benchmark-only switch ---


def apply_without_fingerprint(self: BTree, records: list[Record], checkpoint: Checkpoint) -> Checkpoint:
    """``BTree.apply`` as it was before fingerprints (7ca7d8c): put/delete, no old values,
    no hashing; the checkpoint keeps whatever ``fp_state`` it was given."""
    kv = self._kv
    put_kind = EntryKind.PUT

    def body(txn: Any) -> None:
        for rec in records:
            for e in rec.entries:
                if e.kind == put_kind:
                    txn.put(e.key, e.value, db=kv)
                else:
                    txn.delete(e.key, db=kv)
        txn.put(CHECKPOINT_KEY, checkpoint.encode(), db=self._meta)

    self._write(body)
    return checkpoint


_REAL_APPLY = BTree.apply
_REAL_ADD = Fingerprint.add
_REAL_REMOVE = Fingerprint.remove


@contextmanager
def variant(name: str) -> Iterator[None]:
    """``fp``: current code; ``nofp``: apply_without_fingerprint; ``nohash``: current
    apply (replace/pop) with Fingerprint.add/remove as no-ops."""
    if name == "nofp":
        BTree.apply = apply_without_fingerprint  # type: ignore[method-assign]
    elif name == "nohash":
        Fingerprint.add = lambda self, k, v: None  # type: ignore[method-assign]
        Fingerprint.remove = lambda self, k, v: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        BTree.apply = _REAL_APPLY  # type: ignore[method-assign]
        Fingerprint.add = _REAL_ADD  # type: ignore[method-assign]
        Fingerprint.remove = _REAL_REMOVE  # type: ignore[method-assign]


def interleaved(names: list[str], runs: int, one: Callable[[str], float]) -> dict[str, list[float]]:
    """Run every variant ``runs`` times, rotating the order each run."""
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(runs):
        order = names[r % len(names) :] + names[: r % len(names)]
        if r % 2:
            order.reverse()
        for n in order:
            out[n].append(one(n))
    return out


# --- (a) in-process durable engine ---


def engine_run(data_dir: Path, seconds: float, threads: int) -> float:
    eng = Engine.open(data_dir, NS)
    try:
        eng.write([Entry(EntryKind.PUT, b"hot%05d" % i, VALUE) for i in range(HOT_KEYS)])
        stop = [0.0]
        counts = [0] * threads  # writes per thread so far (new keys never repeat)

        def worker(t: int) -> None:
            rng = random.Random(t)
            i = counts[t]
            pc = time.perf_counter
            while pc() < stop[0]:
                key = b"new%02d-%09d" % (t, i) if i % 2 == 0 else b"hot%05d" % rng.randrange(HOT_KEYS)
                eng.submit([Entry(EntryKind.PUT, key, VALUE)]).result()
                i += 1
            counts[t] = i

        stop[0] = time.perf_counter() + min(1.0, seconds / 3)  # warm-up
        with ThreadPoolExecutor(threads) as ex:
            list(ex.map(worker, range(threads)))
        before = sum(counts)
        t0 = time.perf_counter()
        stop[0] = t0 + seconds
        with ThreadPoolExecutor(threads) as ex:
            list(ex.map(worker, range(threads)))
        return (sum(counts) - before) / (time.perf_counter() - t0)
    finally:
        eng.close()


# --- (b) BTree.apply vs raw py-lmdb ---


def key_mix(n: int, seed: int = 1) -> list[bytes]:
    """Half new keys, half overwrites of an earlier key, in a fixed pseudo-random order."""
    rng = random.Random(seed)
    keys: list[bytes] = []
    for i in range(n):
        keys.append(b"k%09d" % i if i % 2 == 0 or not keys else keys[rng.randrange(len(keys))])
    return keys


def apply_run(work: Path, name: str, keys: list[bytes], batch: int) -> float:
    """Seconds to write ``keys`` durably in ``batch``-record transactions."""
    path = Path(tempfile.mkdtemp(prefix=f"apply-{name}-", dir=work))
    records = [Record(i + 1, i, (Entry(EntryKind.PUT, k, VALUE),)) for i, k in enumerate(keys)]
    batches = [records[i : i + batch] for i in range(0, len(records), batch)]
    try:
        if name == "raw":
            env = lmdb.open(
                str(path), map_size=1 << 30, max_dbs=4, sync=True, metasync=False, readahead=False
            )
            db = env.open_db(b"kv")
            t0 = time.perf_counter()
            for b in batches:
                with env.begin(write=True, db=db) as txn:
                    for rec in b:
                        e = rec.entries[0]
                        txn.put(e.key, e.value)
            dt = time.perf_counter() - t0
            env.close()
            return dt
        bt = BTree(path)
        cp = Checkpoint()
        with variant(name):
            t0 = time.perf_counter()
            for b in batches:
                cp = bt.apply(b, cp.advance(b[-1].lsn, 1, 0, b[-1].time_ns))
            dt = time.perf_counter() - t0
        bt.close()
        return dt
    finally:
        shutil.rmtree(path, ignore_errors=True)


# --- (c) hashing and full scans ---


def item_hash_us(n: int) -> float:
    pairs = [(b"k%09d" % i, VALUE) for i in range(n)]
    t0 = time.perf_counter()
    for k, v in pairs:
        item_hash(k, v)
    return (time.perf_counter() - t0) / n * 1e6


def build_db(path: Path, n: int) -> BTree:
    bt = BTree(path, durable=False)
    fp = Fingerprint()
    for start in range(0, n, 50_000):
        with bt.env.begin(write=True, db=bt._kv) as txn:
            for i in range(start, min(n, start + 50_000)):
                k = b"k%09d" % i
                txn.put(k, VALUE)
                fp.add(k, VALUE)
    bt.set_checkpoint(replace(Checkpoint(), fp_state=fp.state()))
    bt.sync()
    return bt


def scan_run(bt: BTree, name: str) -> float:
    t0 = time.perf_counter()
    if name == "fingerprint":
        fp, cp = bt.scan_fingerprint()
        if fp.state() != cp.fp_state:
            raise SystemExit("scan fingerprint differs from the maintained one: a bug")
    else:
        n = sum(1 for _ in bt.items())
        assert n == bt.count()
    return time.perf_counter() - t0


# --- (d) HTTP ---


def start(work: Path, name: str) -> Any:
    from serverproc import ServerProcess, free_port, wait_healthy

    data = work / f"http-{name}"
    port = free_port()
    cli = ["--data-dir", str(data), "--http-addr", f"127.0.0.1:{port}", "--namespace", NS]
    if name == "fp":
        args = [sys.executable, "-m", "unisondb", *cli]
    else:
        args = [sys.executable, str(Path(__file__).resolve()), "--serve-without-fingerprint", *cli]
    data.mkdir(parents=True)
    log_path = work / f"server-{name}.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            args, stdout=log_file, stderr=subprocess.STDOUT, preexec_fn=lib.die_with_parent
        )
    srv = ServerProcess(data, port, proc, log_path, args)
    wait_healthy(srv, timeout=120)
    return srv


def serve_without_fingerprint(argv: list[str]) -> int:
    from unisondb.cli import main as cli_main

    BTree.apply = apply_without_fingerprint  # type: ignore[method-assign]
    return cli_main(argv)


# --- report ---


def paired(a: list[float], b: list[float]) -> str:
    """Median of the per-run ratios A_i / B_i (each pair ran back to back)."""
    return f"{statistics.median(x / y for x, y in zip(a, b, strict=True)):.3f}"


def pct_cost(a: float, b: float) -> str:
    """Throughput lost by A relative to B."""
    return f"{(1 - a / b) * 100:+.1f} %"


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--serve-without-fingerprint":
        return serve_without_fingerprint(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short runs, 100k-key scan")
    ap.add_argument("--runs", type=int, default=0)
    ap.add_argument("--seconds", type=float, default=0)
    ap.add_argument("--no-http", action="store_true")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    runs = max(3, args.runs or (3 if args.quick else 5))
    seconds = args.seconds or (3.0 if args.quick else 8.0)
    scan_keys = 100_000 if args.quick else 1_000_000
    BENCH_DIR.mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="fp-", dir=BENCH_DIR))
    md = lib.Markdown()
    loads: list[tuple[str, str]] = []

    def phase(name: str) -> None:
        la = lib.loadavg()
        loads.append((name, la))
        print(f"== {name} (load average {la})", file=sys.stderr, flush=True)

    try:
        phase("(a) engine")
        n_run = [0]

        def eng_one(name: str) -> float:
            n_run[0] += 1
            with variant(name):
                return engine_run(work / f"eng-{name}-{n_run[0]}", seconds, 16)

        eng = interleaved(["fp", "nofp"], runs, eng_one)

        phase("(b) apply")
        keys = key_mix(100_000)
        app = interleaved(["fp", "nofp", "nohash", "raw"], runs, lambda n: apply_run(work, n, keys, 1000))

        phase("(c) hash + scan")
        hash_us = [item_hash_us(100_000) for _ in range(runs)]
        t0 = time.perf_counter()
        bt = build_db(work / "scan", scan_keys)
        build_s = time.perf_counter() - t0
        try:
            scan = interleaved(["fingerprint", "cursor"], runs, lambda n: scan_run(bt, n))
        finally:
            bt.close()

        http: dict[str, list[float]] = {}
        if not args.no_http and shutil.which("hey"):
            phase("(d) http")
            servers = {n: start(work, n) for n in ("fp", "nofp")}
            body = '{"value": "' + lib.b64(VALUE) + '"}'
            try:
                http = interleaved(
                    ["fp", "nofp"],
                    runs,
                    lambda n: (
                        lib.hey(
                            f"{servers[n].url}/api/v1/{NS}/kv/bench-key", seconds, 16, method="PUT", body=body
                        ).rps
                    ),
                )
            finally:
                for s in servers.values():
                    s.stop()
        phase("end")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    med = statistics.median
    md.p(
        f"{runs} interleaved runs per row (A/B order alternating), medians; {seconds:g} s per "
        "throughput run. A = current code (fingerprint maintained in the write "
        "transaction); B = `BTree.apply` monkeypatched in the benchmark process to the "
        "pre-fingerprint body (`txn.put`/`txn.delete`, no hashing)."
    )
    md.table(
        [
            "measurement",
            "A: with fingerprint",
            "B: without",
            "A / B (medians)",
            "median of paired A_i / B_i",
            "cost",
        ],
        [
            [
                "(a) in-process Engine, durable writes/s (16 submitters, 50 % new / 50 % overwrite)",
                f"{med(eng['fp']):,.0f}",
                f"{med(eng['nofp']):,.0f}",
                f"{med(eng['fp']) / med(eng['nofp']):.3f}",
                paired(eng["fp"], eng["nofp"]),
                pct_cost(med(eng["fp"]), med(eng["nofp"])),
            ],
            *(
                [
                    [
                        "(d) HTTP durable PUT req/s (hey, 16 conns, one key overwritten)",
                        f"{med(http['fp']):,.0f}",
                        f"{med(http['nofp']):,.0f}",
                        f"{med(http['fp']) / med(http['nofp']):.3f}",
                        paired(http["fp"], http["nofp"]),
                        pct_cost(med(http["fp"]), med(http["nofp"])),
                    ]
                ]
                if http
                else []
            ),
        ],
    )
    n = len(keys)
    rate = {k: n / med(v) for k, v in app.items()}
    md.p(
        "\n(b) 100k one-entry records (100-byte values, 50 % new keys / 50 % overwrites) in "
        "1k-record durable transactions:\n"
    )
    md.table(
        ["variant", "records/s", "÷ raw py-lmdb put", "÷ apply without fingerprint"],
        [
            [label, f"{rate[k]:,.0f}", f"{rate[k] / rate['raw']:.3f}", f"{rate[k] / rate['nofp']:.3f}"]
            for k, label in (
                ("fp", "`BTree.apply` (current: replace/pop + AdHash)"),
                ("nohash", "`BTree.apply`, replace/pop, `Fingerprint.add/remove` no-ops"),
                ("nofp", "`BTree.apply` without fingerprint (put/delete)"),
                ("raw", "raw py-lmdb `put`, same transactions (physical baseline)"),
            )
        ],
    )
    fp_s, cur_s = med(scan["fingerprint"]), med(scan["cursor"])
    md.p(
        f"\n(c) hashing and a full scan ({scan_keys:,} keys, 100-byte values; database built "
        f"in {build_s:.1f} s):\n"
    )
    md.table(
        ["measurement", "value"],
        [
            ["`item_hash` (SHAKE-256 → 2048-bit int), µs per pair", f"{med(hash_us):.2f}"],
            ["`BTree.scan_fingerprint`, pairs/s", f"{scan_keys / fp_s:,.0f}"],
            ["bare cursor scan (`BTree.items`), pairs/s", f"{scan_keys / cur_s:,.0f}"],
            [f"time to fingerprint {scan_keys:,} keys", f"{fp_s:.2f} s"],
            *(
                [["projected time for 1M keys", f"{fp_s / scan_keys * 1e6:.2f} s"]]
                if scan_keys != 1_000_000
                else []
            ),
        ],
    )
    md.p("\nEvery run (A / B, in run order per column):\n")
    raw_rows = [
        [
            "(a) engine writes/s",
            " ".join(f"{x:,.0f}" for x in eng["fp"]),
            " ".join(f"{x:,.0f}" for x in eng["nofp"]),
        ]
    ]
    raw_rows += [
        [f"(b) apply s, {k}", " ".join(f"{x:.3f}" for x in app[k]), ""]
        for k in ("fp", "nohash", "nofp", "raw")
    ]
    raw_rows += [
        [
            "(c) scan s (fingerprint / cursor)",
            " ".join(f"{x:.3f}" for x in scan["fingerprint"]),
            " ".join(f"{x:.3f}" for x in scan["cursor"]),
        ]
    ]
    if http:
        raw_rows.append(
            [
                "(d) HTTP req/s",
                " ".join(f"{x:,.0f}" for x in http["fp"]),
                " ".join(f"{x:,.0f}" for x in http["nofp"]),
            ]
        )
    md.table(["row", "A runs", "B runs"], raw_rows, align="lll")
    md.p("\nLoad average (1/5/15 min) at each phase: " + "; ".join(f"{n}: {la}" for n, la in loads))
    text = md.render()
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
