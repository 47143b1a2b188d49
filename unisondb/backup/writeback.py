"""Bounded writeback of a file written front to back: a backup never queues seconds of
dirty pages on the disk ahead of the WAL's fsyncs.

Left to the kernel, a 2 GiB copy leaves up to ``vm.dirty_ratio`` of RAM dirty and the
flusher writes it back in bursts; a WAL ``fdatasync`` that arrives behind such a burst
waits for all of it (measured: PUT p99 182 ms during snapshots, 9.6 ms without). This is
PostgreSQL's ``checkpoint_flush_after`` / ``backend_flush_after`` idea: every ``WINDOW``
bytes written, ``Writeback.advance``

1. starts the writeback of the window just written (``sync_file_range(WRITE)``: submits
   the pages, returns without waiting), so the disk works while the next window is read;
2. waits for the window before it (``WAIT_BEFORE | WRITE | WAIT_AFTER``), so at most two
   windows of this file are ever dirty or in flight: the copy runs at the disk's speed,
   and a WAL fsync never waits behind more than that. While the WAL is idle
   (``advance(..., deep=True)``) it waits only for the window ``DEEP_WINDOWS`` behind: a
   deep queue for a disk nobody else is waiting for;
3. drops that window, now clean, from the page cache (``POSIX_FADV_DONTNEED``), so a big
   copy does not evict the server's hot pages.

The writes are submitted by the calling thread (a backup thread at idle I/O priority:
``pacing.background_thread``), not by the kernel's flusher, so a scheduler that honours
I/O priorities (BFQ, mq-deadline) serves the WAL first.

``sync_file_range`` is Linux-only and called through ``ctypes`` (Python has no wrapper);
where libc lacks it, or the file system refuses it (``EINVAL``/``ENOSYS``/``ESPIPE``/
``EOPNOTSUPP``), step 2 is a plain ``fdatasync`` of the file and step 1 is skipped (the
fdatasync bounds the backlog the same way, one window later). Neither makes the file
durable by itself: ``sync_file_range`` does not write metadata or flush the device cache,
so the publisher's final ``fsync`` stays (``files.TargetDir.publish``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import time
from collections.abc import Callable

from unisondb.storage import fsutil

#: Bytes per window: the most of this file a WAL fsync can find queued ahead of it is two
#: windows (8 MiB: ~20 ms on a 400 MB/s disk). Small enough for the WAL, large enough that
#: the two syscalls per window cost nothing next to the copy.
WINDOW = 4 << 20
#: Windows in flight while nobody waits for the disk (``advance(..., deep=True)``: the
#: WAL is idle): writeback still starts window by window, but the copy waits only for the
#: window this many behind, so the disk gets a deep queue and the copy runs at full speed
#: (two windows measured 1.6-2.0x slower than the kernel's own writeback on an idle WAL).
DEEP_WINDOWS = 32

SYNC_FILE_RANGE_WAIT_BEFORE = 1
SYNC_FILE_RANGE_WRITE = 2
SYNC_FILE_RANGE_WAIT_AFTER = 4
#: errnos meaning "not here" (fall back to fdatasync), not "the write failed".
_UNSUPPORTED = frozenset({errno.EINVAL, errno.ENOSYS, errno.ESPIPE, errno.EOPNOTSUPP, errno.ENOTSUP})

SyncRange = Callable[[int, int, int, int], None]


def _load_sync_file_range() -> SyncRange | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int

    def sync_file_range(fd: int, offset: int, nbytes: int, flags: int) -> None:
        if fn(fd, offset, nbytes, flags) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))

    return sync_file_range


#: None where libc has no ``sync_file_range`` (the fdatasync fallback is used).
sync_file_range: SyncRange | None = _load_sync_file_range()


class Writeback:
    """Keeps at most two ``window``-byte windows of ``fd`` dirty or in flight; call
    ``advance(end)`` after the file has been written up to ``end``. Not thread-safe (one
    writer). ``waited`` is the seconds spent waiting for the disk (the copy's back-pressure)."""

    def __init__(
        self,
        fd: int,
        window: int | None = None,
        *,
        sync_range: SyncRange | None = None,
        use_sync_range: bool = True,
        drop: bool = True,
    ) -> None:
        window = WINDOW if window is None else window  # read now: a seam for measurements
        if window <= 0:
            raise ValueError(f"window must be > 0, got {window}")
        self._fd = fd
        self._window = window
        self._sync_range = (sync_range or sync_file_range) if use_sync_range else None
        self._drop = drop
        #: End of the last window whose writeback was started / waited for.
        self.started = 0
        self.durable = 0
        self.waited = 0.0
        #: True once the fdatasync fallback is in use (no sync_file_range here).
        self.fallback = self._sync_range is None

    def advance(self, end: int, deep: bool = False) -> None:
        """The file is written up to ``end``: start the writeback of every full window not
        started yet, then wait for all but the newest one (``deep``: all but the newest
        ``DEEP_WINDOWS``). So at most two windows are dirty or in flight: the one started
        last and the one being written."""
        keep = (DEEP_WINDOWS if deep else 1) * self._window
        t = time.perf_counter()
        while end - self.started >= self._window:
            self._start(self.started, self._window)
            self.started += self._window
        if self.started - self.durable > keep:  # also catches up when deep mode ends
            length = self.started - keep - self.durable
            self._wait(self.durable, length)
            self.durable += length
        self.waited += time.perf_counter() - t

    def finish(self, end: int) -> None:
        """Wait for everything up to ``end`` and drop it from the page cache (the caller's
        fsync then has only metadata and the device cache left)."""
        t = time.perf_counter()
        if end > self.durable:
            self._wait(self.durable, end - self.durable)
            self.durable = self.started = end
        self.waited += time.perf_counter() - t

    def _range(self, offset: int, length: int, flags: int) -> None:
        """``sync_file_range`` if we still have it; a file system that refuses it switches
        this file to the ``fdatasync`` fallback for good."""
        if self._sync_range is None:
            return
        try:
            self._sync_range(self._fd, offset, length, flags)
        except OSError as exc:
            if exc.errno not in _UNSUPPORTED:
                raise
            self._sync_range = None
            self.fallback = True

    def _start(self, offset: int, length: int) -> None:
        self._range(offset, length, SYNC_FILE_RANGE_WRITE)

    def _wait(self, offset: int, length: int) -> None:
        self._range(
            offset, length, SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER
        )
        if self._sync_range is None:
            fsutil.fdatasync(self._fd)
        if self._drop:
            try:
                os.posix_fadvise(self._fd, offset, length, os.POSIX_FADV_DONTNEED)
            except OSError:
                pass  # advice only: the pages stay cached, clean
