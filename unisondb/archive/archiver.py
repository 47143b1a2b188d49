"""The archiver: uploads every sealed WAL segment of one namespace, in order, to the archive.

It is given two narrow callables instead of reaching into the engine:

* ``list_sealed() -> list[(segment_id, path)]`` — the namespace's sealed segments on local disk;
* ``describe(segment_id, path) -> SegmentInfo`` — a sealed segment's LSN range, history id and
  fingerprint (the segment footer/header holds them).

A background thread (or a caller, through :meth:`run_once`) repeatedly: renews the writer lease when
due, then publishes every sealed segment that is not yet confirmed, lowest id first, and stops the
pass at the first failure so the archive never gets a hole that a later upload hides. While one
segment uploads, the next is encoded (compressed, hashed, encrypted) on a second thread — confirmation
stays strictly in id order; only the CPU work of the next one overlaps the network wait of this one.

Confirmed ids are kept in memory, and the newest one is persisted after every pass that confirmed
something (``state_path``, ``<data-dir>/<ns>/archive-segments.json``)::

    {"url": "s3://bucket/prefix", "segment": 42, "key": "<object name>", "last_lsn": 4200}

Because segments are confirmed strictly in id order, every local sealed segment with an id below it
was confirmed too. After a restart the first pass trusts that watermark when (a) the URL is the same,
(b) the local segment with that id still exists and names the same object (same history and LSN
range: a restored or replaced WAL does not match), and (c) one HEAD finds the object — or the
namespace's retention record shows retention deleted it on purpose. Then nothing below it is
re-encoded or re-uploaded (and segments retention pruned are not resurrected). Otherwise the
segments are published again and ``publish_file`` recognises identical objects. No LIST, ever, on
this path.

Failures:

* ``ArchiveUnavailable`` (network, 5xx, throttling): retried forever with exponential backoff and
  full jitter, capped; writes go on locally meanwhile, and local segments stay until confirmed.
* ``LeaseHeld``: state ``lease-lost``. Refused at start (another writer's lease is live — e.g. a
  server restored from the archive started within the TTL of the dead old one): retried when that
  lease expires (``Lease.retry_in``). Lost while held (a live writer took it over): the archiver
  stops.
* anything else (a conflicting object, a damaged local segment, credentials refused): retried with
  the same backoff — an operator can fix credentials without a restart — and reported in ``state``
  and the failure metric.

``is_archived(segment_id)`` is what retention must consult before deleting a local segment.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import structlog

from unisondb.archive import naming, retention
from unisondb.archive.lease import Lease
from unisondb.archive.objectfmt import ArchiveKey, Identity, Kind
from unisondb.archive.publish import Spooled, encode_spooled, publish_spooled
from unisondb.archive.store import ObjectStore
from unisondb.errors import ArchiveUnavailable, CorruptArchive, LeaseHeld, UnisonDBError
from unisondb.metrics import ArchiveMetrics
from unisondb.storage import fsutil

log = structlog.get_logger(__name__)

__all__ = ["ArchiveMetrics", "Archiver", "Backoff", "SegmentInfo"]


@dataclass(frozen=True)
class SegmentInfo:
    first_lsn: int
    last_lsn: int
    history_id: bytes
    fingerprint: bytes | None = None


@dataclass
class Backoff:
    """Exponential backoff with full jitter: attempt n waits uniform(0, min(cap, base * 2**n))."""

    base: float = 0.5
    cap: float = 30.0
    rng: random.Random | None = None

    def delay(self, attempt: int) -> float:
        rng = self.rng or random
        return rng.uniform(0, min(self.cap, self.base * (2 ** min(attempt, 30))))


class Archiver:
    def __init__(
        self,
        store: ObjectStore,
        prefix: str,
        namespace: str,
        lease: Lease,
        list_sealed: Callable[[], list[tuple[int, Path]]],
        describe: Callable[[int, Path], SegmentInfo],
        *,
        archive_key: ArchiveKey | None = None,
        interval: float = 1.0,
        backoff: Backoff | None = None,
        metrics: ArchiveMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        spool_dir: Path | None = None,
        state_path: Path | None = None,
        archive_url: str = "",
    ) -> None:
        self.store = store
        self.prefix = prefix
        self.namespace = namespace
        self.lease = lease
        self._list_sealed = list_sealed
        self._describe = describe
        self._key = archive_key
        self.interval = interval
        self.backoff = backoff or Backoff()
        self.metrics = metrics
        self._clock = clock
        self._wall = wall
        self._spool_dir = spool_dir
        self._state_path = state_path
        self._archive_url = archive_url
        self._resumed = state_path is None
        self._newest: tuple[int, str, int] | None = None  # (segment id, key, last LSN) confirmed
        self._archived: set[int] = set()
        self._archived_lsn = -1
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._draining = False
        self._next_renewal = 0.0
        self.failures_in_a_row = 0
        self.state = "idle"
        self.last_error: str | None = None

    # -- what retention and /health read -------------------------------------------------------

    def is_archived(self, segment_id: int) -> bool:
        with self._lock:
            return segment_id in self._archived

    @property
    def archived_lsn(self) -> int:
        """Last LSN of the newest segment confirmed (-1: none yet)."""
        with self._lock:
            return self._archived_lsn

    # -- one pass --------------------------------------------------------------------------------

    def run_once(self) -> int:
        """Renew the lease if due, then publish pending sealed segments in id order. Returns how many
        were confirmed. Raises on the first failure (the caller backs off and calls again)."""
        if not self.lease.held:
            self.lease.acquire()
            self._next_renewal = self._clock() + self.lease.renew_interval
        elif self._clock() >= self._next_renewal:
            self.lease.renew()
            self._next_renewal = self._clock() + self.lease.renew_interval
        if not self._resumed:
            self._resume()
        pending = sorted((sid, path) for sid, path in self._list_sealed() if not self.is_archived(sid))
        self._set_pending(len(pending))
        done = 0
        ahead: Future[tuple[SegmentInfo, Spooled]] | None = None
        pool = ThreadPoolExecutor(1, thread_name_prefix="archive-encode") if len(pending) > 1 else None
        try:
            for i, (segment_id, path) in enumerate(pending):
                if self._stop.is_set() and not self._draining:
                    break
                current = ahead.result() if ahead is not None else self._encode(segment_id, path)
                ahead = None
                with current[1]:
                    if pool is not None and i + 1 < len(pending):
                        ahead = pool.submit(self._encode, *pending[i + 1])
                    self._publish(segment_id, *current)
                done += 1
                self._set_pending(len(pending) - done)
        finally:
            if ahead is not None:  # a failure or a stop with the next one encoded: drop it
                try:
                    ahead.result()[1].close()
                except Exception:  # its error is not this pass's error
                    pass
            if pool is not None:
                pool.shutdown(wait=True)
            if done:
                self._save_state()
        return done

    # -- the persisted watermark -------------------------------------------------------------------

    def _resume(self) -> None:
        # Not marked done when the archive is unreachable: the next pass tries again.
        self._try_resume()
        self._resumed = True

    def _try_resume(self) -> None:
        """Trust the persisted watermark if it still describes this WAL and this archive."""
        state = self._read_state()
        if state is None:
            return
        sid, key, last_lsn = state
        sealed = dict(self._list_sealed())
        if sid not in sealed or self._key_of(sid, sealed[sid]) != key:
            log.info("archive.watermark_not_local", namespace=self.namespace, segment=sid)
            return
        if self.store.head(key) is None:
            try:
                record = retention.read_record(self.store, self.prefix, self.namespace)
            except CorruptArchive as exc:
                log.warning("archive.retention_record_unreadable", error=str(exc))
                record = None
            oldest = record.get("oldest_lsn") if record else None
            if not isinstance(oldest, int) or oldest < last_lsn:
                log.warning(
                    "archive.watermark_missing",
                    namespace=self.namespace,
                    key=self.store.where(key),
                    hint="the archive lost a confirmed segment; publishing the local ones again",
                )
                return
        with self._lock:
            self._archived.update(s for s in sealed if s <= sid)
            self._archived_lsn = max(self._archived_lsn, last_lsn)
            self._newest = (sid, key, last_lsn)
        log.info("archive.resumed", namespace=self.namespace, segment=sid, last_lsn=last_lsn)

    def _read_state(self) -> tuple[int, str, int] | None:
        assert self._state_path is not None
        try:
            raw = json.loads(self._state_path.read_text())
            if raw.get("url") != self._archive_url:
                return None
            return int(raw["segment"]), str(raw["key"]), int(raw["last_lsn"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            # Only an optimisation depends on it: without it the segments are published again.
            log.warning("archive.watermark_unreadable", path=str(self._state_path), error=str(exc))
            return None

    def _save_state(self) -> None:
        with self._lock:
            newest = self._newest
        if self._state_path is None or newest is None:
            return
        sid, key, last_lsn = newest
        text = json.dumps({"url": self._archive_url, "segment": sid, "key": key, "last_lsn": last_lsn})
        try:
            fsutil.write_file_atomic(self._state_path, (text + "\n").encode())
        except UnisonDBError as exc:
            log.warning("archive.watermark_not_saved", path=str(self._state_path), error=str(exc))

    def _key_of(self, segment_id: int, path: Path) -> str:
        return self._segment_key(segment_id, self._describe(segment_id, path))

    def _segment_key(self, segment_id: int, info: SegmentInfo) -> str:
        return naming.segment_key(
            self.prefix,
            self.namespace,
            info.history_id,
            info.first_lsn,
            info.last_lsn,
            segment_id,
            self._key is not None,
        )

    def _encode(self, segment_id: int, path: Path) -> tuple[SegmentInfo, Spooled]:
        info = self._describe(segment_id, path)
        ident = Identity(
            Kind.SEGMENT, self.namespace, info.history_id, info.first_lsn, info.last_lsn, info.fingerprint
        )
        spooled = encode_spooled(path, ident, archive_key=self._key, spool_dir=self._spool_dir)
        return info, spooled

    def _publish(self, segment_id: int, info: SegmentInfo, spooled: Spooled) -> None:
        key = self._segment_key(segment_id, info)
        published = publish_spooled(self.store, key, spooled)
        with self._lock:
            self._archived.add(segment_id)
            self._archived_lsn = max(self._archived_lsn, info.last_lsn)
            if self._newest is None or segment_id > self._newest[0]:
                self._newest = (segment_id, key, info.last_lsn)
        if self.metrics is not None:
            if not published.already:
                self.metrics.uploads.labels(self.namespace, "segment").inc()
                self.metrics.upload_bytes.labels(self.namespace, "segment").inc(published.size)
            self.metrics.last_success.labels(self.namespace).set(self._wall())
            self.metrics.archived_lsn.labels(self.namespace).set(info.last_lsn)
        log.debug(
            "archived segment",
            namespace=self.namespace,
            segment=segment_id,
            key=key,
            already=published.already,
        )

    def _set_pending(self, n: int) -> None:
        if self.metrics is not None:
            self.metrics.pending.labels(self.namespace).set(n)

    # -- the loop --------------------------------------------------------------------------------

    def step(self) -> float:
        """One pass with error handling; returns how long to wait before the next one."""
        try:
            self.run_once()
        except LeaseHeld as exc:
            if str(exc) != self.last_error:  # a remembered refusal (lease.py) is not news
                self._fail("lease", exc)
            self.state = "lease-lost"
            retry = self.lease.retry_in()
            if retry is not None:  # refused by a live lease: try again once it expired (lease.py)
                return retry
            self._stop.set()  # lost while held: a live writer took over
            return 0.0
        except ArchiveUnavailable as exc:
            return self._retry_after("unavailable", exc)
        except UnisonDBError as exc:
            return self._retry_after(type(exc).__name__, exc)
        self.failures_in_a_row = 0
        self.state = "ok"
        self.last_error = None
        return self.interval

    def _fail(self, reason: str, exc: UnisonDBError) -> None:
        self.last_error = str(exc)
        if self.metrics is not None:
            self.metrics.failures.labels(self.namespace, reason).inc()
        log.warning("archive pass failed", namespace=self.namespace, reason=reason, error=str(exc))

    def _retry_after(self, reason: str, exc: UnisonDBError) -> float:
        self._fail(reason, exc)
        self.state = "retrying"
        delay = self.backoff.delay(self.failures_in_a_row)
        self.failures_in_a_row += 1
        if self.metrics is not None:
            self.metrics.retries.labels(self.namespace).inc()
        return delay

    def wake(self) -> None:
        """Run a pass now (a segment was just sealed)."""
        self._wake.set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"archiver-{self.namespace}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            delay = self.step()
            if self._stop.is_set():
                break
            self._wake.wait(delay)
            self._wake.clear()

    def stop(self, *, release: bool = True, timeout: float = 30.0, drain: float = 0.0) -> None:
        """Stop the thread after the upload in flight; release the lease unless it was lost.

        ``drain`` > 0: then keep publishing what is pending (the segment a clean stop just
        sealed) for up to that many seconds, so a clean shutdown leaves nothing behind
        when the archive is reachable. One failed attempt ends the drain: a down archive
        must not hold up a shutdown (the next start uploads the rest)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if drain > 0 and self.state != "lease-lost":
            deadline = self._clock() + drain
            self._draining = True
            try:
                while self._clock() < deadline:
                    if self.run_once() == 0:
                        break
            except UnisonDBError as exc:
                self._fail("drain", exc)
            finally:
                self._draining = False
        if release and self.state != "lease-lost":
            try:
                self.lease.release()
            except UnisonDBError as exc:
                log.warning("archive lease not released", namespace=self.namespace, error=str(exc))
