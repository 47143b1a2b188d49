"""The B-tree's read/resize lock: readers share, a resize waits for every reader and holds
new ones back, and ``wait_idle`` returns once the last reader leaves.

Driven with events and bounded waits, never sleeps: a step that should block is shown to
block by a short bounded ``wait`` that must time out, then released explicitly.
"""

from __future__ import annotations

import threading
from pathlib import Path

from unisondb.storage.btree import BTree, Checkpoint, _ReadWriteLock
from unisondb.storage.record import Entry, EntryKind, Record

BLOCKED = 0.2  # how long a step that must block is given to (wrongly) get through
DONE = 10.0  # how long a step that must get through may take on a loaded machine


def test_readers_share_the_lock() -> None:
    rw = _ReadWriteLock()
    with rw.read(), rw.read():
        inside = threading.Event()

        def third() -> None:
            with rw.read():
                inside.set()

        t = threading.Thread(target=third)
        t.start()
        assert inside.wait(DONE)
        t.join(DONE)


def test_a_resize_waits_for_the_reader_and_holds_new_readers_back() -> None:
    rw = _ReadWriteLock()
    writing, wrote, second_read = threading.Event(), threading.Event(), threading.Event()
    release_writer = threading.Event()

    def writer() -> None:
        with rw.write():
            writing.set()
            release_writer.wait(DONE)
        wrote.set()

    def late_reader() -> None:
        with rw.read():
            second_read.set()

    guard = rw.read()
    guard.__enter__()
    w = threading.Thread(target=writer)
    w.start()
    assert not writing.wait(BLOCKED)  # a live reader keeps the resize out
    guard.__exit__(None, None, None)
    assert writing.wait(DONE)  # the last reader out let it in
    r = threading.Thread(target=late_reader)
    r.start()
    assert not second_read.wait(BLOCKED)  # no reader while the map is being resized
    release_writer.set()
    assert wrote.wait(DONE) and second_read.wait(DONE)
    w.join(DONE)
    r.join(DONE)


def test_wait_idle_returns_when_the_last_reader_leaves() -> None:
    rw = _ReadWriteLock()
    assert rw.wait_idle(0.0)
    guard = rw.read()
    guard.__enter__()
    assert not rw.wait_idle(BLOCKED)
    result: list[bool] = []
    t = threading.Thread(target=lambda: result.append(rw.wait_idle(DONE)))
    t.start()
    guard.__exit__(None, None, None)
    t.join(DONE)
    assert result == [True]


def test_a_reader_that_raises_still_leaves() -> None:
    rw = _ReadWriteLock()
    try:
        with rw.read():
            raise KeyError("boom")
    except KeyError:
        pass
    assert rw.wait_idle(0.0)


# --- BTree.get: no lock, an item in ``getting`` instead (see _ReadWriteLock) ---


def test_a_resize_waits_for_a_get_inside_lmdb() -> None:
    rw = _ReadWriteLock()
    rw.getting.append(None)  # what BTree.get does for the length of its lookup
    writing = threading.Event()

    def writer() -> None:
        with rw.write():
            writing.set()

    w = threading.Thread(target=writer)
    w.start()
    assert not writing.wait(BLOCKED)  # a GET inside LMDB keeps the resize out
    assert rw._writer  # ... and the flag is up: a GET that starts now backs off to read()
    rw.getting.pop()
    rw.get_done()
    assert writing.wait(DONE)
    w.join(DONE)
    assert not rw._writer


def test_wait_idle_waits_for_a_get_inside_lmdb() -> None:
    rw = _ReadWriteLock()
    rw.getting.append(None)
    assert not rw.wait_idle(BLOCKED)
    result: list[bool] = []
    t = threading.Thread(target=lambda: result.append(rw.wait_idle(DONE)))
    t.start()
    rw.getting.pop()
    rw.get_done()
    t.join(DONE)
    assert result == [True]


def test_gets_go_on_while_a_resize_waits_for_a_long_reader(tmp_path: Path) -> None:
    """A snapshot copy holds read() for long; a resize waiting for it must not stop GETs
    (the flag goes up only once the long readers are gone)."""
    bt = BTree(tmp_path / "db")
    try:
        bt.apply([Record(1, 0, (Entry(EntryKind.PUT, b"k", b"v"),))], Checkpoint().advance(1, 1, 0, 0))
        rw = bt._rw
        snapshot = rw.read()
        snapshot.__enter__()
        writing = threading.Event()
        release = threading.Event()

        def writer() -> None:
            with rw.write():
                writing.set()
                release.wait(DONE)

        w = threading.Thread(target=writer)
        w.start()
        assert not writing.wait(BLOCKED)
        assert bt.get(b"k") == b"v"  # not held back by the waiting resize
        snapshot.__exit__(None, None, None)
        assert writing.wait(DONE)
        got: list[bytes | None] = []
        r = threading.Thread(target=lambda: got.append(bt.get(b"k")))
        r.start()
        r.join(BLOCKED)
        assert r.is_alive() and not got  # during the resize a GET waits
        assert not rw.getting  # ... on the lock, not inside LMDB
        release.set()
        r.join(DONE)
        w.join(DONE)
        assert got == [b"v"]
        assert rw.wait_idle(0.0)
    finally:
        bt.close()
