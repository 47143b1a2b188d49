"""Copy sealed WAL segments into ``backups/<ns>/<backupDir>/``.

Only *sealed* segments are copied: they are immutable (footer written, never opened for
writing again), so a copy is byte-identical to the source whenever it is taken. The
active segment is never copied; ``rotate=True`` seals it first (if it holds records), so
the backup reaches the latest acknowledged write.

Per segment, in ascending id order:

1. open the source read-only (a segment deleted by retention since the listing is a
   ``BackupGap``), check its size against the segment table and its header/footer
   (segment id, namespace, last LSN) — cheap, and it catches a wrong or truncated file;
2. read it whole (one segment in memory) and check every record's CRC32C, LSN contiguity
   and the footer with ``segment.scan``: a damaged segment is refused (``CorruptLog``, 500,
   naming the file and offset) instead of copied and vouched for by a fresh ``.sha256``;
3. if ``%09d.wal`` already exists in the target: identical (sha256) → nothing to copy, it
   is still reported; different → ``Conflict`` naming the file, never an overwrite;
4. otherwise write those checked bytes to ``%09d.wal.tmp`` → fsync → rename → dir fsync;
5. write ``%09d.wal.sha256`` the same way (or check the one already there); if that fails,
   the segment just published is removed again (``checksum.complete_publish``).

A failure part-way leaves the segments before it complete and verified (re-running is
safe) and nothing partial for the one that failed.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from unisondb.backup import checksum, files, phases
from unisondb.backup.files import CHUNK, TargetDir, path_lock
from unisondb.backup.paths import Resolved, open_dir
from unisondb.errors import BackupGap, Conflict, CorruptLog, StorageError, from_os_error
from unisondb.storage import segment
from unisondb.storage.engine import Engine
from unisondb.storage.layout import segment_name
from unisondb.storage.wal import SegmentInfo


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
    engine: Engine, target: Resolved, after_segment_id: int, rotate: bool = False
) -> list[WalCopy]:
    """Run one WAL backup request (blocking: call it from a worker thread)."""
    if rotate:
        engine.rotate()
    todo = plan(engine, after_segment_id)
    if not todo:
        return []
    copies: list[WalCopy] = []
    with TargetDir(open_dir(target), target.path) as tdir:
        for info in todo:
            copies.append(copy_segment(engine, info, tdir))
    return copies


def copy_segment(engine: Engine, info: SegmentInfo, tdir: TargetDir) -> WalCopy:
    name = segment_name(info.segment_id)
    dest = tdir.path / name
    with path_lock(dest):
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
            with phases.timed("read"):
                _check_source(engine, info, src)
                data, source_hex = _read_checked(src, info)
            _drop_cache(src)
            dest_st = tdir.require_regular(name)
            if dest_st is not None:
                existing = tdir.hash_file(name)
                if existing != source_hex:
                    raise Conflict(
                        f"{dest} already exists with different content (sha256 {existing}) "
                        f"than sealed segment {info.segment_id} (sha256 {source_hex}); "
                        "refusing to overwrite a backup file: choose another backupDir or "
                        "move the old file away"
                    )
                checksum.ensure_sidecar(tdir, name, source_hex)
                tdir.sync()  # a previous run may have died before its directory fsync
                return WalCopy(info.segment_id, dest, info.size, source_hex, copied=False)
            if tdir.require_regular(checksum.sidecar_name(name)) is not None:
                checksum.ensure_sidecar(tdir, name, source_hex)  # Conflict before copying
            with phases.timed("write"):
                tdir.publish(name, lambda fd: _write(fd, data))
            with phases.timed("sidecar"):
                checksum.complete_publish(tdir, name, source_hex)
            return WalCopy(info.segment_id, dest, info.size, source_hex, copied=True)
        finally:
            os.close(src)


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


def _drop_cache(src: int) -> None:
    """The server never reads a sealed segment again in normal operation: uncache it."""
    try:
        os.posix_fadvise(src, 0, 0, os.POSIX_FADV_DONTNEED)
    except OSError:
        pass  # advice only


def _read_checked(src: int, info: SegmentInfo) -> tuple[bytes, str]:
    """The whole sealed segment, checked record by record; (bytes, sha256 hex).

    Every record's CRC32C, LSN contiguity from the header's first LSN, and the footer
    (count, last LSN, time range) are checked by the same scanner recovery uses, on the
    bytes that are then written to the backup — what the ``.sha256`` vouches for is what
    was checked. Memory is one segment (``--wal-segment-size``, 16 MiB by default).
    """
    chunks: list[bytes] = []
    off = 0
    try:
        while chunk := os.pread(src, CHUNK, off):
            chunks.append(chunk)
            off += len(chunk)
    except OSError as exc:
        raise from_os_error(exc, info.path) from exc
    if off != info.size:
        raise StorageError(
            f"{info.path} changed size while being copied ({off} bytes read, "
            f"{info.size} expected); a sealed segment must never change"
        )
    data = b"".join(chunks)
    del chunks
    try:
        scanned = segment.scan(info.path, data)
    except CorruptLog as exc:
        # The HTTP edge shows only the message, so what to do is part of it.
        raise CorruptLog(
            f"refusing to back up damaged WAL segment {info.segment_id}: {exc.message}; the "
            "segments before it were backed up. Keep any earlier archived copy of this "
            "segment (its .sha256 still checks it), check the disk, and take a new B-tree "
            "snapshot so the archive does not need this segment",
        ) from None
    if not scanned.sealed:
        raise CorruptLog(
            f"refusing to back up WAL segment {info.segment_id}: its records do not end in a valid footer",
            path=info.path,
            offset=scanned.data_end,
        )
    return data, hashlib.sha256(data).hexdigest()


def _write(fd: int, data: bytes) -> None:
    view = memoryview(data)
    for off in range(0, len(view), CHUNK):
        files.write_all(fd, view[off : off + CHUNK])
