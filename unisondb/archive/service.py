"""Archiving inside the server: one ``Archiver`` per namespace, snapshots on a schedule and on demand.

``ArchiveService`` is what ``server.py`` starts and stops. It wires the lower layers to the engines
through the engine's narrow archiving hooks (``Engine.sealed_segments``, ``enable_archiving``):

* every namespace gets an ``Archiver`` that uploads its sealed segments in order;
* the engine seals its active segment ``--archive-interval`` after the first write in it, and
  tells the archiver (``wake``), so a write reaches the archive about one interval later;
* retention asks the archiver (``is_archived``) before it deletes a local segment, so age alone
  never deletes a segment the archive has not confirmed;
* a snapshot (``backup/snapshot.write_snapshot``, the same self-verifying file as
  ``POST .../btree/backup``) is published with its manifest when none was published by this data
  directory within ``--archive-snapshot-interval`` (the first one right after start), and on
  ``POST /api/v1/{ns}/archive/snapshot``.

All namespaces of one server share one writer lease (``PREFIX/writer.lease``): the lease guards the
prefix, and two servers on one prefix is the mistake it refuses. The writer id is stable per data
directory (``<data-dir>/archive-writer-id``), so a restart after SIGKILL takes its own lease back.

Retention (``retention.py``) runs in its own thread every ``--archive-retention-interval`` when
``--archive-retention-snapshots`` or ``--archive-retention-age`` is set, holding the namespace's
snapshot lock (no snapshot is half-published while it lists and deletes) and only while the lease is
held. ``--archive-rate-limit`` is one token bucket in the shared ``ObjectStore``: it bounds the
uploads of all namespaces together, never the lease.

The archiver's confirmed-segment watermark is ``<data-dir>/<ns>/archive-segments.json``
(``archiver.py``). The last snapshot's time per namespace is kept in ``<data-dir>/<ns>/archive-snapshot.json``
(``{"lsn": N, "time": unix seconds, "history": "<32 hex>", "key": "<object name>"}``) so a restart
does not upload a fresh 24-hourly snapshot, and so the schedule needs no LIST call.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from unisondb.archive.archiver import Archiver, SegmentInfo
from unisondb.archive.lease import Lease
from unisondb.archive.manifest import SnapshotManifest, publish_snapshot
from unisondb.archive.objectfmt import ArchiveKey, load_key
from unisondb.archive.retention import PruneResult, Retention, RetentionPolicy
from unisondb.archive.store import ArchiveURL, ObjectStore, parse_url
from unisondb.config import ArchiveConfig
from unisondb.errors import ArchiveUnavailable, InvalidRequest, UnisonDBError, from_os_error
from unisondb.metrics import ArchiveCollector, ArchiveLag, ArchiveMetrics
from unisondb.ratelimit import TokenBucket
from unisondb.storage import fsutil, layout
from unisondb.storage.engine import Engine

log = structlog.get_logger(__name__)

WRITER_ID_FILE = "archive-writer-id"
SNAPSHOT_STATE_FILE = "archive-snapshot.json"
SEGMENT_STATE_FILE = "archive-segments.json"
#: How often the snapshot scheduler looks at the clock.
SCHEDULE_POLL_S = 1.0
#: How long a clean stop keeps uploading what the stop itself sealed.
DRAIN_S = 10.0


def writer_id(data_dir: Path) -> str:
    """The data directory's archive writer id, created (durably) on first use."""
    path = data_dir / WRITER_ID_FILE
    try:
        text = path.read_text().strip()
        if text:
            return text
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise from_os_error(exc, path) from exc
    value = uuid.uuid4().hex
    _write_durably(path, value + "\n")
    return value


def _write_durably(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + fsutil.TMP_SUFFIX)
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsutil.fsync_dir(path.parent)
    except OSError as exc:
        fsutil.remove_quietly(tmp)
        raise from_os_error(exc, path) from exc


def segment_info(info: Any) -> SegmentInfo:
    """The archiver's view of an engine ``wal.SegmentInfo`` (the v2 header and footer)."""
    return SegmentInfo(info.first_lsn, info.last_lsn, info.history, info.fingerprint)


@dataclass
class NamespaceArchive:
    engine: Engine
    archiver: Archiver
    snapshot_lock: threading.Lock = field(default_factory=threading.Lock)
    last_snapshot: dict[str, Any] | None = None
    snapshot_error: str | None = None
    retention: Retention | None = None
    last_prune: PruneResult | None = None
    last_prune_time: float | None = None
    retention_error: str | None = None

    def list_sealed(self) -> list[tuple[int, Path]]:
        # Empty sealed segments cover no LSN and are not uploaded (they cannot be named).
        return [(s.segment_id, s.path) for s in self.engine.sealed_segments() if s.count]

    def describe(self, segment_id: int, path: Path) -> SegmentInfo:
        for s in self.engine.sealed_segments():
            if s.segment_id == segment_id:
                return segment_info(s)
        raise ArchiveUnavailable(
            f"segment {segment_id} of {self.engine.namespace} vanished before it was archived"
        )

    def is_archived(self, segment_id: int) -> bool:
        if self.archiver.is_archived(segment_id):
            return True
        # Empty segments hold nothing to archive; retention may delete them.
        return any(s.segment_id == segment_id and not s.count for s in self.engine.sealed_segments())

    def lag(self, now_ns: int) -> ArchiveLag:
        ns = self.engine.namespace
        archived = self.archiver.archived_lsn
        last = self.engine.last_lsn
        oldest = self.engine.oldest_unarchived_ns(self.archiver.is_archived)
        lag_s = max(0.0, (now_ns - oldest) / 1e9) if oldest is not None else 0.0
        lag_lsns = max(0, last - max(archived, 0)) if oldest is not None else 0
        return ns, lag_lsns, lag_s, int(self.archiver.state in ("ok", "idle"))


class ArchiveService:
    """Every namespace's archiver and the snapshot schedule of one server process."""

    def __init__(
        self,
        cfg: ArchiveConfig,
        data_dir: Path,
        engines: Mapping[str, Engine],
        metrics: ArchiveMetrics,
        *,
        store: ObjectStore | None = None,
        wall: Callable[[], float] = time.time,
    ) -> None:
        if cfg.url is None:
            raise InvalidRequest("archiving needs --archive-url s3://bucket/prefix")
        self.cfg = cfg
        self.url: ArchiveURL = parse_url(cfg.url)
        self.data_dir = data_dir
        self.metrics = metrics
        self._wall = wall
        self.key: ArchiveKey | None = load_key(cfg.key_file) if cfg.key_file else None
        self.limiter = (
            TokenBucket(cfg.rate_limit, sleep=self._rate_limited_sleep) if cfg.rate_limit > 0 else None
        )
        self.store = store or ObjectStore(
            self.url.bucket, endpoint_url=cfg.endpoint, path_style=cfg.path_style, limiter=self.limiter
        )
        self.policy = RetentionPolicy(cfg.retention_snapshots, cfg.retention_age)
        self.writer_id = writer_id(data_dir)
        self.lease = Lease(self.store, self.url.prefix, self.writer_id)
        self.namespaces: dict[str, NamespaceArchive] = {}
        self._stop = threading.Event()
        for ns, engine in engines.items():
            self.add(ns, engine)
        self._scheduler: threading.Thread | None = None
        self._pruner: threading.Thread | None = None

    def _rate_limited_sleep(self, seconds: float) -> None:
        self.metrics.rate_limited.inc(seconds)
        # Waits on the stop event, so a low rate limit never holds up a shutdown by much.
        self._stop.wait(seconds)

    def add(self, ns: str, engine: Engine) -> None:
        holder: list[NamespaceArchive] = []
        archiver = Archiver(
            self.store,
            self.url.prefix,
            ns,
            self.lease,
            lambda: holder[0].list_sealed(),
            lambda sid, path: holder[0].describe(sid, path),
            archive_key=self.key,
            interval=self.cfg.interval,
            metrics=self.metrics,
            spool_dir=layout.backup_root(self.data_dir, ns),
            state_path=layout.namespace_dir(self.data_dir, ns) / SEGMENT_STATE_FILE,
            archive_url=str(self.url),
        )
        na = NamespaceArchive(engine, archiver, last_snapshot=self._read_state(ns))
        if self.policy.enabled:
            na.retention = Retention(
                self.store,
                self.url.prefix,
                ns,
                self.policy,
                archive_key=self.key,
                writer_id=self.writer_id,
                lease_held=lambda: self.lease.held and archiver.state != "lease-lost",
                on_delete=lambda kind: self.metrics.retention_deletions.labels(ns, kind).inc(),
                stopping=self._stop.is_set,
            )
        holder.append(na)
        self.namespaces[ns] = na
        self.metrics.init_namespace(ns)
        if na.last_snapshot is not None:
            self.metrics.last_snapshot.labels(ns).set(float(na.last_snapshot.get("time", 0)))

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        for na in self.namespaces.values():
            na.engine.enable_archiving(na.is_archived, self.cfg.interval, na.archiver.wake)
            na.archiver.start()
        self._scheduler = threading.Thread(target=self._schedule_loop, name="archive-snapshots", daemon=True)
        self._scheduler.start()
        if self.policy.enabled:
            self._pruner = threading.Thread(target=self._prune_loop, name="archive-retention", daemon=True)
            self._pruner.start()
        log.info(
            "archive.started",
            url=str(self.url),
            namespaces=sorted(self.namespaces),
            writer=self.writer_id,
            encrypted=self.key is not None,
            interval=self.cfg.interval,
            snapshot_interval=self.cfg.snapshot_interval,
            retention_snapshots=self.cfg.retention_snapshots,
            retention_age=self.cfg.retention_age,
            rate_limit=self.cfg.rate_limit,
        )

    def seal_all(self) -> None:
        """Seal every active segment that holds writes (before a clean stop's drain)."""
        for ns, na in self.namespaces.items():
            try:
                na.engine.rotate()
            except UnisonDBError as exc:
                log.warning("archive.seal_failed", namespace=ns, error=str(exc))

    def stop(self, drain: float = DRAIN_S) -> None:
        """Stop the scheduler and every archiver (after a short drain), then release the lease."""
        self._stop.set()
        if self._scheduler is not None:
            self._scheduler.join(60)
        if self._pruner is not None:
            self._pruner.join(60)
        for na in self.namespaces.values():
            na.archiver.stop(release=False, drain=drain)
        if all(na.archiver.state != "lease-lost" for na in self.namespaces.values()):
            try:
                self.lease.release()
            except UnisonDBError as exc:
                log.warning("archive.lease_not_released", error=str(exc))

    # -- snapshots ---------------------------------------------------------------------------

    def snapshot_due(self, ns: str, now: float) -> bool:
        if self.cfg.snapshot_interval <= 0:
            return False
        last = self.namespaces[ns].last_snapshot
        return last is None or now - float(last.get("time", 0)) >= self.cfg.snapshot_interval

    def snapshot(self, ns: str) -> SnapshotManifest:
        """Write a consistent snapshot and publish it with its manifest (blocking)."""
        from unisondb.backup.snapshot import write_snapshot

        na = self.namespaces[ns]
        if not self.lease.held:
            raise ArchiveUnavailable(
                f"archive {self.url} is not held by this server yet "
                f"(archiver state: {na.archiver.state}); retry shortly",
                hint=na.archiver.last_error,
            )
        with na.snapshot_lock:
            root = layout.backup_root(self.data_dir, ns)
            tmp = root / f".archive-snapshot-{os.getpid()}{fsutil.TMP_SUFFIX}"
            try:
                fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            except OSError as exc:
                raise from_os_error(exc, tmp) from exc
            try:
                try:
                    cp, size, _ = write_snapshot(na.engine, fd, tmp)
                finally:
                    os.close(fd)
                # A second snapshot of the same state at one LSN confirms the first (publish.py).
                manifest = publish_snapshot(
                    self.store,
                    self.url.prefix,
                    tmp,
                    namespace=ns,
                    history_id=cp.history,
                    lsn=cp.applied_lsn,
                    fingerprint=cp.fingerprint,
                    writer_id=self.writer_id,
                    archive_key=self.key,
                    created_at=self._wall(),
                    spool_dir=root,
                )
            finally:
                fsutil.remove_quietly(tmp)
            state = {
                "lsn": manifest.lsn,
                "time": manifest.created_at,
                "history": manifest.history_id,
                "key": manifest.snapshot_key,
            }
            _write_durably(
                layout.namespace_dir(self.data_dir, ns) / SNAPSHOT_STATE_FILE, json.dumps(state) + "\n"
            )
            na.last_snapshot = state
            na.snapshot_error = None
            self.metrics.last_snapshot.labels(ns).set(manifest.created_at)
            self.metrics.uploads.labels(ns, "snapshot").inc()
            self.metrics.upload_bytes.labels(ns, "snapshot").inc(manifest.snapshot_object_size)
            log.info(
                "archive.snapshot_published",
                namespace=ns,
                lsn=manifest.lsn,
                key=manifest.snapshot_key,
                bytes=size,
            )
            return manifest

    def _schedule_loop(self) -> None:
        while not self._stop.is_set():
            for ns in list(self.namespaces):
                if self._stop.is_set():
                    return
                if self.lease.held and self.snapshot_due(ns, self._wall()):
                    try:
                        self.snapshot(ns)
                    except UnisonDBError as exc:
                        self.namespaces[ns].snapshot_error = str(exc)
                        self.metrics.failures.labels(ns, "snapshot").inc()
                        log.warning("archive.snapshot_failed", namespace=ns, error=str(exc))
            self._stop.wait(SCHEDULE_POLL_S)

    # -- retention -----------------------------------------------------------------------------

    def prune(self, ns: str) -> PruneResult:
        """Apply the retention policy to one namespace now (blocking; the schedule calls it)."""
        na = self.namespaces[ns]
        if na.retention is None:
            raise InvalidRequest(
                "archive retention is off",
                hint="set --archive-retention-snapshots N or --archive-retention-age DURATION",
            )
        if not self.lease.held:
            raise ArchiveUnavailable(f"archive {self.url} is not held by this server yet; retry shortly")
        with na.snapshot_lock:
            now = self._wall()
            result = na.retention.prune(now)
        na.last_prune, na.last_prune_time, na.retention_error = result, now, None
        self.metrics.retention_last_run.labels(ns).set(now)
        if result.window_lsn is not None:
            self.metrics.retention_window_lsn.labels(ns).set(result.window_lsn)
        return result

    def _prune_loop(self) -> None:
        next_run = 0.0  # the first run as soon as the lease is held
        while not self._stop.is_set():
            if self.lease.held and time.monotonic() >= next_run:
                for ns in list(self.namespaces):
                    if self._stop.is_set():
                        return
                    try:
                        self.prune(ns)
                    except UnisonDBError as exc:
                        self.namespaces[ns].retention_error = str(exc)
                        self.metrics.failures.labels(ns, "retention").inc()
                        log.warning("archive.retention_failed", namespace=ns, error=str(exc))
                next_run = time.monotonic() + self.cfg.retention_interval
            self._stop.wait(SCHEDULE_POLL_S)

    def _read_state(self, ns: str) -> dict[str, Any] | None:
        path = layout.namespace_dir(self.data_dir, ns) / SNAPSHOT_STATE_FILE
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            # Only the schedule depends on it: a damaged file means "take one soon".
            log.warning("archive.snapshot_state_unreadable", path=str(path), error=str(exc))
            return None
        return raw if isinstance(raw, dict) else None

    # -- what /health and /metrics read ------------------------------------------------------

    def lags(self) -> Iterable[ArchiveLag]:
        now = time.time_ns()
        return [na.lag(now) for na in self.namespaces.values()]

    def collector(self) -> ArchiveCollector:
        return ArchiveCollector(self.lags)

    def health(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "url": str(self.url),
            "writer": self.writer_id,
            "encrypted": self.key is not None,
            "namespaces": {},
        }
        now = time.time_ns()
        for ns, na in self.namespaces.items():
            _, lag_lsns, lag_s, _ = na.lag(now)
            out["namespaces"][ns] = {
                "state": na.archiver.state,
                "archivedLsn": na.archiver.archived_lsn,
                "lagLsns": lag_lsns,
                "lagSeconds": round(lag_s, 3),
                "lastError": na.archiver.last_error,
                "lastSnapshotLsn": (na.last_snapshot or {}).get("lsn"),
                "lastSnapshotTime": (na.last_snapshot or {}).get("time"),
                "snapshotError": na.snapshot_error,
            }
            if na.retention is not None:
                prune = na.last_prune
                out["namespaces"][ns]["retention"] = {
                    "windowLsn": prune.window_lsn if prune else None,
                    "windowTime": prune.window_time if prune else None,
                    "lastRun": na.last_prune_time,
                    "error": na.retention_error,
                }
        return out
