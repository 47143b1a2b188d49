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

``copy_range`` is the one place copied WAL bytes go through (a kernel copy:
``copy_file_range``, else ``sendfile``, else read/``write_all``); tests replace it (and
``write_all``, which writes sidecars and snapshots) to inject ENOSPC.

``Batch`` publishes many files with ONE directory fsync: what is strictly needed for a
renamed file to survive a power cut is its own data and inode on disk before the rename is
(an fsync of the file) and the rename itself on disk (an fsync of the directory). So every
file is written to its ``.tmp`` and fsynced (on a second thread, behind the writer), then
all are renamed, then the directory is fsynced once. Files are added in *groups* (a WAL
segment and its sidecar) and only whole groups are ever renamed, in order.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from unisondb import lifecycle
from unisondb.errors import Conflict, from_os_error
from unisondb.storage import fsutil, testseam

T = TypeVar("T")
CHUNK = 1 << 20
TMP_SUFFIX = fsutil.TMP_SUFFIX


def write_all(fd: int, data: bytes | memoryview) -> None:
    """Write every byte of ``data`` at ``fd``'s position (retrying short writes)."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


#: Bytes per kernel copy call: small enough that a pacer (``throttle``) acts often.
COPY_CHUNK = 4 << 20
#: errnos of a ``copy_file_range`` the kernel or filesystem cannot do (across
#: filesystems before Linux 5.3, no syscall, a filesystem without support): fall back.
_NO_COPY_RANGE = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL}


def copy_range(src: int, dst: int, size: int, throttle: Callable[[int], None] | None = None) -> None:
    """Copy bytes ``[0, size)`` of ``src`` to the same offsets of ``dst``, in the kernel.

    ``os.copy_file_range`` (page cache to page cache, or a reflink where the filesystem
    shares extents); on EXDEV/ENOSYS/EOPNOTSUPP/EINVAL ``os.sendfile``; if that is refused
    too, ``pread`` + ``write_all``. ``throttle(n)`` is called before each chunk of ``n``
    bytes (the backup pacer's seam; it may sleep). A source that ends early raises.
    """
    off = 0
    mode = "copy_file_range"
    while off < size:
        n = min(COPY_CHUNK, size - off)
        if throttle is not None:
            throttle(n)
        end = off + n
        while off < end:
            if mode == "copy_file_range":
                try:
                    done = os.copy_file_range(src, dst, end - off, off, off)
                except OSError as exc:
                    if exc.errno not in _NO_COPY_RANGE:
                        raise
                    mode = "sendfile"
                    continue
            elif mode == "sendfile":
                try:
                    os.lseek(dst, off, os.SEEK_SET)
                    done = os.sendfile(dst, src, off, end - off)
                except OSError as exc:
                    if exc.errno not in _NO_COPY_RANGE:
                        raise
                    mode = "write"
                    continue
            else:
                chunk = os.pread(src, min(end - off, CHUNK), off)
                os.lseek(dst, off, os.SEEK_SET)
                write_all(dst, chunk)
                done = len(chunk)
            if done == 0:
                raise OSError(errno.EIO, f"source ended at {off} bytes of {size} while copying")
            off += done


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

    def batch(self) -> Batch:
        return Batch(self)

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


@dataclass(slots=True)
class _Staged:
    name: str
    fd: int
    synced: Future[None] | None = None
    renamed: bool = False
    dropped: bool = False

    @property
    def tmp(self) -> str:
        return self.name + TMP_SUFFIX


class Batch:
    """Files made durable and visible together with one directory fsync (see the module
    docstring for why that is all a rename needs).

    ``add([(name, write), ...])`` writes one *group* (a segment and its sidecar): each file
    to ``<name>.tmp`` (``O_EXCL``: a foreign ``.tmp`` is a ``Conflict``), whose fsync is
    then queued on the batch's syncer thread so it runs while the next file is copied. A
    failure inside ``add`` removes that group's ``.tmp`` files and propagates; the groups
    added before it are untouched. ``publish()`` waits for the fsyncs, renames every whole
    group in order, and fsyncs the directory once. A group whose fsync failed is not
    renamed, nor is anything after it; a group whose rename failed half way is withdrawn
    (its renamed member unlinked); the groups before either are still made durable, then
    the error propagates. Leaving the ``with`` block removes every ``.tmp`` not renamed.

    Crash at any step: before the renames only ``.tmp`` files exist (removed at the next
    start); between renames a prefix of whole groups is visible, each file fsynced before
    its rename, so whole; a segment renamed just before its sidecar is completed by the
    next backup (identical file → sidecar written). The request is answered only after the
    directory fsync.
    """

    def __init__(self, tdir: TargetDir) -> None:
        self.tdir = tdir
        self._groups: list[list[_Staged]] = []
        self._syncer = ThreadPoolExecutor(1, thread_name_prefix="backup-fsync")
        self._job = lifecycle.current_job.get()
        #: Set when a file published earlier must be made durable by this batch's
        #: directory fsync (one a previous run renamed but may have died before syncing).
        self.dir_dirty = False

    def __enter__(self) -> Batch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.discard()
        self._syncer.shutdown(wait=True)

    def __len__(self) -> int:
        return len(self._groups)

    def add(self, files: list[tuple[str, Callable[[int], object]]]) -> None:
        group: list[_Staged] = []
        current = files[0][0] if files else ""
        try:
            for name, write in files:
                current = name
                st = self._create(name)
                group.append(st)
                # 0600 whatever the umask (which can only take bits away from 0600, or
                # leave a wider mode if someone changed the default): a backup holds
                # every value.
                os.fchmod(st.fd, 0o600)
                write(st.fd)
                st.synced = self._syncer.submit(_fsync_and_uncache, st.fd)
        except OSError as exc:
            self._drop(group)
            raise from_os_error(exc, self.tdir.path / current) from exc
        except BaseException:
            self._drop(group)
            raise
        self._groups.append(group)

    def uncache_behind(self, fd: int) -> None:
        """Evict a source the caller has finished with from the page cache, on the syncer
        thread: ``posix_fadvise(DONTNEED)`` frees every page, which costs about a sixth
        of a WAL backup's time when done inline (py-spy). The syncer owns a duplicate of
        ``fd``; advice only, never an error."""
        try:
            dup = os.dup(fd)
        except OSError:
            return
        self._syncer.submit(_uncache_and_close, dup)

    def _create(self, name: str) -> _Staged:
        tmp = name + TMP_SUFFIX
        try:
            fd = os.open(
                tmp,
                os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
                dir_fd=self.tdir.fd,
            )
        except FileExistsError:
            raise Conflict(
                f"{self.tdir.path / tmp} already exists: another backup is writing "
                f"{self.tdir.path / name} right now (a .tmp left by a crash is removed when "
                "the server starts)"
            ) from None
        except OSError as exc:
            # Creating a name is the directory's permission/space: name the directory.
            raise from_os_error(exc, self.tdir.path) from exc
        # A backup cancelled by a shutdown must never publish, and its .tmp is removed
        # even while its writer is stuck (``lifecycle``).
        if self._job is not None:
            self._job.track(self.tdir.fd, tmp)
        return _Staged(name, fd)

    def publish(self) -> None:
        """fsyncs done → rename every whole group in order → one directory fsync."""
        error: BaseException | None = None
        failed = ""
        ready: list[list[_Staged]] = []
        for group in self._groups:
            try:
                for st in group:
                    failed = st.name
                    assert st.synced is not None
                    st.synced.result()
            except BaseException as exc:
                error = exc
                break
            ready.append(group)
        self._groups = self._groups[len(ready) :]  # not published: removed on exit
        testseam.hold("wal-batch-synced")
        renamed_any = False
        try:
            with self._job.publishing() if self._job is not None else nullcontext():
                for group in ready:
                    for st in group:
                        failed = st.name
                        os.rename(st.tmp, st.name, src_dir_fd=self.tdir.fd, dst_dir_fd=self.tdir.fd)
                        st.renamed = renamed_any = True
                        testseam.hold("wal-batch-renamed-one")
                testseam.hold("wal-batch-renamed")
        except BaseException as exc:
            for group in ready:
                if any(st.renamed for st in group) and not all(st.renamed for st in group):
                    for st in group:  # never a segment without its sidecar
                        if st.renamed:
                            _unlink_quietly(self.tdir.fd, st.name)
            error = exc
        try:
            if renamed_any or self.dir_dirty:
                fsutil.fsync(self.tdir.fd)
                self.dir_dirty = False
        except OSError as exc:
            error, failed = error or exc, ""
        finally:
            for group in ready:
                self._drop(group)
        if isinstance(error, OSError):
            raise from_os_error(error, self.tdir.path / failed if failed else self.tdir.path) from error
        if error is not None:
            raise error

    def discard(self) -> None:
        """Remove every ``.tmp`` that was not renamed (after a failure or on exit)."""
        groups, self._groups = self._groups, []
        for group in groups:
            self._drop(group)

    def _drop(self, group: list[_Staged]) -> None:
        for st in group:
            if st.dropped:
                continue
            st.dropped = True
            if st.synced is not None:
                try:
                    st.synced.result()  # never close a descriptor its fsync still uses
                except BaseException:
                    pass
            os.close(st.fd)
            if self._job is not None:
                self._job.untrack(st.tmp)
            if not st.renamed:
                _unlink_quietly(self.tdir.fd, st.tmp)


def _fsync_and_uncache(fd: int) -> None:
    fsutil.fsync(fd)
    _drop_cache(fd)  # clean pages now: evicted at once


def _uncache_and_close(fd: int) -> None:
    try:
        _drop_cache(fd)
    finally:
        os.close(fd)


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
