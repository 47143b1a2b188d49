"""Consistent B-tree snapshots: ``backups/<ns>/<path>`` is a valid LMDB ``data.mdb``.

``copy_env`` runs LMDB's compacting copy (``BTree.snapshot_to``: ``mdb_env_copyfd3``
inside ONE read transaction, checkpoint read in that same transaction) or, with
``PLAIN_COPY``, its plain copy (``BTree.copy_plain_to``; the checkpoint is read back from
the copy); either way the file holds exactly the committed state up to the
checkpoint's ``lsn`` and knows where WAL replay resumes. LMDB readers
never block the writer: PUTs keep being acknowledged while a snapshot runs.

Steps: LMDB writes the copy straight into ``<path>.tmp`` (no Python in the data path; the
GIL is released) from a thread running at nice +10, while the request's thread fdatasyncs
the growing file every 32 MiB → sha256 of the copy (read back from the page cache) → the
4096-byte self-verifying trailer (``storage/snapfile.py``: data length, that sha256,
namespace, checkpoint, CRC) appended → fsync → drop the file from the page cache →
(existing file? the same snapshot → keep it; different → ``Conflict``) → rename →
directory fsync → ``<path>.sha256`` sidecar (whole-file digest, so ``sha256sum -c`` works).
Any failure before the rename removes the ``.tmp``; a failure writing the sidecar removes
the just-published file again (``checksum.complete_publish``), so the snapshot and its
integrity record appear together. Between the rename and the sidecar only a kill -9 can
intervene; the file proves itself by its trailer and the next start writes the missing
sidecar (``backup/repair.py``).

"The same snapshot" is byte-identical, or an intact self-verifying snapshot of the same
namespace and checkpoint (the same committed state; only the trailer's creation time
differs): a retry of a request that died before its sidecar gets 200, not 409 forever.

Why not stream LMDB's copy through a pipe and hash it on the way (one pass fewer)? It was
measured (bench/bench_backup.py, 2 CPUs, 205 MiB data.mdb, snapshots back to back):
acknowledged PUT/s under the snapshot loop fell to ~680 with the pipe versus ~1200 with
the direct copy, because every byte then crosses user space twice more on a CPU the
event loop and the WAL writer need. Re-reading a just-written file costs only the hash.

LMDB reports a failed copy as ``lmdb.Error`` with the C library's message (e.g.
``mdb_env_copyfd3: No space left on device``), not an errno; ``_storage_error`` maps the
messages we act on back to our error tree (507 for ENOSPC, 500 permission denied).
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import lmdb

from unisondb.backup import checksum, files, phases
from unisondb.backup.files import TargetDir, path_lock
from unisondb.backup.paths import Resolved, open_dir
from unisondb.errors import Conflict, UnisonDBError, from_os_error
from unisondb.storage import fsutil, lmdberrors, snapfile, testseam
from unisondb.storage.btree import Checkpoint
from unisondb.storage.engine import Engine

#: fdatasync the snapshot file whenever this much more has been written.
FLUSH_EVERY = 32 << 20
FLUSH_POLL_SECONDS = 0.05
#: CPU niceness of the thread running LMDB's copy (the event loop and WAL writer keep 0).
SNAPSHOT_NICE = 10
#: Above this share of free pages a snapshot uses LMDB's compacting copy (see copy_env):
#: compacting costs about 2x per page it writes, so below ~50 % free the plain copy is
#: faster; 25 % also bounds the free space a snapshot file carries.
COMPACT_FREE_FRACTION = 0.25
#: Off for now: a plain copy is not byte-identical for one committed state (it carries free
#: pages and transaction ids), and the archive refuses a second, different object for the
#: same LSN range (tests/archive/test_archive_server.py::
#: test_namespace_survives_loss_of_its_data_directory got 409 with it on). The compacting
#: copy is. The archive now compares snapshots by state (history, LSN, fingerprint:
#: archive/publish.py); what remains before turning it on is the same check for a local
#: snapshot published again at the same path, and a full-suite run with it on.
PLAIN_COPY = False


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

    Same means byte-identical, or a self-verifying snapshot (intact) of the same namespace
    and checkpoint: the same committed state, written by an earlier request that may have
    died before its sidecar (only the trailer's time differs). Anything else is another
    snapshot under this name, and names are never reused for different bytes.
    """
    fd = tdir.open_read(name)
    try:
        trailer = snapfile.read_trailer_fd(fd, dest)
        if (
            trailer is not None
            and trailer.namespace == engine.namespace
            and trailer.checkpoint == cp.encode()
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


_test_hold = testseam.hold


def copy_env(engine: Engine, f: BinaryIO) -> Checkpoint:
    """A consistent copy of the environment into ``f`` and the checkpoint it holds (tests
    replace this to fake ENOSPC).

    With ``PLAIN_COPY`` (off, see there): LMDB's plain copy (``write()`` of every page,
    checkpoint read back from the copy), and the compacting copy (a walk of the B-trees,
    about 1.6-1.9x the time per page, bench/results/2026-12-01-speed.md) only when more
    than ``COMPACT_FREE_FRACTION`` of the pages are free. Without it: the compacting copy.
    Before the copy the data file is read ahead (``POSIX_FADV_WILLNEED``): the serving
    environment maps it with readahead off, so a cold map would otherwise be copied one
    page fault at a time.
    """
    _read_ahead(engine.data_file)
    compact = not PLAIN_COPY or engine.free_fraction() > COMPACT_FREE_FRACTION
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


def write_snapshot(engine: Engine, out_fd: int, dest: Path) -> tuple[Checkpoint, int, str]:
    """Write a consistent copy of the environment to ``out_fd``; (checkpoint, bytes, sha256).

    The file is LMDB's copy followed by the ``snapfile`` trailer; bytes and sha256 are the
    whole file's (what the ``.sha256`` sidecar records). The copy is read back once (from
    the page cache): its sha256 goes into the trailer, and the same hash object then takes
    the trailer bytes, so the whole-file digest costs no second pass.

    Copy and hash run in their own thread at a lower CPU priority (nice +10; Linux niceness
    is per thread and LMDB's internal copy thread inherits it), while this thread fdatasyncs
    the growing file every ``FLUSH_EVERY`` bytes so its dirty pages never pile up into one
    huge flush that the WAL's fsyncs would queue behind.
    """
    outcome = _Outcome()
    ph = phases.current()  # the copy thread below does not inherit the context

    def run() -> None:
        _lower_priority()
        try:
            started = time.perf_counter()
            with os.fdopen(out_fd, "wb", closefd=False) as f:
                outcome.checkpoint = cp = copy_env(engine, f)
            copied = time.perf_counter()
            phases.add(ph, "copy", copied - started)
            h, data_len = files.sha256_fd(out_fd)
            phases.add(ph, "hash", time.perf_counter() - copied)
            trailer = snapfile.encode_trailer(data_len, h.copy().digest(), engine.namespace, cp.encode())
            os.lseek(out_fd, data_len, os.SEEK_SET)
            files.write_all(out_fd, trailer)
            h.update(trailer)
            outcome.digest, outcome.size = h.hexdigest(), data_len + len(trailer)
        except BaseException as exc:  # handed to the waiting thread below
            outcome.error = exc

    worker = threading.Thread(target=run, name=f"snapshot-{engine.namespace}", daemon=True)
    worker.start()
    flushed = 0
    flush_error: OSError | None = None
    while worker.is_alive():
        worker.join(FLUSH_POLL_SECONDS)
        if flush_error is None:
            try:
                size = os.fstat(out_fd).st_size
                if size - flushed >= FLUSH_EVERY:
                    fsutil.fdatasync(out_fd)
                    flushed = size
            except OSError as exc:
                flush_error = exc  # LMDB's copy cannot be interrupted; report after it ends
    error = outcome.error
    if isinstance(error, lmdb.Error):
        raise _storage_error(error, dest) from error
    if isinstance(error, OSError):
        raise from_os_error(error, dest) from error
    if isinstance(error, BaseException):
        raise error
    if flush_error is not None:
        raise from_os_error(flush_error, dest) from flush_error
    assert outcome.checkpoint is not None
    return outcome.checkpoint, outcome.size, outcome.digest


@dataclass(slots=True)
class _Outcome:
    checkpoint: Checkpoint | None = None
    digest: str = ""
    size: int = 0
    error: BaseException | None = None


def _lower_priority() -> None:
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), SNAPSHOT_NICE)
    except (OSError, AttributeError):
        pass  # best effort: without it the snapshot only competes harder for the CPU


def _storage_error(exc: lmdb.Error, dest: Path) -> UnisonDBError:
    return lmdberrors.translate(exc, dest, what="LMDB snapshot")
