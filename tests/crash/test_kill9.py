"""SIGKILL crash test: a real server under concurrent write load, killed at a random moment.

Each round drives a real ``python -m unisondb`` process from 16 client threads (PUTs with
unique values, DELETEs and batch puts), SIGKILLs it 0.2-1.5 s into the load, restarts it
on the same data directory and checks the durability contract (DESIGN.md §2):

* every acknowledged write survives with its value; a key's final value is the state
  after its last acknowledged operation or after one of the unacknowledged operations
  issued later (each key is written by one thread only, one request at a time, so this
  set is exact and tiny);
* acknowledged deletes stay deleted unless a later write to the key was issued;
* no batch is half-applied (checked on the keys no later operation touched);
* LSNs: the checkpoint never goes backwards, the restarted server has applied everything
  in its WAL, the LSNs used by this round lie between the number of acknowledged and of
  issued writes, and a new write gets an LSN above every LSN seen before the kill;
* every WAL segment on disk parses with ``segment.scan``: all but the newest are sealed
  and whole, the newest ends on a record boundary, and LSNs are gapless from 1;
* state verified in earlier rounds is still there (sampled) and the key count matches.

All rounds of a test share one data directory, so later rounds also recover from the
segments, checkpoints and ``.broken`` copies that earlier crashes left behind.

``UNISONDB_CRASH_ROUNDS`` (default 20) sets the rounds of the default test;
``UNISONDB_CRASH_SEED`` replays a run; the ``slow`` soak variant runs 200 rounds
(``UNISONDB_SOAK_ROUNDS``). See docs/TESTING.md.
"""

from __future__ import annotations

import base64
import errno
import os
import random
import re
import shutil
import ssl
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import lmdb
import pytest

from unisondb.config import EngineConfig
from unisondb.errors import UnisonDBError
from unisondb.storage import layout, record, segment
from unisondb.storage.btree import CHECKPOINT_KEY, Checkpoint
from unisondb.storage.engine import Engine
from unisondb.storage.record import Entry, EntryKind

if TYPE_CHECKING:
    from serverproc import ServerProcess

NS = "default"
API = f"/api/v1/{NS}"
ROUNDS = int(os.environ.get("UNISONDB_CRASH_ROUNDS", "20"))
SOAK_ROUNDS = int(os.environ.get("UNISONDB_SOAK_ROUNDS", "200"))
#: Prior-round keys re-read after every restart (they must keep their verified state).
RECHECK_SAMPLE = 64
#: /stats lastLsn can name LSNs that are not durable yet, and those are handed out again
#: after a crash (pinned by ``test_stats_last_lsn_is_never_reused`` below). Rounds whose
#: kill lands in that window (seen with large values, where the kill often interrupts a
#: long multi-page pwrite) report it in their summary line instead of failing the run.
#: Set to False once that xfail test passes.
KNOWN_STATS_LSN_BUG = False
#: One TLS context for every client: httpx builds (and loads CA files into) a new one per
#: Client otherwise, ~80 ms each, although every request here is plain HTTP on loopback.
TLS = ssl.create_default_context()


def client(url: str, timeout: float = 30.0) -> httpx.Client:
    return httpx.Client(base_url=url, timeout=timeout, verify=TLS)


@dataclass(frozen=True)
class Workload:
    segment_size: str = "64KiB"
    threads: int = 16
    keys_per_thread: int = 24
    p_batch: float = 0.25
    p_delete: float = 0.2
    batch_size: tuple[int, int] = (2, 8)
    value_size: tuple[int, int] = (32, 512)
    kill_after: tuple[float, float] = (0.2, 1.5)


MIXED = Workload()
BATCH_HEAVY = Workload(p_batch=0.8, p_delete=0.1, batch_size=(8, 24))
ROTATING = Workload(segment_size="8KiB", value_size=(200, 900))
#: Multi-page WAL writes: Linux stops a pwrite at a page boundary when SIGKILL arrives, so
#: these rounds sometimes end in a real torn record (seen in ~1 round in 8). A batch stays
#: under the 1 MiB body limit (3 x 192 KiB, base64-encoded).
LARGE = Workload(
    segment_size="4MiB", keys_per_thread=4, p_batch=0.1, batch_size=(2, 3), value_size=(64 << 10, 192 << 10)
)


@dataclass
class Op:
    """One HTTP request: ``writes`` maps each key it touches to its new value (None = delete)."""

    kind: str
    writes: dict[str, bytes | None]
    batch_id: str | None = None
    acked: bool = False
    outcome: str = "not sent"


def b64(v: bytes) -> str:
    return base64.b64encode(v).decode()


def make_value(tag: str, key: str, rng: random.Random, wl: Workload) -> bytes:
    return f"{tag}|{key}|".encode() + rng.randbytes(rng.randint(*wl.value_size))


def run_client(
    url: str,
    tid: int,
    prefix: str,
    wl: Workload,
    rng: random.Random,
    ops: list[Op],
    start: threading.Barrier,
    stop: threading.Event,
) -> None:
    """Issue requests one at a time until one fails (the server died) or ``stop``."""
    keys = [f"{prefix}-t{tid:02d}-k{j:02d}" for j in range(wl.keys_per_thread)]
    with client(url, timeout=10.0) as c:
        start.wait(timeout=60)
        seq = 0
        while not stop.is_set():
            seq += 1
            r = rng.random()
            body: dict[str, object] | None
            if r < wl.p_batch:
                bid = f"{prefix}-t{tid:02d}-b{seq}"
                bkeys = rng.sample(keys, min(rng.randint(*wl.batch_size), len(keys)))
                op = Op("batch", {k: make_value(f"B:{bid}", k, rng, wl) for k in bkeys}, bid)
                items = [{"key": k, "value": b64(v)} for k, v in op.writes.items() if v is not None]
                method, path, body = "POST", f"{API}/kv/batch", {"operation": "put", "items": items}
            elif r < wl.p_batch + wl.p_delete:
                key = rng.choice(keys)
                op = Op("delete", {key: None})
                method, path, body = "DELETE", f"{API}/kv/{key}", None
            else:
                key = rng.choice(keys)
                value = make_value(f"P:{prefix}-t{tid:02d}-{seq}", key, rng, wl)
                op = Op("put", {key: value})
                method, path, body = "PUT", f"{API}/kv/{key}", {"value": b64(value)}
            ops.append(op)  # recorded as issued before it is sent
            try:
                resp = c.request(method, path, json=body)
            except httpx.HTTPError as exc:
                op.outcome = type(exc).__name__
                return
            op.outcome = f"HTTP {resp.status_code}"
            if resp.status_code != 200:
                op.outcome += f" {resp.text[:200]}"
                return
            op.acked = True


def poll_lsns(url: str, seen: dict[str, int], stop: threading.Event) -> None:
    """Track the highest LSNs /stats and /checkpoint report until the server dies."""
    with client(url, timeout=5.0) as c:
        while not stop.is_set():
            try:
                stats = c.get(f"{API}/stats").json()
                cp = c.get(f"{API}/checkpoint").json()
            except (httpx.HTTPError, ValueError):
                return
            seen["stats"] = max(seen["stats"], stats["lastLsn"])
            seen["checkpoint"] = max(seen["checkpoint"], cp["lsn"])
            time.sleep(0.01)


def get_many(url: str, keys: list[str]) -> dict[str, bytes | None]:
    def fetch(chunk: list[str]) -> dict[str, bytes | None]:
        out: dict[str, bytes | None] = {}
        with client(url) as c:
            for k in chunk:
                resp = c.get(f"{API}/kv/{k}")
                assert resp.status_code == 200, (k, resp.status_code, resp.text)
                body = resp.json()
                out[k] = base64.b64decode(body["value"]) if body["found"] else None
        return out

    chunks = [keys[i::8] for i in range(8)]
    result: dict[str, bytes | None] = {}
    with ThreadPoolExecutor(8) as pool:
        for part in pool.map(fetch, chunks):
            result.update(part)
    return result


def acceptable_states(ops: list[Op], key: str) -> list[bytes | None]:
    """Final states ``key`` may have: after its last acked op, or after any later unacked one."""
    touching = [op for op in ops if key in op.writes]
    last_acked = max((i for i, op in enumerate(touching) if op.acked), default=-1)
    states = [touching[last_acked].writes[key] if last_acked >= 0 else None]
    states += [op.writes[key] for op in touching[last_acked + 1 :]]
    return states


def describe(v: bytes | None) -> str:
    """The tag of a value (which request wrote it), not its random payload."""
    if v is None:
        return "<absent>"
    parts = v.split(b"|", 2)
    return (parts[0] + b"|" + parts[1]).decode(errors="replace") if len(parts) == 3 else repr(v)


@dataclass
class WalCheck:
    """Verifies WAL segment files; sealed segments already scanned are only re-summarized."""

    wal_dir: Path
    sealed: dict[int, tuple[int, int, int]] = field(default_factory=dict)  # id → size, first, last

    def check(self, last_lsn: int) -> tuple[int, list[str]]:
        problems: list[str] = []
        files = list(segment.iter_segment_files(self.wal_dir))
        expected = 1
        for i, (seg_id, path) in enumerate(files):
            newest = i == len(files) - 1
            size = path.stat().st_size
            known = self.sealed.get(seg_id)
            try:
                if known is not None and known[0] == size:
                    summary = segment.read_summary(path)
                    if summary.footer is None or summary.footer.last_lsn != known[2]:
                        problems.append(f"{path.name}: sealed segment lost its footer")
                    first, last = known[1], known[2]
                else:
                    if known is not None:
                        problems.append(f"{path.name}: sealed segment changed size {known[0]} -> {size}")
                    scan = segment.scan(path)
                    first, last = scan.first_lsn, scan.last_lsn
                    if scan.tail_error is not None:
                        problems.append(f"{path.name}: {scan.tail_error}")
                    if not newest:
                        if not scan.sealed:
                            problems.append(f"{path.name}: older segment without a footer")
                        elif scan.data_end + segment.FOOTER_SIZE != size or not scan.records:
                            problems.append(
                                f"{path.name}: sealed segment is not whole "
                                f"(records end {scan.data_end}, size {size})"
                            )
                        else:
                            self.sealed[seg_id] = (size, first, last)
                    elif scan.sealed or (
                        scan.data_end != size and any(segment.read_file(path)[scan.data_end :])
                    ):
                        # (Zeros after the records are the zero-filler's preallocated space.)
                        problems.append(
                            f"{path.name}: active segment sealed={scan.sealed}, "
                            f"records end {scan.data_end}, size {size}"
                        )
            except UnisonDBError as exc:
                problems.append(f"{path.name}: {exc}")
                continue
            if first != expected:
                problems.append(f"{path.name}: starts at LSN {first}, expected {expected}")
            expected = last + 1
        if expected - 1 != last_lsn:
            problems.append(f"WAL ends at LSN {expected - 1} but the server reports {last_lsn}")
        return len(files), problems


@dataclass
class CrashRun:
    start: Callable[..., object]
    data_dir: Path
    wl: Workload
    seed: int
    summaries: list[str] = field(default_factory=list)
    #: Final state of every key verified in an earlier round (None = absent).
    verified: dict[str, bytes | None] = field(default_factory=dict)
    rounds_run: int = 0
    total_acked: int = 0
    #: Rounds that hit the bug pinned by ``test_stats_last_lsn_is_never_reused``.
    known_bug_hits: list[str] = field(default_factory=list)
    #: More server flags (``--ack lmdb``).
    extra: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.args = ["--wal-segment-size", self.wl.segment_size, *self.extra]
        self.srv = self.launch(-1)
        self.wal = WalCheck(layout.wal_dir(self.data_dir, NS))
        self.lsn = self.stats()["lastLsn"]

    def launch(self, round_no: int) -> ServerProcess:
        """Start the server on the data dir; fail the round if it does not come up."""
        srv: ServerProcess = self.start(self.data_dir, extra_args=self.args, wait=False)
        deadline = time.monotonic() + 30
        with client(srv.url, timeout=1.0) as c:
            while srv.proc.poll() is None and time.monotonic() < deadline:
                try:
                    if c.get("/health").status_code == 200:
                        return srv
                except httpx.TransportError:
                    pass
                time.sleep(0.02)
        srv.kill9()
        self.fail(round_no, [f"server did not come up (exit code {srv.proc.returncode}):", srv.log()[-4000:]])
        raise AssertionError("unreachable")

    def stats(self) -> dict[str, int]:
        with client(self.srv.url) as c:
            stats: dict[str, int] = c.get(f"{API}/stats").json()
            return stats

    def fail(self, round_no: int, problems: list[str]) -> None:
        head = f"crash round {round_no} failed (UNISONDB_CRASH_SEED={self.seed}):"
        raise AssertionError("\n".join([head, *problems[:40], "rounds so far:", *self.summaries]))

    def run(self, rounds: int) -> None:
        for n in range(rounds):
            self.round(n)
        if self.known_bug_hits:
            print("known bug hit (test_stats_last_lsn_is_never_reused):", *self.known_bug_hits, sep="\n  ")
        # A round killed before its first answer checks only recovery; a run must do more.
        assert self.total_acked >= rounds, "\n".join(["too few acknowledged writes:", *self.summaries])
        self.srv.stop()
        assert self.srv.proc.returncode == 0, self.srv.log()

    def round(self, n: int) -> None:
        wl, prefix = self.wl, f"r{n:03d}"
        url = self.srv.url
        lsn_before = self.lsn
        ops: list[list[Op]] = [[] for _ in range(wl.threads)]
        stop = threading.Event()
        barrier = threading.Barrier(wl.threads + 1)
        seen = {"stats": 0, "checkpoint": 0}
        crashed: list[BaseException] = []

        def guarded(fn: Callable[..., None], *args: object) -> None:
            try:
                fn(*args)
            except BaseException as exc:  # surfaced by the round's check below
                crashed.append(exc)

        threads = [
            threading.Thread(
                target=guarded,
                args=(
                    run_client,
                    url,
                    t,
                    prefix,
                    wl,
                    random.Random(self.rng.random()),
                    ops[t],
                    barrier,
                    stop,
                ),
            )
            for t in range(wl.threads)
        ]
        threads.append(threading.Thread(target=guarded, args=(poll_lsns, url, seen, stop)))
        for t in threads:
            t.start()
        barrier.wait(timeout=60)
        kill_at = self.rng.uniform(*wl.kill_after)
        time.sleep(kill_at)
        self.srv.kill9()
        stop.set()
        for t in threads:
            t.join(timeout=30)
        problems = [f"client thread raised {exc!r}" for exc in crashed]
        problems += [f"{t.name} did not stop" for t in threads if t.is_alive()]

        # --- restart on the same data directory ---
        self.srv = self.launch(n)
        log = self.srv.log()
        m = re.search(r"replayed=(\d+)", log)
        replayed = int(m.group(1)) if m else -1
        torn = "wal.torn_tail" in log
        broken = len(list(layout.wal_dir(self.data_dir, NS).glob("*.broken")))
        stats = self.stats()
        with client(self.srv.url) as c:
            cp_lsn = c.get(f"{API}/checkpoint").json()["lsn"]

        all_ops = [op for thread_ops in ops for op in thread_ops]
        acked = sum(op.acked for op in all_ops)
        unknown = len(all_ops) - acked
        problems += [
            f"request answered {op.outcome} before the kill: {op.kind} {sorted(op.writes)[:3]}"
            for op in all_ops
            if op.outcome.startswith("HTTP") and not op.acked
        ]
        last = stats["lastLsn"]
        summary = (
            f"round {n:3d}: kill@{kill_at:.2f}s acked={acked} unknown={unknown} "
            f"lsn {lsn_before}->{last} replayed={replayed} torn_tail={torn} broken_copies={broken} "
            f"seen stats/checkpoint={seen['stats']}/{seen['checkpoint']}"
        )
        self.summaries.append(summary)

        # --- LSNs ---
        if cp_lsn != last:
            problems.append(f"after recovery checkpoint LSN {cp_lsn} != lastLsn {last}")
        if last < seen["checkpoint"]:
            problems.append(
                f"checkpoint went backwards: saw {seen['checkpoint']} before the kill, {last} after restart"
            )
        if not acked <= last - lsn_before <= acked + unknown:
            problems.append(
                f"this round used LSNs {lsn_before + 1}..{last} "
                f"({last - lsn_before}) for {acked} acked + {unknown} unknown writes"
            )

        # --- every key of this round, and a sample of earlier rounds ---
        touched = sorted({k for op in all_ops for k in op.writes})
        earlier = self.rng.sample(sorted(self.verified), min(RECHECK_SAMPLE, len(self.verified)))
        actual = get_many(self.srv.url, touched + earlier)
        for k in touched:
            tid = int(k.split("-t")[1][:2])
            states = acceptable_states(ops[tid], k)
            if actual[k] not in states:
                problems.append(f"{k}: has {describe(actual[k])}, allowed {[describe(s) for s in states]}")
        for k in earlier:
            if actual[k] != self.verified[k]:
                problems.append(
                    f"{k} (earlier round): has {describe(actual[k])}, was verified "
                    f"as {describe(self.verified[k])}"
                )
        for thread_ops in ops:
            for i, op in enumerate(thread_ops):
                if op.kind != "batch":
                    continue
                later = {k for later_op in thread_ops[i + 1 :] for k in later_op.writes}
                keys = [k for k in op.writes if k not in later]
                applied = [k for k in keys if actual[k] == op.writes[k]]
                if applied and len(applied) != len(keys):
                    problems.append(
                        f"batch {op.batch_id} (acked={op.acked}) half-applied: "
                        f"{len(applied)} of {len(keys)} keys"
                    )
        for k in touched:
            self.verified[k] = actual[k]
        # How many unacknowledged puts/batches did land (shows the kill hit real in-flight work).
        inflight = [op for op in all_ops if not op.acked and op.kind != "delete"]
        landed = sum(all(actual[k] == v for k, v in op.writes.items()) for op in inflight)
        self.summaries[-1] += f" in-flight writes landed={landed}/{len(inflight)}"

        # --- a new write continues the LSN sequence ---
        probe = f"{prefix}-probe"
        with client(self.srv.url) as c:
            resp = c.put(f"{API}/kv/{probe}", json={"value": b64(b"probe")})
            assert resp.status_code == 200, resp.text
        self.verified[probe] = b"probe"
        stats = self.stats()
        self.lsn = stats["lastLsn"]
        if self.lsn != last + 1:
            problems.append(f"new write after restart got LSN {self.lsn}, expected {last + 1}")
        if self.lsn <= seen["checkpoint"]:
            problems.append(
                f"LSN reused: new write got LSN {self.lsn} but the checkpoint "
                f"was at LSN {seen['checkpoint']} before the kill"
            )
        elif self.lsn <= seen["stats"]:
            msg = (
                f"LSN reused: new write got LSN {self.lsn} but /stats reported lastLsn "
                f"{seen['stats']} before the kill"
            )
            if KNOWN_STATS_LSN_BUG:
                self.known_bug_hits.append(f"round {n}: {msg}")
                self.summaries[-1] += " [known bug: /stats LSN reused]"
            else:
                problems.append(msg)
        present = sum(v is not None for v in self.verified.values())
        if stats["keys"] != present:
            problems.append(f"server has {stats['keys']} keys, the verified model {present}")

        # --- WAL files ---
        segments, wal_problems = self.wal.check(self.lsn)
        problems += wal_problems
        self.summaries[-1] += f" segments={segments}"
        print(self.summaries[-1])
        self.rounds_run += 1
        self.total_acked += acked
        if problems:
            self.fail(n, problems)


def crash_seed() -> int:
    env = os.environ.get("UNISONDB_CRASH_SEED")
    return int(env) if env else random.randrange(1 << 32)


def run_rounds(
    server_factory: Callable[..., object],
    tmp_path: Path,
    wl: Workload,
    rounds: int,
    extra: list[str] | None = None,
) -> CrashRun:
    run = CrashRun(server_factory, tmp_path / "data", wl, crash_seed(), extra=list(extra or []))
    run.run(rounds)
    assert run.rounds_run == rounds
    return run


@pytest.mark.timeout(max(300, ROUNDS * 15))
def test_kill9_under_mixed_load(server_factory: Callable[..., object], tmp_path: Path) -> None:
    """PUT/DELETE/batch load on 64 KiB segments, SIGKILLed ``UNISONDB_CRASH_ROUNDS`` times."""
    run_rounds(server_factory, tmp_path, MIXED, ROUNDS)


def test_kill9_during_batch_heavy_load(server_factory: Callable[..., object], tmp_path: Path) -> None:
    """80% of requests are 8-24-key batches: the kill almost surely lands in one."""
    run = run_rounds(server_factory, tmp_path, BATCH_HEAVY, 2)
    assert run.verified


def test_kill9_with_large_values(server_factory: Callable[..., object], tmp_path: Path) -> None:
    """64-192 KiB values: the kill can land inside a multi-page WAL write (a torn record)."""
    run_rounds(server_factory, tmp_path, LARGE, 3)


def test_kill9_during_continuous_rotation(server_factory: Callable[..., object], tmp_path: Path) -> None:
    """8 KiB segments and values up to 900 bytes: nearly every group commit rotates (and
    with ``--ack wal`` every seal waits for the applier to catch up)."""
    run = run_rounds(server_factory, tmp_path, ROTATING, 2)
    assert len(run.wal.sealed) > 20, "the load did not rotate segments"


# The tests above run the default, ``--ack wal``: acknowledged at the WAL fsync, LMDB
# behind; every kill loses the in-memory table and recovery must replay it. The two below
# pin ``--ack lmdb`` (every write in LMDB before its answer: the two-fsync path).


def test_kill9_ack_lmdb_under_mixed_load(server_factory: Callable[..., object], tmp_path: Path) -> None:
    """``--ack lmdb``: the same checks, with LMDB committed before every answer."""
    run_rounds(server_factory, tmp_path, MIXED, 5, extra=["--ack", "lmdb"])


def test_kill9_ack_lmdb_during_continuous_rotation(
    server_factory: Callable[..., object], tmp_path: Path
) -> None:
    """``--ack lmdb`` with nearly every group sealing a segment."""
    run = run_rounds(server_factory, tmp_path, ROTATING, 2, extra=["--ack", "lmdb"])
    assert len(run.wal.sealed) > 20, "the load did not rotate segments"


@pytest.mark.slow
@pytest.mark.timeout(max(3600, SOAK_ROUNDS * 15))
def test_kill9_soak(server_factory: Callable[..., object], tmp_path: Path) -> None:
    """The long variant: ``UNISONDB_SOAK_ROUNDS`` (200) kills over all four workloads."""
    seed = crash_seed()
    share = [(MIXED, 5), (BATCH_HEAVY, 2), (ROTATING, 2), (LARGE, 1)]
    for i, (wl, tenths) in enumerate(share):
        # Each workload gets its own data directory (segment sizes differ).
        run = CrashRun(server_factory, tmp_path / f"data{i}", wl, seed + i)
        rounds = max(1, SOAK_ROUNDS * tenths // 10)
        run.run(rounds)
        assert run.rounds_run == rounds


def read_applied_lsn(env: lmdb.Environment) -> int:
    meta = env.open_db(b"meta", create=False)
    with env.begin(db=meta) as txn:
        raw = txn.get(CHECKPOINT_KEY)
    return 0 if raw is None else Checkpoint.decode(raw).applied_lsn


def open_btree_readonly(db_dir: Path) -> lmdb.Environment | None:
    """A second, read-only LMDB handle on the server's B-tree (LMDB supports this)."""
    if not (db_dir / "data.mdb").exists():
        return None
    try:
        env = lmdb.open(str(db_dir), readonly=True, max_dbs=4, lock=True, create=False)
        read_applied_lsn(env)
    except lmdb.Error:
        return None
    return env


def test_kill9_during_recovery(server_factory: Callable[..., object], tmp_path: Path) -> None:
    """SIGKILL while startup recovery replays a long WAL: every restart resumes, none loses.

    The WAL is written in-process (fast), then ``db/`` is removed, as if an empty snapshot
    were restored: the server must replay all of it. A read-only LMDB handle watches the
    checkpoint advance (recovery commits every few thousand records) and the server is
    killed as soon as it passes a random target, several times, before a start is let
    finish. The result must be exactly the state that was written.
    """
    data_dir = tmp_path / "data"
    args = ["--wal-segment-size", "64KiB"]
    n, nkeys = 100_000, 4000
    eng = Engine.open(data_dir, NS, EngineConfig(segment_size=64 << 10))
    model: dict[bytes, bytes] = {}
    futures = []
    for i in range(n):
        key, value = b"key-%05d" % (i % nkeys), b"value-%07d" % i
        futures.append(eng.submit([Entry(EntryKind.PUT, key, value)]))
        model[key] = value
    assert [f.result() for f in futures] == list(range(1, n + 1))
    eng.close()
    db_dir = layout.btree_dir(data_dir, NS)
    shutil.rmtree(db_dir)

    rng = random.Random(crash_seed())
    targets = sorted(rng.sample(range(5_000, n - 5_000), 4))
    progress: list[tuple[int, int]] = []
    for target in targets:
        srv: ServerProcess = server_factory(data_dir, extra_args=args, wait=False)
        env = None
        deadline = time.monotonic() + 60
        try:
            while srv.proc.poll() is None and time.monotonic() < deadline:
                env = env or open_btree_readonly(db_dir)
                if env is not None and read_applied_lsn(env) >= target:
                    break
                time.sleep(0.001)
            assert srv.proc.poll() is None, f"server exited during recovery:\n{srv.log()}"
            srv.kill9()
            env = env or open_btree_readonly(db_dir)
            assert env is not None
            progress.append((target, read_applied_lsn(env)))
        finally:
            if env is not None:
                env.close()
    applied = [a for _t, a in progress]
    assert applied == sorted(applied), f"checkpoint went backwards across kills: {progress}"
    assert all(a >= t for t, a in progress), progress
    mid = sum(0 < a < n for a in applied)
    assert mid >= 1, f"no kill landed inside recovery: {progress}"
    print(f"kills during recovery (target, checkpoint after kill): {progress}")

    srv = server_factory(data_dir, extra_args=args)
    with client(srv.url) as c:
        stats = c.get(f"{API}/stats").json()
        assert stats["lastLsn"] == n and stats["keys"] == nkeys, stats
        assert c.put(f"{API}/kv/after", json={"value": b64(b"x")}).status_code == 200
        assert c.get(f"{API}/stats").json()["lastLsn"] == n + 1
    srv.stop()
    assert srv.proc.returncode == 0, srv.log()
    eng = Engine.open(data_dir, NS, EngineConfig(segment_size=64 << 10))
    try:
        model[b"after"] = b"x"
        assert dict(eng.btree.items()) == model
    finally:
        eng.close()
    _count, problems = WalCheck(layout.wal_dir(data_dir, NS)).check(n + 1)
    assert not problems, problems


def test_stats_last_lsn_is_never_reused(tmp_path: Path) -> None:
    """Every LSN /stats has reported must stay taken (DESIGN §3: LSNs are never reused).

    Deterministic stand-in for the crash test's "LSN above every LSN seen before the
    kill" check, which catches this only when the kill lands between LSN assignment and
    the end of the WAL pwrite (under power loss: before the fsync). It did, in the soak:
    LARGE round 1 of UNISONDB_CRASH_SEED=4245231335, /stats said lastLsn 348, the kill
    tore record 347 mid-pwrite, and after restart the next write got LSN 347. Here the
    WAL write fails with ENOSPC instead (the engine survives it and gives the LSNs
    back), and /stats is read at that instant.
    """
    eng = Engine.open(tmp_path / "data", NS, EngineConfig())
    try:
        assert eng.put(b"a", b"1") == 1
        reported: list[int] = []

        def no_space(data: bytes, meta: list[tuple[int, int, int]]) -> tuple[int, int]:
            reported.append(eng.describe()["lastLsn"])  # what GET /stats answers right now
            raise OSError(errno.ENOSPC, "No space left on device")

        eng.wal.append = no_space  # type: ignore[method-assign]
        with pytest.raises(UnisonDBError):
            eng.put(b"b", b"2")
        del eng.wal.append
        lsn = eng.put(b"c", b"3")
        assert lsn > max(reported), (
            f"/stats reported lastLsn {max(reported)} for a write that never became "
            f"durable; the next write then got LSN {lsn}"
        )
    finally:
        eng.close()


def test_torn_record_whose_value_embeds_the_next_record_is_a_torn_tail(tmp_path: Path) -> None:
    """DESIGN §2.5: a torn tail in the newest segment is the end of the log.

    Values are user data, so a value may contain the bytes of an encoded WAL record
    (a stored copy of a segment, or a deliberate one). When a crash tears the record
    holding such a value (power loss, or SIGKILL in a multi-page pwrite: Linux stops
    copying at a page boundary on a fatal signal) recovery must still cut it off.
    """
    data_dir = tmp_path / "data"
    eng = Engine.open(data_dir, NS, EngineConfig())
    try:
        assert eng.put(b"a", b"1") == 1
        embedded = record.encode(3, time.time_ns(), [Entry(EntryKind.PUT, b"k", b"v")])
        # The crash simulated below tears this record before its fsync completed.
        assert eng.put(b"blob", b"x" * 100 + embedded + b"y" * 100) == 2
    finally:
        eng.close()
    # A clean stop sealed segment 1 and began an empty segment 2; the crash being simulated
    # happened before that: drop segment 2, and tear segment 1 (footer gone, then inside
    # the value, after the embedding).
    files = [p for _id, p in segment.iter_segment_files(layout.wal_dir(data_dir, NS))]
    assert len(files) == 2 and files[1].stat().st_size == segment.HEADER_SIZE
    files[1].unlink()
    newest = files[0]
    with open(newest, "r+b") as f:
        f.truncate(newest.stat().st_size - segment.FOOTER_SIZE - 50)
    # A torn record was never fsynced, so it was never applied to LMDB either: rebuild the
    # B-tree from the WAL alone, as after such a crash.
    shutil.rmtree(layout.btree_dir(data_dir, NS))
    eng = Engine.open(data_dir, NS, EngineConfig())
    try:
        assert eng.last_lsn == 1
        assert eng.get(b"a") == b"1" and eng.get(b"blob") is None
    finally:
        eng.close()
