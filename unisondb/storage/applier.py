"""The applier thread (``--ack wal``): moves acknowledged records from the table into LMDB.

It takes the oldest batches of the in-memory table (``memtable.py``), a few thousand
records at a time, and applies them with ``BTree.apply`` in ONE transaction together with
the checkpoint after the last of them (DESIGN §2.4's rule, unchanged): LMDB therefore
always holds exactly the state after some WAL record, named by its checkpoint, and the
state fingerprint is updated from the old values LMDB holds, which are right because
batches are applied in LSN order and nothing else writes LMDB meanwhile. Only after the
commit are the records dropped from the table, so a reader that misses the table finds
them in LMDB.

Each transaction costs LMDB's commit fsync, on the same disk as the WAL's fdatasync that
every acknowledgement waits for. So under load the applier commits at most once per
``interval`` seconds (after one commit, the next waits until ``interval`` has passed since
it began), in one larger transaction, and at once when something cannot wait: the table is
full (the writer is held by backpressure) or holds ``BATCH_RECORDS`` records, a seal needs
the table applied (``drain``), a caller waits for LMDB (``wait_applied``: a snapshot, a
catch-up), the applier is stopping; and once no write arrived for ``IDLE_GAP`` (5 ms: the
writes paused, nothing to compete with). A write alone after a quiet spell is applied at once.
The lag this adds is bounded by ``interval`` (and, as before, by the table's bounds).

If LMDB refuses a transaction (a full disk) the records stay in the table (still
visible, still durable in the WAL), ``on_error`` stalls the engine (new writes are
refused, reads go on) and the applier retries every ``retry`` seconds or when asked
(``retry_now``). ``on_recovered`` is called after the first success that follows.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

import structlog

from unisondb.errors import StorageError, UnisonDBError
from unisondb.storage import memtable, testseam
from unisondb.storage.btree import BTree, Checkpoint
from unisondb.storage.memtable import MemTable
from unisondb.storage.record import EntryKind
from unisondb.storage.walk import Op

log = structlog.get_logger(__name__)

#: With ``interval``: a table that received nothing for this long is applied at once.
IDLE_GAP = 0.005

#: Records per LMDB transaction (about; one batch is never split).
BATCH_RECORDS = memtable.WAKE_RECORDS


def _net_effect(batches: list[memtable.Batch]) -> list[Op]:
    """The records of ``batches`` as ``BTree.apply_ops`` pairs with the same effect: the
    last value of each key (None: deleted), keys in the order first written (LMDB ends in
    the same state, and the fingerprint, a function of the state, is the same: ``h(k, v0)``
    out and ``h(k, vn)`` in, the values between cancel). A key written n times in a
    transaction then costs one LMDB write and two hashes instead of n and 2n."""
    put = EntryKind.PUT
    net: dict[bytes, bytes | None] = {}
    for b in batches:
        for rec in b.records:
            for e in rec.entries:
                net[e.key] = e.value if e.kind == put else None
    return list(net.items())


class Applier:
    def __init__(
        self,
        table: MemTable,
        btree: BTree,
        checkpoint: Checkpoint,
        *,
        retry: float,
        interval: float = 0.0,
        on_error: Callable[[UnisonDBError], None],
        on_recovered: Callable[[], None],
        name: str = "lmdb-applier",
    ) -> None:
        self.table = table
        self.btree = btree
        #: The checkpoint LMDB holds (read by the engine from any thread).
        self.checkpoint = checkpoint
        self.error: UnisonDBError | None = None
        self.transactions = 0
        self._retry = retry
        self._interval = interval
        #: ``IDLE_GAP`` (tests that hold LMDB behind on purpose make it long).
        self.idle_gap = IDLE_GAP
        #: ``time.monotonic()`` when the last transaction began (-inf: none yet, so the
        #: first is due at once). Not 0: the monotonic clock counts from boot, so on a
        #: machine up for less than ``interval`` a 0 would hold the first commit back.
        self._last_commit = -math.inf
        #: Callers inside ``wait_applied`` (they make the next transaction start at once).
        self._waiters = 0
        self._on_error = on_error
        self._on_recovered = on_recovered
        self._paused = False
        #: Writers waiting in ``drain`` (a seal needs the table applied, paused or not).
        self._draining = 0
        #: A batch taken from the table is being applied (``pause`` waits for it).
        self._busy = False
        self._stop = False
        self._kicked = False
        self._attempts = 0
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _loop(self) -> None:
        cond = self.table.cond
        while True:
            with cond:
                while not self._stop:
                    if self.table.empty() or (self._paused and not self._draining):
                        cond.wait()
                        continue
                    left = self._wait_left()
                    if left <= 0:
                        break
                    cond.wait(left)
                if self._stop:
                    return
                self._busy = True
                self._last_commit = time.monotonic()
            try:
                error = self._apply_oldest()
            finally:
                with cond:
                    self._busy = False
                    cond.notify_all()
            if error is not None:
                self._failed(error)

    def _wait_left(self) -> float:
        """Seconds until the next transaction is due (``table.cond`` held; see the module
        docstring): 0 when something waits for it."""
        t = self.table
        if self._interval <= 0 or self._draining or self._waiters or t.full() or t.records >= BATCH_RECORDS:
            return 0.0
        # Deferring only pays while writes keep coming (their fsyncs are what an LMDB
        # commit would compete with): once none came for IDLE_GAP, commit now, so LMDB
        # does not stay behind a quiet WAL for the rest of the interval.
        due = min(self._last_commit + self._interval, t.last_add + self.idle_gap)
        return due - time.monotonic()

    def _apply_oldest(self) -> UnisonDBError | None:
        """One LMDB transaction: the oldest batches of the table and their checkpoint."""
        batches = self.table.pending(BATCH_RECORDS)
        last = batches[-1]
        tail = last.records[-1]
        testseam.hold("apply")
        try:
            cp = self.btree.apply_ops(
                _net_effect(batches),
                self.checkpoint.advance(tail.lsn, last.segment_id, last.end, tail.time_ns),
            )
        except UnisonDBError as exc:
            return exc
        except Exception as exc:  # a bug: stall rather than die silently
            log.exception("applier.crashed")
            return StorageError(f"LMDB applier failed: {exc!r}")
        self.checkpoint = cp
        self.transactions += 1
        recovered = self.error is not None
        with self.table.cond:
            self.error = None
            self._attempts += 1
        self.table.applied(batches)  # notifies drain() waiters
        if recovered:
            self._on_recovered()
        return None

    def _failed(self, exc: UnisonDBError) -> None:
        cond = self.table.cond
        first = self.error is None
        with cond:
            self.error = exc
            self._attempts += 1
            cond.notify_all()
        if first:
            self._on_error(exc)
        with cond:
            if not self._kicked and not self._stop:
                cond.wait(self._retry)
            self._kicked = False

    # --- the engine's calls ---

    def drain(self) -> bool:
        """Wait until every record in the table is in LMDB; False if LMDB is refusing.

        The writer calls this before it seals a segment (the footer needs the state after
        its last record), so it applies the table even while the applier is paused
        (``pause``): a paused applier would otherwise hold the writer forever."""
        cond = self.table.cond
        with cond:
            self._draining += 1
            cond.notify_all()
            try:
                while not self.table.empty():
                    if self.error is not None or self._stop:
                        return False
                    cond.wait()
            finally:
                self._draining -= 1
        return True

    def wait_applied(self, lsn: int, timeout: float | None = None) -> bool:
        """Wait until LMDB holds every record up to ``lsn`` (from any thread; records added
        meanwhile are not waited for); False if LMDB is refusing or the wait timed out."""
        cond = self.table.cond
        with cond:
            self._waiters += 1
            cond.notify_all()  # (an applier waiting out its interval starts now)
            try:
                return cond.wait_for(
                    lambda: self.checkpoint.applied_lsn >= lsn or self.error is not None or self._stop,
                    timeout,
                ) and (self.checkpoint.applied_lsn >= lsn)
            finally:
                self._waiters -= 1

    def retry_now(self, timeout: float = 30.0) -> bool:
        """Retry a refused transaction now; True if the table could be applied."""
        cond = self.table.cond
        with cond:
            if self.error is None:
                return True
            seen = self._attempts
            self._kicked = True
            cond.notify_all()
            cond.wait_for(lambda: self._attempts > seen or self._stop, timeout)
            return self.error is None

    def stop(self) -> None:
        with self.table.cond:
            self._stop = True
            self.table.cond.notify_all()
        if self._thread.is_alive():
            self._thread.join()

    # --- test seams ---

    def pause(self) -> None:
        """Apply nothing until ``resume`` (the table fills; writes meet backpressure), except
        what a seal needs (``drain``). Returns once no transaction is in progress, so LMDB's
        files and ``checkpoint`` stay still until the next seal or ``resume``."""
        with self.table.cond:
            self._paused = True
            self.table.cond.wait_for(lambda: not self._busy)

    def resume(self) -> None:
        with self.table.cond:
            self._paused = False
            self.table.cond.notify_all()
