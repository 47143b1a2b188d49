"""The B-tree: one LMDB environment per namespace at ``<ns>/db/`` (file ``data.mdb``).

Two named sub-databases:

* ``kv``   user keys → values;
* ``meta`` the checkpoint (``b"checkpoint"``, format below), written in the **same**
  transaction as the data it describes, so any copy of ``data.mdb`` knows exactly
  which WAL records it already contains; and ``b"namespace"``, the owning namespace.

Checkpoint value (344 bytes, little-endian)::

    Offset  Size  Field
    0       8     applied_lsn   last WAL record applied (0 = none)
    8       8     segment_id    segment holding that record
    16      8     offset        offset just past that record in its segment
    24      8     timeline      human-friendly history counter (see history.py)
    32      8     time_ns       time of the applied record
    40      8     timeline_first_segment
                                first segment id written on this history after a fork
                                (0 = since the beginning); lower ids are a previous history
    48      16    history       history id this state belongs to (zero: not yet assigned)
    64      16    parent        the history this one forked from (zero: none)
    80      8     fork_lsn      last LSN shared with ``parent``
    88      256   fp_state      state fingerprint of the ``kv`` database (fingerprint.py)

(A 48-byte checkpoint is format 1, a pre-release without history or fingerprint: refused.)

Durability: LMDB runs with ``metasync=False``: every commit still fsyncs its data
pages, and LMDB guarantees that a crash can at most undo the *last* commit, never
corrupt the file. The WAL holds everything acknowledged, so an undone commit is
replayed on the next start. We never use ``sync=False`` (a crash could then corrupt).
"""

from __future__ import annotations

import errno
import os
import struct
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO

import lmdb

from unisondb.errors import CorruptLog, UnisonDBError, from_os_error
from unisondb.storage import fsutil, lmdberrors, lmdbfile, snapfile, testseam
from unisondb.storage.fingerprint import EMPTY_STATE, Fingerprint, state_digest
from unisondb.storage.history import NO_HISTORY, Lineage
from unisondb.storage.record import EntryKind, Record

CHECKPOINT_KEY = b"checkpoint"
#: The namespace this environment belongs to (UTF-8), so a data.mdb copied into the wrong
#: namespace directory is refused instead of silently mixed with that namespace's WAL.
NAMESPACE_KEY = b"namespace"
CHECKPOINT = struct.Struct("<QQQQQQ16s16sQ256s")
DEFAULT_MAP_SIZE = 1 << 30  # 1 GiB of address space to start; grows by doubling
#: Bytes per ``f.write`` of a plain copy (``BTree.copy_plain_to``).
PLAIN_COPY_CHUNK = 1 << 20
#: The window of ``data.mdb`` a plain copy asks the kernel to read ahead (``WILLNEED``).
PLAIN_COPY_READ_AHEAD = 8 << 20


@dataclass(frozen=True, slots=True)
class Checkpoint:
    applied_lsn: int = 0
    segment_id: int = 0
    offset: int = 0
    timeline: int = 1
    time_ns: int = 0
    timeline_first_segment: int = 0
    history: bytes = NO_HISTORY
    parent: bytes = NO_HISTORY
    fork_lsn: int = 0
    fp_state: bytes = EMPTY_STATE

    def encode(self) -> bytes:
        return CHECKPOINT.pack(
            self.applied_lsn,
            self.segment_id,
            self.offset,
            self.timeline,
            self.time_ns,
            self.timeline_first_segment,
            self.history,
            self.parent,
            self.fork_lsn,
            self.fp_state,
        )

    @property
    def lineage(self) -> Lineage:
        return Lineage(self.history, self.parent, self.fork_lsn, self.timeline)

    @property
    def fingerprint(self) -> bytes:
        """Digest of the state fingerprint (what footers, snapshots and the API show)."""
        return state_digest(self.fp_state)

    def advance(self, lsn: int, segment_id: int, offset: int, time_ns: int) -> Checkpoint:
        """The position after records up to ``lsn`` on the same history (``BTree.apply``
        then sets the fingerprint of the state they produce)."""
        return replace(self, applied_lsn=lsn, segment_id=segment_id, offset=offset, time_ns=time_ns)

    def on_lineage(self, lineage: Lineage, first_segment: int) -> Checkpoint:
        """The same state, now the start of ``lineage`` (a new or forked history)."""
        return replace(
            self,
            timeline=lineage.timeline,
            history=lineage.history,
            parent=lineage.parent,
            fork_lsn=lineage.fork_lsn,
            timeline_first_segment=first_segment,
        )

    @classmethod
    def decode(cls, raw: bytes) -> Checkpoint:
        if len(raw) == 48:
            raise CorruptLog(
                "checkpoint is format 1 (a pre-release without history ids or state fingerprint)",
                hint="restore this namespace from a backup written by this "
                "version, or run the pre-release build to export it",
            )
        if len(raw) != CHECKPOINT.size:
            raise CorruptLog(f"checkpoint record has {len(raw)} bytes, expected {CHECKPOINT.size}")
        return cls(*CHECKPOINT.unpack(raw))


class _ReadWriteLock:
    """Readers share; the map-resize path excludes them (LMDB requires no live txns).

    ``read()`` hands out one reused guard object whose ``__enter__``/``__exit__`` take the
    plain (C) lock once each, and the condition is only waited on or notified when a
    resize is pending. A ``@contextmanager`` generator and two ``Condition`` blocks per
    read cost more than the LMDB lookup itself (bench/bench_read_path.py).

    ``BTree.get`` (every GET) does not even take that lock: it puts one item in
    ``getting`` for the length of its lookup and then checks ``_writer``; a resize sets
    ``_writer`` and then waits until ``getting`` is empty. Each step is one atomic list or
    attribute operation (the GIL orders them), so either the GET sees the flag and backs
    off to ``read()``, or the resize sees the GET and waits for it — never neither. The
    guard's two Python calls and two lock blocks were 0.7 µs of a 1.6 µs lookup.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._readers = 0
        self._writer = False
        self._idle_waiters = 0
        self._guard = _ReadGuard(self)
        #: One item per ``BTree.get`` inside LMDB without the lock (see the class docstring).
        self.getting: list[None] = []

    def read(self) -> _ReadGuard:
        return self._guard

    def wait_idle(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds until no reader is left; True if none is."""
        with self._cond:
            self._idle_waiters += 1
            try:
                return self._cond.wait_for(lambda: self._readers == 0 and not self.getting, max(timeout, 0.0))
            finally:
                self._idle_waiters -= 1

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._idle_waiters += 1  # the last reader out notifies
            try:
                # Readers under the lock may hold it for long (a snapshot copy): GETs go on
                # meanwhile. Only once they are gone does the flag stop new GETs, and the
                # GETs already inside (one lookup each) are waited for.
                while self._writer or self._readers:
                    self._cond.wait()
                self._writer = True
                try:
                    while self.getting:
                        self._cond.wait()
                except BaseException:
                    self._writer = False
                    self._cond.notify_all()
                    raise
            finally:
                self._idle_waiters -= 1
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()

    def get_done(self) -> None:
        """A ``BTree.get`` left (its item already taken out of ``getting``): wake a resize
        or ``wait_idle`` waiting for it."""
        with self._cond:
            self._cond.notify_all()


class _ReadGuard:
    """``with lock.read():`` — stateless, so one instance serves every thread."""

    __slots__ = ("_rw",)

    def __init__(self, rw: _ReadWriteLock) -> None:
        self._rw = rw

    def __enter__(self) -> None:
        rw = self._rw
        with rw._lock:
            while rw._writer:
                rw._cond.wait()
            rw._readers += 1

    def __exit__(self, *exc: object) -> None:
        rw = self._rw
        with rw._lock:
            rw._readers -= 1
            if rw._readers == 0 and rw._idle_waiters:
                rw._cond.notify_all()


class BTree:
    """LMDB environment of one namespace. Writes come only from the engine's writer thread."""

    def __init__(
        self, path: Path, *, map_size: int = DEFAULT_MAP_SIZE, durable: bool = True, serving: bool = False
    ) -> None:
        """``durable=False`` (no fsync per commit) is only for a restore's staging copy,
        which is synced with ``sync()`` before anything can use it. ``serving``: opened by
        the engine, which forks a new history on a snapshot installed by hand."""
        self.path = path
        # Before LMDB maps it: a data.mdb shorter than its meta page claims is a SIGBUS.
        lmdbfile.check_if_present(path / "data.mdb", "btree")
        # A snapshot copied in by hand (cp snapshot <ns>/db/data.mdb): verify, strip trailer.
        self.installed = snapfile.install_check(path, mark=serving)
        try:
            fsutil.make_dirs(path)
            data_file = path / "data.mdb"
            existing = data_file.stat().st_size if data_file.exists() else 0
            # A restored snapshot may be larger than the configured map: start above it.
            size = max(map_size, _round_up(existing * 2, 1 << 20))
            _reserve_lock_file(path / "lock.mdb")
            self.env = lmdb.open(
                str(path),
                map_size=size,
                max_dbs=4,
                subdir=True,
                sync=durable,
                metasync=False,
                readahead=False,
                max_readers=512,
                lock=True,
            )
            self._kv = self.env.open_db(b"kv")
            self._meta = self.env.open_db(b"meta")
            if durable:
                # LMDB fsyncs data.mdb's content, never the directory: make a newly created
                # data.mdb's entry durable before any write is acknowledged.
                fsutil.fsync_dir(path)
        except lmdb.Error as exc:
            raise CorruptLog(
                f"cannot open LMDB environment: {exc}",
                path=path / "data.mdb",
                hint="if data.mdb was copied from a snapshot, check it with 'sha256sum -c <snapshot>.sha256'",
            ) from exc
        except OSError as exc:
            raise from_os_error(exc, path) from exc
        self._rw = _ReadWriteLock()
        self.map_size = size

    # --- reads (any thread) ---

    def get(self, key: bytes) -> bytes | None:
        rw = self._rw
        getting = rw.getting
        getting.append(None)  # before the check: see _ReadWriteLock
        value: bytes | None
        if rw._writer:
            getting.pop()
            if rw._idle_waiters:
                rw.get_done()
            with rw.read(), self.env.begin(db=self._kv, buffers=False) as txn:  # waits out the resize
                value = txn.get(key)
                return value
        try:
            with self.env.begin(db=self._kv, buffers=False) as txn:
                value = txn.get(key)
                return value
        finally:
            getting.pop()
            if rw._idle_waiters:
                rw.get_done()

    def read_checkpoint(self) -> Checkpoint:
        with self._rw.read(), self.env.begin(db=self._meta) as txn:
            raw = txn.get(CHECKPOINT_KEY)
        return Checkpoint() if raw is None else Checkpoint.decode(raw)

    def read_namespace(self) -> str | None:
        with self._rw.read(), self.env.begin(db=self._meta) as txn:
            raw = txn.get(NAMESPACE_KEY)
        return None if raw is None else bytes(raw).decode("utf-8", errors="replace")

    def write_namespace(self, namespace: str) -> None:
        self._write(lambda txn: txn.put(NAMESPACE_KEY, namespace.encode(), db=self._meta))

    def count(self) -> int:
        with self._rw.read(), self.env.begin(db=self._kv) as txn:
            n: int = txn.stat(self._kv)["entries"]
            return n

    def count_with(self, keys: Iterable[bytes]) -> tuple[int, list[bool]]:
        """The key count and, for each of ``keys``, whether it is present, from one read
        transaction (the engine adds the in-memory table's changes to this count)."""
        with self._rw.read(), self.env.begin(db=self._kv) as txn:
            n: int = txn.stat(self._kv)["entries"]
            return n, [txn.get(k) is not None for k in keys]

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        """All key/value pairs in key order, from one consistent read transaction."""
        with self._rw.read(), self.env.begin(db=self._kv) as txn:
            yield from txn.cursor().iternext(keys=True, values=True)

    # --- writes (engine writer thread only) ---

    def apply(self, records: list[Record], checkpoint: Checkpoint) -> Checkpoint:
        """Apply records and the checkpoint that ends after them in one durable transaction.

        ``checkpoint.fp_state`` is the fingerprint *before* these records; the returned
        checkpoint (the one written) carries the fingerprint after them. The old value of
        every key comes from the same write transaction (``replace``/``pop`` return it at
        no extra lookup), so the fingerprint is exact for the data it is committed with.
        The records' entries in order as ``apply_ops`` pairs: one loop for both.
        """
        put_kind = EntryKind.PUT
        ops = [(e.key, e.value if e.kind == put_kind else None) for rec in records for e in rec.entries]
        return self.apply_ops(ops, checkpoint)

    def apply_ops(
        self,
        ops: list[tuple[bytes, bytes | None]],
        checkpoint: Checkpoint,
        *,
        every: tuple[int, Callable[[], None]] | None = None,
    ) -> Checkpoint:
        """``apply`` of a flat list of (key, value) pairs, value None for a delete: what a
        restore's replay decodes (``walk.Walk.records(ops=...)``, no object per record) and
        what ``apply`` turns records into. One transaction, the fingerprint from the old
        value of every key in the same transaction, the checkpoint after them returned;
        ``every=(n, fn)`` runs ``fn()`` after each ``n`` entries, inside the transaction (a
        restore gives the map's pages back there: ``mapped.py``)."""
        written: list[Checkpoint] = []
        step = max(len(ops) if every is None else every[0], 1)

        def body(txn: Any) -> None:
            fp = Fingerprint(checkpoint.fp_state)
            # A cursor's replace/pop: the transaction's own go through a new cursor and
            # keyword parsing on every call (measured ~40 % slower per put).
            cursor = txn.cursor(db=self._kv)
            put, pop = cursor.replace, cursor.pop
            removed: list[tuple[bytes, bytes]] = []
            deletes = False
            for at in range(0, len(ops), step):
                for key, value in ops[at : at + step]:
                    if value is None:
                        old = pop(key)
                        deletes = True
                    else:
                        old = put(key, value)
                    if old is not None:
                        removed.append((key, old))
                if every is not None:
                    every[1]()
            added = [(k, v) for k, v in ops if v is not None] if deletes else ops
            fp.change(added, removed)  # type: ignore[arg-type]  # no None left in ``added``
            cp = replace(checkpoint, fp_state=fp.state())
            txn.put(CHECKPOINT_KEY, cp.encode(), db=self._meta)
            written[:] = [cp]

        self._write(body)
        return written[0]

    def scan_fingerprint(self) -> tuple[Fingerprint, Checkpoint]:
        """Fingerprint computed from every pair, and the checkpoint, in one read transaction."""
        with self._rw.read(), self.env.begin() as txn:
            raw = txn.get(CHECKPOINT_KEY, db=self._meta)
            cp = Checkpoint() if raw is None else Checkpoint.decode(raw)
            fp = Fingerprint.of_items(txn.cursor(db=self._kv).iternext(keys=True, values=True))
        return fp, cp

    def _write(self, body: Callable[[Any], object]) -> None:
        """Run ``body`` in one write transaction, growing the map until it fits."""
        while True:
            try:
                with self._rw.read(), self.env.begin(write=True) as txn:
                    body(txn)
                return
            except lmdb.MapFullError:
                self._grow()
            except lmdb.Error as exc:
                # The transaction was aborted: the environment is unchanged and a later
                # commit may succeed (e.g. once space is freed); the engine decides.
                raise lmdberrors.translate(exc, self.path / "data.mdb", what="LMDB write") from exc

    def set_checkpoint(self, checkpoint: Checkpoint) -> None:
        self.apply([], checkpoint)

    def _grow(self, at_least: int = 0) -> None:
        with self._rw.write():
            size = self.map_size * 2
            while size < at_least:
                size *= 2
            try:
                self.env.set_mapsize(size)
            except lmdb.Error as exc:
                raise lmdberrors.translate(exc, self.path / "data.mdb", what="LMDB map growth") from exc
            self.map_size = size

    def _ensure_headroom(self) -> None:
        """Grow the map now if less than half of it is free."""
        used = (self.env.info()["last_pgno"] + 1) * self.env.stat()["psize"]
        if used * 2 > self.map_size:
            self._grow(at_least=used * 2)

    def sync(self) -> None:
        """Force everything committed so far (including the last meta page) to disk."""
        try:
            self.env.sync(True)
        except lmdb.Error as exc:
            raise lmdberrors.translate(exc, self.path / "data.mdb", what="LMDB sync") from exc

    # --- snapshots ---

    def snapshot_to(self, f: BinaryIO) -> Checkpoint:
        """Write a compacted, consistent copy of the environment to ``f``.

        The copy and the returned checkpoint come from the same read transaction, so
        the checkpoint says exactly which WAL records the copy contains.
        """
        # The read transaction below blocks map growth until the copy ends (LMDB cannot
        # resize under a live reader), so make room for writes to continue meanwhile.
        self._ensure_headroom()
        with self._rw.read(), self.env.begin() as txn:
            raw = txn.get(CHECKPOINT_KEY, db=self._meta)
            cp = Checkpoint() if raw is None else Checkpoint.decode(raw)
            testseam.hold("snapshot-copy")  # a copy that takes as long as a test wants
            self.env.copyfd(f.fileno(), compact=True, txn=txn)
        return cp

    def copy_plain_to(self, f: BinaryIO, chunk: int = PLAIN_COPY_CHUNK) -> Checkpoint:
        """LMDB's plain (non-compacting) copy of the environment, every byte handed to
        ``f.write`` once (``chunk`` bytes at a time, a new ``bytes`` each: the caller may
        keep it to hash on another thread), and the checkpoint of exactly the state it holds.

        It is what ``mdb_env_copyfd2`` without ``MDB_CP_COMPACT`` writes, done here so the
        bytes pass through Python once instead of being read back from the copy: the two
        meta pages and a read transaction are taken while holding LMDB's writer lock (an
        empty write transaction: no commit can fall between them, so the newest meta page
        copied is the state the read transaction pins and the checkpoint is read from),
        then pages 2 .. ``last_pgno`` are read from ``data.mdb`` with ``pread``. The pinned
        state's pages cannot change while the read transaction lives (LMDB never reuses a
        page a live reader can see); free pages can, and are garbage in LMDB's own plain
        copy just the same. The file is read ahead sequentially on its own descriptor
        (``POSIX_FADV_SEQUENTIAL``, and ``WILLNEED`` one ``PLAIN_COPY_READ_AHEAD`` window at
        a time, so a paced copy also paces its reads): the serving map keeps readahead off
        (``MADV_RANDOM``), which is right for GETs and would make a cold copy fault page by
        page.
        """
        self._ensure_headroom()
        path = self.path / "data.mdb"
        with self._rw.read():
            testseam.hold("snapshot-copy")
            # Our own reads fail as errors about data.mdb; what ``f.write`` raises (a full
            # backup disk) passes through untouched for the caller to name its own file.
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as exc:
                raise from_os_error(exc, path) from exc
            try:
                _advise_sequential(fd)
                psize = int(self.env.stat()["psize"])
                writer = self.env.begin(write=True)  # LMDB's writer lock, as mdb_env_copyfd0 takes it
                try:
                    txn = self.env.begin(db=self._meta)
                    end = (int(self.env.info()["last_pgno"]) + 1) * psize
                    head = _pread(fd, 2 * psize, 0, path)
                finally:
                    writer.abort()  # nothing written: no commit, no new transaction id
                try:
                    raw = txn.get(CHECKPOINT_KEY)
                    cp = Checkpoint() if raw is None else Checkpoint.decode(bytes(raw))
                    end = min(end, os.fstat(fd).st_size)  # as LMDB clamps it
                    f.write(head)
                    off = len(head)
                    ahead = 0
                    while off < end:
                        if off >= ahead:  # read ahead one window at a time: paced like the copy
                            ahead = off + PLAIN_COPY_READ_AHEAD
                            _advise_willneed(fd, off, PLAIN_COPY_READ_AHEAD)
                        data = _pread(fd, min(chunk, end - off), off, path)
                        f.write(data)
                        off += len(data)
                finally:
                    txn.abort()
            finally:
                os.close(fd)
        return cp

    def free_fraction(self) -> float:
        """Share of the file's pages (up to the last used one) that no B-tree uses: what a
        plain copy writes and a compacting copy leaves out."""
        with self._rw.read(), self.env.begin() as txn:
            total = int(self.env.info()["last_pgno"]) + 1
            used = 2  # the meta pages
            for st in (txn.stat(), txn.stat(self._kv), txn.stat(self._meta)):
                used += int(st["branch_pages"]) + int(st["leaf_pages"]) + int(st["overflow_pages"])
        return max(0.0, (total - used) / total)

    def stat(self) -> dict[str, Any]:
        return dict(self.env.info())

    def wait_readers(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for every reader (a snapshot copy, a GET) to end."""
        return self._rw.wait_idle(timeout)

    def close(self) -> None:
        self.env.close()


def read_namespace_label(path: Path) -> str | None:
    """The namespace a ``data.mdb`` file is labelled with (meta key ``namespace``).

    Read-only and best effort, for messages about a file found in the wrong place: None
    when the file has no label or cannot be read safely. Nothing is written next to the
    file (``readonly``, ``lock=False``). Before liblmdb maps it, both meta pages must be
    intact and the file as long as they claim: liblmdb would die of SIGBUS on pages
    past the end of a cut file, and it refuses page numbers beyond ``last_pg`` itself.
    """
    try:
        size = lmdbfile.check_file(path).file_size
    except UnisonDBError:
        return None
    try:
        env = lmdb.open(
            str(path), subdir=False, readonly=True, lock=False, max_dbs=4, map_size=max(size, 1 << 20)
        )
    except lmdb.Error:
        return None
    try:
        meta = env.open_db(b"meta", create=False)
        with env.begin(db=meta) as txn:
            raw = txn.get(NAMESPACE_KEY)
    except lmdb.Error:
        return None
    finally:
        env.close()
    return None if raw is None else bytes(raw).decode("utf-8", errors="replace")


def _pread(fd: int, n: int, off: int, path: Path) -> bytes:
    """Up to ``n`` bytes at ``off`` (a new object each time: the caller may keep it); none
    is an error (the file was cut under the copy)."""
    try:
        data = os.pread(fd, n, off)
    except OSError as exc:
        raise from_os_error(exc, path) from exc
    if not data:
        raise CorruptLog(f"data.mdb ended at {off} bytes during a copy", path=path)
    return data


def _advise_sequential(fd: int) -> None:
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
    except OSError:
        pass  # advice only


def _advise_willneed(fd: int, offset: int, length: int) -> None:
    try:
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_WILLNEED)
    except OSError:
        pass  # advice only: the reads then wait for the disk themselves


#: Bytes reserved for ``lock.mdb``: LMDB needs 64 per reader slot (512) plus a header.
LOCK_FILE_BYTES = 64 << 10


def _reserve_lock_file(lock: Path) -> None:
    """Allocate ``lock.mdb``'s blocks before LMDB maps it.

    LMDB writes its reader table through ``mmap``; on a full file system (measured on
    tmpfs) the first store into a page that has no block behind it kills the process
    with SIGBUS instead of returning ENOSPC. Reserving the blocks here turns a full disk
    at startup into an ordinary "no space left on device" error. LMDB takes a lock file
    larger than it needs as room for more readers.
    """
    try:
        if lock.exists() and lock.stat().st_size >= LOCK_FILE_BYTES:
            return
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise from_os_error(exc, lock) from exc
    try:
        os.posix_fallocate(fd, 0, LOCK_FILE_BYTES)
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            return  # a file system without fallocate: LMDB sizes the file itself
        raise from_os_error(exc, lock) from exc
    finally:
        os.close(fd)


def _round_up(n: int, step: int) -> int:
    return ((n + step - 1) // step) * step
