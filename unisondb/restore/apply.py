"""Apply a verified plan: stage a complete namespace directory, then publish it atomically.

Steps (the target namespace is untouched until step 5)::

    1. lock    flock the data directory itself (one restore at a time per data dir; no
               lock file is left behind), then the namespace's own <ns>/LOCK (refused while a
               server holds it); delete leftover .restore-<ns>-<hex> staging dirs of killed
               runs
    2. stage   <data>/.restore-<ns>-<hex>/ with its own LOCK (held), db/data.mdb = the
               snapshot's LMDB bytes, read once: hashed while copied (trailer and
               sidecar checked), then its structure walked on the staged copy and its
               content check started; wal/ empty
    3. replay  each segment read once (``verify.ChainWalk``: sha256 + sidecar, every
               record CRC, LSN contiguity, footer, anchor, time target) and its records
               applied from the same bytes, in LMDB transactions (``sync=False``) with
               their checkpoint; then the final checkpoint: new timeline, segment id =
               highest seen
    4. sync    wait for the content check; env.sync(True), fsync every staged directory
               and the data dir — nothing is published before this (see ``_replay``)
    5. publish <ns> exists: renameat2(RENAME_EXCHANGE) swaps the two directories in one
               atomic step, the data dir is fsynced, and the old tree (now at the staging
               name) is deleted; <ns> absent: renameat2(RENAME_NOREPLACE)

``kill -9`` at any instant therefore leaves either the old namespace or the complete new
one under ``<ns>`` — never a mix — plus at most a ``.restore-*`` directory that the next
restore deletes. Both LOCKs are held until the end, so no server can open the namespace
in between.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import gc
import hashlib
import os
import re
import secrets
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

from unisondb.errors import Conflict, CorruptSnapshot, LockedError, StorageError, UnisonDBError, from_os_error
from unisondb.restore import sources
from unisondb.restore.errors import BackupCorrupt, DataExists
from unisondb.restore.inventory import (
    SegmentMeta,
    check_sidecar,
    inspect_target,
    raise_on_mismatch,
    start_content_check,
)
from unisondb.restore.progress import Progress
from unisondb.restore.timeline import Link
from unisondb.restore.verify import BEGIN, END, RUN, ChainWalk, Run, VerifiedPlan, checksum_warnings
from unisondb.storage import fingerprint, fsutil, layout, lmdbfile, mapped, segment, snapfile
from unisondb.storage.btree import BTree, Checkpoint
from unisondb.storage.history import Lineage
from unisondb.storage.lockfile import NamespaceLock
from unisondb.storage.walk import Op

#: Records per LMDB transaction while replaying (bounded also by REPLAY_BATCH_BYTES).
REPLAY_BATCH = 100_000
#: Budget of one replay transaction, counting each record as at least one LMDB page: a
#: write transaction keeps every page it dirties in memory until it commits (random keys
#: over a big tree dirty about a leaf page per record), so this, not the record count,
#: bounds the restore's memory. With ``sync=False`` a commit costs no fsync, so smaller
#: transactions cost little.
REPLAY_BATCH_BYTES = 8 << 20
_PAGE = 4096
#: Records between two looks at this process's file-backed RSS, and the level above which
#: the staged B-tree's mapped pages are given back: one put at a random key maps 64 KiB
#: (fault-around) to ~256 KiB (large page-cache folios) measured here.
RELEASE_RECORDS = 64
RELEASE_ABOVE = 32 << 20
_COPY_CHUNK = 4 << 20
#: The staged copy is written in pieces this small: the page cache keeps what a write
#: brings in as folios of up to its size, and a fault on a mapped file maps the whole
#: folio — after 4 MiB writes, every put the replay makes at a random key mapped ~1.6 MiB
#: of the B-tree (measured), after 64 KiB writes 64 KiB.
_WRITE_PIECE = 64 << 10
_STAGING_RE = re.compile(r"^\.restore-(?P<ns>.+)-(?P<token>[0-9a-f]{12})$")

#: Test hook: called with the name of each step boundary (tests kill the process there).
crash_hook: Callable[[str], None] | None = None


def _step(name: str) -> None:
    if crash_hook is not None:
        crash_hook(name)


@dataclass(slots=True)
class RestoreSummary:
    namespace: str
    target_dir: Path
    end_lsn: int
    end_time_ns: int
    timeline: int
    next_segment_id: int
    history: bytes
    proof: Proof
    records_replayed: int
    wal_bytes: int
    snapshot_bytes: int
    replaced_existing: bool
    verify_seconds: float
    copy_seconds: float
    replay_seconds: float
    #: Time spent waiting, after the replay, for the snapshot content check to finish.
    content_wait_seconds: float
    publish_seconds: float
    total_seconds: float
    removed_staging: list[Path] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def staging_dirs(data_dir: Path, namespace: str) -> list[Path]:
    """Leftover staging directories of ``namespace`` (exact name match, not a prefix)."""
    if not data_dir.is_dir():
        return []
    out = []
    for child in data_dir.iterdir():
        m = _STAGING_RE.match(child.name)
        if m and m.group("ns") == namespace and child.is_dir() and not child.is_symlink():
            out.append(child)
    return sorted(out)


class DataDirLock:
    """An ``flock`` on the data directory itself: one restore at a time per data dir.

    Servers do not take it (they lock each namespace's LOCK), so it only keeps two
    restores from cleaning up each other's staging directories.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as exc:
            raise from_os_error(exc, self.path) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LockedError(
                f"another 'unisondb restore' is running in {self.path}", hint="wait for it to finish"
            ) from None
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None


def apply_plan(
    vp: VerifiedPlan, *, force: bool = False, progress: Progress | None = None, started: float | None = None
) -> RestoreSummary:
    """Publish the verified plan into ``<data-dir>/<ns>``. See the module docstring."""
    progress = progress or Progress()
    plan = vp.plan
    t_start = time.perf_counter()
    data_dir, ns = plan.data_dir, plan.namespace
    try:
        # make_dirs, not Path.mkdir: the fsync of data_dir at publish does not make a data_dir
        # created here durable in its own parent (see fsutil.make_dirs).
        fsutil.make_dirs(data_dir)
    except OSError as exc:
        raise from_os_error(exc, data_dir) from exc
    ns_dir = layout.namespace_dir(data_dir, ns)
    _refuse_if_busy_or_full(data_dir, ns, force)
    restore_lock = DataDirLock(data_dir)
    restore_lock.acquire()
    ns_lock: NamespaceLock | None = None
    stage_lock: NamespaceLock | None = None
    staging: Path | None = None
    try:
        existed = ns_dir.exists()
        if existed:
            ns_lock = NamespaceLock(layout.lock_path(data_dir, ns))
            ns_lock.acquire()
            _refuse_if_busy_or_full(data_dir, ns, force, check_lock=False)  # again, under the lock
        removed = _remove_stale_staging(data_dir, ns)
        _step("locked")
        staging = data_dir / f".restore-{ns}-{secrets.token_hex(6)}"
        try:
            staging.mkdir()
        except OSError as exc:
            raise from_os_error(exc, data_dir) from exc
        stage_lock = NamespaceLock(staging / "LOCK")
        stage_lock.acquire()
        _step("staging-created")
        t_copy = time.perf_counter()
        flushing = _copy_snapshot(vp, staging / "db" / "data.mdb", progress)
        copy_seconds = time.perf_counter() - t_copy
        _step("snapshot-copied")
        t_replay = time.perf_counter()
        proof = _replay(vp, staging / "db", progress)
        replay_seconds = time.perf_counter() - t_replay
        _step("replayed")
        # The snapshot's content check ran in worker processes while we copied and
        # replayed (verify_plan(background_content=True)); nothing is published before it
        # has proven every pair.
        if vp.content is not None:
            vp.content.wait()
        flushing.result()  # done long ago (the replay's env.sync(True) flushed it too)
        t_pub = time.perf_counter()
        try:
            (staging / "wal").mkdir()
            _start_history(vp, staging / "wal", proof)
            for d in (staging / "db", staging / "wal", staging, data_dir):
                fsutil.fsync_dir(d)
        except OSError as exc:
            raise from_os_error(exc, staging) from exc
        _step("synced")
        if existed:
            _exchange(staging, ns_dir)
            _step("exchanged")
            # ``staging`` now names the old tree; deleting it is the last step.
        else:
            _rename_noreplace(staging, ns_dir)
            staging = None
            _step("renamed")
        try:
            # An error here (EIO: a power cut) is one error line too, like every step before.
            fsutil.fsync_dir(data_dir)
            if staging is not None:
                _rmtree(staging)
                staging = None
                fsutil.fsync_dir(data_dir)
        except OSError as exc:
            raise from_os_error(exc, data_dir) from exc
        _step("published")
        publish_seconds = time.perf_counter() - t_pub
    except BaseException:
        if vp.content is not None:
            vp.content.cancel()
        if staging is not None:
            _rmtree_quietly(staging)
        raise
    finally:
        if stage_lock is not None:
            stage_lock.release()
        if ns_lock is not None:
            ns_lock.release()
        restore_lock.release()
    total = time.perf_counter() - (started if started is not None else t_start)
    return RestoreSummary(
        namespace=ns,
        target_dir=ns_dir,
        end_lsn=vp.end_lsn,
        end_time_ns=vp.end_time_ns,
        timeline=plan.new_timeline,
        next_segment_id=plan.new_segment_id,
        history=plan.new_history,
        proof=proof,
        records_replayed=vp.records,
        wal_bytes=vp.wal_bytes,
        snapshot_bytes=plan.snapshot.size,
        replaced_existing=existed,
        verify_seconds=vp.seconds,
        copy_seconds=copy_seconds,
        replay_seconds=replay_seconds,
        content_wait_seconds=vp.content.waited if vp.content is not None else 0.0,
        publish_seconds=publish_seconds,
        total_seconds=total,
        removed_staging=removed,
        warnings=list(vp.warnings),
    )


def _refuse_if_busy_or_full(data_dir: Path, ns: str, force: bool, *, check_lock: bool = True) -> None:
    existing = inspect_target(data_dir, ns)
    if check_lock and existing.locked_by is not None:
        who = f" (held by pid {existing.locked_by})" if existing.locked_by else ""
        raise LockedError(
            f"namespace is locked: {layout.lock_path(data_dir, ns)}{who}; a UnisonDB server or "
            "another offline tool is using it",
            hint="stop the server first (restore works offline only)",
        )
    if existing.has_data and not force:
        raise DataExists(
            f"{existing.path} already holds data (db/data.mdb or WAL segments); refusing to replace it",
            hint="add --force to replace it (the current B-tree and WAL are deleted), or "
            "restore into another --data-dir; --dry-run shows what would be replaced",
        )


def _remove_stale_staging(data_dir: Path, ns: str) -> list[Path]:
    """Delete staging dirs of killed restores (we hold the restore lock: none is live)."""
    removed = staging_dirs(data_dir, ns)
    for d in removed:
        _rmtree(d)
    if removed:
        try:
            fsutil.fsync_dir(data_dir)
        except OSError as exc:
            raise from_os_error(exc, data_dir) from exc
    return removed


class _Flush:
    """The staged copy's ``fdatasync``, on a thread of its own (the call runs without the
    GIL): the disk writes the copy while this process walks, replays and hashes.

    Nothing waits for it until publication, and nothing depends on it for safety: the
    replay's ``env.sync(True)`` (``btree.sync()``) is an ``fdatasync`` of the same file, so
    it makes every byte of the copy durable as well, and nothing is published before it
    (see ``_replay``). This thread only starts the writeback early; ``result`` reports its
    error, if any, before anything is published."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._error: OSError | None = None
        self._thread = threading.Thread(target=self._run, name="restore-flush", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDONLY)
            try:
                os.fdatasync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            self._error = exc

    def result(self) -> None:
        self._thread.join()
        if self._error is not None:
            raise from_os_error(self._error, self.path) from self._error


def _copy_snapshot(vp: VerifiedPlan, dest: Path, progress: Progress) -> _Flush:
    """Copy the snapshot's LMDB bytes into staging, reading each byte once.

    Every chunk is hashed on a second thread (hashlib runs without the GIL) while this one
    writes it: one pass gives the sha256 of the LMDB bytes (the self-verifying trailer's,
    ``snapfile.py``) and, with the trailer added, of the whole file (the ``.sha256``
    sidecar's). The trailer itself is not copied, so the staged file is a plain data.mdb.
    Then, on the staged copy (page cache, not the input again): the checksums and LMDB's
    structure (``lmdbfile`` page walk, before LMDB maps it). The copy is not fsynced here
    (``_Flush``: the writeback runs behind the replay).

    The content check (every pair of the input hashed, ``start_content_check``) starts
    before the copy, in a worker process, so it overlaps the copy, the walk and the replay
    instead of starting after them. It maps the input before the walk has checked it, but
    only in that worker: a damaged file can at worst kill the worker, whose failure makes
    ``ContentCheck.wait`` scan in this process — which it does only after the walk here
    has passed, on bytes proven equal to the walked copy by their sha256. Its result counts
    only if that sha256 matches too, and ``apply_plan`` waits for it before publishing.
    """
    snap = vp.plan.snapshot
    src = snap.path
    trailer = snapfile.read_trailer(sources.materialize(src))
    data_len = trailer.data_len if trailer is not None else snap.size
    if vp.deferred and snap.keys >= fingerprint.PARALLEL_MIN_PAIRS:
        # One worker: more would have this process cut the keyspace into ranges — a cursor
        # pass over the input before the walk has checked it. (A smaller keyspace is
        # scanned in this process, so only after the walk, below.)
        vp.content = start_content_check(snap, None, background=True)
    h = hashlib.sha256()
    progress.phase("copy snapshot", snap.size)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with (
            ThreadPoolExecutor(1, thread_name_prefix="restore-sha256") as pool,
            sources.open_plain(src) as fin,
            open(dest, "xb") as fout,
        ):
            left = data_len
            hashing: Future[None] | None = None
            while left > 0:
                chunk = fin.read(min(_COPY_CHUNK, left))
                if not chunk:
                    break
                if hashing is not None:
                    hashing.result()  # in order: the previous chunk is in the digest
                hashing = pool.submit(h.update, chunk)
                view = memoryview(chunk)
                for at in range(0, len(chunk), _WRITE_PIECE):
                    fout.write(view[at : at + _WRITE_PIECE])
                left -= len(chunk)
                progress.advance(len(chunk))
            if hashing is not None:
                hashing.result()
            tail = fin.read(snapfile.TRAILER_SIZE + 1)
            fout.flush()
    except OSError as exc:
        raise from_os_error(exc, dest if exc.filename == str(dest) else src) from exc
    flushing = _Flush(dest)
    whole = h.copy()
    whole.update(tail)
    digest = whole.hexdigest()
    if left or (trailer is not None and tail != trailer.raw) or (trailer is None and tail):
        raise BackupCorrupt(f"snapshot {src} changed while the restore was reading it (its size changed)")
    if vp.snapshot_sha256 and digest != vp.snapshot_sha256:
        raise BackupCorrupt(
            f"snapshot {src} changed after it was verified (sha256 {digest}, verified {vp.snapshot_sha256})"
        )
    if vp.deferred:
        res = check_sidecar(src, digest)
        raise_on_mismatch(res)
        vp.checksums.insert(0, res)
        vp.snapshot_sha256 = digest
    if trailer is not None and h.digest() != trailer.data_sha256:
        raise CorruptSnapshot(
            f"{src} is corrupt: sha256 of its {trailer.data_len} data bytes is "
            f"{h.hexdigest()} but its trailer records {trailer.data_sha256_hex}",
            hint="the file changed after it was written (disk or transfer damage); "
            "use another copy of this snapshot or an older one",
        )
    if vp.deferred:
        # Every page LMDB can reach is present and well formed before LMDB maps the file
        # in this process (a damaged file is reported, never opened): the walk reads the
        # staged copy, from the page cache.
        lmdbfile.check_file(dest, "snapshot", shown=src, walk=True)
        if vp.content is not None:
            vp.content.remember(digest)
        else:
            vp.content = start_content_check(snap, digest, background=True)
    return flushing


@dataclass(frozen=True, slots=True)
class Proof:
    """What the restore proved about the state it built (fingerprints, ``fingerprint.py``)."""

    #: Digest of the restored state's fingerprint.
    fingerprint: bytes
    #: The snapshot's content equals its own recorded fingerprint (every pair hashed).
    snapshot_checked: bool
    #: Segment boundaries where the rebuilt state matched the recorded fingerprint.
    boundaries: int
    #: Last LSN whose state matched a recorded fingerprint (None: no record to compare).
    proven_lsn: int | None
    end_lsn: int

    @property
    def end_proven(self) -> bool:
        return self.proven_lsn == self.end_lsn

    def describe(self) -> str:
        if self.end_proven:
            return (
                f"state fingerprint {fingerprint.short(self.fingerprint)} equals the one "
                f"the server recorded at LSN {self.end_lsn}: the restored state is "
                "exactly the original state there"
            )
        where = (
            f"last proven at LSN {self.proven_lsn}"
            if self.proven_lsn is not None
            else "no recorded fingerprint on the way"
        )
        return (
            f"state fingerprint {fingerprint.short(self.fingerprint)}; LSN {self.end_lsn} "
            f"is inside a segment, where no fingerprint is recorded ({where}; every "
            "record CRC checked)"
        )


def _replay(vp: VerifiedPlan, db_dir: Path, progress: Progress) -> Proof:
    """Replay the plan's WAL into the staged B-tree and start the new history.

    Every segment is read once: ``ChainWalk`` hashes it, checks its sidecar, walks its
    records (CRC, LSN contiguity, footer, anchor, time target) and decodes the entries
    of those to replay, from the same bytes, into flat (key, value) pairs
    (``Walk.records(ops=...)``: no object per record), which this loop gathers run by run
    into transactions (``BTree.apply_ops``).

    Safety of ``sync=False`` (``BTree(durable=False)``) and of replaying records whose
    file is still being checked: the staged directory is ``.restore-<ns>-<hex>``, which
    nothing opens (a server opens ``<ns>``; both LOCKs are held). Nothing is published
    before ``btree.sync()`` (``env.sync(True)``) here and the fsyncs of every staged
    directory and of the data dir in ``apply_plan``; a check that fails later deletes the
    staging directory, and a restore killed at any instant leaves one that the next
    restore deletes (``_remove_stale_staging``) before it stages anything. So a lost or
    half-written page of the staged environment can never be served, and the replay
    commits at every segment boundary — where the state fingerprint is compared with the
    one the server recorded — without paying an fsync each time.
    """
    progress.phase("replay WAL", vp.records, unit="records")
    # The replay makes millions of small acyclic objects (records, entries, keys): the
    # cycle collector would scan the live ones again and again and find nothing.
    collecting = gc.isenabled()
    gc.disable()
    try:
        return _replay_chain(vp, db_dir, progress)
    finally:
        if collecting:
            gc.enable()


def _replay_chain(vp: VerifiedPlan, db_dir: Path, progress: Progress) -> Proof:
    plan = vp.plan
    cp = plan.snapshot.checkpoint
    btree = BTree(db_dir, durable=False)
    pages = mapped.MappedFile(db_dir / "data.mdb")
    try:
        got = btree.read_checkpoint()
        if got != cp:
            raise BackupCorrupt(
                f"the staged snapshot's checkpoint {got} differs from the one verified ({cp})"
            )
        # The snapshot's content is proven against its recorded fingerprint by the
        # content check (waited for before publishing), and the staged copy has the
        # checked sha256, so it is not hashed a second time here.
        proven: int | None = cp.applied_lsn
        boundaries = 0
        last_lsn = cp.applied_lsn
        # ``ops``: what the walk appends (the entries of the records of the next run);
        # ``batch``: the entries of the records of the transaction being gathered.
        ops: list[Op] = []
        batch: list[Op] = []
        records = size = 0
        where: tuple[Link, Run] | None = None
        chain = ChainWalk(plan, [s.link for s in vp.steps], end_lsn=None if vp.deferred else vp.end_lsn)

        def flush() -> None:
            nonlocal cp, batch, records, size
            if records:
                assert where is not None
                cp = _apply_batch(btree, batch, cp, *where, release)
                progress.advance(records)
                batch, records, size = [], 0, 0

        # LMDB maps the whole file; the pages the replay reads would stay in this
        # process's RSS (up to the B-tree's size): they are given back to the page cache
        # every RELEASE_RECORDS records, inside each transaction (``storage/mapped.py``;
        # the map size names the mapping: LMDB maps the file anew when it grows).
        def release() -> None:
            pages.release_over(RELEASE_ABOVE, btree.map_size)

        for kind, link, run in chain.walk(ops=ops):
            if kind == RUN:
                assert run is not None
                if run.first_lsn != last_lsn + 1:
                    raise BackupCorrupt(
                        f"{link.segment.path}: LSN {run.first_lsn} where {last_lsn + 1} was expected"
                    )
                batch += ops
                ops.clear()
                records += run.records
                # Each record counted as at least a page (REPLAY_BATCH_BYTES): its bytes
                # plus a page bounds max(its bytes, a page).
                size += run.end - run.start + run.records * _PAGE
                where = (link, run)
                last_lsn = run.last_lsn
                if records >= REPLAY_BATCH or size >= REPLAY_BATCH_BYTES:
                    flush()
                continue
            seg = link.segment
            if kind == BEGIN and link.from_lsn == seg.first_lsn and seg.start_fp is not None:
                flush()
                _prove(cp, seg.start_fp, seg, "before its first record")
                boundaries += 1
                proven = cp.applied_lsn
            elif kind == END and link.to_lsn == seg.last_lsn and seg.end_fp is not None:
                flush()
                _prove(cp, seg.end_fp, seg, "after its last record")
                boundaries += 1
                proven = cp.applied_lsn
        flush()
        assert chain.end_lsn is not None
        vp.steps, vp.end_lsn, vp.end_time_ns = chain.steps, chain.end_lsn, chain.end_time_ns
        if vp.deferred:
            vp.checksums += chain.checksums
            vp.warnings += checksum_warnings(vp.checksums)
        if last_lsn != vp.end_lsn:
            raise BackupCorrupt(f"replay ended at LSN {last_lsn}, verified end is {vp.end_lsn}")
        # The new history (a fork of the one the chain ended on): a random id, a timeline
        # above every one seen, and a first segment id above every id seen, which the
        # restore creates empty in wal/ so the server continues it instead of forking again.
        # Ids below it belong to other histories, so a WAL backup loop must not call them a
        # retention gap.
        parent = plan.chain.end_history if vp.steps else cp.history
        lineage = Lineage(plan.new_history, parent, vp.end_lsn, plan.new_timeline)
        cp = btree.apply(
            [],
            replace(
                cp,
                applied_lsn=vp.end_lsn,
                segment_id=plan.new_segment_id - 1,
                offset=0,
                time_ns=vp.end_time_ns or cp.time_ns,
            ).on_lineage(lineage, plan.new_segment_id),
        )
        # A deliberate restore may load a snapshot into another namespace: it is ours now.
        btree.write_namespace(plan.namespace)
        btree.sync()
    finally:
        pages.close()
        btree.close()
    return Proof(cp.fingerprint, True, boundaries, proven, vp.end_lsn)


def _start_history(vp: VerifiedPlan, wal_dir: Path, proof: Proof) -> None:
    """Create the new history's first (empty) segment, so a start continues it."""
    plan = vp.plan
    lineage = Lineage(
        plan.new_history,
        plan.chain.end_history if vp.steps else plan.snapshot.checkpoint.history,
        vp.end_lsn,
        plan.new_timeline,
    )
    header = segment.SegmentHeader.for_lineage(
        plan.new_segment_id,
        lineage,
        vp.end_lsn + 1,
        time.time_ns(),
        segment.namespace_crc(plan.namespace),
        proof.fingerprint,
    )
    try:
        fsutil.write_file_atomic(wal_dir / layout.segment_name(plan.new_segment_id), header.encode())
    except OSError as exc:
        raise from_os_error(exc, wal_dir) from exc


def _prove(cp: Checkpoint, recorded: bytes, seg: SegmentMeta, where: str) -> None:
    if cp.fingerprint != recorded:
        raise BackupCorrupt(
            f"the rebuilt state at LSN {cp.applied_lsn} hashes to "
            f"{fingerprint.short(cp.fingerprint)}, but {seg.path} recorded "
            f"{fingerprint.short(recorded)} {where}: the snapshot and this segment are not "
            "one history, or a record was altered",
            hint="use the WAL backups of the server the snapshot was taken from; 'unisondb "
            "backup verify --snapshot ... --wal ...' checks each file",
        )


def _apply_batch(
    btree: BTree, batch: list[Op], cp: Checkpoint, link: Link, last: Run, release: Callable[[], None]
) -> Checkpoint:
    """Apply the entries of the records up to the end of ``last`` (in ``link``)."""
    cp = cp.advance(last.last_lsn, link.segment.segment_id, last.end, last.time_ns)
    return btree.apply_ops(batch, cp, every=(RELEASE_RECORDS, release))


# --- atomic directory publication ---

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2


def _renameat2(src: Path, dst: Path, flags: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available in this C library")
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(dst))


def _exchange(staging: Path, ns_dir: Path) -> None:
    try:
        _renameat2(staging, ns_dir, _RENAME_EXCHANGE)
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise StorageError(
                f"cannot swap {staging} and {ns_dir} atomically: the file system or C library "
                f"does not support renameat2(RENAME_EXCHANGE) ({exc.strerror})",
                hint=f"the staged restore is complete in {staging}; with the server stopped, "
                f"move {ns_dir} aside and rename {staging} to {ns_dir} by hand",
            ) from exc
        raise from_os_error(exc, ns_dir) from exc


def _rename_noreplace(staging: Path, ns_dir: Path) -> None:
    try:
        _renameat2(staging, ns_dir, _RENAME_NOREPLACE)
    except OSError as exc:
        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise Conflict(
                f"{ns_dir} appeared while the restore was running (a server starting?); nothing was changed",
                hint="stop it and run the restore again",
            ) from exc
        if exc.errno in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            try:
                os.rename(staging, ns_dir)  # ns_dir did not exist a moment ago
            except OSError as exc2:
                raise from_os_error(exc2, ns_dir) from exc2
            return
        raise from_os_error(exc, ns_dir) from exc


def _rmtree(path: Path) -> None:
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise from_os_error(exc, path) from exc


def _rmtree_quietly(path: Path) -> None:
    try:
        shutil.rmtree(path)
    except (OSError, UnisonDBError):
        # Cleanup on an error path: the next restore removes what is left.
        pass
