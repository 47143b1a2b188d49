"""Copy sealed WAL segments into ``backups/<ns>/<backupDir>/``.

Only *sealed* segments are copied: they are immutable (footer written, never opened for
writing again), so a copy is byte-identical to the source whenever it is taken. The
active segment is never copied; ``rotate=True`` seals it first (if it holds records), so
the backup reaches the latest acknowledged write.

Segments are copied in ascending id order, in batches (``BATCH_BYTES``/``BATCH_FILES``)
published with one directory fsync each (``files.Batch``). Per segment:

1. open the source read-only (a segment deleted by retention since the listing is a
   ``BackupGap``), check its size against the segment table and its header/footer
   (segment id, namespace, last LSN) — cheap, and it catches a wrong or truncated file;
2. read it whole, once (one segment in memory; from the page cache when it was written
   recently), and on those bytes check every record's CRC32C, LSN contiguity and the
   footer with the one WAL walker: a damaged segment is refused (``CorruptLog``, 500,
   naming the file and offset) instead of copied and vouched for. Header, records and
   footer are all under a CRC, so bytes that pass are the bytes the writer wrote;
3. the sidecar is the SHA-256 the WAL writer recorded at seal time when it still stands
   for the file (``_seal_time_hash``: this process's seal, or a ``wal/<segment>.sha256``
   not older than the segment's last change; ``storage/seghash.py``) — no second hash of
   every byte. Without one (or for a file already in the target) a second thread hashes
   the checked bytes and compares with any recorded hash: the checked bytes win, a missing
   record is written (first need), a stale one logged (``wal_backup.recorded_sha256_mismatch``)
   and rewritten, and never published;
4. if ``%09d.wal`` already exists in the target: identical (sha256) → nothing to copy, it
   is still reported; different → ``Conflict`` naming the file, never an overwrite;
5. otherwise kernel-copy the source to ``%09d.wal.tmp`` (``files.copy_range``: the pages
   just read are copied from the page cache, not read from disk again) and write
   ``%09d.wal.sha256.tmp``; the source's identity (inode, size, mtime, ctime) must be unchanged
   after the copy, so the bytes copied are the bytes checked;
6. at the end of the batch: every ``.tmp`` fsynced (behind the copy, on another thread),
   all renamed — segment, then its sidecar — then ONE directory fsync.

A failure part-way publishes the whole segments staged before it (complete and verified,
re-running is safe) and nothing of the one that failed. A kill -9 at any step leaves only
whole files (``files.Batch``); ``.tmp`` files are removed at the next start.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import structlog

from unisondb.backup import checksum, files, pacing, phases
from unisondb.backup.files import Batch, TargetDir, path_lock
from unisondb.backup.paths import Resolved, open_dir
from unisondb.errors import BackupGap, Conflict, CorruptLog, StorageError, from_os_error
from unisondb.storage import seghash, segment
from unisondb.storage.engine import Engine
from unisondb.storage.layout import segment_name
from unisondb.storage.wal import SegmentInfo

log = structlog.get_logger(__name__)

#: A batch ends after this many bytes or files: one directory fsync per batch, and a
#: kill -9 loses at most one batch of copying (re-running redoes it).
BATCH_BYTES = 256 << 20
BATCH_FILES = 64

#: Called with the number of bytes about to be copied (the backup pacer's seam).
Throttle = Callable[[int], None]


@dataclass(frozen=True, slots=True)
class WalCopy:
    segment_id: int
    path: Path
    size: int
    sha256: str
    #: False when an identical file was already there (nothing written).
    copied: bool

    @property
    def bytes_written(self) -> int:
        return self.size if self.copied else 0


def plan(engine: Engine, after_segment_id: int) -> list[SegmentInfo]:
    """Sealed segments with id > ``after_segment_id``, ascending; ``BackupGap`` on a hole.

    ``after_segment_id`` = 0 means "everything still on disk" and is never a gap. Otherwise
    segment ``after_segment_id + 1`` is the first one the caller lacks; if the oldest
    segment on disk is newer than that, the ones in between are gone (retention deleted
    them) and silently skipping them would leave a hole in the caller's archive. After a
    restore, ids below the new timeline's first segment are not part of this history.
    """
    on_disk = engine.segments()
    # Ids below the current timeline's first segment (after a restore) belong to an abandoned
    # history: nobody can back them up any more, and nobody needs to.
    first_missing = max(after_segment_id + 1, engine.checkpoint().timeline_first_segment)
    if after_segment_id > 0 and on_disk and on_disk[0].segment_id > first_missing:
        raise gap_error(engine, first_missing, on_disk[0].segment_id - 1, on_disk[0].segment_id)
    return [s for s in engine.sealed_segments() if s.segment_id > after_segment_id]


def gap_error(engine: Engine, first: int, last: int, oldest: int) -> BackupGap:
    ids = f"segment id {first} is" if first == last else f"segment ids {first}-{last} are"
    return BackupGap(
        f"WAL backup gap in namespace {engine.namespace}: {ids} no longer on disk; WAL "
        f"retention (--wal-retention) deleted them. The oldest segment still on disk is "
        f"{oldest}. Take a new B-tree snapshot and restart the WAL archive from it "
        f"(afterSegmentId={oldest - 1})",
    )


def backup_wal(
    engine: Engine,
    target: Resolved,
    after_segment_id: int,
    rotate: bool = False,
    throttle: Throttle | None = None,
) -> list[WalCopy]:
    """Run one WAL backup request (blocking: call it from a worker thread).

    Without ``throttle`` the copy is charged to the server's pacer (``backup/pacing.py``:
    adaptive brake and ``--backup-rate-limit``), like a snapshot. Unlike a snapshot it runs
    on the caller's (pooled) thread, so it does not lower that thread's I/O priority: the
    setting would outlive the request."""
    if rotate:
        engine.rotate()
    todo = plan(engine, after_segment_id)
    if not todo:
        return []
    session = None
    if throttle is None:
        session = pacing.current().session(engine.namespace, "wal")
        throttle = session.charge
    copies: list[WalCopy] = []
    try:
        with (
            TargetDir(open_dir(target), target.path) as tdir,
            ThreadPoolExecutor(1, thread_name_prefix="wal-backup-hash") as hasher,
        ):
            for batch in _batches(todo):
                copies += _copy_batch(engine, batch, tdir, hasher, throttle)
    finally:
        if session is not None:
            rep = session.report()
            # The sleeps happened inside the timed "write" (the copy): move them to "pace",
            # so the phases still add up to the backup's duration.
            ph = phases.current()
            phases.add(ph, "write", -min(rep.total, ph.get("write", 0.0) if ph is not None else 0.0))
            phases.add(ph, "pace", rep.total)
            pacing.log_report(engine.namespace, "wal", rep)
    return copies


def _batches(todo: list[SegmentInfo]) -> Iterator[list[SegmentInfo]]:
    batch: list[SegmentInfo] = []
    size = 0
    for info in todo:
        if batch and (size + info.size > BATCH_BYTES or len(batch) >= BATCH_FILES):
            yield batch
            batch, size = [], 0
        batch.append(info)
        size += info.size
    if batch:
        yield batch


def _copy_batch(
    engine: Engine,
    infos: list[SegmentInfo],
    tdir: TargetDir,
    hasher: ThreadPoolExecutor,
    throttle: Throttle | None,
) -> list[WalCopy]:
    out: list[WalCopy] = []
    # Destination locks are taken in ascending id order by every request, so two requests
    # over overlapping ranges wait for each other instead of deadlocking; they are held
    # until the batch is published (the second then finds identical files).
    with ExitStack() as held, tdir.batch() as batch:
        try:
            for info in infos:
                held.enter_context(path_lock(tdir.path / segment_name(info.segment_id)))
                out.append(_stage_segment(engine, info, tdir, batch, hasher, throttle))
        except BaseException:
            # The segments staged before the failing one are whole and verified: publish
            # them (what a per-segment backup had already done). If that fails too, the
            # first error is the one to report; nothing partial is left either way.
            try:
                with phases.timed("sync"):
                    batch.publish()
            except Exception:
                pass
            raise
        with phases.timed("sync"):
            batch.publish()
    return out


def _stage_segment(
    engine: Engine,
    info: SegmentInfo,
    tdir: TargetDir,
    batch: Batch,
    hasher: ThreadPoolExecutor,
    throttle: Throttle | None,
) -> WalCopy:
    name = segment_name(info.segment_id)
    dest = tdir.path / name
    try:
        src = os.open(info.path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        oldest = min((s.segment_id for s in engine.segments()), default=0)
        raise BackupGap(
            f"WAL backup gap in namespace {engine.namespace}: segment id "
            f"{info.segment_id} was deleted by WAL retention (--wal-retention) while this "
            f"backup was running. The oldest segment still on disk is {oldest}",
        ) from None
    except OSError as exc:
        raise from_os_error(exc, info.path) from exc
    try:
        side = checksum.sidecar_name(name)
        dest_st = tdir.require_regular(name)
        side_st = tdir.require_regular(side)
        with phases.timed("read"):
            _check_source(engine, info, src)
            before = _identity(src, info)
            # A file already in the target is compared by content: with the hash of the
            # bytes checked now, never with a recorded one (a wrong record would read as a
            # Conflict). Re-running a backup is the rare path.
            recorded = None if dest_st or side_st else _seal_time_hash(info, before.ctime_ns)
            hashed = _read_checked(src, info, hasher, recorded)
        checked = [recorded is not None]

        def checked_hex() -> str:
            # The hash runs on ``hasher`` behind the record checks and the copy; it is
            # waited for only where its value is needed.
            with phases.timed("read"):
                digest = hashed.result()
                if not checked[0]:
                    _cross_check(info, digest)
                    checked[0] = True
            return digest

        if dest_st is not None:
            source_hex = checked_hex()
            existing = tdir.hash_file(name)
            if existing != source_hex:
                raise Conflict(
                    f"{dest} already exists with different content (sha256 {existing}) "
                    f"than sealed segment {info.segment_id} (sha256 {source_hex}); "
                    "refusing to overwrite a backup file: choose another backupDir or "
                    "move the old file away"
                )
            checksum.ensure_sidecar(tdir, name, source_hex, batch)
            batch.dir_dirty = True  # a previous run may have died before its directory fsync
            batch.uncache_behind(src)
            return WalCopy(info.segment_id, dest, info.size, source_hex, copied=False)
        group: list[tuple[str, Callable[[int], object]]] = [
            (name, lambda fd: _copy(src, fd, info, before, throttle))
        ]
        if side_st is not None:
            checksum.ensure_sidecar(tdir, name, checked_hex())  # Conflict before copying
        else:
            group.append((side, lambda fd: _write_sidecar(fd, name, checked_hex())))
        batch.add(group)
        # The server never reads a sealed segment again in normal operation: uncache it
        # (on the syncer thread; ``add`` has finished copying).
        batch.uncache_behind(src)
        return WalCopy(info.segment_id, dest, info.size, checked_hex(), copied=True)
    finally:
        os.close(src)


class _Identity(NamedTuple):
    """Of the open source: unchanged from the check to the end of the copy means the bytes
    copied are the bytes checked."""

    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int


def _identity(src: int, info: SegmentInfo) -> _Identity:
    try:
        st = os.fstat(src)
    except OSError as exc:
        raise from_os_error(exc, info.path) from exc
    return _Identity(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _seal_time_hash(info: SegmentInfo, changed_ns: int) -> str | None:
    """The SHA-256 recorded when the segment was sealed, if it still stands for the file.

    This process's own seal (``SegmentInfo.sha256``: hashed from the bytes the writer
    wrote, in memory) always does; a ``wal/<segment>.sha256`` from an earlier run does
    unless the segment changed after it was written (``seghash.read``: ctime vs mtime).
    Used, it spares the backup a second hash of every byte (the CPU that kept a WAL backup
    above ``cp``); the record checks still run on every byte (docs/ARCHITECTURE.md, "what
    a WAL backup's .sha256 vouches for")."""
    if info.sha256 is not None:
        return info.sha256
    return seghash.read(info.path, changed_ns)


def _copy(
    src: int,
    dst: int,
    info: SegmentInfo,
    before: _Identity,
    throttle: Throttle | None,
) -> None:
    with phases.timed("write"):
        files.copy_range(src, dst, info.size, throttle)
    if _identity(src, info) != before:
        raise StorageError(
            f"{info.path} changed while being backed up (inode, size or mtime differ from "
            "when its records were checked); a sealed segment must never change: check "
            "what writes to the WAL directory"
        )


def _write_sidecar(fd: int, name: str, hexdigest: str) -> None:
    with phases.timed("sidecar"):
        files.write_all(fd, checksum.sidecar_line(hexdigest, name).encode())


def _check_source(engine: Engine, info: SegmentInfo, src: int) -> None:
    """Size, header and footer of the source agree with the sealed-segment table."""
    try:
        size = os.fstat(src).st_size
        head = os.pread(src, segment.HEADER_SIZE, 0)
        tail = os.pread(src, segment.FOOTER_SIZE, max(size - segment.FOOTER_SIZE, 0))
    except OSError as exc:
        raise from_os_error(exc, info.path) from exc
    if size != info.size:
        raise StorageError(
            f"{info.path} is {size} bytes but sealed segment {info.segment_id} was sealed at "
            f"{info.size} bytes: a sealed segment must never change; check the WAL directory"
        )
    header = segment.decode_header(head, info.path)
    footer = segment.try_decode_footer(head + tail)
    if header.segment_id != info.segment_id or header.ns_crc != segment.namespace_crc(engine.namespace):
        raise CorruptLog(
            f"header does not belong to segment {info.segment_id} of namespace {engine.namespace}",
            path=info.path,
            offset=0,
        )
    if footer is None or footer.last_lsn != info.last_lsn or footer.count != info.count:
        raise CorruptLog(
            "sealed segment footer is missing or does not match the segment table",
            path=info.path,
            offset=size - segment.FOOTER_SIZE,
        )


def _read_checked(
    src: int, info: SegmentInfo, hasher: ThreadPoolExecutor, recorded: str | None
) -> Future[str]:
    """Read the whole sealed segment once and check it record by record; its sha256 hex:
    ``recorded`` (the seal-time hash, ``_seal_time_hash``) or, without one, the hash of
    these bytes (being computed on ``hasher``).

    Every record's CRC32C, LSN contiguity from the header's first LSN, and the footer
    (count, last LSN, time range) are checked by the same scanner recovery uses, on the
    bytes just read (header and footer CRCs by ``_check_source``): every byte of a
    segment is under a CRC, so bytes that pass are the bytes the writer hashed at seal.
    Memory is one segment (``--wal-segment-size``, 16 MiB by default).
    """
    try:
        data = os.pread(src, info.size + 1, 0)  # one read; + 1: a file that grew is seen
        if 0 < len(data) < info.size:  # a short read (not seen on Linux for regular files)
            chunks = [data]
            got = len(data)
            while got <= info.size and (more := os.pread(src, info.size + 1 - got, got)):
                chunks.append(more)
                got += len(more)
            data = b"".join(chunks)
            del chunks
    except OSError as exc:
        raise from_os_error(exc, info.path) from exc
    if len(data) != info.size:
        raise StorageError(
            f"{info.path} changed size while being copied ({len(data)} bytes read, "
            f"{info.size} expected); a sealed segment must never change"
        )
    digest: Future[str]
    if recorded is not None:
        digest = Future()
        digest.set_result(recorded)
    else:
        digest = hasher.submit(_sha256_hex, data)
    try:
        # Every check of ``segment.scan`` without decoding the entries (one walker).
        scanned = segment.walk_bytes(info.path, data)
    except CorruptLog as exc:
        digest.cancel()
        # The HTTP edge shows only the message, so what to do is part of it.
        raise CorruptLog(
            f"refusing to back up damaged WAL segment {info.segment_id}: {exc.message}; the "
            "segments before it were backed up. Keep any earlier archived copy of this "
            "segment (its .sha256 still checks it), check the disk, and take a new B-tree "
            "snapshot so the archive does not need this segment",
        ) from None
    if scanned.footer is None:
        raise CorruptLog(
            f"refusing to back up WAL segment {info.segment_id}: its records do not end in a valid footer",
            path=info.path,
            offset=scanned.data_end,
        )
    return digest


def _sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _cross_check(info: SegmentInfo, checked_hex: str) -> None:
    """Compare the hash of the checked bytes (computed because no seal-time hash stood
    for the file, or a file already in the target needed a fresh one) with the recorded one.

    The checked bytes win whatever the record says: a missing or torn record is written
    now ("first need"), a disagreeing one is logged and rewritten. Either way the backup's
    sidecar is the hash of the bytes whose every record was just checked.
    """
    in_memory = info.sha256
    recorded = in_memory if in_memory is not None else seghash.read(info.path)
    if recorded == checked_hex:
        return
    if recorded is not None:
        log.warning(
            "wal_backup.recorded_sha256_mismatch",
            path=str(info.path),
            recorded=recorded,
            checked=checked_hex,
            source=str(seghash.sidecar_path(info.path)) if in_memory is None else "this process's seal",
            reason="the segment's records all check, so its bytes are kept and the backup's "
            ".sha256 is theirs; the recorded hash is stale (the file was replaced?) and is rewritten",
        )
    try:
        seghash.write(info.path, checked_hex)
    except OSError as exc:
        log.warning("wal_backup.sha256_not_recorded", path=str(info.path), error=str(exc))
