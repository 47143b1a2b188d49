"""Zero-fill the active WAL segment ahead of its writer, in a background thread.

Appending to a file that grows makes every ``fdatasync`` also write the file's new size
(an inode update, a journal commit). Writing into space that already exists and holds
zeros does not: the data blocks are all there is to flush. So a thread keeps the next
``ahead`` bytes after the writer's position written with zeros and synced, up to the
segment's size limit; the writer never waits for it (if it overtakes the filler, its
writes simply grow the file, as without preallocation).

What this leaves on disk, and why recovery is exact about it (``walk.py``): an
active segment is its records followed by zeros. A record never starts with eight zero
bytes (its length field is at least ``record.MIN_BODY``), so the first record position
whose bytes up to the end of the file are all zero is the clean end of the log, not
damage. Any non-zero byte after the last whole record is a torn or damaged record and is
handled as before. A sealed segment has no zeros: ``ActiveSegment.seal`` cuts them off
before it writes the footer.

Writer and filler share the segment's ``lock``: the writer reserves the range it is
about to write (``ActiveSegment.append``), the filler writes zeros only beyond every
reservation and holds the lock while it does, so zeros never land on a record. Nothing
is zero-filled while the file system has less than ``min_free`` bytes free (a nearly
full disk needs its space for LMDB and for the records themselves).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import structlog

from unisondb.storage import fsutil
from unisondb.storage.segment import ActiveSegment

log = structlog.get_logger(__name__)

#: Zeros written per step (the lock is held for one step's ``pwrite``).
CHUNK = 128 << 10
#: No zero-filling while the file system has less free space than this.
MIN_FREE = 64 << 20

_ZEROS = bytes(CHUNK)


class ZeroFiller:
    """One background thread per WAL; ``attach`` the active segment after each rotation."""

    def __init__(self, directory: Path, ahead: int, limit: int, *, min_free: int = MIN_FREE) -> None:
        self.dir = directory
        self.ahead = ahead
        #: Never fill past this offset (the segment size: a full segment is sealed).
        self.limit = limit
        self.min_free = min_free
        self.chunk = max(4096, min(CHUNK, ahead))
        #: Bytes of zeros written (for tests and metrics).
        self.bytes_zeroed = 0
        self._seg: ActiveSegment | None = None
        self._wake = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None

    def attach(self, seg: ActiveSegment | None) -> None:
        """Fill ahead of ``seg`` from now on (the thread starts with the first segment)."""
        self._seg = seg
        if self._thread is None and not self._stop:
            self._thread = threading.Thread(target=self._loop, name="wal-zerofill", daemon=True)
            self._thread.start()
        self.poke()

    def poke(self) -> None:
        """The writer appended: fill further if the zeros ahead run short (never blocks).

        The thread is woken only when a step is due (``fill_step``'s test, read without
        the lock: a stale read only delays the wake to a later append), not after every
        append: a wake-up per group commit cost the writer more than the zeros saved."""
        seg = self._seg
        if seg is not None and seg.count:
            start = max(seg.zeroed_end, seg.size)
            stop = min(self.limit, seg.size + self.ahead)
            n = min(self.chunk, stop - start)
            if n <= 0 or (n < self.chunk and stop < self.limit):
                return
        self._wake.set()

    def close(self) -> None:
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join()

    def _loop(self) -> None:
        while not self._stop:
            self._wake.wait()
            self._wake.clear()
            try:
                while not self._stop and self.fill_step():
                    pass
            except OSError as exc:  # ENOSPC, EIO: the writer carries on without zeros ahead
                log.warning("wal.zerofill_failed", path=str(self.dir), error=str(exc))

    def fill_step(self) -> bool:
        """Write one chunk of zeros ahead of the writer; False if nothing is due.

        Called by the thread; tests call it directly to fill deterministically."""
        seg = self._seg
        if seg is None:
            return False
        with seg.lock:
            if seg.closed or seg.count == 0:
                return False  # an unused segment costs nothing (engines that never write)
            start = max(seg.zeroed_end, seg.size)
            stop = min(self.limit, seg.size + self.ahead)
            n = min(self.chunk, stop - start)
            if n <= 0 or (n < self.chunk and stop < self.limit):
                return False  # enough zeros ahead (or only a sliver is due)
            free = fsutil.free_bytes(self.dir)
            if free is not None and free < self.min_free + n:
                return False
            if os.pwrite(seg.fd, _ZEROS[:n], start) != n:
                raise OSError(28, "short write of zeros")
            seg.zeroed_end = start + n
            dup = os.dup(seg.fd)
        # Synced outside the lock (the writer appends meanwhile), through a duplicate
        # descriptor that a seal cannot close under us: the size change is then durable
        # before the writer's own fdatasync would have to carry it.
        try:
            os.fdatasync(dup)
        finally:
            os.close(dup)
        self.bytes_zeroed += n
        return True
