"""Graceful shutdown with a deadline (``--shutdown-timeout``; docs/OPERATIONS.md).

Timeline after SIGTERM/SIGINT at ``t0``, with ``T`` the timeout::

    t0          stop accepting connections (uvicorn); a new backup request gets 503
    t0 + T/2    backups still running are cancelled: their clients get a JSON 503, their
                ``.tmp`` is removed, and they can no longer publish anything
                (``TargetDir.publish`` asks ``current_job`` before every rename)
    t0 + 3T/4   uvicorn stops waiting for in-flight requests (writes finish long before)
    then        engines close: each writer drains its queue, the WAL is synced and sealed;
                LMDB is closed only once no reader (a snapshot's copy) is left, waiting
                until t0 + 0.9 T at most
    t0 + 0.9 T  a copy still inside LMDB (``mdb_env_copyfd`` cannot be interrupted) is
                abandoned: its ``.tmp`` is unlinked, its environment is left open, and the
                process ends with ``os._exit`` so no thread touches a closed environment
                or publishes anything after ``server.stopped``.

A backup that starts publishing (its first rename) before it is cancelled finishes: the
rest of its publishing is a rename, fsyncs and a small sidecar.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from unisondb.errors import Unavailable

#: Fractions of the timeout at which each step of the timeline happens.
CANCEL_BACKUPS_AT = 0.5
HTTP_GRACE_AT = 0.75
ABANDON_AT = 0.9


class Job:
    """One running backup: what it is writing (``.tmp`` names) and whether it may publish."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.cancelled = False
        self._publishing = 0
        self._lock = threading.Lock()
        #: tmp name → a duplicate of its directory's descriptor (to unlink it on cancel).
        self._tmps: dict[str, int] = {}

    def track(self, dir_fd: int, tmp: str) -> None:
        with self._lock:
            self._tmps[tmp] = os.dup(dir_fd)

    def untrack(self, tmp: str) -> None:
        with self._lock:
            fd = self._tmps.pop(tmp, -1)
        if fd >= 0:
            os.close(fd)

    @contextmanager
    def publishing(self) -> Iterator[None]:
        """Around a rename that publishes a file: refused once the job is cancelled."""
        with self._lock:
            if self.cancelled:
                raise Unavailable(
                    f"the server is shutting down: the {self.what} was cancelled before it was published"
                )
            self._publishing += 1
        try:
            yield
        finally:
            with self._lock:
                self._publishing -= 1

    def cancel(self) -> bool:
        """Stop this job from publishing and remove its ``.tmp`` files; False (nothing
        done) if it is publishing right now (it then finishes within moments)."""
        with self._lock:
            if self._publishing:
                return False
            self.cancelled = True
            tmps, self._tmps = self._tmps, {}
        for name, fd in tmps.items():
            try:
                os.unlink(name, dir_fd=fd)
            except OSError:
                pass  # already gone (the job's own cleanup), or removed at the next start
            finally:
                os.close(fd)
        return True


#: The job of the backup running in this thread (set by the API around the backup).
current_job: ContextVar[Job | None] = ContextVar("unisondb_backup_job", default=None)


class Shutdown:
    """Process-wide shutdown state: when it began and which backups are still running."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._t0: float | None = None
        self._lock = threading.Lock()
        self._jobs: set[Job] = set()

    def begin(self) -> None:
        """Called from the signal handler: a plain assignment, no lock (the interrupted
        main thread may hold one)."""
        if self._t0 is None:
            self._t0 = time.monotonic()

    @property
    def stopping(self) -> bool:
        return self._t0 is not None

    def at(self, fraction: float) -> float:
        """``time.monotonic()`` value of that point of the timeline (from now if not begun)."""
        t0 = self._t0 if self._t0 is not None else time.monotonic()
        return t0 + self.timeout * fraction

    def backups_due(self) -> bool:
        return self.stopping and time.monotonic() >= self.at(CANCEL_BACKUPS_AT)

    def start_job(self, what: str) -> Job:
        if self.stopping:
            raise Unavailable(
                f"the server is shutting down: the {what} was not started",
                hint="retry once the server is back",
            )
        job = Job(what)
        with self._lock:
            self._jobs.add(job)
        return job

    def finish(self, job: Job) -> None:
        with self._lock:
            self._jobs.discard(job)

    def running(self) -> list[Job]:
        with self._lock:
            return list(self._jobs)

    def wait_jobs(self, until: float) -> list[Job]:
        """Wait (until the monotonic time ``until``) for running jobs; return those left."""
        while (left := self.running()) and time.monotonic() < until:
            time.sleep(0.05)
        return left

    def cancel_all(self) -> list[Job]:
        """Cancel every job that is not publishing; return the jobs that were cancelled."""
        return [job for job in self.running() if job.cancel()]
