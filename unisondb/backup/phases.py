"""Where a backup spends its time: seconds per phase, for ``/metrics``.

A request collects its phases in a ``contextvars`` dict (``collecting``); the backup code
times its steps with ``timed("copy")`` or, from a thread it started itself (which does not
inherit the context), with ``add(into, ...)`` on the dict it captured with ``current()``.
Outside ``collecting`` every call is a no-op, so the backup functions stay usable alone.

Phases: snapshot (``kind="btree"``) ``copy`` (reads, writes, waits of the copy), ``hash``
(the hash thread's busy time, overlapped with the copy), ``pace`` (sleeps of
backup/pacing.py), ``sync`` (fsyncs, rename, directory fsync), ``sidecar``; WAL backup
(``kind="wal"``) ``read`` (read + every record CRC + sha256), ``write`` (the kernel copy),
``sidecar``, ``sync`` (fsyncs, renames, one directory fsync per batch), ``pace``. A
snapshot's phases add up to its duration.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_current: ContextVar[dict[str, float] | None] = ContextVar("backup_phases", default=None)


@contextmanager
def collecting() -> Iterator[dict[str, float]]:
    phases: dict[str, float] = {}
    token = _current.set(phases)
    try:
        yield phases
    finally:
        _current.reset(token)


def current() -> dict[str, float] | None:
    return _current.get()


def add(into: dict[str, float] | None, name: str, seconds: float) -> None:
    if into is not None:
        into[name] = into.get(name, 0.0) + seconds


@contextmanager
def timed(name: str) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    finally:
        add(_current.get(), name, time.perf_counter() - started)
