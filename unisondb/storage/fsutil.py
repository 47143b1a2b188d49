"""Durable file primitives: the only place UnisonDB calls ``fsync``.

Everything that must survive a crash goes through here, so the rules live in one
place:

* a new file is written as ``<name>.tmp``, fsynced, renamed over ``<name>``, and then
  the directory is fsynced (a rename is only durable once its directory is);
* on any failure the ``.tmp`` is removed, so no partial file is ever left behind;
* every fsync is timed (``FSYNC_SECONDS``) so slow disks show up in metrics.

Test fault (for the power-cut tests only, never for production): with the environment
variable ``UNISONDB_TEST_FAULT_SKIP_WAL_FSYNC=1`` set when this module is imported,
``fdatasync`` of a WAL segment file (a name ending in ``.wal``) does nothing. Acknowledged
writes are then not durable, and ``tests/powercut`` must notice; that is how those tests
prove they can catch a missing fsync. Nothing else changes.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from unisondb.errors import from_os_error
from unisondb.storage import layout

TMP_SUFFIX = ".tmp"

#: See the module docstring. Read once, at import.
TEST_FAULT_SKIP_WAL_FSYNC = os.environ.get("UNISONDB_TEST_FAULT_SKIP_WAL_FSYNC") == "1"

#: Optional observer called with the duration of every fsync (set by metrics wiring).
fsync_observer: Callable[[float], None] | None = None


def _observe(started: float) -> None:
    if fsync_observer is not None:
        fsync_observer(time.perf_counter() - started)


def fdatasync(fd: int) -> None:
    """Flush file data (and the size, if it changed) of ``fd`` to stable storage."""
    if TEST_FAULT_SKIP_WAL_FSYNC and _is_wal_segment(fd):
        return
    started = time.perf_counter()
    os.fdatasync(fd)
    _observe(started)


def _is_wal_segment(fd: int) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}").endswith(layout.SEGMENT_SUFFIX)
    except OSError:
        return False


def fsync(fd: int) -> None:
    started = time.perf_counter()
    os.fsync(fd)
    _observe(started)


def free_bytes(path: Path) -> int | None:
    """Bytes an unprivileged writer can still use on the file system of ``path``."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


#: Below this much free space an EIO from LMDB is taken for a full disk (see ``btree``).
NEARLY_FULL_BYTES = 1 << 20


def nearly_full(path: Path) -> bool:
    free = free_bytes(path)
    return free is not None and free < NEARLY_FULL_BYTES


def fsync_dir(path: Path) -> None:
    """Make creations, renames and deletions inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fsync(fd)
    finally:
        os.close(fd)


def make_dirs(path: Path) -> None:
    """``mkdir -p`` that survives a power cut: every directory it creates is fsynced into its
    parent (a new directory's entry is not durable until its parent is synced, and
    everything later written inside it would vanish with it)."""
    missing: list[Path] = []
    cur = path
    while not cur.exists():
        missing.append(cur)
        cur = cur.parent
    if not missing and not path.is_dir():  # as Path.mkdir(exist_ok=True): names the culprit
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(path))
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:
            pass
        fsync_dir(d.parent)


def remove_quietly(path: Path) -> None:
    """Remove a file in a cleanup path; a failure here must not mask the original error."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError:
        # Cleanup only: the caller is already raising the error that matters.
        pass


@contextmanager
def atomic_file(dest: Path, mode: int = 0o644) -> Iterator[BinaryIO]:
    """Yield a writable file that becomes ``dest`` atomically and durably on success.

    On exit without error: flush, fsync, rename ``dest.tmp`` → ``dest``, fsync the
    directory. On error: the ``.tmp`` is removed and ``dest`` is untouched. OS errors
    are translated into the UnisonDB error tree naming ``dest``'s directory or file.
    """
    tmp = dest.with_name(dest.name + TMP_SUFFIX)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    except OSError as exc:
        raise from_os_error(exc, dest.parent) from exc
    f = os.fdopen(fd, "wb")
    try:
        yield f
        f.flush()
        fsync(f.fileno())
        f.close()
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
    except OSError as exc:
        _close_quietly(f)
        remove_quietly(tmp)
        raise from_os_error(exc, dest) from exc
    except BaseException:
        _close_quietly(f)
        remove_quietly(tmp)
        raise


def _close_quietly(f: BinaryIO) -> None:
    """Close in an error path. ``close()`` flushes what is still buffered, and on a full
    disk that flush fails again (the descriptor is closed anyway): that second error
    must neither replace the first nor skip removing the ``.tmp``."""
    try:
        f.close()
    except OSError:
        pass


def write_file_atomic(dest: Path, data: bytes) -> None:
    with atomic_file(dest) as f:
        f.write(data)


def clean_tmp_files(root: Path) -> list[Path]:
    """Delete leftover ``*.tmp`` files under ``root`` (from a crash mid-write); return them."""
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            if name.endswith(TMP_SUFFIX):
                p = Path(dirpath) / name
                remove_quietly(p)
                removed.append(p)
    return removed
