"""Adaptive group commit: wait for more writers only when others are in flight.

Time is the engine's ``clock`` seam (a frozen clock the test moves) and the writer is held
with ``pause_writer`` to queue a known number of writes; nothing sleeps.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from unisondb.config import EngineConfig
from unisondb.errors import StorageError, Unavailable, UnisonDBError
from unisondb.storage.engine import Engine
from unisondb.storage.record import Entry, EntryKind


class FrozenClock:
    """A clock that moves only when the test moves it; ``called`` is set once the writer
    reads it (it does so only inside the group-commit window, holding the engine's lock)."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.called = threading.Event()

    def __call__(self) -> float:
        self.called.set()
        return self.now


def _put(eng: Engine, i: int) -> Future[int]:
    return eng.submit([Entry(EntryKind.PUT, b"k%d" % i, b"v%d" % i)])


def test_a_writer_alone_never_waits(open_engine: Callable[..., Engine]) -> None:
    """With a 30 s window, 30 sequential writes finish at once, one fsync each: a window
    spent by a lone writer would take 15 minutes."""
    eng = open_engine(EngineConfig(group_commit_window=30.0))
    fsyncs = eng.wal.fsyncs
    started = time.monotonic()
    for i in range(30):
        eng.put(b"k%d" % i, b"v")
    assert time.monotonic() - started < 10.0
    assert eng.stats.group_waits == 0
    assert eng.wal.fsyncs - fsyncs == 30
    assert eng.writes_per_fsync == 1.0


def test_with_writers_in_flight_the_group_waits_for_them(open_engine: Callable[..., Engine]) -> None:
    eng = open_engine(EngineConfig(group_commit_window=1.0))
    clock = FrozenClock()
    eng.clock = clock
    # Four writers in flight at once: the peak the window then waits for.
    eng.pause_writer()
    first = [_put(eng, i) for i in range(4)]
    eng.resume_writer()
    assert [f.result(timeout=30) for f in first] == [1, 2, 3, 4]
    assert eng.stats.group_commits == 1
    fsyncs = eng.wal.fsyncs
    # One arrives: the writer takes it and waits (the clock does not move) for three more.
    clock.called.clear()
    second = [_put(eng, 10)]
    assert clock.called.wait(30), "the writer did not enter the group-commit window"
    second += [_put(eng, 11 + i) for i in range(3)]
    assert [f.result(timeout=30) for f in second] == [5, 6, 7, 8]
    assert eng.stats.group_commits == 2, "the four writes must share one group commit"
    assert eng.wal.fsyncs - fsyncs == 1
    assert eng.stats.group_waits >= 1
    assert eng.writes_per_fsync == 4.0


def test_the_wait_ends_at_the_window(open_engine: Callable[..., Engine]) -> None:
    eng = open_engine(EngineConfig(group_commit_window=1.0))
    clock = FrozenClock()
    eng.clock = clock
    eng.pause_writer()
    first = [_put(eng, i) for i in range(3)]
    eng.resume_writer()
    for f in first:
        f.result(timeout=30)
    clock.called.clear()
    lone = _put(eng, 99)
    # The writer waits for two more writers that never come, until the window has passed
    # on its clock. Moving the clock (and waking it) ends the wait.
    assert clock.called.wait(30), "the writer did not enter the group-commit window"
    assert not lone.done()
    clock.now += 2.0
    eng.wake()
    assert lone.result(timeout=30) == 4
    assert eng.stats.group_commits == 2


def test_a_lone_writer_answered_fast_is_not_counted_as_a_second_one(
    open_engine: Callable[..., Engine],
) -> None:
    """A client that sends its next write the moment the last one is answered (here: from
    the future's callback, on the writer thread, before the group's bookkeeping is done) is
    still alone: no group waits. With a 30 s window, one wait would fail the test."""
    eng = open_engine(EngineConfig(group_commit_window=30.0))
    done = threading.Event()
    lsns: list[int] = []

    def next_write(fut: Future[int]) -> None:
        lsns.append(fut.result())
        if len(lsns) == 50:
            done.set()
            return
        _put(eng, len(lsns)).add_done_callback(next_write)

    _put(eng, 0).add_done_callback(next_write)
    assert done.wait(20), f"only {len(lsns)} of 50 chained writes done: a lone writer waited"
    assert lsns == list(range(1, 51))
    assert eng.stats.group_waits == 0


class _CountingLoop(asyncio.SelectorEventLoop):
    """A real event loop that counts its thread-safe wake-ups."""

    def __init__(self) -> None:
        super().__init__()
        self.wakeups = 0

    def call_soon_threadsafe(self, *args: Any, **kwargs: Any) -> Any:
        self.wakeups += 1
        return super().call_soon_threadsafe(*args, **kwargs)


def test_submit_async_answers_a_whole_group_with_one_loop_wakeup(open_engine: Callable[..., Engine]) -> None:
    eng = open_engine(EngineConfig(group_commit_window=0))
    loop = _CountingLoop()
    try:

        async def main() -> list[int]:
            eng.pause_writer()
            futs = [eng.submit_async([Entry(EntryKind.PUT, b"k%d" % i, b"v")], loop) for i in range(8)]
            cancelled = eng.submit_async([Entry(EntryKind.PUT, b"gone", b"v")], loop)
            cancelled.cancel()  # its caller went away: the others are still answered
            eng.resume_writer()
            return list(await asyncio.gather(*futs))

        lsns = loop.run_until_complete(main())
    finally:
        loop.close()
    assert lsns == list(range(lsns[0], lsns[0] + 8))
    assert eng.stats.group_commits == 1 and loop.wakeups == 1
    assert eng.get(b"k7") == b"v" and eng.get(b"gone") == b"v"  # written although nobody waits


def test_submit_async_delivers_a_refusal_to_the_loop(open_engine: Callable[..., Engine]) -> None:
    eng = open_engine()
    loop = asyncio.new_event_loop()
    try:

        async def main() -> BaseException | None:
            eng.pause_writer()
            fut = eng.submit_async([Entry(EntryKind.PUT, b"k", b"v")], loop)
            # A fake fault: the state ``_fail`` leaves after a cut back that itself failed
            # (a real one needs a truncate to fail under the segment).
            eng._failed = StorageError("injected: the engine stopped")
            eng.resume_writer()
            try:
                await fut
            except UnisonDBError as exc:
                return exc
            return None

        exc = loop.run_until_complete(main())
    finally:
        loop.close()
        eng._failed = None
    assert isinstance(exc, Unavailable)
