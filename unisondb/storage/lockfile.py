"""Per-namespace exclusive lock (``<ns>/LOCK``) so two processes never share a namespace."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from unisondb.errors import LockedError, from_os_error


class NamespaceLock:
    """An ``flock`` on ``<ns>/LOCK``, held for the lifetime of an engine or offline tool.

    The lock is advisory and released by the kernel when the process dies, so a
    ``kill -9`` never leaves a stale lock behind. The file records the holder's PID
    for the error message a second process prints.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise from_os_error(exc, self.path) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = ""
            try:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            finally:
                os.close(fd)
            who = f" (held by pid {holder})" if holder else ""
            raise LockedError(
                f"namespace is locked: {self.path}{who}; another UnisonDB server or an offline "
                "tool (restore) is using this data directory",
                hint="stop the other process first, or use a different --data-dir",
            ) from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            # The pid is only a hint for the "locked" message; the flock is the lock. On a
            # full disk the write fails: go on, and let the step that needs space report it.
            pass
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            finally:
                os.close(self._fd)
                self._fd = None

    def __enter__(self) -> NamespaceLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
