"""The power-cut filesystem keeps exactly what was made durable (see lazyfs.py's docstring).

Every test writes through a real FUSE mount, cuts power, remounts on what survived and
reads it back through the mount.
"""

from __future__ import annotations

import mmap
import os
import threading
from collections.abc import Callable
from pathlib import Path

import lmdb
import pytest
from powercut_mount import PowerCutMount


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write(path: Path, data: bytes, *, sync: str | None = None, flags: int = 0) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | flags, 0o644)
    try:
        os.write(fd, data)
        if sync == "fsync":
            os.fsync(fd)
        elif sync == "fdatasync":
            os.fdatasync(fd)
    finally:
        os.close(fd)


def cut_and_remount(fs: PowerCutMount) -> Path:
    fs.cut()
    fs.unmount()
    return fs.mount()


def test_write_without_fsync_is_lost_but_visible_before_the_cut(pcfs: PowerCutMount) -> None:
    m = pcfs.mountpoint
    write(m / "a", b"durable", sync="fsync")
    fsync_dir(m)
    write(m / "a", b"-unsynced", flags=os.O_APPEND)
    assert (m / "a").read_bytes() == b"durable-unsynced"  # the live state reads back
    m = cut_and_remount(pcfs)
    assert (m / "a").read_bytes() == b"durable"


@pytest.mark.parametrize("sync", ["fsync", "fdatasync"])
def test_file_sync_keeps_data(pcfs: PowerCutMount, sync: str) -> None:
    m = pcfs.mountpoint
    write(m / "a", b"x" * 300_000, sync=sync)
    fsync_dir(m)
    m = cut_and_remount(pcfs)
    assert (m / "a").read_bytes() == b"x" * 300_000


def test_new_file_without_dir_fsync_is_lost_even_if_its_data_was_synced(pcfs: PowerCutMount) -> None:
    m = pcfs.mountpoint
    write(m / "a", b"data", sync="fsync")
    m = cut_and_remount(pcfs)
    assert not (m / "a").exists()


def test_dir_fsync_without_file_fsync_keeps_an_empty_file(pcfs: PowerCutMount) -> None:
    m = pcfs.mountpoint
    write(m / "a", b"data")
    fsync_dir(m)
    m = cut_and_remount(pcfs)
    assert (m / "a").read_bytes() == b""


def test_rename_without_dir_fsync_is_lost(pcfs: PowerCutMount) -> None:
    m = pcfs.mountpoint
    write(m / "a.tmp", b"new", sync="fsync")
    fsync_dir(m)
    os.replace(m / "a.tmp", m / "a")
    m = cut_and_remount(pcfs)
    assert sorted(os.listdir(m)) == ["a.tmp"]
    assert (m / "a.tmp").read_bytes() == b"new"


def test_atomic_replace_with_dir_fsync_survives(pcfs: PowerCutMount) -> None:
    m = pcfs.mountpoint
    write(m / "a", b"old", sync="fsync")
    fsync_dir(m)
    write(m / "a.tmp", b"new", sync="fsync")
    os.replace(m / "a.tmp", m / "a")
    fsync_dir(m)
    m = cut_and_remount(pcfs)
    assert sorted(os.listdir(m)) == ["a"]
    assert (m / "a").read_bytes() == b"new"


def test_unlink_without_dir_fsync_comes_back(pcfs: PowerCutMount) -> None:
    m = pcfs.mountpoint
    write(m / "a", b"keep", sync="fsync")
    fsync_dir(m)
    os.unlink(m / "a")
    write(m / "b", b"other", sync="fsync")  # may reuse a's inode number
    m = cut_and_remount(pcfs)
    assert sorted(os.listdir(m)) == ["a"]
    assert (m / "a").read_bytes() == b"keep"


def test_truncate_is_durable_only_after_file_sync(pcfs: PowerCutMount) -> None:
    m = pcfs.mountpoint
    write(m / "a", b"0123456789", sync="fsync")
    fsync_dir(m)
    os.truncate(m / "a", 4)
    m = cut_and_remount(pcfs)
    assert (m / "a").read_bytes() == b"0123456789"
    fd = os.open(m / "a", os.O_RDWR)
    os.ftruncate(fd, 4)
    os.pwrite(fd, b"AB", 8)  # extend again: the gap must read as zeros, not old bytes
    os.fdatasync(fd)
    os.close(fd)
    m = cut_and_remount(pcfs)
    assert (m / "a").read_bytes() == b"0123\0\0\0\0AB"


def test_overwrite_in_the_middle_is_lost_without_sync(pcfs: PowerCutMount) -> None:
    m = pcfs.mountpoint
    write(m / "a", b"a" * 8192, sync="fsync")
    fsync_dir(m)
    fd = os.open(m / "a", os.O_RDWR)
    os.pwrite(fd, b"B" * 100, 4000)
    os.fdatasync(fd)
    os.pwrite(fd, b"C" * 100, 100)
    os.close(fd)
    m = cut_and_remount(pcfs)
    assert (m / "a").read_bytes() == b"a" * 4000 + b"B" * 100 + b"a" * 4092


def test_o_dsync_writes_are_durable_without_fsync(pcfs: PowerCutMount) -> None:
    m = pcfs.mountpoint
    write(m / "a", b"", sync="fsync")
    fsync_dir(m)
    write(m / "a", b"dsync", flags=os.O_DSYNC)
    m = cut_and_remount(pcfs)
    assert (m / "a").read_bytes() == b"dsync"


def test_new_directory_needs_its_parent_and_itself_synced(pcfs: PowerCutMount) -> None:
    m = pcfs.mountpoint
    (m / "d1").mkdir()
    (m / "d2").mkdir()
    write(m / "d1" / "f", b"1", sync="fsync")
    write(m / "d2" / "f", b"2", sync="fsync")
    fsync_dir(m / "d1")
    fsync_dir(m)  # d1 and d2 exist now; only d1's entries were synced
    (m / "d3").mkdir()
    fsync_dir(m / "d3")  # d3's own entries, but not d3 in its parent
    m = cut_and_remount(pcfs)
    assert sorted(os.listdir(m)) == ["d1", "d2"]
    assert (m / "d1" / "f").read_bytes() == b"1"
    assert os.listdir(m / "d2") == []


def test_fsync_of_an_unlinked_open_file_and_writes_after_the_cut_fail(pcfs: PowerCutMount) -> None:
    m = pcfs.mountpoint
    fd = os.open(m / "a", os.O_RDWR | os.O_CREAT, 0o644)
    os.unlink(m / "a")
    os.write(fd, b"gone")
    os.fsync(fd)  # must not fail for lack of a path
    pcfs.cut()
    with pytest.raises(OSError) as err:
        os.write(fd, b"after the cut")
        os.fsync(fd)
    os.close(fd)
    assert err.value.errno == 5  # EIO
    assert pcfs.stats()["frozen"] is True
    pcfs.unmount()
    m = pcfs.mount()
    assert os.listdir(m) == []


def test_files_present_at_mount_are_durable(pcfs: PowerCutMount) -> None:
    m = pcfs.mountpoint
    (m / "d").mkdir()
    write(m / "d" / "f", b"kept", sync="fsync")
    fsync_dir(m / "d")
    fsync_dir(m)
    m = cut_and_remount(pcfs)
    m = cut_and_remount(pcfs)  # nothing changed in between: everything stays
    assert (m / "d" / "f").read_bytes() == b"kept"
    assert pcfs.stats() == {
        "fsync": 0,
        "fsyncdir": 0,
        "write": 0,
        "bytes_synced": 0,
        "frozen": False,
        "held": False,
    }


def test_control_file_is_hidden_and_sync_makes_everything_durable(pcfs: PowerCutMount) -> None:
    m = pcfs.mountpoint
    (m / "d").mkdir()
    write(m / "d" / "f", b"written back")
    assert os.listdir(m) == ["d"]  # .powercut answers but is never listed
    pcfs.sync_all()
    write(m / "d" / "g", b"after the sync")
    m = cut_and_remount(pcfs)
    assert os.listdir(m / "d") == ["f"]
    assert (m / "d" / "f").read_bytes() == b"written back"


def test_a_rename_over_a_file_keeps_the_old_file_until_the_dir_is_synced(pcfs: PowerCutMount) -> None:
    m = pcfs.mountpoint
    write(m / "a", b"old", sync="fsync")
    write(m / "b", b"new", sync="fsync")
    fsync_dir(m)
    os.replace(m / "b", m / "a")
    write(m / "c", b"c", sync="fsync")  # may get the replaced file's inode number
    m = cut_and_remount(pcfs)
    assert {n: (m / n).read_bytes() for n in os.listdir(m)} == {"a": b"old", "b": b"new"}


@pytest.mark.parametrize("sync_top", [True, False])
def test_a_wal_segment_in_a_new_tree_survives_only_if_the_tree_top_was_synced(
    pcfs: PowerCutMount, sync_top: bool
) -> None:
    """The server's first-start sequence (mkdir -p with parent fsyncs, segment created by
    tmp + fsync + rename + dir fsync, reopened O_WRONLY, pwrite + fdatasync, rotation).
    Every later sync survives, but all of it hangs on the entry of the tree's top directory
    in its parent: once, ``serve()`` made ``--data-dir`` without that fsync."""
    m = pcfs.mountpoint
    wal = m / "data" / "ns" / "wal"
    for d in (m / "data", m / "data" / "ns", wal):
        d.mkdir()
        if d != m / "data" or sync_top:
            fsync_dir(d.parent)
    for seg in ("000000001.wal", "000000002.wal"):
        write(wal / (seg + ".tmp"), b"H" * 128, sync="fsync")
        os.rename(wal / (seg + ".tmp"), wal / seg)
        fsync_dir(wal)
        fd = os.open(wal / seg, os.O_WRONLY)
        try:
            os.pwrite(fd, b"R" * 1000, 128)
            os.fdatasync(fd)
        finally:
            os.close(fd)
    m = cut_and_remount(pcfs)
    if not sync_top:
        assert os.listdir(m) == []
        return
    assert sorted(os.listdir(m / "data" / "ns" / "wal")) == ["000000001.wal", "000000002.wal"]
    for seg in ("000000001.wal", "000000002.wal"):
        assert (m / "data" / "ns" / "wal" / seg).read_bytes() == b"H" * 128 + b"R" * 1000


def _in_thread(fn: Callable[[], object]) -> threading.Thread:
    t = threading.Thread(target=fn)
    t.start()
    return t


@pytest.mark.parametrize("other", ["open", "stat"])
def test_a_write_in_flight_is_what_the_map_shows(pcfs: PowerCutMount, other: str) -> None:
    """The kernel puts a write's bytes in the page cache before it sends the WRITE here,
    so while it is in flight the cache is the only up-to-date copy. Neither an ``open`` of
    the file by another descriptor (FUSE drops the cache there without ``keep_cache``) nor
    a stat that sees a newer mtime (``auto_inval_data``) may drop that copy, or the next
    read of the page (here through ``mmap``, as LMDB reads) fetches the old bytes from
    this process and the cache keeps them after the write returned. Found as lost LMDB
    commits in the snapshot rounds (docs/TESTING.md)."""
    ps = mmap.PAGESIZE
    path = pcfs.mountpoint / "f"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    mm = None
    try:
        os.pwrite(fd, b"old." * (2 * ps // 4), 0)
        mm = mmap.mmap(fd, 2 * ps, prot=mmap.PROT_READ)
        assert mm[ps : ps + 4] == b"old."  # page 1 is in the page cache
        os.stat(path)  # attributes cached...
        os.pwrite(fd, b"more", 0)  # ...and now older than the file's mtime
        pcfs.hold_write(ps, ps + 1)
        # Part of a page, as LMDB writes its meta page.
        writer = _in_thread(lambda: os.pwrite(fd, b"new." * 16, ps))
        try:
            pcfs.wait_held()
            if other == "open":
                os.close(os.open(path, os.O_RDONLY))
            else:
                os.stat(path)
            assert mm[ps : ps + 4] == b"new."  # a read while the write is in flight
        finally:
            pcfs.release()
            writer.join()
        assert mm[ps : ps + 4] == b"new."
        assert os.pread(fd, 4, ps) == b"new."
    finally:
        if mm is not None:
            mm.close()
        os.close(fd)


def test_lmdb_keeps_every_commit_when_its_file_is_opened_during_a_meta_write(pcfs: PowerCutMount) -> None:
    """The exact interleaving of the lost writes: the applier's commit of txn 2 is writing
    its meta page (page 0) when a snapshot opens ``data.mdb`` (``BTree.copy_plain_to``)
    and reads the meta pages (its ``env.stat()``). If that read caches page 0's old bytes
    (txn 0's meta), txn 3 starts from the stale meta and commits a tree without txn 1
    and 2. Opened as ``BTree`` opens it (``metasync=False``)."""
    db = pcfs.mountpoint / "db"
    env = lmdb.open(str(db), map_size=1 << 20, metasync=False, max_dbs=2)
    try:
        with env.begin(write=True) as txn:  # txn 1: meta page 1
            txn.put(b"k1", b"1")
        psize = int(env.stat()["psize"])
        pcfs.hold_write(0, psize)  # txn 2 writes its meta to page 0

        def commit_txn2() -> None:
            with env.begin(write=True) as txn:
                txn.put(b"k2", b"2")

        committer = _in_thread(commit_txn2)
        try:
            pcfs.wait_held()
            os.close(os.open(db / "data.mdb", os.O_RDONLY | os.O_CLOEXEC))
            env.stat()  # reads both meta pages through the map
        finally:
            pcfs.release()
            committer.join()
        with env.begin(write=True) as txn:  # txn 3
            txn.put(b"k3", b"3")
    finally:
        env.close()
    env = lmdb.open(str(db), map_size=1 << 20, max_dbs=2, readonly=True)
    try:
        with env.begin() as txn:
            assert {k: txn.get(k) for k in (b"k1", b"k2", b"k3")} == {b"k1": b"1", b"k2": b"2", b"k3": b"3"}
    finally:
        env.close()
