"""Engine: one namespace = one WAL + one LMDB B-tree, with group commit.

Write path (durable when the returned future resolves)::

    submit(entries) ──► queue ──► writer thread: take every queued request
                                   ├─ assign contiguous LSNs, encode records
                                   ├─ append to the active segment (rotate by size)
                                   ├─ ONE fdatasync for the whole group
                                   ├─ ack="wal" (default): into the in-memory table
                                   │  (the applier thread commits it to LMDB later)
                                   │  ack="lmdb": apply to LMDB + checkpoint in ONE transaction
                                   └─ resolve every request's future with its LSN

Concurrent writers therefore share one WAL fsync (and with ``ack="lmdb"`` one LMDB
commit). A request is acknowledged only after its record is on disk *and* visible to
readers.

Adaptive group commit: when other writers have been in flight recently (the peak number
of unanswered writes over the last groups is above one), the writer thread waits up to
``group_commit_window`` (250 µs) after taking a group for the writers still missing from
it, so one fsync serves all of them instead of two alternating cohorts. A writer that is
alone never waits: its latency is the same as without the window. Time comes from
``self.clock`` (a seam tests replace); ``wake()`` re-checks a waiting writer at once.

Answers to an event loop (``submit_async``): a write submitted from an asyncio loop gets
an ``asyncio.Future`` of that loop. The writer records every outcome of a group in an
outbox and hands the whole group's answers to each loop with ONE
``call_soon_threadsafe`` after the group (``_post_replies``), instead of one
thread-safe future, one callback and one loop wake-up per write.

Reads look in the in-memory table (``ack="wal"``), then in LMDB, from the caller's thread
(read transactions never block on the writer).

``ack="wal"`` (``--ack wal``, the default): a group is acknowledged once its WAL fdatasync returned and
its records are in the in-memory table (``memtable.py``), which readers check before
LMDB; the applier thread (``applier.py``) commits the table to LMDB in large
transactions, each with its checkpoint (the same one-transaction rule), in LSN order.
LMDB then lags the WAL by at most the table's bound (bytes and records); when the table
is full the writer waits before its next group (backpressure). A segment is sealed only
after the applier caught up with its last record (``_drain``), because its footer needs
the fingerprint after it. A crash loses the table and recovery replays it from the WAL
(docs/ARCHITECTURE.md "Acknowledging at the WAL"). An LMDB failure then comes after the
acknowledgement: the records stay visible in the table, new writes are refused (stall)
until the applier's retry succeeds.

Failure policy (a full disk is a state, not a death; docs/OPERATIONS.md "Disk full"):

* a failed WAL write (ENOSPC) is cut back off the segment and fails the requests whose
  records it held (507); the next group simply tries again;
* a failed WAL fdatasync: those records may or may not be on disk, so they are cut off
  again and the cut is synced; then they fail (507) and their LSNs are handed out again;
* a failed seal (footer write or its fsync) is cut back likewise: the segment stays the
  active one and is sealed by a later rotation;
* an LMDB failure *after* the WAL is durable (ENOSPC, which LMDB often reports as EIO, or a
  failed map growth): the records are durable, so they are kept as **pending** and the
  engine is **stalled**: new writes get 507 at once, reads go on, and the writer retries
  the apply every ``disk_full_retry`` seconds (``_housekeeping``; tests call
  ``retry_now``). The stalled group's requests wait up to ``disk_full_hold`` for a retry to
  succeed and are then acknowledged; after that they are answered 507 although durable,
  counted in ``stats.durable_but_failed`` (``unisondb_writes_durable_but_failed_total``);
* a sealed segment whose successor cannot be created (ENOSPC) stalls the engine the same
  way until the retry creates it.

A segment is never sealed while durable records are not yet applied (its footer records
the state fingerprint after its last record). Only a failure that cannot be cut back (the
truncate itself fails: the segment's end is unknown) or a bug stops the engine for good
(``Unavailable`` until restarted; recovery then replays the WAL).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import structlog

from unisondb.errors import (
    CorruptSnapshot,
    InvalidRequest,
    NoSpace,
    PayloadTooLarge,
    PermissionDenied,
    StorageError,
    Unavailable,
    UnisonDBError,
    from_os_error,
)
from unisondb.storage import fingerprint, fsutil, history, layout, record, snapfile
from unisondb.storage.applier import Applier
from unisondb.storage.btree import BTree, Checkpoint
from unisondb.storage.history import Lineage, fork_segment_id
from unisondb.storage.lockfile import NamespaceLock
from unisondb.storage.memtable import MemTable
from unisondb.storage.options import EngineConfig
from unisondb.storage.record import Entry, EntryKind, Record
from unisondb.storage.recovery import RecoveryResult, recover
from unisondb.storage.wal import SegmentInfo, Wal

log = structlog.get_logger(__name__)

#: Groups over which the peak number of writers in flight is remembered (adaptive commit).
_CONCURRENCY_GROUPS = 64
#: ``Engine._wake_at`` while the writer thread is not waiting: no write needs to wake it.
_BUSY = 1 << 62


@dataclass(frozen=True, slots=True)
class WalStats:
    """What ``/metrics`` shows of one namespace's WAL (``Engine.wal_stats``)."""

    bytes_written: int
    fsyncs: int
    rotations: int
    #: Bytes of torn tail cut off when the WAL was opened.
    truncated_bytes: int
    #: Highest sealed segment id (0: none) and the oldest segment id on disk (0: none).
    newest_sealed: int
    oldest_segment: int
    #: Seconds since the active segment was created (0.0: no active segment).
    active_age_seconds: float


class _LoopReply:
    """The writer's side of an ``asyncio.Future`` (``submit_async``): it has the three
    methods the writer uses of a ``concurrent.futures.Future`` and puts the outcome in the
    engine's outbox; ``Engine._post_replies`` delivers the outbox on the loop."""

    __slots__ = ("future", "loop", "outbox", "settled")

    def __init__(
        self, future: asyncio.Future[Any], loop: asyncio.AbstractEventLoop, outbox: list[Any]
    ) -> None:
        self.future = future
        self.loop = loop
        self.outbox = outbox
        self.settled = False

    def done(self) -> bool:
        return self.settled

    def set_result(self, value: Any) -> None:
        self.settled = True
        self.outbox.append((self, value, None))

    def set_exception(self, exc: BaseException) -> None:
        self.settled = True
        self.outbox.append((self, None, exc))


def _deliver(items: list[tuple[_LoopReply, Any, BaseException | None]]) -> None:
    """On the event loop: settle the futures of one group's answers (a future its caller
    cancelled meanwhile is left alone)."""
    for reply, value, exc in items:
        fut = reply.future
        if fut.done():
            continue
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(value)


@dataclass(slots=True)
class _Request:
    entries: tuple[Entry, ...] | None  # None = a control command
    future: Future[Any] | _LoopReply
    command: str = ""
    #: Bytes of its WAL record (``record.encoded_size``, computed once at submit).
    size: int = 0


@dataclass(slots=True)
class EngineStats:
    ops_received: int = 0
    ops_flushed: int = 0
    group_commits: int = 0
    records_written: int = 0
    #: Writes answered 507 whose records were durable in the WAL (applied later or replayed).
    durable_but_failed: int = 0
    #: Times the engine entered the disk-full (stalled) state, and left it.
    stalls: int = 0
    resumes: int = 0
    #: Groups that waited for more writers (adaptive group commit), and for how long.
    group_waits: int = 0
    group_wait_seconds: float = 0.0


@dataclass(slots=True)
class _Pending:
    """Durable WAL records that LMDB has not taken yet, and the requests still waiting."""

    records: list[Record]
    segment_id: int
    end: int
    requests: list[_Request]
    since: float  # time.monotonic() of the first failure


class _ApplyFailed(Exception):
    """LMDB refused records that are already durable in the WAL (mid-group rotation)."""

    def __init__(self, error: UnisonDBError, count: int, segment_id: int, end: int) -> None:
        super().__init__(error.message)
        self.error, self.count, self.segment_id, self.end = error, count, segment_id, end


class Engine:
    """The storage engine of one namespace. Create with ``Engine.open``; close with ``close``."""

    def __init__(self, data_dir: Path, namespace: str, config: EngineConfig) -> None:
        self.data_dir = data_dir
        self.namespace = namespace
        self.config = config
        self.stats = EngineStats()
        self._queue: deque[_Request] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self._failed: UnisonDBError | None = None
        self._thread: threading.Thread | None = None
        self._lock = NamespaceLock(layout.lock_path(data_dir, namespace))
        self.btree: BTree
        self.wal: Wal
        self.recovery: RecoveryResult
        self._next_lsn = 1
        self._last_time_ns = 0
        self._checkpoint = Checkpoint()
        #: Highest LSN known to be in a durable LMDB state (after an explicit env sync).
        self._durable_lsn = 0
        self._last_retention_check = 0.0
        #: Set once any byte of the group being committed reached the WAL.
        self._group_wrote = False
        #: (segment id, start offset) of the last record appended, for ``offset()``.
        self._last_record = (0, 0)
        #: Records of the group being committed already applied (before a mid-group seal).
        self._applied_in_group = 0
        #: Archiving (``enable_archiving``): retention asks ``_retention_guard`` before it
        #: deletes a sealed segment; the active segment is sealed ``_seal_after`` seconds
        #: after its first record; ``_on_sealed`` is told of every seal.
        self._retention_guard: Callable[[int], bool] | None = None
        self._seal_after = 0.0
        self._on_sealed: Callable[[], None] | None = None
        #: Where the active segment ended before the last unsynced append (for a cut back).
        self._unsynced_mark: tuple[int, int, int, int, int, int] | None = None
        #: Why writes are refused right now (a full disk), None while accepting.
        self._stalled: UnisonDBError | None = None
        self._pending: _Pending | None = None
        self._next_retry = 0.0
        #: Monotonic clock of the group-commit window (a seam: tests install their own).
        self.clock: Callable[[], float] = time.monotonic
        #: Wall clock (ns) that segment ages are measured by: ``--wal-segment-max-age`` and
        #: the archive's seal interval (a seam: tests install their own and ``housekeep``).
        self.wall_clock: Callable[[], int] = time.time_ns
        #: Writes of the group being committed whose answers are not out yet (zeroed just
        #: before the answers go out, so a client coming straight back is not counted
        #: twice); with the queue, the writes in flight. Peak of that count over the
        #: current and the previous run of ``_CONCURRENCY_GROUPS`` groups:
        self._committing = 0
        self._peak_now = 0
        self._peak_prev = 0
        self._peak_groups = 0
        #: Queued writes at which ``_enqueue`` wakes the writer (``_BUSY``: it is not waiting).
        self._wake_at = _BUSY
        #: Test seam: while set the writer takes no group (``pause_writer``).
        self._writer_paused = False
        #: ``ack="wal"``: acknowledged records not yet in LMDB, and the thread applying them.
        self._table: MemTable | None = None
        self._applier: Applier | None = None
        #: Highest LSN acknowledged (durable in the WAL and visible to readers).
        self._acked_lsn = 0
        #: Answers of ``submit_async`` writes not yet handed to their loops (``_LoopReply``).
        self._outbox: list[tuple[_LoopReply, Any, BaseException | None]] = []

    # --- lifecycle ---

    @classmethod
    def open(
        cls,
        data_dir: Path,
        namespace: str,
        config: EngineConfig | None = None,
        *,
        on_locked: Callable[[Path], object] | None = None,
    ) -> Engine:
        """Lock the namespace, recover, and start the writer thread.

        ``on_locked(backup_root)`` runs once the namespace lock is held, after the ``.tmp``
        files there were removed: the backup layer finishes interrupted publications
        (``backup.repair``) without the storage layer importing it."""
        layout.validate_namespace(namespace)
        eng = cls(data_dir, namespace, config or EngineConfig())
        ns_dir = layout.namespace_dir(data_dir, namespace)
        try:
            fsutil.make_dirs(ns_dir)
            fsutil.make_dirs(layout.backup_root(data_dir, namespace))
        except OSError as exc:
            raise from_os_error(exc, ns_dir) from exc
        eng._lock.acquire()
        try:
            eng._recover(on_locked)
        except BaseException:
            eng._lock.release()
            raise
        if eng.config.ack == "wal":
            eng._table = MemTable(eng.config.memtable_bytes, eng.config.memtable_max_lag)
            eng._applier = Applier(
                eng._table,
                eng.btree,
                eng._checkpoint,
                retry=eng.config.disk_full_retry,
                interval=eng.config.apply_interval,
                on_error=eng._apply_refused,
                on_recovered=eng._apply_recovered,
                name=f"lmdb-applier-{namespace}",
            )
            eng._applier.start()
        eng._thread = threading.Thread(target=eng._writer_loop, name=f"wal-writer-{namespace}", daemon=True)
        eng._thread.start()
        return eng

    def _recover(self, on_locked: Callable[[Path], object] | None) -> None:
        removed = fsutil.clean_tmp_files(layout.backup_root(self.data_dir, self.namespace))
        removed += fsutil.clean_tmp_files(layout.wal_dir(self.data_dir, self.namespace))
        if on_locked is not None:
            on_locked(layout.backup_root(self.data_dir, self.namespace))
        if removed:
            log.warning(
                "startup.removed_tmp_files", namespace=self.namespace, files=[str(p) for p in removed]
            )
        self.btree = BTree(
            layout.btree_dir(self.data_dir, self.namespace), map_size=self.config.map_size, serving=True
        )
        if (inst := self.btree.installed) is not None:  # a snapshot copied in by hand
            log.info(
                "startup.snapshot_installed",
                path=str(inst.path),
                bytes=inst.trailer.data_len,
                verify_seconds=round(inst.verify_seconds, 3),
            )
        self.wal = None  # type: ignore[assignment]
        try:
            self._claim_btree()
            installed = self._check_installed_snapshot()
            self.wal = Wal.open(
                layout.wal_dir(self.data_dir, self.namespace),
                self.namespace,
                preallocate=self.config.wal_preallocate,
                segment_size=self.config.segment_size,
            )
            self.recovery = recover(self.wal, self.btree)
            rcp = self.recovery.checkpoint
            fork_reason = "a snapshot was installed by hand" if installed else self._fork_reason(rcp)
            # Every start begins a fresh segment: the previous active one is sealed (so it can
            # be backed up and is immutable), and ids keep growing past anything the
            # checkpoint has seen (a snapshot copied in from elsewhere included). Its footer
            # gets the state fingerprint only if that state is the one after its last record.
            act = self.wal.active
            tip = act is not None and act.header.history == rcp.history and act.last_lsn == rcp.applied_lsn
            self.wal.seal_active_if_nonempty(rcp.fingerprint if tip else None)
            cp, next_id = self._settle_history(rcp, fork_reason)
            self.wal.start_segment(next_id, cp.lineage, self.recovery.next_lsn, cp.fingerprint)
            if installed:  # the fork is durable (checkpoint synced, segment created)
                self._installed_marker().unlink()
                fsutil.fsync_dir(self._installed_marker().parent)
            self._last_record = self._find_last_record()
        except BaseException:
            if self.wal is not None:
                self.wal.close()
            self.btree.close()
            raise
        self.btree.sync()
        self._checkpoint = cp
        self._durable_lsn = cp.applied_lsn
        self._acked_lsn = cp.applied_lsn
        self._next_lsn = self.recovery.next_lsn
        self._last_time_ns = cp.time_ns
        log.info(
            "engine.opened",
            namespace=self.namespace,
            applied_lsn=cp.applied_lsn,
            replayed=self.recovery.records_replayed,
            timeline=cp.timeline,
            history=history.show(cp.history),
            fingerprint=fingerprint.short(cp.fingerprint),
            segment=next_id,
        )

    def _installed_marker(self) -> Path:
        return layout.btree_dir(self.data_dir, self.namespace) / snapfile.INSTALL_MARKER

    def _check_installed_snapshot(self) -> bool:
        """A snapshot installed by hand: prove its content once, before anything uses it.

        Its bytes were checked against its trailer; here every key/value pair is hashed
        and compared with the fingerprint its checkpoint recorded (one full scan, once per
        installed file), so a snapshot altered and re-trailed is refused too."""
        if not self._installed_marker().exists():
            return False
        scanned, cp = self.btree.scan_fingerprint()
        if scanned.state() != cp.fp_state:
            path = layout.btree_dir(self.data_dir, self.namespace) / "data.mdb"
            raise CorruptSnapshot(
                f"{path}: the installed snapshot does not hold the state it recorded (its "
                f"pairs hash to {fingerprint.short(scanned.digest())}, its checkpoint says "
                f"{fingerprint.short(cp.fingerprint)} at LSN {cp.applied_lsn})",
                hint="copy another snapshot (or an older one) to it, or run 'unisondb restore'",
            )
        log.info(
            "startup.snapshot_content_verified",
            namespace=self.namespace,
            keys=self.btree.count(),
            fingerprint=fingerprint.short(cp.fingerprint),
        )
        return True

    def _settle_history(self, cp: Checkpoint, reason: str | None) -> tuple[Checkpoint, int]:
        """Decide which history this run writes on; return its checkpoint and next segment id.

        * a namespace without a history (new) gets a fresh one;
        * a B-tree that continues the WAL beside it keeps its history;
        * anything else forks a new history at the checkpoint (see ``history.py``): a
          snapshot copied in by hand, a WAL whose segment holding the checkpoint is missing.
          Continuing the old history there would hand out (history, LSN) pairs and segment
          ids that the old server may already have used for other data.
        """
        sealed_max = self.wal.max_segment_id()
        if not cp.lineage.is_set and cp.applied_lsn == 0:
            cp = self.btree.apply([], cp.on_lineage(Lineage.create(), 0))
            return cp, max(sealed_max, cp.segment_id) + 1
        if reason is None:
            # A fork's first segment may be gone (it was empty, and the last start dropped
            # it): ids then continue from where the fork put them, never below.
            return cp, max(sealed_max, cp.segment_id, cp.timeline_first_segment - 1) + 1
        known = max(sealed_max, layout.max_backup_segment_id(self.data_dir, self.namespace))
        next_id = fork_segment_id(known, cp.segment_id)
        old = cp.lineage
        cp = self.btree.apply([], cp.on_lineage(old.fork(cp.applied_lsn), next_id))
        self.btree.sync()
        log.warning(
            "engine.forked_history",
            namespace=self.namespace,
            reason=reason,
            parent=history.show(old.history),
            history=history.show(cp.history),
            fork_lsn=cp.applied_lsn,
            timeline=cp.timeline,
            first_segment=next_id,
        )
        return cp, next_id

    def _fork_reason(self, cp: Checkpoint) -> str | None:
        """Why the B-tree is not the continuation of the local WAL (None: it is)."""
        if not cp.lineage.is_set:
            return None  # a new namespace: it gets a history of its own, not a fork
        for s in self.wal.segments():
            if s.history == cp.history and s.first_lsn <= cp.applied_lsn + 1 and s.last_lsn >= cp.applied_lsn:
                return None
        return (
            f"no local WAL segment of history {history.short(cp.history)} holds the "
            f"checkpoint (LSN {cp.applied_lsn}, segment {cp.segment_id}): data.mdb was "
            "installed from elsewhere or its WAL is gone"
        )

    def _claim_btree(self) -> None:
        """Refuse a data.mdb that another namespace wrote; label an unlabelled one as ours."""
        owner = self.btree.read_namespace()
        if owner is None:
            self.btree.write_namespace(self.namespace)
        elif owner != self.namespace:
            path = layout.btree_dir(self.data_dir, self.namespace) / "data.mdb"
            raise StorageError(
                f"{path} belongs to namespace {owner!r}, not {self.namespace!r}",
                hint=f"copy a snapshot only into <data-dir>/{owner}/db/, or load it into this "
                f"namespace deliberately with 'unisondb restore --namespace {self.namespace}'",
            )

    def close(self, readers_until: float | None = None) -> bool:
        """Finish queued writes, seal, sync and close. Idempotent.

        LMDB is closed only once no reader is left (a snapshot's copy reads it). With
        ``readers_until`` (a ``time.monotonic()`` deadline) the wait is bounded: if a
        reader is still inside LMDB then, the environment is left open (closing it under
        a live read would crash the process) and False is returned; the caller then ends
        the process without touching it again."""
        with self._cond:
            if self._closing:
                return True
            self._closing = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
        drained = True
        if self._applier is not None:
            # Everything acknowledged goes to LMDB before the seal (its footer needs the
            # state after it); if LMDB refuses, the WAL still holds it for the next start.
            self._applier.resume()  # (a test may have paused it)
            if self._applier.error is not None:
                self._applier.retry_now(timeout=5.0)
            drained = self._applier.drain()
            self._applier.stop()
            self._checkpoint = self._applier.checkpoint
        try:
            if self._stalled is not None and drained:
                self._try_resume()  # one last chance to apply what is pending
            self._answer_held(force=True)
            if self.wal.active is not None and self._failed is None and self._pending is None and drained:
                self.wal.sync()
                # A clean stop seals: the last writes are then in a segment that a WAL
                # backup can copy (only sealed segments are backed up). It also starts the
                # next (empty) segment, which records where the LSNs stand: a later loss
                # of the sealed tail segment is then an LsnGap, not a silent rollback.
                # On a full disk this may fail: the next start seals instead.
                try:
                    self.wal.rotate(self._next_lsn, self._checkpoint.fingerprint)
                except (OSError, UnisonDBError) as exc:
                    log.warning(
                        "engine.close_seal_failed",
                        namespace=self.namespace,
                        error=str(_as_storage_error(exc, self.wal.dir)),
                    )
            self.btree.sync()
        finally:
            self._post_replies()  # answers given after the writer stopped (held writes)
            self.wal.close()
            wait = None if readers_until is None else readers_until - time.monotonic()
            idle = self.btree.wait_readers(wait if wait is not None else 1e9)
            if idle:
                self.btree.close()
            else:
                log.error(
                    "engine.close_abandoned_reader",
                    namespace=self.namespace,
                    note="a reader (snapshot copy) is still inside LMDB at the "
                    "shutdown deadline: the environment is left open and the "
                    "process exits without closing it",
                )
            self._lock.release()
        return idle

    # --- writes ---

    def submit(self, entries: tuple[Entry, ...] | list[Entry]) -> Future[int]:
        """Queue one atomic write; the future resolves to its LSN once durable and visible."""
        entries = tuple(entries)
        future: Future[int] = Future()
        self._enqueue(_Request(entries, future, size=_validate_entries(entries)))
        return future

    def submit_async(
        self, entries: tuple[Entry, ...] | list[Entry], loop: asyncio.AbstractEventLoop
    ) -> asyncio.Future[int]:
        """``submit`` for a caller on ``loop`` (call it there): the returned future of that
        loop resolves to the LSN once durable and visible. Answers reach the loop once per
        group commit, not once per write (module docstring)."""
        entries = tuple(entries)
        size = _validate_entries(entries)
        fut: asyncio.Future[int] = loop.create_future()
        self._enqueue(_Request(entries, _LoopReply(fut, loop, self._outbox), size=size))
        return fut

    def _post_replies(self) -> None:
        """Hand the answers in the outbox to their loops: one wake-up per loop. Runs on the
        writer thread after every group, and in ``close`` (after the writer stopped)."""
        if not self._outbox:
            return
        items = self._outbox[:]
        del self._outbox[: len(items)]
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_LoopReply, Any, BaseException | None]]] = {}
        for item in items:
            by_loop.setdefault(item[0].loop, []).append(item)
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, batch)
            except RuntimeError:  # the loop is closed: nobody is waiting for these answers
                pass

    def _enqueue(self, req: _Request) -> None:
        with self._cond:
            if self._closing:
                raise Unavailable(f"namespace {self.namespace} is shutting down")
            if self._failed is not None:
                raise Unavailable(
                    f"namespace {self.namespace} stopped accepting writes after a storage "
                    f"failure: {self._failed.message}",
                    hint="fix the cause and restart the server; recovery replays the WAL",
                )
            if self._stalled is not None and req.command not in ("retry", "housekeep"):
                raise self._refusal(self._stalled)  # 507 at once; reads go on
            queue = self._queue
            queue.append(req)
            if req.entries is None:
                self._cond.notify()  # a command ends any wait at once
                return
            self.stats.ops_received += 1
            inflight = len(queue) + self._committing
            if inflight > self._peak_now:
                self._peak_now = inflight
            # Wake the writer only when it waits for this many queued writes (one while it
            # idles; the writers still missing from its group inside the window; never
            # while it is busy: it looks at the queue before it waits again). A wake-up per
            # write cost a futex call here and a GIL hand-off to the writer for each.
            if len(queue) >= self._wake_at:
                self._cond.notify()

    def write(self, entries: tuple[Entry, ...] | list[Entry]) -> int:
        return self.submit(entries).result()

    def put(self, key: bytes, value: bytes) -> int:
        return self.write([Entry(EntryKind.PUT, key, value)])

    def delete(self, key: bytes) -> int:
        return self.write([Entry(EntryKind.DELETE, key)])

    def rotate(self) -> int | None:
        """Seal the active segment if it holds records; return its id (None if it was empty)."""
        return self._command("rotate")  # type: ignore[no-any-return]

    def housekeep(self) -> None:
        """Run the writer's between-groups work now (age-based seals, retention, the
        disk-full retry timer) and return once it ran: what the writer thread does on its
        own when idle or after a group. A seam for tests that move ``wall_clock``."""
        self._command("housekeep")

    def retry_now(self) -> bool:
        """Retry the work a full disk stopped, now (what ``disk_full_retry`` does
        periodically); True if the engine accepts writes afterwards. A test seam and an
        operator's shortcut: it never waits for the timer."""
        return bool(self._command("retry"))

    def _command(self, command: str) -> Any:
        """Run a control command on the writer thread, after the writes queued before it."""
        future: Future[Any] = Future()
        self._enqueue(_Request(None, future, command))
        return future.result()

    @staticmethod
    def _refusal(cause: UnisonDBError) -> UnisonDBError:
        """A fresh error (never one instance raised in many threads) saying why."""
        cls = type(cause) if type(cause) in (NoSpace, PermissionDenied, StorageError) else StorageError
        return cls(
            cause.message,
            hint="writes are refused until the storage accepts them "
            "again; free space and they resume by themselves (reads still work)",
        )

    @property
    def stalled(self) -> UnisonDBError | None:
        """Why writes are refused (a full disk), or None."""
        return self._stalled

    # --- reads ---

    def get(self, key: bytes) -> bytes | None:
        """The newest acknowledged value: from the in-memory table if the key is there
        (``--ack wal``; it is dropped only after LMDB committed it), else from LMDB."""
        table = self._table
        if table is not None:
            hit = table.lookup(key)
            if hit is not None:
                return hit[1]
        return self.btree.get(key)

    def checkpoint(self) -> Checkpoint:
        return self.btree.read_checkpoint()

    def catch_up(self, timeout: float | None = None) -> bool:
        """Wait until LMDB holds every write acknowledged before this call (``--ack wal``;
        at once otherwise). False if LMDB is refusing writes or ``timeout`` passed."""
        if self._applier is None:
            return True
        return self._applier.wait_applied(self._acked_lsn, timeout)

    def snapshot_to(self, f: BinaryIO, *, compact: bool = True) -> Checkpoint:
        """A consistent copy of LMDB (``BTree.snapshot_to``, or ``BTree.copy_plain_to`` when not
        ``compact``) holding every write acknowledged before the call: with ``--ack wal`` the
        applier catches up first, so a snapshot-only backup never misses a write that was
        answered 200 before it was requested."""
        if not self.catch_up():
            assert self._applier is not None
            raise self._applier.error or Unavailable(f"namespace {self.namespace} is shutting down")
        return self.btree.snapshot_to(f) if compact else self.btree.copy_plain_to(f)

    @property
    def applied_lsn(self) -> int:
        """Last LSN applied to the B-tree (equal to ``last_lsn`` between group commits,
        behind it by the in-memory table with ``--ack wal``)."""
        if self._applier is not None:
            return self._applier.checkpoint.applied_lsn
        return self._checkpoint.applied_lsn

    @property
    def last_lsn(self) -> int:
        """Last LSN acknowledged (durable and visible). LSNs handed out to a group still
        being written are not reported: if that group fails they are given out again."""
        return max(self._acked_lsn, self.applied_lsn)

    @property
    def table_bytes(self) -> int:
        """Bytes of acknowledged records not yet in LMDB (0 unless ``--ack wal``)."""
        return self._table.bytes if self._table is not None else 0

    def key_count(self) -> int:
        """Live keys, acknowledged writes in the in-memory table included."""
        if self._table is None:
            return self.btree.count()
        return self._table.count_keys(self.btree.count_with)

    @property
    def table_full_waits(self) -> int:
        """Group commits that waited for room in the in-memory table (backpressure)."""
        return self._table.full_waits if self._table is not None else 0

    @property
    def lmdb_lag(self) -> int:
        """Acknowledged records LMDB does not hold yet (one read of LMDB's LSN: the applier
        may commit a group before the writer has counted it acknowledged)."""
        applied = self.applied_lsn
        return max(self._acked_lsn, applied) - applied

    def offset(self) -> tuple[int, int]:
        """(segment id, start offset) of the last record appended; zeros before the first."""
        act = self.wal.active
        if act is not None and act.count:
            return act.header.segment_id, act.last_record_offset
        return self._last_record

    def _find_last_record(self) -> tuple[int, int]:
        """Position of the newest record on disk (scans at most one sealed segment)."""
        from unisondb.storage import segment

        for info in reversed(self.wal.sealed_segments()):
            if info.count:
                recs = segment.scan(info.path).records
                return info.segment_id, recs[-1][1]
        return 0, 0

    def segments(self) -> list[SegmentInfo]:
        """Every segment on disk (sealed and active), ascending by id."""
        return self.wal.segments()

    def wal_stats(self, now_ns: int | None = None) -> WalStats:
        """Counters and positions of the WAL for ``/metrics`` (``now_ns``: a clock seam)."""
        wal = self.wal
        segs = wal.segments()
        act = wal.active
        now = time.time_ns() if now_ns is None else now_ns
        return WalStats(
            bytes_written=wal.bytes_written,
            fsyncs=wal.fsyncs,
            rotations=wal.rotations,
            truncated_bytes=wal.report.truncated_bytes,
            newest_sealed=max((s.segment_id for s in segs if s.sealed), default=0),
            oldest_segment=segs[0].segment_id if segs else 0,
            active_age_seconds=(now - act.header.created_ns) / 1e9 if act is not None else 0.0,
        )

    def wal_sync_latency(self) -> tuple[float, float]:
        """(``time.monotonic()`` when the last WAL fsync ended, its seconds); (0, 0) before the
        first. Read without a lock from any thread (a tuple is replaced whole): backup pacing."""
        return self.wal.last_sync

    @property
    def data_file(self) -> Path:
        """LMDB's ``data.mdb`` of this namespace (what a snapshot copies)."""
        return self.btree.path / "data.mdb"

    def free_fraction(self) -> float:
        """Share of LMDB's pages no B-tree uses (``BTree.free_fraction``)."""
        return self.btree.free_fraction()

    def sealed_segments(self) -> list[SegmentInfo]:
        """Sealed (immutable) segments, ascending by id: id, path, LSN range, history id
        (``lineage.history``) and the state fingerprint after the last record, all from the
        v2 header and footer. Safe to call from any thread."""
        return self.wal.sealed_segments()

    # --- archiving hooks (unisondb/archive/service.py) ---

    def enable_archiving(
        self,
        is_archived: Callable[[int], bool],
        seal_after: float,
        on_sealed: Callable[[], None] | None = None,
    ) -> None:
        """Turn on the archive's two demands on the engine.

        * retention never deletes a sealed segment for which ``is_archived(id)`` is False,
          whatever its age (a hole in the archive could never be filled again);
        * a non-empty active segment is sealed once its first record is ``seal_after``
          seconds old, so every write reaches a sealed (archivable) segment within about
          that long. ``on_sealed`` is called on the writer thread after every seal; it must
          not block (the archiver's ``wake``)."""
        with self._cond:
            self._retention_guard = is_archived
            self._seal_after = seal_after
            self._on_sealed = on_sealed
            self._cond.notify()

    def rotate_if_idle_since(self, seconds: float, now_ns: int | None = None) -> bool:
        """Whether the active segment holds a record older than ``seconds`` (it is then due
        to be sealed by the archive interval). Pure: the writer thread does the seal."""
        act = self.wal.active
        if act is None or not act.count:
            return False
        now_ns = self.wall_clock() if now_ns is None else now_ns
        return now_ns - act.min_time_ns >= seconds * 1e9

    def oldest_unarchived_ns(self, is_archived: Callable[[int], bool]) -> int | None:
        """Record time of the oldest write not in an archived segment (None: all archived).
        The archive lag in seconds is now minus this."""
        for info in self.wal.segments():
            if info.count and not (info.sealed and is_archived(info.segment_id)):
                return info.min_time_ns
        return None

    # --- the writer thread ---

    def _writer_loop(self) -> None:
        while True:
            with self._cond:
                while (not self._queue or self._writer_paused) and not self._closing:
                    self._wake_at = 1
                    self._cond.wait(timeout=self._idle_timeout())
                    self._wake_at = _BUSY
                    if not self._queue and not self._writer_paused:
                        break
                if not self._queue and self._closing:
                    return
                group = self._take_group()
                if group:
                    self._gather(group)
                    self._committing = sum(1 for r in group if r.entries is not None)
            try:
                if group:
                    self._commit_group(group)
                    self._post_replies()  # the answers go out before any housekeeping
                self._housekeeping()
            except Exception as exc:  # a bug or an unexpected failure: never die silently
                log.exception("engine.writer_crashed", namespace=self.namespace)
                self._fail(StorageError(f"WAL writer failed: {exc!r}"), group)
            finally:
                self._group_done(group)
                self._post_replies()

    def _gather(self, group: list[_Request]) -> None:
        """Adaptive group commit (``self._cond`` held): with other writers recently in
        flight, wait up to ``group_commit_window`` for as many to join as were in flight
        at the peak. Alone (peak of one), never wait."""
        window = self.config.group_commit_window
        target = max(self._peak_now, self._peak_prev)
        if window <= 0 or target < 2 or len(group) >= target or group[-1].entries is None:
            return
        started = self.clock()
        deadline = started + window
        size = sum(r.size for r in group)
        while not self._closing:
            while self._queue and size < self.config.max_group_bytes and group[-1].entries is not None:
                req = self._queue.popleft()
                group.append(req)
                size += req.size
            if len(group) >= target or group[-1].entries is None or size >= self.config.max_group_bytes:
                break
            remaining = deadline - self.clock()
            if remaining <= 0:
                break
            self._wake_at = target - len(group)  # (the queue is empty here)
            self._cond.wait(remaining)
            self._wake_at = _BUSY
        self.stats.group_waits += 1
        self.stats.group_wait_seconds += self.clock() - started

    def _group_done(self, group: list[_Request]) -> None:
        """The group is answered (or failed): it no longer counts as in flight."""
        if not group:
            return
        with self._cond:
            self._committing = 0
            self._peak_groups += 1
            if self._peak_groups >= _CONCURRENCY_GROUPS:
                # A burst ends: after two runs of groups its peak no longer makes a lone
                # writer wait.
                self._peak_prev, self._peak_now, self._peak_groups = self._peak_now, len(self._queue), 0

    # --- test seams for the writer thread ---

    def pause_writer(self) -> None:
        """Make the writer thread take no new group until ``resume_writer`` (a test seam:
        queue several writes, then let them be taken together)."""
        with self._cond:
            self._writer_paused = True

    def resume_writer(self) -> None:
        with self._cond:
            self._writer_paused = False
            self._cond.notify_all()

    def wake(self) -> None:
        """Make a writer waiting in the group-commit window look at ``clock`` again now."""
        with self._cond:
            self._cond.notify_all()

    def _idle_timeout(self) -> float:
        if self._stalled is not None:
            return self.config.disk_full_retry
        age = self.config.segment_max_age
        timeout = min(age / 4, 30.0) if age > 0 else 30.0
        if self._seal_after > 0:
            # Wake often enough to seal within about a tenth of the archive interval late.
            timeout = min(timeout, max(self._seal_after / 10, 0.01))
        return timeout

    def _take_group(self) -> list[_Request]:
        group: list[_Request] = []
        size = 0
        while self._queue and size < self.config.max_group_bytes:
            req = self._queue.popleft()
            group.append(req)
            if req.entries is None:
                break  # control commands run alone, after the writes queued before them
            size += req.size
        return group

    def _commit_group(self, group: list[_Request]) -> None:
        if group[-1].entries is None:
            writes, command = group[:-1], group[-1]
        else:
            writes, command = group, None
        if writes:
            self._commit_writes(writes)
        if command is not None:
            self._run_command(command)

    def _commit_writes(self, writes: list[_Request]) -> None:
        if self._failed is not None:
            for req in writes:
                req.future.set_exception(Unavailable(f"namespace {self.namespace} is failed"))
            return
        if self._stalled is not None:  # queued before the stall began: never written
            for req in writes:
                req.future.set_exception(self._refusal(self._stalled))
            return
        if self._table is not None and not self._table.wait_room(self._room_never_comes, self.clock):
            for req in writes:  # LMDB refuses and the table is full: never written
                req.future.set_exception(
                    self._refusal(self._stalled or StorageError("LMDB is refusing writes"))
                )
            return
        records: list[Record] = []
        try:
            seg_id, end = self._append(writes, records)
            self._sync_appended()
        except _ApplyFailed as af:
            self._ack(writes[: self._applied_in_group], records)
            for req in writes[af.count :]:  # never appended
                req.future.set_exception(af.error)
            self._stall_pending(
                records[self._applied_in_group : af.count],
                writes[self._applied_in_group : af.count],
                af.segment_id,
                af.end,
                af.error,
            )
            return
        except UnisonDBError as exc:
            self._group_failed(writes, records, exc)
            return
        if self._table is not None:
            # Durable: visible through the table now, in LMDB once the applier is there.
            done = self._applied_in_group
            self._table.add(records[done:], seg_id, end, sum(r.size for r in writes[done:]))
            self._ack(writes, records)
            return
        try:
            self._apply(records[self._applied_in_group :], seg_id, end)
        except UnisonDBError as exc:
            self._ack(writes[: self._applied_in_group], records)
            self._stall_pending(
                records[self._applied_in_group :], writes[self._applied_in_group :], seg_id, end, exc
            )
            return
        self._ack(writes, records)

    def _ack(self, writes: list[_Request], records: list[Record]) -> None:
        if not writes:
            return
        self._committing = 0  # before the answers: a client's next write is not "another"
        self.stats.ops_flushed += len(writes)
        self.stats.group_commits += 1
        self.stats.records_written += len(writes)
        for req, rec in zip(writes, records, strict=False):
            if rec.lsn > self._acked_lsn:
                self._acked_lsn = rec.lsn
            if not req.future.done():
                req.future.set_result(rec.lsn)

    def _group_failed(self, writes: list[_Request], records: list[Record], exc: UnisonDBError) -> None:
        """A WAL write, fsync or seal failed: what was applied before a mid-group rotation
        is durable and acknowledged; the rest is not in the WAL (cut back) and fails."""
        done = self._applied_in_group
        self._ack(writes[:done], records)
        act = self.wal.active
        if act is not None and act.broken:
            # The cut back failed: the segment's end is unknown. Only recovery can decide.
            self._fail(exc, writes)
            return
        if records[done:]:
            self._next_lsn = records[done].lsn  # never durable: handed out again
        for req in writes[done:]:
            req.future.set_exception(exc)
        if act is None:  # sealed, but the next segment could not be created
            self._stall(exc)

    def _sync_appended(self) -> None:
        """fdatasync what was appended; on failure cut it off again, durably, and raise."""
        act = self.wal.active
        if act is None or self._unsynced_mark is None:
            return
        try:
            self.wal.sync()
        except OSError as exc:
            act.rollback(self._unsynced_mark)
            raise from_os_error(exc, act.path) from exc
        finally:
            self._unsynced_mark = None

    def _stall_pending(
        self, records: list[Record], writes: list[_Request], seg_id: int, end: int, exc: UnisonDBError
    ) -> None:
        """LMDB refused durable records: keep them, refuse new writes, retry later."""
        if not records:
            return
        self._pending = _Pending(records, seg_id, end, list(writes), time.monotonic())
        log.error(
            "engine.apply_failed",
            namespace=self.namespace,
            error=str(exc),
            first_lsn=records[0].lsn,
            last_lsn=records[-1].lsn,
            note="the records are durable in the WAL and are applied once LMDB takes them again",
        )
        self._stall(exc)
        self._answer_held()

    def _stall(self, exc: UnisonDBError) -> None:
        with self._cond:
            first = self._stalled is None
            self._stalled = exc
        if first:
            self.stats.stalls += 1
            log.error(
                "engine.stalled",
                namespace=self.namespace,
                error=str(exc),
                retry_seconds=self.config.disk_full_retry,
            )
        self._next_retry = time.monotonic() + self.config.disk_full_retry

    def _answer_held(self, *, force: bool = False) -> None:
        """Answer pending requests that waited ``disk_full_hold``: 507, although durable."""
        p = self._pending
        if p is None or not p.requests:
            return
        if not force and time.monotonic() - p.since < self.config.disk_full_hold:
            return
        exc = self._stalled or Unavailable(f"namespace {self.namespace} is shutting down")
        n = 0
        for req in p.requests:
            if not req.future.done():
                req.future.set_exception(exc)
                n += 1
        p.requests = []
        self.stats.durable_but_failed += n
        if n:
            log.warning(
                "engine.durable_writes_answered_failed",
                namespace=self.namespace,
                writes=n,
                first_lsn=p.records[0].lsn,
                last_lsn=p.records[-1].lsn,
                note="these writes are in the WAL and will be visible once applied",
            )

    def _try_resume(self) -> bool:
        """Retry what the full disk stopped: apply pending records, create the segment a
        rotation still owes. True (and accepting writes again) if everything succeeded."""
        if self._stalled is None:
            return True
        if self._applier is not None and not self._applier.retry_now():
            return False  # LMDB still refuses the table (its own retry timer goes on)
        p = self._pending
        try:
            if p is not None:
                self._apply(p.records, p.segment_id, p.end)
                self._pending = None
                self._ack(p.requests, p.records)
            if self.wal.active is None:
                self.wal.start_unstarted()
        except (OSError, UnisonDBError) as exc:
            self._stall(_as_storage_error(exc, self.wal.dir))
            self._answer_held()
            return False
        with self._cond:
            self._stalled = None
        self.stats.resumes += 1
        log.info("engine.resumed", namespace=self.namespace, applied_lsn=self.applied_lsn)
        return True

    # --- ack="wal": the applier's calls and the writer's waits ---

    def _drain(self) -> bool:
        """Wait until LMDB holds every acknowledged record (``--ack wal``), so the state
        fingerprint after the active segment's last record is known; False if LMDB refuses."""
        if self._applier is None:
            return True
        ok = self._applier.drain()
        if ok:
            self._checkpoint = self._applier.checkpoint
        return ok

    def _room_never_comes(self) -> bool:
        """While the writer waits for room in the table: give up if LMDB is refusing (the
        applier keeps running while the engine closes, so room comes then too)."""
        return self._applier is not None and self._applier.error is not None

    def _apply_refused(self, exc: UnisonDBError) -> None:
        """Applier thread: LMDB refused acknowledged records; refuse new writes until it takes them."""
        log.error(
            "engine.apply_failed",
            namespace=self.namespace,
            error=str(exc),
            note="the records are acknowledged, durable in the WAL and visible; they are "
            "applied once LMDB takes them again",
        )
        self._stall(exc)

    def _apply_recovered(self) -> None:
        """Applier thread: LMDB took the table again; accept writes unless something else
        (a segment a rotation still owes) keeps the engine stalled."""
        with self._cond:
            if self._stalled is None or self.wal.active is None or self._pending is not None:
                return
            self._stalled = None
        self.stats.resumes += 1
        log.info("engine.resumed", namespace=self.namespace, applied_lsn=self.applied_lsn)

    def pause_applier(self) -> None:
        """Test seam (``--ack wal``): apply nothing to LMDB until ``resume_applier``."""
        assert self._applier is not None, "pause_applier needs ack='wal'"
        self._applier.pause()

    def resume_applier(self) -> None:
        assert self._applier is not None, "resume_applier needs ack='wal'"
        self._applier.resume()

    def _apply(self, records: list[Record], seg_id: int, end: int) -> None:
        """Apply durable records to LMDB with the checkpoint after them (one transaction)."""
        if records:
            self._checkpoint = self.btree.apply(
                records, self._checkpoint.advance(records[-1].lsn, seg_id, end, records[-1].time_ns)
            )

    def _append(self, writes: list[_Request], records: list[Record]) -> tuple[int, int]:
        """Encode and write the group, rotating by size between records."""
        self._applied_in_group = 0
        chunk: list[bytes] = []
        meta: list[tuple[int, int, int]] = []
        chunk_bytes = 0
        seg_id, end = 0, 0
        if self.wal.active is None:
            raise StorageError(f"namespace {self.namespace} has no active WAL segment")
        for req in writes:
            assert req.entries is not None
            now = max(time.time_ns(), self._last_time_ns)
            self._last_time_ns = now
            lsn = self._next_lsn
            data = record.encode(lsn, now, req.entries)
            active = self.wal.active
            if (active.count or chunk) and active.size + chunk_bytes + len(data) > self.config.segment_size:
                if chunk:
                    seg_id, end = self._flush_chunk(chunk, meta)
                chunk, meta, chunk_bytes = [], [], 0
                self._seal_and_advance(records, seg_id, end)
                active = self.wal.active
            chunk.append(data)
            meta.append((lsn, now, len(data)))
            chunk_bytes += len(data)
            records.append(Record(lsn, now, req.entries))
            self._next_lsn += 1
        if chunk:
            seg_id, end = self._flush_chunk(chunk, meta)
        return seg_id, end

    def _flush_chunk(self, chunk: list[bytes], meta: list[tuple[int, int, int]]) -> tuple[int, int]:
        active = self.wal.active
        if active is None:
            raise StorageError(f"namespace {self.namespace} has no active WAL segment")
        mark = active.mark()
        try:
            result = self.wal.append(b"".join(chunk), meta)
        except OSError as exc:
            raise from_os_error(exc, active.path) from exc
        self._unsynced_mark = mark
        return result

    def _seal_and_advance(self, records: list[Record], seg_id: int, end: int) -> None:
        # Rotation mid-group: the records already written must be durable before sealing,
        # and applied, because the footer records the state fingerprint after them.
        self._sync_appended()
        todo = records[self._applied_in_group :]
        if self._table is not None:
            self._table.add(todo, seg_id, end)
            self._applied_in_group = len(records)
            if not self._drain():
                assert self._applier is not None
                err = self._applier.error or Unavailable(f"namespace {self.namespace} is shutting down")
                raise _ApplyFailed(err, len(records), seg_id, end)
        elif todo:
            try:
                self._apply(todo, seg_id, end)
            except UnisonDBError as exc:
                raise _ApplyFailed(exc, len(records), seg_id, end) from exc
        self._applied_in_group = len(records)
        try:
            self._rotate()
        except OSError as exc:
            raise from_os_error(exc, self.wal.dir) from exc

    def _rotate(self) -> int | None:
        """Seal the active segment and start the next. A failed seal is cut back (the
        segment stays active); a failed start leaves no active segment until a retry
        (``_try_resume``). Only a ``broken`` segment stops the engine."""
        act = self.wal.active
        if act is None:
            self.wal.start_unstarted()
            return None
        if act.count and not self._drain():
            assert self._applier is not None
            raise self._applier.error or Unavailable(f"namespace {self.namespace} is shutting down")
        if act.count:
            self._last_record = (act.header.segment_id, act.last_record_offset)
        sealed = self.wal.rotate(self._next_lsn, self._checkpoint.fingerprint)
        if sealed is not None and self._on_sealed is not None:
            self._on_sealed()
        return sealed

    def _rotation_failed(self, exc: BaseException, writes: list[_Request]) -> UnisonDBError:
        err = _as_storage_error(exc, self.wal.dir)
        act = self.wal.active
        if act is not None and act.broken:
            self._fail(err, writes)
        elif act is None:
            self._stall(err)
        else:
            log.warning(
                "wal.rotation_failed",
                namespace=self.namespace,
                error=str(err),
                note="the segment stays active; a later rotation seals it",
            )
        return err

    def _fail(self, exc: UnisonDBError, writes: list[_Request]) -> None:
        log.error("engine.failed", namespace=self.namespace, error=str(exc))
        self._failed = exc
        for req in writes:
            if not req.future.done():
                req.future.set_exception(exc)

    def _run_command(self, req: _Request) -> None:
        if self._failed is not None:
            req.future.set_exception(Unavailable(f"namespace {self.namespace} is failed"))
            return
        if req.command == "retry":
            req.future.set_result(self._try_resume())
            return
        if req.command == "housekeep":
            self._housekeeping()
            req.future.set_result(None)
            return
        if req.command != "rotate":
            req.future.set_exception(StorageError(f"unknown engine command {req.command}"))
            return
        if self._stalled is not None:
            req.future.set_exception(self._refusal(self._stalled))
            return
        try:
            req.future.set_result(self._rotate())
        except (OSError, UnisonDBError) as exc:
            err = self._rotation_failed(exc, [req])
            if not req.future.done():
                req.future.set_exception(err)

    def _housekeeping(self) -> None:
        """Age-based rotation and retention; runs on the writer thread between groups."""
        if self._failed is not None:
            return
        if self._stalled is not None:
            if time.monotonic() >= self._next_retry:
                self._try_resume()
            return
        act = self.wal.active
        by_age = (
            act is not None
            and act.count
            and self.config.segment_max_age > 0
            and self.wall_clock() - act.header.created_ns > self.config.segment_max_age * 1e9
        )
        if by_age or (self._seal_after > 0 and self.rotate_if_idle_since(self._seal_after)):
            try:
                self._rotate()
            except (OSError, UnisonDBError) as exc:
                self._rotation_failed(exc, [])
                return
        try:
            now = time.monotonic()
            # With archiving on, segments wait for the archive rather than only for age, so
            # check more often (a short --wal-retention then frees disk soon after upload).
            period = 30.0 if self._retention_guard is None else min(30.0, max(self.config.retention, 1.0))
            if now - self._last_retention_check > period:
                self._last_retention_check = now
                self._apply_retention()
        except (OSError, UnisonDBError) as exc:
            log.error("engine.housekeeping_failed", namespace=self.namespace, error=str(exc))

    def _apply_retention(self) -> None:
        """Delete sealed segments the durable checkpoint has passed and retention allows."""
        cutoff_ns = time.time_ns() - int(self.config.retention * 1e9)
        candidates = [
            s for s in self.wal.sealed_segments() if s.max_time_ns < cutoff_ns and s.created_ns < cutoff_ns
        ]
        if not candidates:
            return
        # The checkpoint is read BEFORE the sync, so it names a durable state: with --ack
        # wal the applier may commit meanwhile, and a commit after the sync is not durable
        # yet (MDB_NOMETASYNC). (A sealed segment's records were committed before its seal,
        # on this thread, so they are covered either way; this keeps the name honest.)
        committed = self._lmdb_checkpoint().applied_lsn
        self.btree.sync()  # everything committed so far is now durable
        self._durable_lsn = committed
        guard = self._retention_guard
        for s in candidates:
            if guard is not None and not guard(s.segment_id):
                # Not yet in the archive: age alone never deletes it (docs/ARCHIVE.md).
                log.info("wal.retention_kept_unarchived", namespace=self.namespace, segment=s.segment_id)
                continue
            if s.last_lsn <= self._durable_lsn:
                log.info("wal.retention_delete", namespace=self.namespace, segment=s.segment_id)
                self.wal.delete_segment(s.segment_id)

    def _lmdb_checkpoint(self) -> Checkpoint:
        """The checkpoint LMDB holds now (the applier's with ``--ack wal``)."""
        return self._applier.checkpoint if self._applier is not None else self._checkpoint

    def describe(self) -> dict[str, Any]:
        act = self.wal.active
        # One read of each: the fingerprint, timeline and appliedLsn are of the same LMDB
        # state even while the applier commits (``--ack wal``), and the lag is their gap.
        cp = self._lmdb_checkpoint()
        last = max(self._acked_lsn, cp.applied_lsn)
        return {
            "namespace": self.namespace,
            "opsReceived": self.stats.ops_received,
            "opsFlushed": self.stats.ops_flushed,
            "currentSegment": act.header.segment_id if act else 0,
            "currentOffset": act.size if act else 0,
            "lastLsn": last,
            "timeline": cp.timeline,
            "history": history.show(cp.history),
            "fingerprint": cp.fingerprint.hex(),
            "keys": self.key_count(),
            "groupCommits": self.stats.group_commits,
            "writesPerFsync": round(self.writes_per_fsync, 2),
            "ack": self.config.ack,
            "appliedLsn": cp.applied_lsn,
            "lmdbLagRecords": last - cp.applied_lsn,
            "memtableBytes": self.table_bytes,
            "memtableFullWaits": self.table_full_waits,
        }

    @property
    def writes_per_fsync(self) -> float:
        """Acknowledged writes per group commit (one WAL fsync each), since start."""
        return self.stats.ops_flushed / self.stats.group_commits if self.stats.group_commits else 0.0


def _as_storage_error(exc: BaseException, path: Path) -> UnisonDBError:
    if isinstance(exc, UnisonDBError):
        return exc
    if isinstance(exc, OSError):
        return from_os_error(exc, path)
    return StorageError(repr(exc))


def _validate_entries(entries: tuple[Entry, ...]) -> int:
    """Refuse a write no record can hold; return its record's size in bytes."""
    if not entries:
        raise InvalidRequest("a write needs at least one entry")
    size = record.encoded_size(entries)
    if size - record.HEADER_SIZE > record.MAX_BODY:
        raise PayloadTooLarge(
            f"write is {size} bytes as a WAL record; the maximum is {record.MAX_BODY} bytes"
        )
    for e in entries:
        if not e.key:
            raise InvalidRequest("key cannot be empty")
        if len(e.key) > record.MAX_KEY:
            raise InvalidRequest(f"key is {len(e.key)} bytes; the maximum is {record.MAX_KEY} bytes (UTF-8)")
    return size
