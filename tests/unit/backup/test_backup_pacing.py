"""Backup pacing (backup/pacing.py): full speed on an idle WAL, backing off while its fsyncs
are slow, never beyond ``MAX_SLOWDOWN`` x the backup's working time without saying so, and
the ``--backup-rate-limit`` cap.

Time runs on a fake clock (``FakeTime``): "work" advances it, the pacer's sleep advances it;
nothing sleeps. The WAL fsync latencies are a scripted stand-in for ``Engine.wal_sync_latency``
(a congested disk cannot be produced on demand); the last test paces a real snapshot of a
real engine with a recording sleep.
"""

from __future__ import annotations

import ctypes
import os
import platform
import random
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from unisondb.backup import pacing, phases
from unisondb.backup.pacing import MAX_SLOWDOWN, Pacer
from unisondb.backup.snapshot import write_snapshot
from unisondb.config import EngineConfig, load_config
from unisondb.errors import InvalidRequest
from unisondb.storage import snapfile
from unisondb.storage.engine import Engine

MiB = 1 << 20


class FakeTime:
    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


class Wal:
    """A WAL whose last fsync took ``latency`` seconds and ended ``age`` seconds ago."""

    def __init__(self, t: FakeTime, latency: float = 0.001, age: float = 0.0) -> None:
        self.t, self.latency, self.age = t, latency, age
        self.n = 0

    def samples(self) -> list[tuple[float, float]]:
        self.n += 1  # every reading is a new fsync (ends at a new time)
        return [(self.t.now - self.age - self.n * 1e-9, self.latency)]


def run_backup(
    t: FakeTime,
    pacer: Pacer,
    chunks: int,
    work: float = 0.01,
    wal: Wal | None = None,
    script: list[float] | None = None,
) -> tuple[pacing.PacingReport, float]:
    session = pacer.session("ns", "btree")
    started = t.now
    for i in range(chunks):
        if wal is not None and script is not None:
            wal.latency = script[i]
        t.now += work  # the backup's own work for this chunk
        session.charge(MiB)
    return session.report(), t.now - started


def test_idle_or_fast_wal_never_slows_a_backup() -> None:
    t = FakeTime()
    for wal in (Wal(t, latency=0.5, age=10.0), Wal(t, latency=0.001)):  # idle (old fsync); fast
        rep, took = run_backup(t, Pacer(wal_latency=wal.samples, clock=t.clock, sleep=t.sleep), 200, wal=wal)
        assert t.slept == [] and rep.total == 0.0 and not rep.at_bound
        assert took == pytest.approx(rep.work) == pytest.approx(2.0)
    # No WAL at all (a server without namespaces writing, or pacing not installed).
    rep, _ = run_backup(t, Pacer(clock=t.clock, sleep=t.sleep), 10)
    assert rep.total == 0.0


def test_a_steadily_slow_disk_is_not_congestion() -> None:
    # 20 ms per fsync, every time (a slow disk, no backup effect): the usual latency follows it.
    t = FakeTime()
    wal = Wal(t, latency=0.020)
    rep, _ = run_backup(t, Pacer(wal_latency=wal.samples, clock=t.clock, sleep=t.sleep), 100, wal=wal)
    assert rep.adaptive == 0.0


def test_slow_fsyncs_back_off_and_fast_ones_release() -> None:
    t = FakeTime()
    wal = Wal(t)
    pacer = Pacer(wal_latency=wal.samples, clock=t.clock, sleep=t.sleep)
    script = [0.001] * 20 + [0.030] * 3 + [0.001] * 200  # a burst of slow fsyncs
    paused: list[int] = []
    session = pacer.session("ns", "btree")
    started = t.now
    with structlog.testing.capture_logs() as logs:
        for i, lat in enumerate(script):
            wal.latency = lat
            t.now += 0.01  # 1 MiB per 10 ms: the copy's own speed is 100 MiB/s
            before = len(t.slept)
            session.charge(MiB)
            if len(t.slept) > before:
                paused.append(i)
    rep, took = session.report(), t.now - started
    # Unpaced before the burst; the first slow fsync halves the rate, the second one started
    # before that cut (it says nothing about the new rate: no cut), the third halves it again ...
    assert paused and paused[0] == 20 and rep.cuts == 2
    assert t.slept[0] == pytest.approx(0.01, rel=0.01)  # 1 MiB at 50 MiB/s takes 20 ms
    assert 25 * MiB <= rep.min_rate < 27 * MiB
    assert not rep.at_bound and not [e for e in logs if e["event"] == "backup.pacing_at_bound"]
    # ... which grows back by INCREASE bytes/s per second of fast fsyncs: unpaced again
    # once above the copy's own speed, after (100 MiB/s - min_rate) / INCREASE seconds.
    recover = (100 * MiB - rep.min_rate) / pacing.INCREASE
    assert paused == list(range(20, paused[-1] + 1))
    assert t.slept[-1] < 0.001 and rep.adaptive < recover
    assert paused[-1] < 200 and script[paused[-1] + 1 :]  # the rest ran unpaced
    assert took == pytest.approx(rep.work + rep.adaptive)


def test_pacing_never_exceeds_its_bound_and_says_so_at_it() -> None:
    """The documented bound (docs/OPERATIONS.md): adaptive pacing adds at most
    (MAX_SLOWDOWN - 1) x the backup's working time; reaching it logs
    ``backup.pacing_at_bound`` once per backup."""
    t = FakeTime()
    wal = Wal(t)
    pacer = Pacer(wal_latency=wal.samples, clock=t.clock, sleep=t.sleep)
    script = [0.001] * 5 + [0.050] * 295  # congested for good
    with structlog.testing.capture_logs() as logs:
        rep, took = run_backup(t, pacer, len(script), wal=wal, script=script)
    assert rep.at_bound
    warned = [e for e in logs if e["event"] == "backup.pacing_at_bound"]
    assert len(warned) == 1 and warned[0]["max_slowdown"] == MAX_SLOWDOWN
    assert took <= MAX_SLOWDOWN * rep.work + 1e-9
    assert took > 0.9 * MAX_SLOWDOWN * rep.work  # and it really is at the bound
    # Random latency patterns: the bound holds for every one, and a backup stretched past
    # 90 % of it has said so.
    rng = random.Random(7)
    for _ in range(50):
        t2 = FakeTime()
        w = Wal(t2)
        p = Pacer(wal_latency=w.samples, clock=t2.clock, sleep=t2.sleep)
        seq = [rng.choice([0.001, 0.001, 0.004, 0.05]) for _ in range(200)]
        works = [rng.uniform(0.001, 0.05) for _ in range(200)]
        session = p.session("ns", "btree")
        start = t2.now
        for lat, wk in zip(seq, works, strict=True):
            w.latency = lat
            t2.now += wk
            session.charge(MiB)
        r = session.report()
        took = t2.now - start
        assert took <= MAX_SLOWDOWN * r.work + 1e-9
        if took > 0.9 * MAX_SLOWDOWN * r.work:
            assert r.at_bound


def test_rate_limit_caps_bytes_per_second() -> None:
    t = FakeTime()
    pacer = Pacer(10 * MiB, clock=t.clock, sleep=t.sleep)  # 10 MiB/s, 1 s of burst
    rep, took = run_backup(t, pacer, 100, work=0.001)  # 100 MiB that would take 0.1 s
    assert took == pytest.approx(100 / 10 - 1, rel=0.02)  # burst + rate x T
    assert rep.limit == pytest.approx(took - rep.work, rel=1e-6) and rep.adaptive == 0.0
    # The cap is shared by the server's backups: a second one right after waits its turn.
    rep2, took2 = run_backup(t, pacer, 10, work=0.001)
    assert took2 == pytest.approx(1.0, rel=0.05)


def test_cap_wait_counts_against_the_adaptive_pause() -> None:
    t = FakeTime()
    wal = Wal(t, latency=0.001)
    pacer = Pacer(1 * MiB, wal_latency=wal.samples, clock=t.clock, sleep=t.sleep)
    script = [0.001] * 3 + [0.05] * 50
    rep, took = run_backup(t, pacer, len(script), wal=wal, script=script)
    # At 1 MiB/s each 1 MiB chunk already waits ~1 s, far more than 3 x its 10 ms of work.
    assert rep.adaptive == 0.0 and rep.limit > 40


def test_backup_rate_limit_flag_and_toml(tmp_path: Path) -> None:
    assert load_config().backup_rate_limit == 0
    assert load_config(overrides={"backup_rate_limit": "50MiB/s"}).backup_rate_limit == 50 * MiB
    f = tmp_path / "c.toml"
    f.write_text('backup_rate_limit = "20MiB"\n')
    assert load_config(f).backup_rate_limit == 20 * MiB
    assert load_config(f, overrides={"backup_rate_limit": "0"}).backup_rate_limit == 0
    with pytest.raises(InvalidRequest, match="invalid backup rate limit 'fast'"):
        load_config(overrides={"backup_rate_limit": "fast"})
    with pytest.raises(InvalidRequest, match="at least 1MiB/s"):
        load_config(overrides={"backup_rate_limit": "64KiB"})


def _ioprio_get() -> int:
    nr = {"x86_64": 252, "aarch64": 31}.get(platform.machine())
    if nr is None:
        pytest.skip(f"ioprio_get unknown on {platform.machine()}")
    return int(ctypes.CDLL(None, use_errno=True).syscall(nr, 1, 0))


def test_background_thread_gets_idle_io_and_low_cpu_priority() -> None:
    seen: dict[str, int] = {}

    def body() -> None:
        pacing.background_thread()
        seen["nice"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        seen["ioprio"] = _ioprio_get()

    th = threading.Thread(target=body)
    th.start()
    th.join()
    assert seen["nice"] == pacing.BACKUP_NICE
    if seen["ioprio"] < 0:
        pytest.skip("ioprio_get refused here")
    assert seen["ioprio"] >> 13 == 3  # IOPRIO_CLASS_IDLE
    assert _ioprio_get() >> 13 != 3  # this thread is untouched


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    eng = Engine.open(tmp_path / "data", "paced", EngineConfig(segment_size=1 << 20))
    yield eng
    eng.close()


def test_a_real_snapshot_is_paced_within_its_bound(engine: Engine, tmp_path: Path) -> None:
    for i in range(64):
        engine.put(b"k%03d" % i, os.urandom(64 << 10))  # ~4 MiB: several 1 MiB chunks
    slept: list[float] = []
    wal = [(0.0, 0.001)]

    def congested() -> list[tuple[float, float]]:
        import time

        wal[0] = (time.monotonic(), 0.001 if not slept and wal[0][0] == 0.0 else 0.050)
        return list(wal)

    pacer = Pacer(wal_latency=congested, sleep=slept.append)
    out = tmp_path / "s.db"
    fd = os.open(out, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        with phases.collecting() as ph, structlog.testing.capture_logs() as logs:
            cp, size, digest = write_snapshot(engine, fd, out, pacer=pacer)
    finally:
        os.close(fd)
    assert slept and ph["pace"] == pytest.approx(sum(slept))
    # The sleeps are recorded, not slept: the pacer's work time is the copy's real time.
    (paced,) = [e for e in logs if e["event"] == "backup.paced"]
    assert paced["adaptive_seconds"] == pytest.approx(sum(slept), abs=1e-3)
    assert sum(slept) <= (MAX_SLOWDOWN - 1) * paced["work_seconds"] + 1e-3
    if sum(slept) >= (pacing.AT_BOUND_SHARE * MAX_SLOWDOWN - 1) * paced["work_seconds"] + 1e-3:
        assert paced["at_bound"]
    assert snapfile.verify_fd(os.open(out, os.O_RDONLY), out)[1] == digest
    assert cp.applied_lsn == 64 and out.stat().st_size == size


def test_a_session_says_whether_the_wal_is_idle() -> None:
    """What the snapshot's writeback reads to choose a deep or a two-window queue."""
    t = FakeTime()
    wal = Wal(t, latency=0.001, age=10.0)
    session = Pacer(wal_latency=wal.samples, clock=t.clock, sleep=t.sleep).session("ns", "btree")
    session.charge(MiB)
    assert session.wal_idle
    wal.age = 0.0
    session.charge(MiB)
    assert not session.wal_idle
