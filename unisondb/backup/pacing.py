"""Backup I/O pacing: writers keep going while a backup runs (one ``Pacer`` per server).

Every chunk a backup writes is charged (``Pacing.charge(nbytes)``) before the next is read.
Two brakes, both on the backup's own thread (a PUT never waits for them):

* **adaptive** — AIMD on the copy rate (``Pacing``): full speed while the WAL is idle or
  its fsyncs are as fast as usual; each new WAL fsync (``Engine.wal_sync_latency``, any
  namespace) slower than ``CONGESTED_RATIO`` x the usual latency (and above
  ``CONGESTED_FLOOR``) cuts the rate to ``DECREASE`` x the copy's speed, fast fsyncs let
  it grow back by ``INCREASE`` bytes/s per second, and a chunk that took less than
  ``bytes / rate`` is followed by a sleep of the difference (so the backup yields the disk
  queue to the WAL's fsyncs). "Usual" is the lowest WAL fsync latency of the last minute
  (``BASE_BUCKETS`` x ``BASE_BUCKET``). It acts on what it is given: the snapshot's bounded
  writeback (``backup/writeback.py``) makes the copy's speed the disk's, and its pauses
  real pauses for the disk.
* **hard cap** — ``--backup-rate-limit`` bytes/s for all backups of the server together
  (``unisondb/ratelimit.py``'s token bucket; 0 = none): for operators who want a bound
  whatever the WAL does.

**The bound.** Adaptive pacing never makes a backup take more than ``MAX_SLOWDOWN`` x its
working time (its sleeps are clipped to ``MAX_SLOWDOWN - 1`` x the work so far). When it
reaches ``AT_BOUND_SHARE`` of the bound it says so, once per backup: the warning
``backup.pacing_at_bound`` (the WAL stays slow even
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
import enum
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
#: AIMD on the copy rate: a slow WAL fsync cuts it to this share of the copy's speed ...
DECREASE = 0.5
#: ... fast ones let it grow back by this many bytes/s per second ...
INCREASE = 64 << 20
#: ... and it is never cut below this (the bound below is the other floor).
MIN_RATE = 2 << 20
#: A backup stretched to this share of its bound has reached it (and says so).
AT_BOUND_SHARE = 0.9
#: Weight of the newest chunk in the copy's moving-average speed.
SPEED_EWMA = 0.2
#: CPU niceness of a backup thread (the event loop and the WAL writer keep 0).
BACKUP_NICE = 10

LatencySource = Callable[[], Iterable[tuple[float, float]]]


def _no_wal() -> Iterable[tuple[float, float]]:
    return ()


class WalState(enum.Enum):
    IDLE = "idle"
    FAST = "fast"
    SLOW = "slow"


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

    def wal_state(self, now: float, seen: dict[int, float], since: float = float("-inf")) -> WalState:
        """IDLE when no WAL fsync ended within ``IDLE_AFTER``; SLOW when one that ended
        since the caller last looked (``seen``: WAL index → end time, updated) took more
        than ``CONGESTED_RATIO`` x the usual latency (and ``CONGESTED_FLOOR``); else FAST.
        Each slow fsync is reported once per caller, and only one that started at or
        after ``since``."""
        slow = active = False
        with self._lock:
            samples = list(enumerate(self._wal_latency()))
            for i, (ended, seconds) in samples:
                if ended > 0.0 and self._seen.get(i) != ended:  # a new sample: the usual latency
                    self._seen[i] = ended
                    self._note(ended, seconds)
            base = min((m for _, m in self._minima), default=0.0)
        limit = max(CONGESTED_FLOOR, CONGESTED_RATIO * base)
        for i, (ended, seconds) in samples:
            if ended <= 0.0:
                continue
            if now - ended <= IDLE_AFTER:
                active = True
            if seen.get(i, 0.0) < ended:
                seen[i] = ended
                fresh = now - ended <= IDLE_AFTER and ended - seconds >= since
                slow = slow or (fresh and seconds > limit)
        if slow:
            return WalState.SLOW
        return WalState.FAST if active else WalState.IDLE

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
    #: Lowest copy rate (bytes/s) the adaptive brake set; 0 = it never braked.
    min_rate: float = 0.0
    #: Times the brake cut the rate (slow WAL fsyncs seen).
    cuts: int = 0

    @property
    def total(self) -> float:
        return self.adaptive + self.limit


class Pacing:
    """One backup's pacing: ``charge()`` after every chunk written, ``report()`` at the end.
    Called from one thread (the backup's).

    The adaptive brake is AIMD on the copy rate, as TCP does on its window: unlimited while
    the WAL is idle or fast; each new WAL fsync slower than ``CONGESTED_RATIO`` x the usual
    latency cuts the rate to ``DECREASE`` x (the lower of the rate and the speed the copy
    was actually going); while fsyncs are fast again the rate grows by ``INCREASE`` bytes/s
    every second, and once it is above the copy's own speed the brake is off. A chunk then
    takes at least ``bytes / rate``: the difference is slept. The sleep is clipped so the
    backup never exceeds ``MAX_SLOWDOWN`` x its working time (said once, at 90 % of it)."""

    def __init__(self, pacer: Pacer, namespace: str, kind: str) -> None:
        self._p = pacer
        self._namespace = namespace
        self._kind = kind
        self._mark = pacer._clock()
        #: Bytes/s the brake allows; None = unlimited.
        self.rate: float | None = None
        #: The copy's own speed (bytes/s of work time; moving average).
        self.speed = 0.0
        self._seen: dict[int, float] = {}
        self._max_extra = pacer.max_slowdown - 1.0
        self.work = 0.0
        self.adaptive = 0.0
        self.limit = 0.0
        self.at_bound = False
        self.min_rate = 0.0
        self.cuts = 0
        #: No WAL fsync ended within IDLE_AFTER at the last charge (nothing to protect: the
        #: snapshot's writeback may run a deep queue, ``writeback.Writeback.advance``).
        self.wal_idle = True
        #: Seconds slept after the previous chunk (the rate grows over sleeps too).
        self._last_pause = 0.0
        #: When the rate was last cut: only an fsync that started after it is news about
        #: the new rate (those already queued were slowed by the old one; one cut per
        #: "round trip", as TCP does).
        self._cut_at = float("-inf")

    def charge(self, nbytes: int) -> None:
        p = self._p
        now = p._clock()
        worked = max(0.0, now - self._mark)
        self.work += worked
        if worked > 0:
            inst = nbytes / worked
            self.speed = inst if self.speed == 0.0 else SPEED_EWMA * inst + (1 - SPEED_EWMA) * self.speed
        state = p.wal_state(now, self._seen, since=self._cut_at)
        self.wal_idle = state is WalState.IDLE
        if state is WalState.IDLE:
            self.rate = None  # nothing to protect: full speed
        elif state is WalState.SLOW:
            top = self.speed if self.rate is None else min(self.rate, self.speed or self.rate)
            self.rate = max(MIN_RATE, top * DECREASE)
            self.cuts += 1
            self._cut_at = now
            self.min_rate = self.rate if self.min_rate == 0.0 else min(self.min_rate, self.rate)
        elif self.rate is not None:  # fast again: grow back
            self.rate += INCREASE * (worked + self._last_pause)
            if self.speed and self.rate > self.speed:
                self.rate = None
        delay = max(0.0, nbytes / self.rate - worked) if self.rate else 0.0
        waited = p._bucket.take(nbytes) if p._bucket is not None else 0.0
        self.limit += waited
        # The cap's wait already gave the disk a pause: sleep only what it did not cover.
        delay = max(0.0, delay - waited)
        allowed = max(0.0, self._max_extra * self.work - self.adaptive)
        if delay > allowed:
            delay = allowed
            self._say_at_bound()
        elif (
            delay > 0
            and self.work + self.adaptive + delay >= AT_BOUND_SHARE * self._p.max_slowdown * self.work
        ):
            self._say_at_bound()  # close enough that the operator should know
        self._last_pause = delay + waited
        if delay > 0:
            self.adaptive += delay
            p._sleep(delay)
        self._mark = p._clock()

    def _say_at_bound(self) -> None:
        if self.at_bound or self._max_extra <= 0:
            return
        self.at_bound = True
        log.warning(
            "backup.pacing_at_bound",
            namespace=self._namespace,
            kind=self._kind,
            max_slowdown=self._p.max_slowdown,
            rate=round(self.rate or 0.0),
            hint="the WAL's fsyncs stay slow with the backup at its slowest: "
            "put backups/ on another disk (docs/OPERATIONS.md)",
        )

    def report(self) -> PacingReport:
        return PacingReport(self.adaptive, self.limit, self.work, self.at_bound, self.min_rate, self.cuts)


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
            cuts=rep.cuts,
            min_rate_mib_s=round(rep.min_rate / (1 << 20), 1),
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
