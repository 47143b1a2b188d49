"""Consistent B-tree snapshots: ``backups/<ns>/<path>`` is a valid LMDB ``data.mdb``.

``copy_env`` runs the plain copy (``BTree.copy_plain_to``: every page up to the last used
one; its checkpoint read in the read transaction that pins the copied state) or, when more
than ``COMPACT_FREE_FRACTION`` of the pages are free, LMDB's compacting copy
(``BTree.snapshot_to``: ``mdb_env_copyfd3`` inside ONE read transaction, checkpoint read
in that same transaction); either way the file holds exactly the committed state up to
the checkpoint's ``lsn`` and knows where WAL replay resumes. LMDB readers
never block the writer: PUTs keep being acknowledged while a snapshot runs.

Steps: the copy is written into ``<path>.tmp`` from a thread at nice +10 and idle I/O
priority, hashed chunk by chunk as it is written, paced (``backup/pacing.py``), its
writeback bounded to two 4 MiB windows while the WAL is busy (``backup/writeback.py``)
→ the 4096-byte self-verifying trailer (``storage/snapfile.py``: data length, that
sha256, namespace, checkpoint, CRC) appended → fsync → drop the file from the page cache →
(existing file? the same snapshot → keep it; different → ``Conflict``) → rename →
directory fsync → ``<path>.sha256`` sidecar (whole-file digest, so ``sha256sum -c`` works).
Any failure before the rename removes the ``.tmp``; a failure writing the sidecar removes
the just-published file again (``checksum.complete_publish``), so the snapshot and its
integrity record appear together. Between the rename and the sidecar only a kill -9 can
intervene; the file proves itself by its trailer and the next start writes the missing
sidecar (``backup/repair.py``).

"The same snapshot" is an intact self-verifying snapshot of the same namespace and state
(history, LSN, fingerprint), whatever its bytes (a plain copy of one state differs from
the next in free pages and transaction ids), or a byte-identical file: a retry of a request
that died before its sidecar gets 200, not 409 forever.

One pass: the plain copy is done by ``BTree.copy_plain_to`` (what LMDB's plain copy does,
in 1 MiB ``pread`` chunks), each chunk hashed, written and paced by ``_Sink``; the file is
never read back. (Streaming LMDB's own copy through a pipe instead was measured slower:
every byte crosses user space twice more, 2.0-2.7x ``cp`` versus 1.3-1.5x for copy +
read-back at load 5-10, 1 GiB; the pipe is kept only for the compacting copy, which LMDB
must write itself.)

LMDB reports a failed copy as ``lmdb.Error`` with the C library's message (e.g.
``mdb_env_copyfd3: No space left on device``), not an errno; ``_storage_error`` maps the
messages we act on back to our error tree (507 for ENOSPC, 500 permission denied).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, cast

import lmdb
import structlog

from unisondb.backup import checksum, files, pacing, phases, writeback
from unisondb.backup.files import TargetDir, path_lock
from unisondb.backup.paths import Resolved, open_dir
from unisondb.errors import Conflict, UnisonDBError, from_os_error
from unisondb.storage import lmdberrors, snapfile, testseam
from unisondb.storage.btree import Checkpoint
from unisondb.storage.engine import Engine

log = structlog.get_logger(__name__)

#: Chunks (1 MiB) the hash thread may lag behind the copy.
HASH_QUEUE = 8
#: Pipe size asked for (``F_SETPIPE_SZ``, capped by /proc/sys/fs/pipe-max-size) and the
#: bytes read from it at a time, for LMDB's compacting copy.
PIPE_CHUNK = 1 << 20
F_SETPIPE_SZ = 1031
#: Above this share of free pages a snapshot uses LMDB's compacting copy (see copy_env):
#: compacting costs about 2x per page it writes, so below ~50 % free the plain copy is
#: faster; 25 % also bounds the free space a snapshot file carries.
COMPACT_FREE_FRACTION = 0.25
#: The plain copy by default (False: always compact; for measurements). Snapshots of one
#: state are compared by state, not bytes (``_same_state``; the archive: archive/publish.py).
PLAIN_COPY = True


@dataclass(frozen=True, slots=True)
class Snapshot:
    path: Path
    size: int
    sha256: str
    checkpoint: Checkpoint
    #: False when an identical file was already there (nothing written).
    copied: bool

    @property
    def bytes_written(self) -> int:
        return self.size if self.copied else 0


def take_snapshot(engine: Engine, target: Resolved) -> Snapshot:
    """Run one B-tree backup request (blocking: call it from a worker thread)."""
    name = target.name
    side = checksum.sidecar_name(name)
    with TargetDir(open_dir(target), target.path.parent) as tdir, path_lock(target.path):
        dest_exists = tdir.require_regular(name) is not None
        if tdir.require_regular(side) is not None and not dest_exists:
            # A new snapshot never has the digest an old sidecar records (its trailer holds
            # the time it was written): refuse now instead of after copying.
            raise Conflict(
                f"{tdir.path / side} already exists but {target.path} does not; refusing to "
                "write a snapshot beside a checksum of other bytes: move the old .sha256 "
                "away or choose another path"
            )
        existing_digest = ""

        def keep(result: tuple[Checkpoint, int, str]) -> bool:
            nonlocal existing_digest
            if not dest_exists:
                return True
            existing_digest = _existing_same(engine, tdir, name, target.path, *result)
            return False  # the same snapshot is already there: keep the existing file

        started = time.perf_counter()
        ph = phases.current()
        before = sum(ph.values()) if ph is not None else 0.0
        cp, size, digest = tdir.publish(name, lambda fd: write_snapshot(engine, fd, target.path), keep)
        if ph is not None:  # what publish spent beyond the copy and hash: fsyncs and rename
            phases.add(ph, "sync", time.perf_counter() - started - (sum(ph.values()) - before))
        if dest_exists:
            checksum.ensure_sidecar(tdir, name, existing_digest)
            tdir.sync()  # a previous run may have died before its directory fsync
            st = tdir.stat(name)
            return Snapshot(target.path, st.st_size if st else size, existing_digest, cp, copied=False)
        _test_hold("snapshot-published")
        with phases.timed("sidecar"):
            checksum.complete_publish(tdir, name, digest)
        return Snapshot(target.path, size, digest, cp, copied=True)


def _existing_same(
    engine: Engine, tdir: TargetDir, name: str, dest: Path, cp: Checkpoint, size: int, digest: str
) -> str:
    """Whole-file sha256 of the existing ``name`` if it holds this same snapshot, else 409.

    Same means a self-verifying snapshot (intact) of the same namespace and state (history,
    LSN, fingerprint: ``_same_state``), e.g. written by an earlier request that may have
    died before its sidecar, or the same request retried (two plain copies of one state
    are not byte-identical), or else byte-identical (a file without a trailer). Anything
    else is another snapshot under this name, and names are never reused for other states.
    """
    fd = tdir.open_read(name)
    try:
        trailer = snapfile.read_trailer_fd(fd, dest)
        if (
            trailer is not None
            and trailer.namespace == engine.namespace
            and _same_state(trailer.checkpoint, cp)
        ):
            return snapfile.verify_fd(
                fd,
                dest,
                hint=(
                    "an earlier snapshot of the same state under this name is damaged: move it away and retry"
                ),
            )[1]
        existing, _size = files.hash_fd(fd)
    except OSError as exc:
        raise from_os_error(exc, dest) from exc
    finally:
        os.close(fd)
    if existing == digest:
        return existing
    raise Conflict(
        f"{dest} already exists with different content (sha256 {existing}; this snapshot "
        f"at LSN {cp.applied_lsn} is {digest}); refusing to overwrite a backup file: choose "
        "a new path (e.g. with the date and time in it)"
    )


def _same_state(raw: bytes, cp: Checkpoint) -> bool:
    """Does the checkpoint ``raw`` (a trailer's) state what ``cp`` states: the same history,
    LSN and state fingerprint? Two copies of one committed state differ in their bytes (a
    plain copy carries free pages and transaction ids) and may differ in the checkpoint's
    wall-clock field; the fingerprint proves they hold the same pairs (as the archive
    compares snapshots: archive/publish.py)."""
    try:
        other = Checkpoint.decode(raw)
    except UnisonDBError:
        return False
    return (other.history, other.applied_lsn, other.fp_state) == (cp.history, cp.applied_lsn, cp.fp_state)


_test_hold = testseam.hold


def copy_env(engine: Engine, f: BinaryIO) -> Checkpoint:
    """A consistent copy of the environment into ``f`` and the checkpoint it holds (tests
    replace this to fake ENOSPC).

    LMDB's plain copy (every page up to the last used one, through ``f.write``:
    ``BTree.copy_plain_to``), and LMDB's compacting copy (a walk of the B-trees, about
    1.6-1.9x the time per page, bench/results/2026-12-01-speed.md; written by LMDB to
    ``f.fileno()``) only when more than ``COMPACT_FREE_FRACTION`` of the pages are free.
    The compacting copy walks the serving map, which has readahead off: the data file is
    read ahead (``POSIX_FADV_WILLNEED``) first so a cold map is not copied one page fault
    at a time. (The plain copy reads ahead window by window itself.)
    """
    compact = not PLAIN_COPY or engine.free_fraction() > COMPACT_FREE_FRACTION
    if compact:
        _read_ahead(engine.data_file)
    return engine.snapshot_to(f, compact=compact)


def _read_ahead(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # best effort: the copy then faults pages in itself
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
    except (OSError, AttributeError):
        pass
    finally:
        os.close(fd)


def write_snapshot(
    engine: Engine, out_fd: int, dest: Path, *, pacer: pacing.Pacer | None = None
) -> tuple[Checkpoint, int, str]:
    """Write a consistent copy of the environment to ``out_fd``; (checkpoint, bytes, sha256).

    The file is LMDB's copy followed by the ``snapfile`` trailer; bytes and sha256 are the
    whole file's (what the ``.sha256`` sidecar records). One pass: every chunk of the copy
    goes through ``_Sink.write`` once, which hands it to a hashing thread, writes it and
    charges it to the server's pacer (``backup/pacing.py``); the trailer takes the copy's
    sha256 and the same hash object then takes the trailer, so the whole-file digest costs
    nothing more.

    Two threads, so the hash (hashlib releases the GIL) and the copy overlap: the copy
    thread (nice +10, idle I/O priority: ``pacing.background_thread``) reads, writes and
    keeps the file's writeback to two windows (``writeback.Writeback``: it waits for the
    disk, so the copy runs no faster than the disk and its dirty pages never pile up into
    one huge flush that the WAL's fsyncs would queue behind); the hash thread hashes the
    same chunks.
    """
    outcome = _Outcome()
    ph = phases.current()  # the copy thread below does not inherit the context
    session = (pacer or pacing.current()).session(engine.namespace, "btree")
    sink = _Sink(out_fd, session)

    def run() -> None:
        pacing.background_thread()
        try:
            started = time.perf_counter()
            try:
                outcome.checkpoint = cp = copy_env(engine, cast(BinaryIO, sink))
            finally:
                sink.close_pipe()
                sink.finish_hash()
            sink.raise_error()
            sink.finish_writeback()
            # Phases add up to the wall time: pace (sleeps), hash (the hash thread's busy
            # time, overlapped with the copy), copy (the rest: reads, writes, waits).
            wall = time.perf_counter() - started
            paced = session.report().total
            hashing = min(sink.hashing, max(0.0, wall - paced))
            phases.add(ph, "copy", wall - paced - hashing)
            phases.add(ph, "hash", hashing)
            phases.add(ph, "pace", paced)
            trailer = snapfile.encode_trailer(
                sink.size, sink.h.copy().digest(), engine.namespace, cp.encode()
            )
            files.write_all(out_fd, trailer)
            sink.h.update(trailer)
            outcome.digest, outcome.size = sink.h.hexdigest(), sink.size + len(trailer)
        except BaseException as exc:  # handed to the waiting thread below
            outcome.error = sink.error or exc

    worker = threading.Thread(target=run, name=f"snapshot-{engine.namespace}", daemon=True)
    worker.start()
    worker.join()
    error = outcome.error
    if isinstance(error, lmdb.Error):
        raise _storage_error(error, dest) from error
    if isinstance(error, OSError):
        raise from_os_error(error, dest) from error
    if isinstance(error, BaseException):
        raise error
    assert outcome.checkpoint is not None
    pacing.log_report(engine.namespace, "btree", session.report())
    return outcome.checkpoint, outcome.size, outcome.digest


class _Sink:
    """Where a snapshot's bytes go, in order: the hash thread, the file, pacing.

    ``write`` is what the plain copy calls per chunk (a fresh ``bytes`` each time, so the
    hash thread can keep it without a copy). LMDB's compacting copy writes to a descriptor
    instead: ``fileno()`` hands it the write end of a pipe (made as large as the system
    allows: fewer wake-ups) that a thread drains into ``write``. A failure of ours (ENOSPC
    on the file) closes the pipe's read end, so LMDB's copy fails too (EPIPE) instead of
    blocking, and ours is the error reported.
    """

    def __init__(self, fd: int, session: pacing.Pacing) -> None:
        self.h = hashlib.sha256()
        self.size = 0
        #: Seconds the hash thread spent hashing.
        self.hashing = 0.0
        self.error: BaseException | None = None
        self._fd = fd
        self._session = session
        self._writeback = writeback.Writeback(fd)
        self._pipe_w = -1
        self._drain: threading.Thread | None = None
        self._chunks: queue.Queue[bytes | None] = queue.Queue(HASH_QUEUE)
        self._hasher = threading.Thread(target=self._hash, name="snapshot-hash", daemon=True)
        self._hasher.start()

    def _hash(self) -> None:
        pacing.background_thread()
        while (chunk := self._chunks.get()) is not None:
            started = time.perf_counter()
            self.h.update(chunk)
            self.hashing += time.perf_counter() - started

    def finish_hash(self) -> None:
        self._chunks.put(None)
        self._hasher.join()

    def write(self, data: bytes | memoryview) -> int:
        chunk = data if isinstance(data, bytes) else bytes(data)
        self._chunks.put(chunk)  # waits while the hash thread is HASH_QUEUE chunks behind
        _write_copy(self._fd, chunk)
        self.size += len(chunk)
        # May wait for the disk (part of the work paced); a deep queue only while no WAL
        # fsync can be stuck behind it.
        self._writeback.advance(self.size, deep=self._session.wal_idle)
        self._session.charge(len(chunk))
        return len(chunk)

    def fileno(self) -> int:
        if self._pipe_w < 0:
            r, w = os.pipe2(os.O_CLOEXEC)
            _grow_pipe(w)
            self._pipe_w = w
            self._drain = threading.Thread(
                target=self._drain_pipe, args=(r,), name="snapshot-pipe", daemon=True
            )
            self._drain.start()
        return self._pipe_w

    def _drain_pipe(self, r: int) -> None:
        pacing.background_thread()
        buf = memoryview(bytearray(PIPE_CHUNK))
        try:
            while n := os.readv(r, [buf]):
                self.write(buf[:n])
        except BaseException as exc:
            self.error = exc
        finally:
            os.close(r)

    def close_pipe(self) -> None:
        if self._pipe_w >= 0:
            os.close(self._pipe_w)  # end of the copy: the drain thread reads EOF
            self._pipe_w = -1
        if self._drain is not None:
            self._drain.join()
            self._drain = None

    def finish_writeback(self) -> None:
        """Wait for the copy's last windows (the trailer and the publisher's fsync follow)."""
        self._writeback.finish(self.size)

    def raise_error(self) -> None:
        if self.error is not None:
            raise self.error


#: The copy's writes (``files.write_all``, bound here: the sidecar's ENOSPC test budgets the
#: module's ``write_all`` for the trailer and the sidecar, the bytes after the copy).
_write_copy = files.write_all


def _grow_pipe(fd: int) -> None:
    try:
        with open("/proc/sys/fs/pipe-max-size") as f:
            size = min(int(f.read()), PIPE_CHUNK)
        fcntl.fcntl(fd, F_SETPIPE_SZ, size)
    except (OSError, ValueError):
        pass  # the default 64 KiB pipe works, with more wake-ups


@dataclass(slots=True)
class _Outcome:
    checkpoint: Checkpoint | None = None
    digest: str = ""
    size: int = 0
    error: BaseException | None = None


def _storage_error(exc: lmdb.Error, dest: Path) -> UnisonDBError:
    return lmdberrors.translate(exc, dest, what="LMDB snapshot")
