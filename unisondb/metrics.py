"""Every Prometheus metric UnisonDB exports, bound to one injected ``CollectorRegistry``.

Backup counters are ordinary prometheus_client metrics; per-request counts and latencies
are ``RequestStats`` (plain lists, exposed at scrape time: every request records there). Engine
state (WAL bytes, fsyncs, rotations, segment ids, recovery) is read at scrape time by
``EngineCollector`` from counters the engine keeps anyway, so the write path pays
nothing for it.

Names follow ``unisondb_<subsystem>_<what>_<unit>``.
"""

from __future__ import annotations

import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

if TYPE_CHECKING:
    from unisondb.storage.engine import Engine

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
BACKUP_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600)


class Metrics:
    """All metric objects of one server process."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        # The *_created series double the exposition size and no alert of ours uses them.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = registry or CollectorRegistry()
        r = self.registry
        #: ``unisondb_http_requests_total`` and ``unisondb_http_request_duration_seconds``.
        self.requests = RequestStats(LATENCY_BUCKETS)
        r.register(self.requests)
        labels = ["namespace", "kind"]
        self.backup_success = Counter(
            "unisondb_backup_success_total", "Successful backups", labels, registry=r
        )
        self.backup_failure = Counter("unisondb_backup_failure_total", "Failed backups", labels, registry=r)
        self.backup_last_timestamp = Gauge(
            "unisondb_backup_last_timestamp_seconds",
            "Unix time of the last successful backup",
            labels,
            registry=r,
        )
        self.backup_bytes = Counter(
            "unisondb_backup_bytes_total", "Bytes written by successful backups", labels, registry=r
        )
        self.backup_last_bytes = Gauge(
            "unisondb_backup_last_bytes", "Bytes written by the last successful backup", labels, registry=r
        )
        self.backup_consecutive_failures = Gauge(
            "unisondb_backup_consecutive_failures",
            "Failed backups since the last success",
            labels,
            registry=r,
        )
        self.backup_duration = Histogram(
            "unisondb_backup_duration_seconds", "Backup duration", labels, buckets=BACKUP_BUCKETS, registry=r
        )
        self.backup_phase_seconds = Counter(
            "unisondb_backup_phase_seconds_total",
            "Seconds backups spent in each phase (backup/phases.py)",
            [*labels, "phase"],
            registry=r,
        )
        self.backup_wal_gap = Counter(
            "unisondb_backup_wal_gap_total",
            "WAL backup requests that asked for segments already deleted by retention",
            ["namespace"],
            registry=r,
        )
        self.fsync_seconds = Histogram(
            "unisondb_fsync_duration_seconds",
            "Duration of every fsync/fdatasync",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )

    def init_namespace(self, namespace: str) -> None:
        """Create every per-namespace backup series at 0, so the first failure after a start
        is visible to ``increase()`` in alert rules (a series that appears at 1 is not), and
        the document's ``grep`` of /metrics finds each one before the first backup.

        ``last_timestamp_seconds`` and ``last_bytes`` at 0 mean "no success since start";
        the alert rules ignore 0 (``> 0``) for both."""
        for kind in ("wal", "btree"):
            self.backup_success.labels(namespace, kind)
            self.backup_failure.labels(namespace, kind)
            self.backup_bytes.labels(namespace, kind)
            self.backup_consecutive_failures.labels(namespace, kind).set(0)
            self.backup_last_timestamp.labels(namespace, kind).set(0)
            self.backup_last_bytes.labels(namespace, kind).set(0)
            self.backup_duration.labels(namespace, kind)
        self.backup_wal_gap.labels(namespace)

    def record_backup(
        self,
        namespace: str,
        kind: str,
        ok: bool,
        nbytes: int,
        seconds: float,
        phases: dict[str, float] | None = None,
    ) -> None:
        self.backup_duration.labels(namespace, kind).observe(seconds)
        for phase, spent in (phases or {}).items():
            self.backup_phase_seconds.labels(namespace, kind, phase).inc(spent)
        if ok:
            self.backup_success.labels(namespace, kind).inc()
            self.backup_bytes.labels(namespace, kind).inc(nbytes)
            self.backup_last_bytes.labels(namespace, kind).set(nbytes)
            self.backup_last_timestamp.labels(namespace, kind).set(time.time())
            self.backup_consecutive_failures.labels(namespace, kind).set(0)
        else:
            self.backup_failure.labels(namespace, kind).inc()
            self.backup_consecutive_failures.labels(namespace, kind).inc()

    def watch_engines(self, engines: Callable[[], Iterable[Engine]]) -> None:
        self.registry.register(EngineCollector(engines))


class ArchiveMetrics:
    """The archiver's Prometheus series (``unisondb/archive/``), labelled by namespace.

    Counters and the last-success gauge are updated by the archiver as it works; the lag
    series are read at scrape time (``ArchiveCollector``)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.uploads = Counter(
            "unisondb_archive_uploads_total",
            "Objects published to the archive",
            ["namespace", "kind"],
            registry=r,
        )
        self.upload_bytes = Counter(
            "unisondb_archive_upload_bytes_total",
            "Bytes published to the archive",
            ["namespace", "kind"],
            registry=r,
        )
        self.failures = Counter(
            "unisondb_archive_failures_total", "Failed archive passes", ["namespace", "reason"], registry=r
        )
        self.retries = Counter(
            "unisondb_archive_retries_total",
            "Archive passes retried after a failure",
            ["namespace"],
            registry=r,
        )
        self.last_success = Gauge(
            "unisondb_archive_last_success_timestamp_seconds",
            "Unix time of the last successful upload",
            ["namespace"],
            registry=r,
        )
        self.archived_lsn = Gauge(
            "unisondb_archive_archived_lsn",
            "Last LSN of the newest segment confirmed in the archive",
            ["namespace"],
            registry=r,
        )
        self.pending = Gauge(
            "unisondb_archive_pending_segments",
            "Sealed local segments not yet confirmed in the archive",
            ["namespace"],
            registry=r,
        )
        self.last_snapshot = Gauge(
            "unisondb_archive_last_snapshot_timestamp_seconds",
            "Unix time of the last snapshot published to the archive (0: none since start)",
            ["namespace"],
            registry=r,
        )

        self.retention_deletions = Counter(
            "unisondb_archive_retention_deletions_total",
            "Objects archive retention deleted (kind: segment, snapshot, manifest)",
            ["namespace", "kind"],
            registry=r,
        )
        self.retention_window_lsn = Gauge(
            "unisondb_archive_retention_window_lsn",
            "Oldest LSN archive retention still promises to restore (-1: not pruned yet)",
            ["namespace"],
            registry=r,
        )
        self.retention_last_run = Gauge(
            "unisondb_archive_retention_last_run_timestamp_seconds",
            "Unix time of the last successful retention run (0: none since start)",
            ["namespace"],
            registry=r,
        )
        self.rate_limited = Counter(
            "unisondb_archive_rate_limited_seconds_total",
            "Seconds uploads waited for --archive-rate-limit",
            registry=r,
        )

    def init_namespace(self, namespace: str) -> None:
        """Series at 0 from the start, so ``increase()`` sees the first failure."""
        for kind in ("segment", "snapshot", "manifest"):
            self.retention_deletions.labels(namespace, kind)
        self.retention_window_lsn.labels(namespace).set(-1)
        self.retention_last_run.labels(namespace).set(0)
        for kind in ("segment", "snapshot"):
            self.uploads.labels(namespace, kind)
            self.upload_bytes.labels(namespace, kind)
        self.retries.labels(namespace)
        self.last_success.labels(namespace).set(0)
        self.last_snapshot.labels(namespace).set(0)
        self.pending.labels(namespace).set(0)


#: What ``ArchiveCollector`` reads per namespace at scrape time:
#: (namespace, lag in LSNs, lag in seconds, 1 if the last pass succeeded else 0).
ArchiveLag = tuple[str, int, float, int]


class ArchiveCollector(Collector):
    """Archive lag (the RPO an operator alerts on), computed when /metrics is scraped."""

    def __init__(self, lags: Callable[[], Iterable[ArchiveLag]]) -> None:
        self._lags = lags

    def collect(self) -> Iterator[Metric]:
        ns = ["namespace"]
        lsns = GaugeMetricFamily(
            "unisondb_archive_lag_lsns", "Newest acknowledged LSN minus the newest archived LSN", labels=ns
        )
        secs = GaugeMetricFamily(
            "unisondb_archive_lag_seconds",
            "Age of the oldest acknowledged write not yet in the archive (0: everything is archived)",
            labels=ns,
        )
        up = GaugeMetricFamily(
            "unisondb_archive_up", "1 if the archiver's last pass succeeded, else 0", labels=ns
        )
        for namespace, lag_lsns, lag_seconds, ok in self._lags():
            lsns.add_metric([namespace], lag_lsns)
            secs.add_metric([namespace], lag_seconds)
            up.add_metric([namespace], ok)
        yield from (lsns, secs, up)


class RequestStats(Collector):
    """Requests by (route, method, status) and their latency by route, counted in plain
    lists under one lock and turned into Prometheus families at scrape time.

    Every request records here, so it is built for that: one C lock, a dict lookup and a
    ``bisect`` per request, where a prometheus_client ``Counter`` plus ``Histogram`` took
    three locked increments and a Python loop over the buckets (bench/bench_read_path.py
    measures both). The exposition is the same as those metrics'."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        self._lock = threading.Lock()
        #: (route, method, status) → [count, that route's latency row]: one dict lookup per
        #: request. A row holds per-bucket counts (not cumulative; index len(bounds) is
        #: +Inf), then the sum; every key of one route shares its row.
        self._cells: dict[tuple[str, str, int], list[Any]] = {}
        self._latency: dict[str, list[float]] = {}

    def record(self, route: str, method: str, status: int, seconds: float) -> None:
        cell = self._cells.get((route, method, status))
        if cell is None:
            cell = self._new_cell(route, method, status)
        row = cell[1]
        with self._lock:
            cell[0] += 1
            row[bisect_left(self._bounds, seconds)] += 1
            row[-1] += seconds

    def _new_cell(self, route: str, method: str, status: int) -> list[Any]:
        with self._lock:
            row = self._latency.get(route)
            if row is None:
                row = self._latency[route] = [0.0] * (len(self._bounds) + 2)
            return self._cells.setdefault((route, method, status), [0, row])

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            counts = [(key, cell[0]) for key, cell in self._cells.items()]
            latency = [(route, list(row)) for route, row in self._latency.items()]
        total = CounterMetricFamily(
            "unisondb_http_requests",
            "HTTP requests by route, method and status",
            labels=["route", "method", "status"],
        )
        for (route, method, status), n in counts:
            total.add_metric([route, method, str(status)], n)
        hist = HistogramMetricFamily(
            "unisondb_http_request_duration_seconds", "HTTP request latency by route", labels=["route"]
        )
        for route, row in latency:
            buckets: list[tuple[str, float]] = []
            seen = 0.0
            for bound, in_bucket in zip((*map(floatToGoString, self._bounds), "+Inf"), row[:-1], strict=True):
                seen += in_bucket
                buckets.append((bound, seen))
            hist.add_metric([route], buckets, row[-1])
        yield from (total, hist)


class EngineCollector(Collector):
    """Reads WAL and recovery state from the engines at scrape time."""

    def __init__(self, engines: Callable[[], Iterable[Engine]]) -> None:
        self._engines = engines

    def collect(self) -> Iterator[Metric]:
        ns = ["namespace"]
        wal_bytes = CounterMetricFamily("unisondb_wal_bytes_written", "Bytes appended to the WAL", labels=ns)
        fsyncs = CounterMetricFamily("unisondb_wal_fsyncs", "WAL fdatasync calls", labels=ns)
        rotations = CounterMetricFamily("unisondb_wal_rotations", "WAL segment rotations", labels=ns)
        writes = CounterMetricFamily("unisondb_writes", "Acknowledged write requests", labels=ns)
        groups = CounterMetricFamily("unisondb_group_commits", "Group commits (one fsync each)", labels=ns)
        per_fsync = GaugeMetricFamily(
            "unisondb_group_commit_writes_per_fsync",
            "Acknowledged writes per group commit (one WAL fsync each) since start",
            labels=ns,
        )
        table_bytes = GaugeMetricFamily(
            "unisondb_memtable_bytes",
            "Bytes of acknowledged records not yet in LMDB (--ack wal; 0 otherwise)",
            labels=ns,
        )
        lmdb_lag = GaugeMetricFamily(
            "unisondb_lmdb_lag_records",
            "Acknowledged records LMDB does not hold yet (--ack wal; recovery replays them after a crash)",
            labels=ns,
        )
        table_full = CounterMetricFamily(
            "unisondb_memtable_full_waits",
            "Times a group commit waited because the in-memory table was full (backpressure)",
            labels=ns,
        )
        waits = CounterMetricFamily(
            "unisondb_group_commit_waits",
            "Group commits that waited (up to --group-commit-window) for more writers",
            labels=ns,
        )
        replayed = GaugeMetricFamily(
            "unisondb_recovery_records_replayed", "WAL records replayed at the last startup", labels=ns
        )
        rec_secs = GaugeMetricFamily(
            "unisondb_recovery_duration_seconds", "Duration of the last startup recovery", labels=ns
        )
        truncated = GaugeMetricFamily(
            "unisondb_recovery_torn_bytes_truncated",
            "Bytes of torn WAL tail cut at the last startup",
            labels=ns,
        )
        sealed_max = GaugeMetricFamily(
            "unisondb_wal_sealed_segment_max_id", "Highest sealed WAL segment id (0 if none)", labels=ns
        )
        oldest = GaugeMetricFamily(
            "unisondb_wal_oldest_segment_id", "Oldest WAL segment id still on disk", labels=ns
        )
        age = GaugeMetricFamily(
            "unisondb_wal_active_segment_age_seconds", "Age of the active WAL segment", labels=ns
        )
        last_lsn = GaugeMetricFamily("unisondb_wal_last_lsn", "Last LSN written", labels=ns)
        applied = GaugeMetricFamily("unisondb_checkpoint_lsn", "Last LSN applied to the B-tree", labels=ns)
        durable_failed = CounterMetricFamily(
            "unisondb_writes_durable_but_failed",
            "Writes answered 507 although their records were durable in the WAL (the disk "
            "stayed full longer than --disk-full-hold; they are applied once it is not)",
            labels=ns,
        )
        stalled = GaugeMetricFamily(
            "unisondb_writes_stalled", "1 while writes are refused because the disk is full", labels=ns
        )
        stalls = CounterMetricFamily(
            "unisondb_disk_full_stalls", "Times writes were stalled by a full disk", labels=ns
        )
        now = time.time_ns()
        for eng in self._engines():
            n = [eng.namespace]
            wal = eng.wal_stats(now)
            wal_bytes.add_metric(n, wal.bytes_written)
            fsyncs.add_metric(n, wal.fsyncs)
            rotations.add_metric(n, wal.rotations)
            writes.add_metric(n, eng.stats.ops_flushed)
            groups.add_metric(n, eng.stats.group_commits)
            per_fsync.add_metric(n, eng.writes_per_fsync)
            waits.add_metric(n, eng.stats.group_waits)
            table_bytes.add_metric(n, eng.table_bytes)
            lmdb_lag.add_metric(n, eng.lmdb_lag)
            table_full.add_metric(n, eng.table_full_waits)
            replayed.add_metric(n, eng.recovery.records_replayed)
            rec_secs.add_metric(n, eng.recovery.seconds)
            truncated.add_metric(n, wal.truncated_bytes)
            sealed_max.add_metric(n, wal.newest_sealed)
            oldest.add_metric(n, wal.oldest_segment)
            age.add_metric(n, wal.active_age_seconds)
            last_lsn.add_metric(n, eng.last_lsn)
            applied.add_metric(n, eng.applied_lsn)
            durable_failed.add_metric(n, eng.stats.durable_but_failed)
            stalled.add_metric(n, 1.0 if eng.stalled is not None else 0.0)
            stalls.add_metric(n, eng.stats.stalls)
        yield from (
            wal_bytes,
            fsyncs,
            rotations,
            writes,
            groups,
            per_fsync,
            waits,
            table_bytes,
            lmdb_lag,
            table_full,
            replayed,
            rec_secs,
            truncated,
            sealed_max,
            oldest,
            age,
            last_lsn,
            applied,
            durable_failed,
            stalled,
            stalls,
        )
