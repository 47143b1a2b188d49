"""The segmented write-ahead log of one namespace.

Segments live in ``<ns>/wal/`` as ``%09d.wal`` (format in ``segment.py``). Exactly one
segment, the newest, is *active*; every older one is *sealed* (footer written, never
modified again). Segment ids only grow.

Threading: ``append``/``sync``/``rotate``/``delete_segment`` are called only by the
engine's writer thread. ``sealed_segments`` and ``summaries`` may be called from any
thread; they read a snapshot of the segment table under ``_lock``.

Opening (``Wal.open``) repairs what a crash can leave behind and refuses everything else:

* a torn tail in the newest segment is the end of the log: the file is copied to
  ``<name>.broken``, truncated to its last whole record and fsynced;
* a damaged record anywhere else, or in the middle of the newest segment, is ``CorruptLog``
  naming the file and offset;
* an older segment without a footer (only possible if a crash hit between writing the
  last record and the footer) is scanned fully and sealed;
* zeros after the last record of a segment are space the zero-filler wrote ahead of the
  writer (``zerofill.py``), not damage: the log ends there;
* a recorded-hash sidecar (``seghash.py``) whose segment is gone, or that is torn, is removed.

Sealing records the segment's SHA-256, hashed while its bytes were appended
(``seghash.SegmentHasher``), in ``SegmentInfo.sha256`` and in ``<segment>.sha256`` beside
it; a WAL backup cross-checks it against the bytes it checked (never trusts it alone).
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import structlog

from unisondb.errors import CorruptLog, from_os_error
from unisondb.storage import fsutil, seghash, segment
from unisondb.storage.history import Lineage
from unisondb.storage.segment import ActiveSegment, SegmentFooter, SegmentHeader
from unisondb.storage.zerofill import ZeroFiller

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class SegmentInfo:
    """What the WAL knows about one segment without reading it."""

    segment_id: int
    path: Path
    timeline: int
    first_lsn: int
    last_lsn: int  # first_lsn - 1 when empty
    count: int
    min_time_ns: int
    max_time_ns: int
    created_ns: int
    size: int
    sealed: bool
    lineage: Lineage = Lineage()
    #: State fingerprint digest after the last record (sealed segments; None if unknown).
    fingerprint: bytes | None = None
    #: SHA-256 hex of the whole file as this process wrote and sealed it (None: sealed by
    #: an earlier run or on open; ``seghash.read`` may know it, else it is computed on
    #: first need). A hint to cross-check, never a proof (``seghash.py``).
    sha256: str | None = None

    @property
    def history(self) -> bytes:
        return self.lineage.history


@dataclass(slots=True)
class OpenReport:
    """What ``Wal.open`` had to do, for logs and metrics."""

    truncated_bytes: int = 0
    broken_copy: Path | None = None
    sealed_on_open: int = 0


class Wal:
    def __init__(self, directory: Path, namespace: str) -> None:
        self.dir = directory
        self.namespace = namespace
        self.ns_crc = segment.namespace_crc(namespace)
        self._lock = threading.Lock()
        self._sealed: dict[int, SegmentInfo] = {}
        self.active: ActiveSegment | None = None
        self.report = OpenReport()
        #: Counters for metrics (read by the metrics collector).
        self.bytes_written = 0
        self.fsyncs = 0
        self.last_sync = (0.0, 0.0)
        self.rotations = 0
        #: (id, lineage, first LSN, start fingerprint) of the segment a rotation still has
        #: to create after its predecessor was sealed (set while that fails).
        self.unstarted: tuple[int, Lineage, int, bytes] | None = None
        #: Zero-fills the active segment ahead of the writer (None: preallocation off).
        self.zerofill: ZeroFiller | None = None
        #: (segment id, hasher) of the active segment's bytes as they are appended; None
        #: for a segment this process did not create (its hash is computed on first need).
        self._hasher: tuple[int, seghash.SegmentHasher] | None = None

    # --- opening ---

    @classmethod
    def open(cls, directory: Path, namespace: str, *, preallocate: int = 0, segment_size: int = 0) -> Wal:
        """Load the segment table and repair a torn tail; does not create a segment.

        ``preallocate`` > 0: keep that many bytes after the write position zero-filled (up
        to ``segment_size``) from a background thread, for cheaper fdatasyncs."""
        wal = cls(directory, namespace)
        if preallocate > 0 and segment_size > 0:
            wal.zerofill = ZeroFiller(directory, preallocate, segment_size)
        try:
            fsutil.make_dirs(directory)
        except OSError as exc:
            raise from_os_error(exc, directory) from exc
        files = list(segment.iter_segment_files(directory))
        seghash.clean(directory)
        for i, (seg_id, path) in enumerate(files):
            is_last = i == len(files) - 1
            summary = segment.read_summary(path)
            if summary.header.segment_id != seg_id:
                raise CorruptLog(
                    f"header says segment {summary.header.segment_id} but the file is named "
                    f"for segment {seg_id}",
                    path=path,
                    offset=8,
                )
            if summary.header.ns_crc != wal.ns_crc:
                raise CorruptLog(
                    f"segment belongs to a different namespace than {namespace!r}",
                    path=path,
                    offset=40,
                    hint="WAL segments cannot be moved between namespaces; remove this file "
                    "from the wal/ directory",
                )
            if summary.footer is not None and not is_last:
                wal._sealed[seg_id] = _info_from_footer(summary.header, summary.footer, path, summary.size)
                continue
            # The newest segment is always read in full: its last bytes may be a value that
            # only looks like a footer (``segment.scan`` tells the two apart).
            scan = segment.scan(path)
            if scan.footer is not None:
                wal._sealed[seg_id] = _info_from_footer(scan.header, scan.footer, path, scan.file_size)
                continue
            if scan.tail_error is not None:
                if not is_last or scan.tail_is_midlog:
                    raise CorruptLog(
                        f"damaged record ({scan.tail_error}) with more log after it",
                        path=path,
                        offset=scan.data_end,
                        hint="restore the segment from a WAL backup; if none exists, "
                        "'unisondb wal inspect' shows the last good record",
                    )
                wal._repair_torn_tail(scan)
            if is_last:
                wal._set_active(scan)
            else:
                wal._seal_scanned(scan)
        return wal

    def _repair_torn_tail(self, scan: segment.SegmentScan) -> None:
        broken = scan.path.with_name(scan.path.name + ".broken")
        cut = scan.file_size - scan.data_end
        log.warning(
            "wal.torn_tail",
            path=str(scan.path),
            offset=scan.data_end,
            bytes_dropped=cut,
            reason=scan.tail_error,
            broken_copy=str(broken),
        )
        try:
            shutil.copyfile(scan.path, broken)
            with open(scan.path, "r+b") as f:
                f.truncate(scan.data_end)
                fsutil.fsync(f.fileno())
            fsutil.fsync_dir(self.dir)
        except OSError as exc:
            raise from_os_error(exc, scan.path) from exc
        self.report.truncated_bytes += cut
        self.report.broken_copy = broken

    def _set_active(self, scan: segment.SegmentScan) -> None:
        _remove_sidecar_quietly(scan.path)  # an unsealed segment has no recorded hash
        act = ActiveSegment.open_existing(scan.path, scan.header, scan.data_end)
        act.note_records([(r.lsn, r.time_ns, start) for r, start, _end in scan.records])
        self.active = act

    def _seal_scanned(self, scan: segment.SegmentScan) -> None:
        # Sealed before recovery has rebuilt the state at its end: no fingerprint is known,
        # and the footer says so (a restore then proves the state at the next boundary).
        act = ActiveSegment.open_existing(scan.path, scan.header, scan.data_end)
        act.note_records([(r.lsn, r.time_ns, start) for r, start, _end in scan.records])
        self._seal(act, None)
        self.report.sealed_on_open += 1

    # --- the segment table ---

    def segments(self) -> list[SegmentInfo]:
        """All segments, sealed and active, ascending by id."""
        act = self.active  # read once: the writer thread may replace it meanwhile
        with self._lock:
            infos = sorted(self._sealed.values(), key=lambda s: s.segment_id)
        if act is not None:
            infos.append(self._active_info(act))
        return infos

    def sealed_segments(self) -> list[SegmentInfo]:
        with self._lock:
            return sorted(self._sealed.values(), key=lambda s: s.segment_id)

    def max_segment_id(self) -> int:
        with self._lock:
            ids = list(self._sealed)
            if self.active is not None:
                ids.append(self.active.header.segment_id)
        return max(ids, default=0)

    @property
    def last_lsn(self) -> int:
        if self.active is not None and (self.active.count or not self._sealed):
            return self.active.last_lsn
        sealed = self.sealed_segments()
        return sealed[-1].last_lsn if sealed else 0

    def _active_info(self, act: ActiveSegment) -> SegmentInfo:
        h = act.header
        return SegmentInfo(
            h.segment_id,
            act.path,
            h.timeline,
            h.first_lsn,
            act.last_lsn,
            act.count,
            act.min_time_ns,
            act.max_time_ns,
            h.created_ns,
            act.size,
            False,
            h.lineage,
        )

    # --- writing (writer thread only) ---

    def start_segment(self, segment_id: int, lineage: Lineage, first_lsn: int, start_fp: bytes) -> None:
        """Create a new active segment (the previous one must already be sealed or absent).

        ``start_fp`` is the state fingerprint digest before ``first_lsn``."""
        assert self.active is None or self.active.count == 0
        if self.active is not None:
            # An empty active segment carries no data; replace it rather than seal it.
            old = self.active
            old.close()
            fsutil.remove_quietly(old.path)
            self.active = None
        header = SegmentHeader.for_lineage(
            segment_id, lineage, first_lsn, time.time_ns(), self.ns_crc, start_fp
        )
        self.active = ActiveSegment.create(self.dir, header)
        self._hasher = (segment_id, seghash.SegmentHasher(header.encode()))
        fsutil.fsync_dir(self.dir)
        if self.zerofill is not None:
            self.zerofill.attach(self.active)

    def append(self, data: bytes, meta: list[tuple[int, int, int]]) -> tuple[int, int]:
        """Append encoded records; return (segment id, end offset). Durable after ``sync``."""
        assert self.active is not None
        start = self.active.size
        self.active.append(data, meta)
        if self._hasher is not None and self._hasher[0] == self.active.header.segment_id:
            # After the write succeeded: a failed one was cut back and never hashed. A
            # rollback since the last append shows as ``start`` below the hashed end.
            self._hasher[1].update(start, data)
        self.bytes_written += len(data)
        if self.zerofill is not None:
            self.zerofill.poke()
        return self.active.header.segment_id, self.active.size

    def sync(self) -> None:
        assert self.active is not None
        started = time.monotonic()
        self.active.sync()
        self.fsyncs += 1
        # (when it ended, seconds it took): what backup pacing watches (backup/pacing.py)
        ended = time.monotonic()
        self.last_sync = (ended, ended - started)

    def rotate(self, next_lsn: int, fingerprint: bytes) -> int | None:
        """Seal the active segment if it holds records and start the next; return the sealed id.

        ``fingerprint`` is the state digest after the active segment's last record (every
        record in it must already be applied)."""
        act = self.active
        if act is None or act.count == 0:
            return None
        self._seal(act, fingerprint)
        self.active = None
        self.rotations += 1
        self.unstarted = (act.header.segment_id + 1, act.header.lineage, next_lsn, fingerprint)
        self.start_unstarted()
        return act.header.segment_id

    def start_unstarted(self) -> None:
        """Create the segment a rotation sealed the previous one for. If that fails (a full
        disk) there is no active segment until this is called again successfully."""
        if self.unstarted is not None:
            self.start_segment(*self.unstarted)
            self.unstarted = None

    def _seal(self, act: ActiveSegment, fingerprint: bytes | None) -> None:
        records_end = act.size
        try:
            footer = act.seal(fingerprint)
        except OSError as exc:
            raise from_os_error(exc, act.path) from exc
        digest = self._sealed_digest(act, records_end, footer)
        info = _info_from_footer(act.header, footer, act.path, act.size, digest)
        with self._lock:
            self._sealed[info.segment_id] = info

    def _sealed_digest(self, act: ActiveSegment, records_end: int, footer: SegmentFooter) -> str | None:
        """The sealed file's SHA-256 from the bytes hashed while appending, recorded beside
        it; None when the hasher does not cover the file (opened after a crash, rolled
        back). Never fails the seal: a missing sidecar only means "compute on first need"."""
        hasher, self._hasher = self._hasher, None
        digest = None
        if hasher is not None and hasher[0] == act.header.segment_id:
            digest = hasher[1].finish(records_end, footer.encode())
        if digest is None:
            # A sidecar of an earlier version of this file (cut back by a torn-tail repair,
            # or put there by hand) must not outlive it: computed on first need instead.
            _remove_sidecar_quietly(act.path)
            return None
        try:
            seghash.write(act.path, digest)
        except OSError as exc:
            log.warning("wal.sha256_not_recorded", path=str(act.path), error=str(exc))
        return digest

    def seal_active_if_nonempty(self, fingerprint: bytes | None) -> None:
        """Seal the active segment (or drop it if empty): at startup, so this run starts
        afresh, and at a clean stop, so the last writes are in a segment a backup can copy.
        ``fingerprint`` is the state digest after its last record."""
        act = self.active
        if act is None:
            return
        if act.count:
            self._seal(act, fingerprint)
        else:
            # No records: nothing to keep, and an empty file must not linger as a
            # "segment" covering no LSNs.
            act.close()
            fsutil.remove_quietly(act.path)
        self.active = None

    def delete_segment(self, segment_id: int) -> None:
        with self._lock:
            info = self._sealed.pop(segment_id)
        try:
            info.path.unlink()
        except FileNotFoundError:
            gone = True
        except OSError as exc:
            raise from_os_error(exc, info.path) from exc
        else:
            gone = False
        try:
            # Segment first: a crash in between leaves an orphan sidecar (removed at the
            # next open), never a segment whose recorded hash vanished early.
            seghash.remove(info.path)
            if not gone:
                fsutil.fsync_dir(self.dir)
        except OSError as exc:
            raise from_os_error(exc, info.path) from exc

    def close(self) -> None:
        if self.zerofill is not None:
            self.zerofill.close()
        if self.active is not None:
            self.active.close()
            self.active = None

    # --- reading ---

    def replay_from(self, after_lsn: int) -> Iterator[tuple[segment.SegmentScan, int]]:
        """Scans of every segment that holds records with LSN > ``after_lsn``, in order.

        Yields (scan, index of the first record with LSN > after_lsn). Segments entirely
        at or before ``after_lsn`` are skipped by their footer, never read.
        """
        for info in self.segments():
            if info.last_lsn <= after_lsn:
                continue
            scan = segment.scan(info.path)
            start = 0
            while start < len(scan.records) and scan.records[start][0].lsn <= after_lsn:
                start += 1
            yield scan, start


def _remove_sidecar_quietly(path: Path) -> None:
    try:
        seghash.remove(path)
    except OSError as exc:
        log.warning("wal.sha256_not_removed", path=str(path), error=str(exc))


def _info_from_footer(
    h: SegmentHeader, f: SegmentFooter, path: Path, size: int, sha256: str | None = None
) -> SegmentInfo:
    return SegmentInfo(
        h.segment_id,
        path,
        h.timeline,
        h.first_lsn,
        f.last_lsn,
        f.count,
        f.min_time_ns,
        f.max_time_ns,
        h.created_ns,
        size,
        True,
        h.lineage,
        f.fingerprint,
        sha256,
    )
