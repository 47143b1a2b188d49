"""Durable, descriptor-relative file publishing inside an opened backup directory.

``TargetDir.publish(name, write)`` is the same protocol as ``fsutil.atomic_file`` —
``<name>.tmp`` → write → fsync → rename → fsync the directory, the ``.tmp`` removed on any
failure — but every step is relative to the directory's file descriptor (``dir_fd``) and
the ``.tmp`` is created with ``O_EXCL | O_NOFOLLOW``. So once ``paths.open_dir`` has
opened the directory, no symbolic link swapped in later can redirect a write, and two
writers can never share one ``.tmp``. A leftover ``.tmp`` after ``kill -9`` is removed by
the engine at startup (``fsutil.clean_tmp_files`` over the backup root).

Once fsynced, a published file is dropped from the page cache (``POSIX_FADV_DONTNEED``) so
backups do not evict the database's hot pages.

``write_all`` is the only place copied WAL bytes are written; tests replace it to inject
ENOSPC.
"""

from __future__ import annotations

import hashlib
import os
import stat
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TypeVar

from unisondb import lifecycle
from unisondb.errors import Conflict, from_os_error
from unisondb.storage import fsutil

T = TypeVar("T")
CHUNK = 1 << 20
TMP_SUFFIX = fsutil.TMP_SUFFIX


def write_all(fd: int, data: bytes | memoryview) -> None:
    """Write every byte of ``data`` at ``fd``'s position (retrying short writes)."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def hash_fd(fd: int) -> tuple[str, int]:
    """(sha256 hex, size) of the whole file behind ``fd``, read with ``pread``."""
    h, size = sha256_fd(fd)
    return h.hexdigest(), size


def sha256_fd(fd: int) -> tuple[hashlib._Hash, int]:
    """(sha256 object, size) after reading the whole file behind ``fd``.

    The object is returned, not its digest, so a caller can ``copy()`` it and go on
    hashing bytes it appends (the snapshot trailer) without reading the file again.
    """
    h = hashlib.sha256()
    off = 0
    while True:
        chunk = os.pread(fd, CHUNK, off)
        if not chunk:
            return h, off
        h.update(chunk)
        off += len(chunk)


# --- per-destination locks: two requests for the same file wait for each other ---

_locks_guard = threading.Lock()
_locks: dict[str, tuple[threading.Lock, int]] = {}


@contextmanager
def path_lock(path: Path) -> Iterator[None]:
    key = str(path)
    with _locks_guard:
        lock, users = _locks.get(key, (threading.Lock(), 0))
        _locks[key] = (lock, users + 1)
    try:
        with lock:
            yield
    finally:
        with _locks_guard:
            lock, users = _locks[key]
            if users == 1:
                del _locks[key]
            else:
                _locks[key] = (lock, users - 1)


class TargetDir:
    """An open directory inside the backup root; ``path`` is how errors and responses name it."""

    def __init__(self, fd: int, path: Path) -> None:
        self.fd = fd
        self.path = path

    def __enter__(self) -> TargetDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def stat(self, name: str) -> os.stat_result | None:
        """``lstat`` of ``name`` in this directory, or None if it does not exist."""
        try:
            return os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise from_os_error(exc, self.path / name) from exc

    def require_regular(self, name: str) -> os.stat_result | None:
        st = self.stat(name)
        if st is not None and not stat.S_ISREG(st.st_mode):
            raise Conflict(
                f"{self.path / name} already exists and is not a regular file; refusing to replace it"
            )
        return st

    def open_read(self, name: str) -> int:
        try:
            return os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.fd)
        except OSError as exc:
            raise from_os_error(exc, self.path / name) from exc

    def hash_file(self, name: str) -> str:
        fd = self.open_read(name)
        try:
            return hash_fd(fd)[0]
        except OSError as exc:
            raise from_os_error(exc, self.path / name) from exc
        finally:
            os.close(fd)

    def read_small(self, name: str, limit: int = 64 << 10) -> bytes:
        fd = self.open_read(name)
        try:
            return os.read(fd, limit)
        except OSError as exc:
            raise from_os_error(exc, self.path / name) from exc
        finally:
            os.close(fd)

    def unlink(self, name: str) -> None:
        """Remove ``name`` and make the removal durable (used to withdraw a half publish)."""
        try:
            os.unlink(name, dir_fd=self.fd)
            fsutil.fsync(self.fd)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise from_os_error(exc, self.path / name) from exc

    def sync(self) -> None:
        try:
            fsutil.fsync(self.fd)
        except OSError as exc:
            raise from_os_error(exc, self.path) from exc

    def publish(self, name: str, write: Callable[[int], T], keep: Callable[[T], bool] | None = None) -> T:
        """Create ``name`` atomically and durably from what ``write(fd)`` writes.

        ``write`` gets a descriptor open for reading and writing on ``<name>.tmp``. After it
        returns, the data is fsynced; then ``keep(result)`` (if given) decides: True
        publishes (rename + directory fsync), False discards the ``.tmp`` and leaves any
        existing ``name`` alone, and an exception discards it and propagates. Nothing but a
        complete, fsynced file ever appears under ``name``.
        """
        tmp = name + TMP_SUFFIX
        dest = self.path / name
        try:
            fd = os.open(
                tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=self.fd
            )
        except FileExistsError:
            raise Conflict(
                f"{self.path / tmp} already exists: another backup is writing {dest} right now "
                "(a .tmp left by a crash is removed when the server starts)"
            ) from None
        except OSError as exc:
            raise from_os_error(exc, self.path) from exc
        published = False
        # A backup cancelled by a shutdown must never publish, and its .tmp is removed
        # even while its writer is stuck (``lifecycle``).
        job = lifecycle.current_job.get()
        if job is not None:
            job.track(self.fd, tmp)
        try:
            # 0600 whatever the umask (which can only take bits away from 0600, or leave a
            # wider mode if someone changed the default): a backup holds every value.
            os.fchmod(fd, 0o600)
            result = write(fd)
            fsutil.fsync(fd)
            _drop_cache(fd)
            os.close(fd)
            fd = -1
            if keep is not None and not keep(result):
                return result
            with job.publishing() if job is not None else nullcontext():
                os.rename(tmp, name, src_dir_fd=self.fd, dst_dir_fd=self.fd)
                published = True
                fsutil.fsync(self.fd)
            return result
        except OSError as exc:
            raise from_os_error(exc, dest) from exc
        finally:
            if job is not None:
                job.untrack(tmp)
            if fd >= 0:
                os.close(fd)
            if not published:
                _unlink_quietly(self.fd, tmp)


def _drop_cache(fd: int) -> None:
    """Evict a just-fsynced backup file from the page cache.

    A backup is written once and read rarely; left cached, a multi-GiB snapshot would push
    the database's own hot pages out of memory. Measured with bench/bench_backup.py, this
    and the periodic fdatasync in ``snapshot.write_snapshot`` raised acknowledged PUT/s
    during back-to-back snapshots by ~1.5x.
    """
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except OSError:
        pass  # advice only


def _unlink_quietly(dir_fd: int, name: str) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    except OSError:
        # Cleanup after a failure: the error being raised is the one that matters, and a
        # leftover .tmp is removed at the next start.
        pass
