"""Backup I/O pacing: writers keep going while a backup runs (one ``Pacer`` per server).

Every chunk a backup writes is charged (``Pacing.charge(nbytes)``) before the next is read.
Two brakes, both on the backup's own thread (a PUT never waits for them):

* **adaptive** — full speed while the WAL is idle or its fsyncs are as fast as usual; when
  the latest WAL fsync (``Engine.wal_sync_latency``, any namespace) is slower than
  ``CONGESTED_RATIO`` x the usual latency (and above ``CONGESTED_FLOOR``), the backup
  sleeps ``factor`` x the time it just spent working, the factor doubling while the WAL
  stays slow and halving once it is fast again (so the backup yields the disk queue to the
  WAL's fsyncs). "Usual" is the lowest WAL fsync latency of the last minute
  (``BASE_BUCKETS`` x ``BASE_BUCKET``).
* **hard cap** — ``--backup-rate-limit`` bytes/s for all backups of the server together
  (``unisondb/ratelimit.py``'s token bucket; 0 = none): for operators who want a bound
  whatever the WAL does.

**The bound.** Adaptive pacing never makes a backup take more than ``MAX_SLOWDOWN`` x its
working time (its factor is capped at ``MAX_SLOWDOWN - 1``). When it reaches the cap it
says so, once per backup: the warning ``backup.pacing_at_bound`` (the WAL stays slow even
with the backup at 1/``MAX_SLOWDOWN`` of its speed: the backup and the WAL need separate
disks, docs/OPERATIONS.md). The hard cap is what the operator asked for; it bounds the
duration below by ``bytes / rate``. Either way the seconds paced are reported: the
``pace`` phase of ``unisondb_backup_phase_seconds_total`` and the ``backup.done`` log line,
split into ``adaptive`` and ``limit`` in ``Pacing.report``.

Time is a seam (``clock``, ``sleep``): tests drive it without sleeping.

``background_thread()`` lowers the calling thread's CPU priority (nice +10) and sets its
I/O priority to the idle class (``ioprio_set``, ``IOPRIO_CLASS_IDLE``; honoured by the BFQ
and CFQ schedulers, ignored by ``none``/``mq-deadline``): best effort, a refusal is logged
once per process.
"""

from __future__ import annotations

import ctypes
import os
import platform
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import structlog

from unisondb.ratelimit import TokenBucket

log = structlog.get_logger(__name__)

#: Adaptive pacing never stretches a backup beyond this many times its working time.
MAX_SLOWDOWN = 4.0
#: A WAL fsync this many times slower than the usual latency means the disk queue is congested.
CONGESTED_RATIO = 3.0
#: ... and never below this (faster fsyncs are not worth slowing a backup for).
CONGESTED_FLOOR = 0.002
#: A WAL whose last fsync ended longer ago than this is idle: nothing to protect.
IDLE_AFTER = 0.5
#: The usual latency is the lowest fsync latency seen in the last BASE_BUCKETS x
#: BASE_BUCKET seconds (a slow disk is not congestion; the pauses of a paced backup let
#: fast fsyncs through, which keep the floor honest under a long backup).
BASE_BUCKET = 10.0
BASE_BUCKETS = 6
#: First factor when the WAL turns slow (sleep / work); doubles while it stays slow.
START_FACTOR = 0.25
#: CPU niceness of a backup thread (the event loop and the WAL writer keep 0).
BACKUP_NICE = 10

LatencySource = Callable[[], Iterable[tuple[float, float]]]


def _no_wal() -> Iterable[tuple[float, float]]:
    return ()


class Pacer:
    """The server's pacer for backup I/O; ``session()`` per backup. Thread-safe."""

    def __init__(
        self,
        rate_limit: int = 0,
        *,
        wal_latency: LatencySource = _no_wal,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        max_slowdown: float | None = None,
    ) -> None:
        max_slowdown = MAX_SLOWDOWN if max_slowdown is None else max_slowdown  # read now: a seam
        if rate_limit < 0:
            raise ValueError(f"rate_limit must be >= 0, got {rate_limit}")
        if max_slowdown < 1:
            raise ValueError(f"max_slowdown must be >= 1, got {max_slowdown}")
        self.rate_limit = rate_limit
        self.max_slowdown = max_slowdown
        self._wal_latency = wal_latency
        self._clock = clock
        self._sleep = sleep
        self._bucket = TokenBucket(rate_limit, clock=clock, sleep=sleep) if rate_limit > 0 else None
        self._lock = threading.Lock()
        #: (start, lowest fsync seconds) per ``BASE_BUCKET`` seconds, the last ``BASE_BUCKETS``.
        self._minima: list[tuple[float, float]] = []
        self._seen: dict[int, float] = {}

    def session(self, namespace: str, kind: str) -> Pacing:
        return Pacing(self, namespace, kind)

    def congested(self, now: float) -> bool:
        """Is any WAL's latest fsync, ended within ``IDLE_AFTER``, slower than usual?"""
        worst = 0.0
        with self._lock:
            for i, (ended, seconds) in enumerate(self._wal_latency()):
                if ended <= 0.0:
                    continue
                if self._seen.get(i) != ended:  # a new sample: the usual latency
                    self._seen[i] = ended
                    self._note(ended, seconds)
                if now - ended <= IDLE_AFTER:
                    worst = max(worst, seconds)
            base = min((m for _, m in self._minima), default=0.0)
        return worst > max(CONGESTED_FLOOR, CONGESTED_RATIO * base)

    def _note(self, at: float, seconds: float) -> None:
        bucket = at - at % BASE_BUCKET
        if self._minima and self._minima[-1][0] == bucket:
            self._minima[-1] = (bucket, min(self._minima[-1][1], seconds))
        else:
            self._minima.append((bucket, seconds))
            del self._minima[:-BASE_BUCKETS]


@dataclass(frozen=True, slots=True)
class PacingReport:
    #: Seconds slept by the adaptive brake and by the hard cap.
    adaptive: float
    limit: float
    #: Seconds the backup worked between charges (its duration without pacing).
    work: float
    #: The adaptive brake reached ``MAX_SLOWDOWN`` (logged once as ``backup.pacing_at_bound``).
    at_bound: bool

    @property
    def total(self) -> float:
        return self.adaptive + self.limit


class Pacing:
    """One backup's pacing: ``charge()`` after every chunk written, ``report()`` at the end.
    Called from one thread (the backup's)."""

    def __init__(self, pacer: Pacer, namespace: str, kind: str) -> None:
        self._p = pacer
        self._namespace = namespace
        self._kind = kind
        self._mark = pacer._clock()
        self._factor = 0.0
        self._max_factor = pacer.max_slowdown - 1.0
        self.work = 0.0
        self.adaptive = 0.0
        self.limit = 0.0
        self.at_bound = False

    def charge(self, nbytes: int) -> None:
        p = self._p
        now = p._clock()
        worked = max(0.0, now - self._mark)
        self.work += worked
        if p.congested(now):
            self._factor = min(self._max_factor, max(START_FACTOR, self._factor * 2))
            if self._factor >= self._max_factor and self._max_factor > 0 and not self.at_bound:
                self.at_bound = True
                log.warning(
                    "backup.pacing_at_bound",
                    namespace=self._namespace,
                    kind=self._kind,
                    max_slowdown=p.max_slowdown,
                    hint="the WAL's fsyncs stay slow with the backup at its slowest: "
                    "put backups/ on another disk (docs/OPERATIONS.md)",
                )
        else:
            self._factor = self._factor / 2 if self._factor >= START_FACTOR / 4 else 0.0
        delay = worked * self._factor
        waited = p._bucket.take(nbytes) if p._bucket is not None else 0.0
        self.limit += waited
        # The cap's wait already gave the disk a pause: sleep only what it did not cover.
        delay = max(0.0, delay - waited)
        if delay > 0:
            self.adaptive += delay
            p._sleep(delay)
        self._mark = p._clock()

    def report(self) -> PacingReport:
        return PacingReport(self.adaptive, self.limit, self.work, self.at_bound)


def log_report(namespace: str, kind: str, rep: PacingReport) -> None:
    """One ``backup.paced`` line for a backup that was held back at all."""
    if rep.total > 0:
        log.info(
            "backup.paced",
            namespace=namespace,
            kind=kind,
            adaptive_seconds=round(rep.adaptive, 3),
            limit_seconds=round(rep.limit, 3),
            work_seconds=round(rep.work, 3),
            at_bound=rep.at_bound,
        )


# --- the server's pacer ---

_server = Pacer()


def install(pacer: Pacer) -> None:
    """Make ``pacer`` the one every backup of this process uses (``server.serve``)."""
    global _server
    _server = pacer


def current() -> Pacer:
    """The server's pacer (without ``install``: unpaced, no cap)."""
    return _server


# --- thread priority ---

#: ioprio_set(2) syscall numbers (there is no libc wrapper).
_IOPRIO_SET = {"x86_64": 251, "aarch64": 30, "i686": 289, "i386": 289, "armv7l": 314}
_IOPRIO_WHO_PROCESS = 1  # with who=0: the calling thread
_IOPRIO_CLASS_IDLE = 3
_IOPRIO_CLASS_SHIFT = 13
_refused_logged = False


def background_thread() -> None:
    """Lower the calling thread's CPU and I/O priority (a backup thread; best effort)."""
    global _refused_logged
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKUP_NICE)
    except (OSError, AttributeError):
        pass  # without it the backup only competes harder for the CPU
    err = _set_idle_io()
    if err and not _refused_logged:
        _refused_logged = True
        log.info("backup.ioprio_refused", error=err, effect="backups run at normal I/O priority")


def _set_idle_io() -> str:
    nr = _IOPRIO_SET.get(platform.machine())
    if nr is None:
        return f"ioprio_set unknown on {platform.machine()}"
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        rc = libc.syscall(nr, _IOPRIO_WHO_PROCESS, 0, _IOPRIO_CLASS_IDLE << _IOPRIO_CLASS_SHIFT)
    except (OSError, AttributeError) as exc:
        return str(exc)
    if rc != 0:
        return os.strerror(ctypes.get_errno())
    return ""
