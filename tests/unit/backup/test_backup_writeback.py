"""Bounded writeback (backup/writeback.py): at most two windows of a file being written are
dirty or in flight, windows already durable leave the page cache, ``fdatasync`` where
``sync_file_range`` is missing, and a failing disk's error reaches the backup.

Real files on the test's temporary directory; page-cache residency is read with
``mincore(2)`` (a dirty or in-flight page is resident; ``POSIX_FADV_DONTNEED`` drops only
clean ones, so a window that is not resident was written back). The only fakes are a
``sync_file_range`` that fails with ``EINVAL`` or ``EIO`` (a file system that refuses the
call, a failing disk: neither can be produced on demand) and spies that call the real thing.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from unisondb.backup import pacing, writeback
from unisondb.backup.snapshot import write_snapshot
from unisondb.backup.writeback import (
    SYNC_FILE_RANGE_WAIT_AFTER,
    SYNC_FILE_RANGE_WAIT_BEFORE,
    SYNC_FILE_RANGE_WRITE,
    Writeback,
)
from unisondb.config import EngineConfig
from unisondb.errors import UnisonDBError
from unisondb.storage import fsutil, snapfile
from unisondb.storage.engine import Engine

MiB = 1 << 20
WAIT = SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER

needs_sfr = pytest.mark.skipif(writeback.sync_file_range is None, reason="no sync_file_range in libc")


def resident(path: Path) -> list[bool]:
    """Per page of ``path``: is it in the page cache (mincore)?"""
    size = path.stat().st_size
    page = mmap.PAGESIZE
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)
        try:
            buf = (ctypes.c_char * 1).from_buffer(mm)
            vec = ctypes.create_string_buffer((size + page - 1) // page)
            rc = libc.mincore(ctypes.addressof(buf), size, vec)
            del buf
            assert rc == 0, os.strerror(ctypes.get_errno())
        finally:
            mm.close()
    return [b & 1 == 1 for b in vec.raw]


def cached_mib(path: Path, start: int, end: int) -> float:
    pages = resident(path)[start // mmap.PAGESIZE : end // mmap.PAGESIZE]
    return sum(pages) * mmap.PAGESIZE / MiB


@pytest.fixture
def out(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    path = tmp_path / "copy.bin"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    yield path, fd
    os.close(fd)


class Spy:
    """Calls the real sync_file_range, recording (offset, length, flags)."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int, int]] = []
        real = writeback.sync_file_range
        assert real is not None
        self._real = real

    def __call__(self, fd: int, offset: int, length: int, flags: int) -> None:
        self.calls.append((offset, length, flags))
        self._real(fd, offset, length, flags)


@needs_sfr
def test_at_most_two_windows_are_dirty_and_durable_ones_leave_the_cache(out: tuple[Path, int]) -> None:
    path, fd = out
    spy = Spy()
    wb = Writeback(fd, MiB, sync_range=spy)
    chunk = os.urandom(256 << 10)
    for n in range(1, 65):  # 16 MiB in 256 KiB writes
        os.write(fd, chunk)
        wb.advance(n * len(chunk))
        end = n * len(chunk)
        # Everything before the window that was started last is written back and dropped.
        assert wb.durable >= end - 2 * MiB
        assert cached_mib(path, 0, wb.durable) == 0.0
    # The pattern: start window k, then wait for window k-1 (never more than two in flight).
    assert spy.calls[0] == (0, MiB, SYNC_FILE_RANGE_WRITE)
    for k in range(1, 16):
        assert spy.calls[2 * k - 1] == (k * MiB, MiB, SYNC_FILE_RANGE_WRITE)
        assert spy.calls[2 * k] == ((k - 1) * MiB, MiB, WAIT)
    wb.finish(16 * MiB)
    assert wb.durable == 16 * MiB and cached_mib(path, 0, 16 * MiB) == 0.0
    assert not wb.fallback and wb.waited >= 0.0


def test_without_sync_file_range_it_fdatasyncs(
    out: tuple[Path, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, fd = out
    syncs: list[int] = []
    real = fsutil.fdatasync

    def counting(f: int) -> None:
        syncs.append(f)
        real(f)

    monkeypatch.setattr(fsutil, "fdatasync", counting)
    wb = Writeback(fd, MiB, use_sync_range=False)
    assert wb.fallback
    block = os.urandom(MiB)
    for n in range(1, 9):
        os.write(fd, block)
        wb.advance(n * MiB)
    assert syncs == [fd] * 7  # one per window after the first: the backlog stays bounded
    assert cached_mib(path, 0, wb.durable) == 0.0


def test_a_file_system_refusing_sync_file_range_falls_back(
    out: tuple[Path, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, fd = out
    calls: list[int] = []

    def refuses(fd: int, offset: int, length: int, flags: int) -> None:  # fake: EINVAL from the FS
        calls.append(flags)
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))

    syncs: list[int] = []
    real = fsutil.fdatasync
    monkeypatch.setattr(fsutil, "fdatasync", lambda f: (syncs.append(f), real(f))[1])
    wb = Writeback(fd, MiB, sync_range=refuses)
    for n in range(1, 5):
        os.write(fd, os.urandom(MiB))
        wb.advance(n * MiB)
    assert calls == [SYNC_FILE_RANGE_WRITE]  # asked once, then never again
    assert wb.fallback and len(syncs) == 3
    assert cached_mib(path, 0, wb.durable) == 0.0


def test_a_disk_error_during_writeback_is_raised(out: tuple[Path, int]) -> None:
    _path, fd = out

    def fails(fd: int, offset: int, length: int, flags: int) -> None:  # fake: a failing disk
        if flags & SYNC_FILE_RANGE_WAIT_AFTER:
            raise OSError(errno.EIO, os.strerror(errno.EIO))

    wb = Writeback(fd, MiB, sync_range=fails)
    os.write(fd, os.urandom(MiB))
    wb.advance(MiB)  # window 0 started, nothing waited for yet
    os.write(fd, os.urandom(MiB))
    with pytest.raises(OSError) as exc:
        wb.advance(2 * MiB)
    assert exc.value.errno == errno.EIO and not wb.fallback


def test_window_must_be_positive(out: tuple[Path, int]) -> None:
    with pytest.raises(ValueError, match="window must be > 0"):
        Writeback(out[1], 0)


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    eng = Engine.open(tmp_path / "data", "wb", EngineConfig(segment_size=4 << 20))
    yield eng
    eng.close()


def _fill(engine: Engine, mib: int) -> None:
    for i in range(mib * 4):
        engine.put(b"k%05d" % i, os.urandom(256 << 10))


@needs_sfr
@pytest.mark.parametrize("wal_busy", [False, True])
def test_a_snapshot_leaves_its_copy_out_of_the_page_cache(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, wal_busy: bool
) -> None:
    _fill(engine, 24)
    spy = Spy()
    monkeypatch.setattr(writeback, "sync_file_range", spy)

    def wal() -> list[tuple[float, float]]:  # a fast fsync that just ended (busy) or none
        return [(time.monotonic(), 0.0005)] if wal_busy else []

    path = tmp_path / "s.db"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        _cp, size, digest = write_snapshot(engine, fd, path, pacer=pacing.Pacer(wal_latency=wal))
    finally:
        os.close(fd)
    assert size > 24 * MiB
    starts = [c for c in spy.calls if c[2] == SYNC_FILE_RANGE_WRITE]
    waits = [c for c in spy.calls if c[2] == WAIT]
    assert len(starts) == (size - snapfile.TRAILER_SIZE) // writeback.WINDOW
    if wal_busy:  # two windows at most: a wait per window
        assert len(waits) >= len(starts) - 1
    else:  # idle WAL: a deep queue, waited for at the end
        assert len(waits) <= 2
    # Either way the copy's windows were written back and dropped: the server's own pages
    # (data.mdb) are not evicted by a copy that fills the cache with its own.
    copied = size - snapfile.TRAILER_SIZE
    assert cached_mib(path, 0, copied // mmap.PAGESIZE * mmap.PAGESIZE) < 1.0
    assert snapfile.verify_fd(os.open(path, os.O_RDONLY), path)[1] == digest


def test_a_disk_error_during_a_snapshot_writeback_fails_it_cleanly(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fill(engine, 12)

    def fails(fd: int, offset: int, length: int, flags: int) -> None:  # fake: a failing disk
        if flags & SYNC_FILE_RANGE_WAIT_AFTER:
            raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(writeback, "sync_file_range", fails)
    path = tmp_path / "s.db"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        with pytest.raises(UnisonDBError) as exc:
            write_snapshot(engine, fd, path, pacer=pacing.Pacer())
    finally:
        os.close(fd)
    assert str(path) in str(exc.value) and "input/output error" in str(exc.value).lower()


@needs_sfr
def test_deep_queue_while_the_wal_is_idle_then_two_windows(
    out: tuple[Path, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, fd = out
    monkeypatch.setattr(writeback, "DEEP_WINDOWS", 8)
    spy = Spy()
    wb = Writeback(fd, MiB, sync_range=spy)
    block = os.urandom(MiB)
    for n in range(1, 13):  # WAL idle: every window started, waits only 8 windows behind
        os.write(fd, block)
        wb.advance(n * MiB, deep=True)
        assert wb.started == n * MiB and wb.durable == max(0, n - 8) * MiB
    assert [c for c in spy.calls if c[2] == WAIT] == [(k * MiB, MiB, WAIT) for k in range(4)]
    spy.calls.clear()
    os.write(fd, block)
    wb.advance(13 * MiB)  # the WAL woke up: back to two windows at once
    assert spy.calls == [(12 * MiB, MiB, SYNC_FILE_RANGE_WRITE), (4 * MiB, 8 * MiB, WAIT)]
    assert wb.durable == 12 * MiB and cached_mib(path, 0, 12 * MiB) == 0.0
