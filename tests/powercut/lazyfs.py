"""A FUSE filesystem for tests that forgets every change not made durable ("power cut").

Like LazyFS (the filesystem Jepsen uses to find fsync bugs), it keeps two states:

* the **live** state: a real directory (``--backing``) that every operation is passed
  through to at once, so the program under test reads back what it wrote, as from a
  page cache;
* the **durable** state: what a disk would still hold after power is lost. It is a
  map of directory entries (per directory: name -> node) plus one content file per
  node in ``--state``, changed only by the operations below.

Durability model (strict POSIX, stricter than ext4 in practice):

* ``fsync`` or ``fdatasync`` of a regular file (or any ``write`` through a file opened
  with ``O_SYNC``/``O_DSYNC``) makes that file's whole content and size durable: every
  byte range written or truncated since its last sync is copied to its durable copy.
  The two calls are treated alike (``fdatasync`` persists the size it needs too).
* ``fsync`` of a directory makes that directory's entries durable exactly as they are
  now: creations, renames in and out, unlinks, ``mkdir``/``rmdir``, symlinks. A
  rename between two directories needs both directories fsynced; until then the file
  can be lost from both, or (source not synced, target synced) appear under both names.
* Nothing else is durable: ``write``, ``truncate``, ``close``, ``rename`` and ``create``
  alone change only the live state. A file whose directory entry is durable but whose
  data was never synced comes back **empty** (size 0).
* Writing ``sync`` to the control file makes the whole live state durable, as the
  kernel's periodic write-back (or ``sync``) would after a quiet half minute.
* A power cut (writing ``cut`` to the control file ``/.powercut`` at the mount root,
  or the N-th ``fsync``/``fdatasync``/directory fsync after writing ``cut-at-sync N``)
  freezes the filesystem at once: that write returns after the durable state has
  been written out as a plain directory tree (``--image``), and every later operation
  fails with ``EIO`` (reads the kernel serves from its page cache, or through an
  ``mmap``, never reach this process and still succeed). The test then SIGKILLs the
  program, unmounts, and mounts a new instance on the image: "what survived". Since the
  durable state changes only at those syncs, cutting just before the N-th one, for
  N = 1, 2, ..., reaches every state a power cut could leave behind (the restore rounds
  use this). Reading ``/.powercut`` returns JSON
  counters (syncs, dir syncs, writes, cut state, whether a write is held).
* ``hold-write START END`` on the control file holds the next write that overlaps bytes
  [START, END) of any file before it is handled, until ``release``: a seam for tests that
  need a write in flight at an exact moment.

What it does NOT model: torn writes inside one ``write`` call (a write is all or
nothing), reordering or partial persistence of unsynced writes (all unsynced changes
are lost together; a real disk may keep some), ``sync``/``syncfs``/``sync_file_range``
(not passed to FUSE; unused by UnisonDB), hard links and device nodes (refused with
``EPERM``); ``rename`` honours ``RENAME_NOREPLACE`` and ``RENAME_EXCHANGE`` (passed on to the
backing directory with ``renameat2``), and metadata other than sizes: permission bits, owners and times are
durable immediately. Files that existed when the filesystem was mounted are durable.
Kernel caches are safe because a cut is always followed by an unmount; the kernel
write-back cache is off (libfuse's default), so every ``write`` reaches this process
before the system call returns. The kernel's page cache of a file is never dropped by
an ``open`` or an attribute change (``keep_cache``, no ``auto_inval_data``), as on a disk
file system: FUSE's default would let a read fetch a page's old bytes while a write to it
is in flight, which lost whole LMDB commits (``PowerCutFS.init_with_config``).

Run: ``python tests/powercut/lazyfs.py --backing DIR --state DIR --image DIR MOUNTPOINT``
(``powercut_mount.py`` does this for the tests). It runs in the foreground until
unmounted (``fusermount3 -u -z MOUNTPOINT``); ``POWERCUT_DEBUG=1`` logs every operation;
``POWERCUT_WRITE_DELAY=SECONDS`` delays every write (a loaded machine's FUSE round trip).
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import json
import logging
import os
import shutil
import stat
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import mfusepy

CONTROL_NAME = ".powercut"
CONTROL_PATH = "/" + CONTROL_NAME
CONTROL_FH = 1 << 40  # file handle of the control file (real fds are small)
_SYNC_FLAGS = os.O_SYNC | os.O_DSYNC
_SYNC_BIT = 1 << 32  # set in a file handle opened with O_SYNC/O_DSYNC
_AT_FDCWD, _RENAME_NOREPLACE, _RENAME_EXCHANGE = -100, 1, 2
_LIBC = ctypes.CDLL(None, use_errno=True)
#: libfuse 3's capability bits (fuse_common.h): AUTO_INVAL_DATA drops a file's cached pages
#: when a getattr shows a new mtime; EXPLICIT_INVAL_DATA stops the kernel from dropping
#: them on its own (on a size change) at all.
_FUSE_CAP_AUTO_INVAL_DATA = 1 << 12
_FUSE_CAP_EXPLICIT_INVAL_DATA = 1 << 25
_STAT_KEYS = ("st_mode", "st_nlink", "st_uid", "st_gid", "st_size", "st_ino", "st_blocks", "st_blksize")


@dataclass
class Node:
    """One file, directory or symlink, identified independently of inode reuse."""

    id: int
    kind: str  # "f", "d" or "l"
    mode: int = 0o644
    target: str = ""  # symlink target
    #: Live byte ranges [start, end) changed since the last sync (files only).
    dirty: list[tuple[int, int]] = field(default_factory=list)
    truncated: bool = False

    def mark(self, start: int, end: int) -> None:
        if end <= start:
            return
        if self.dirty and self.dirty[-1][1] == start:  # appends: the common case
            self.dirty[-1] = (self.dirty[-1][0], end)
        else:
            self.dirty.append((start, end))


class PowerCutFS(mfusepy.Operations):  # type: ignore[misc]
    use_ns = True
    # libfuse passes no path to fh-based operations, so an unlinked open file works.
    flag_nopath = True
    flag_nullpath_ok = True

    def __init__(self, backing: str, state: str, image: str) -> None:
        self.backing = os.path.realpath(backing)
        self.state = os.path.realpath(state)
        self.image = os.path.abspath(image)
        self._mu = threading.RLock()
        self.frozen = False
        self.next_id = 0
        self.next_dir_fh = 0
        self.nodes: dict[int, Node] = {}
        self.by_ino: dict[int, int] = {}  # live st_ino -> node id
        self.durable: dict[int, dict[str, int]] = {}  # dir node id -> durable entries
        self.fds: dict[int, tuple[int, int]] = {}  # fh -> (live fd, node id)
        self.dirs: dict[int, str] = {}  # directory handle -> path (libfuse may pass no path)
        self.counters = {"fsync": 0, "fsyncdir": 0, "write": 0, "bytes_synced": 0}
        self.cut_at_sync: int | None = None  # syncs left until an armed cut (None: not armed)
        #: ``hold-write START END``: the next write overlapping [START, END) waits, outside
        #: the lock, until ``release`` (a test's way to have a WRITE in flight at an exact
        #: moment); ``held`` says one is waiting.
        self.hold_range: tuple[int, int] | None = None
        self.held = False
        self._release = threading.Event()
        #: ``POWERCUT_WRITE_DELAY`` seconds slept before each write is handled (outside the
        #: lock, so other requests go on): a slow, loaded FUSE round trip, to stress races
        #: between a write in flight and the kernel's cache (docs/TESTING.md).
        self.write_delay = float(os.environ.get("POWERCUT_WRITE_DELAY") or 0)
        os.makedirs(self.state, exist_ok=True)
        self.root = self._load(self.backing)

    def init_with_config(self, conn: Any, config: Any) -> None:
        """Never let the kernel drop a file's cached pages by itself: no
        ``auto_inval_data``, and ``explicit_inval_data`` where the kernel offers it (with
        ``keep_cache`` at every open: ``_FUSE.open``).

        FUSE drops them by default at every ``open`` and when a getattr shows a new mtime
        or size, because a FUSE file may change behind the kernel's back. These files
        cannot: every change comes through this mount. And dropping them is wrong while a
        ``write`` is in flight: the kernel puts its bytes in the page cache before it sends
        the WRITE here, and once that copy is dropped a read of the page (an ``mmap``
        fault) fetches the old bytes from this process, which the cache then keeps after
        the write returned. LMDB reads its pages, meta pages included, through ``mmap``: a
        snapshot opening ``data.mdb`` while a commit wrote its meta page left the next
        commit building on the meta page before it, dropping whole committed transactions
        (docs/TESTING.md; test_powercut_fs.py pins both). A disk file system keeps its page
        cache while a write is in flight: that is what is modelled here.
        """
        if conn is not None:
            conn.want &= ~_FUSE_CAP_AUTO_INVAL_DATA
            conn.want |= conn.capable & _FUSE_CAP_EXPLICIT_INVAL_DATA

    # --- the durable model ---

    def _new(self, kind: str, ino: int, mode: int) -> Node:
        self.next_id += 1
        node = Node(self.next_id, kind, stat.S_IMODE(mode))
        self.nodes[node.id] = node
        self.by_ino[ino] = node.id
        return node

    def _store(self, node_id: int) -> str:
        return os.path.join(self.state, str(node_id))

    def _load(self, live: str) -> int:
        """Adopt an existing tree as durable (it was on disk before the mount)."""
        st = os.lstat(live)
        if stat.S_ISDIR(st.st_mode):
            node = self._new("d", st.st_ino, st.st_mode)
            self.durable[node.id] = {n: self._load(os.path.join(live, n)) for n in os.listdir(live)}
        elif stat.S_ISLNK(st.st_mode):
            node = self._new("l", st.st_ino, st.st_mode)
            node.target = os.readlink(live)
        elif stat.S_ISREG(st.st_mode):
            node = self._new("f", st.st_ino, st.st_mode)
            shutil.copyfile(live, self._store(node.id))
        else:
            raise SystemExit(f"powercut: {live}: only files, directories and symlinks are supported")
        return node.id

    def _node_of(self, live: str) -> Node:
        return self.nodes[self.by_ino[os.lstat(live).st_ino]]

    def _forget(self, live: str) -> None:
        """Before an unlink or a rename over ``live``: its inode number may be reused."""
        try:
            st = os.lstat(live)
        except FileNotFoundError:
            return
        if st.st_nlink <= 1 or stat.S_ISDIR(st.st_mode):
            self.by_ino.pop(st.st_ino, None)

    def _sync_file(self, fd: int, node: Node) -> None:
        size = os.fstat(fd).st_size
        dst = os.open(self._store(node.id), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            for start, end in node.dirty:
                pos, end = start, min(end, size)
                while pos < end:
                    chunk = os.pread(fd, min(end - pos, 1 << 20), pos)
                    if not chunk:
                        break
                    os.pwrite(dst, chunk, pos)
                    pos += len(chunk)
                    self.counters["bytes_synced"] += len(chunk)
            os.ftruncate(dst, size)
        finally:
            os.close(dst)
        node.dirty.clear()

    def _sync_dir(self, live: str) -> None:
        node = self._node_of(live)
        entries = {}
        for name in os.listdir(live):
            if live == self.backing and name == CONTROL_NAME:
                continue
            entries[name] = self._node_of(os.path.join(live, name)).id
        self.durable[node.id] = entries

    def sync_all(self) -> None:
        """Everything live becomes durable, as after ``sync`` or the kernel's own write-back."""
        for dirpath, _dirs, files in os.walk(self.backing):
            self._sync_dir(dirpath)
            for name in files:
                live = os.path.join(dirpath, name)
                if os.path.islink(live):
                    continue
                node = self._node_of(live)
                fd = os.open(live, os.O_RDONLY)
                try:
                    node.mark(0, os.fstat(fd).st_size)
                    self._sync_file(fd, node)
                finally:
                    os.close(fd)

    def cut(self) -> None:
        """Freeze and write the durable state out as a directory tree at ``image``."""
        self.frozen = True
        os.makedirs(self.image)
        placed: dict[int, str] = {}

        def emit(dir_id: int, out: str, seen: frozenset[int]) -> None:
            for name, nid in sorted(self.durable.get(dir_id, {}).items()):
                node, dest = self.nodes[nid], os.path.join(out, name)
                if node.kind == "d":
                    if nid in seen:  # a directory renamed into its own durable subtree
                        continue
                    os.mkdir(dest, node.mode)
                    emit(nid, dest, seen | {nid})
                elif node.kind == "l":
                    os.symlink(node.target, dest)
                elif nid in placed:  # durable under two names (see the module docstring)
                    shutil.copyfile(placed[nid], dest)
                elif os.path.exists(self._store(nid)):
                    os.rename(self._store(nid), dest)
                    placed[nid] = dest
                else:  # entry durable, data never synced
                    open(dest, "wb").close()
                    placed[nid] = dest
                if node.kind != "l":
                    os.chmod(dest, node.mode)

        emit(self.root, self.image, frozenset({self.root}))
        os.chmod(self.image, self.nodes[self.root].mode)

    # --- plumbing ---

    def _live(self, path: str) -> str:
        return self.backing + path if path != "/" else self.backing

    def _check(self) -> None:
        if self.frozen:
            raise mfusepy.FuseOSError(errno.EIO)

    def _sync_point(self) -> None:
        """Before each fsync/fsyncdir: an armed cut happens here, instead of this sync."""
        self._check()
        if self.cut_at_sync is not None:
            self.cut_at_sync -= 1
            if self.cut_at_sync <= 0:
                self.cut_at_sync = None
                self.cut()
                raise mfusepy.FuseOSError(errno.EIO)

    def _fd(self, fh: int) -> tuple[int, Node]:
        fd, nid = self.fds[fh]
        return fd, self.nodes[nid]

    def _open(self, path: str, flags: int, mode: int | None) -> int:
        live = self._live(path)
        old_size = os.lstat(live).st_size if os.path.lexists(live) else None
        # The kernel computes append offsets; O_SYNC is modelled here, not asked of the disk.
        # A sync reads the live file back, so the live fd is always readable.
        live_flags = flags & ~(os.O_APPEND | _SYNC_FLAGS | os.O_CREAT | os.O_ACCMODE)
        live_flags |= os.O_RDONLY if flags & os.O_ACCMODE == os.O_RDONLY else os.O_RDWR
        if mode is not None:
            live_flags |= os.O_CREAT
        fd = os.open(live, live_flags, 0o600 if mode is None else mode)
        st = os.fstat(fd)
        if old_size is None or st.st_ino not in self.by_ino:
            node = self._new("f", st.st_ino, st.st_mode)
        else:
            node = self.nodes[self.by_ino[st.st_ino]]
            if flags & os.O_TRUNC:
                node.mark(0, old_size)
        fh = fd | _SYNC_BIT if flags & _SYNC_FLAGS else fd
        self.fds[fh] = (fd, node.id)
        return fh

    # --- FUSE operations ---

    def getattr(self, path: str | None, fh: int | None = None) -> dict[str, Any]:
        with self._mu:
            if path == CONTROL_PATH or fh == CONTROL_FH:
                # A size above any report, so the kernel asks for it; the short read ends it.
                return {"st_mode": stat.S_IFREG | 0o600, "st_nlink": 1, "st_size": 1 << 16}
            self._check()
            st = os.fstat(self.fds[fh][0]) if fh is not None else os.lstat(self._live(path or "/"))
            attrs = {k: getattr(st, k) for k in _STAT_KEYS}
            for k in ("st_atime", "st_mtime", "st_ctime"):  # nanoseconds (use_ns)
                attrs[k] = getattr(st, k + "_ns")
            return attrs

    def readdir(self, path: str | None, fh: int) -> list[str]:
        with self._mu:
            self._check()
            names = os.listdir(self._live(self.dirs.get(fh, path or "/")))
            return [".", "..", *names]

    def readlink(self, path: str) -> str:
        with self._mu:
            self._check()
            return os.readlink(self._live(path))

    def statfs(self, path: str) -> dict[str, int]:
        with self._mu:
            self._check()
            sv = os.statvfs(self.backing)
            return {
                k: getattr(sv, k)
                for k in (
                    "f_bsize",
                    "f_frsize",
                    "f_blocks",
                    "f_bfree",
                    "f_bavail",
                    "f_files",
                    "f_ffree",
                    "f_namemax",
                )
            }

    def access(self, path: str, amode: int) -> int:
        with self._mu:
            self._check()
            if path != CONTROL_PATH:
                os.lstat(self._live(path))
            return 0

    def open(self, path: str, flags: int) -> int:
        with self._mu:
            if path == CONTROL_PATH:
                return CONTROL_FH
            self._check()
            return self._open(path, flags, None)

    def create(self, path: str, mode: int, flags: int) -> int:
        with self._mu:
            self._check()
            return self._open(path, flags, mode)

    def read(self, path: str | None, size: int, offset: int, fh: int) -> bytes:
        with self._mu:
            if fh == CONTROL_FH:
                report = {**self.counters, "frozen": self.frozen, "held": self.held}
                return json.dumps(report).encode()[offset : offset + size]
            self._check()
            return os.pread(self.fds[fh][0], size, offset)

    def write(self, path: str | None, data: bytes, offset: int, fh: int) -> int:
        if fh != CONTROL_FH:
            if self.write_delay:
                time.sleep(self.write_delay)
            self._maybe_hold(offset, offset + len(data))
        with self._mu:
            if fh == CONTROL_FH:
                command = data.strip()
                if command == b"cut":
                    if not self.frozen:
                        self.cut()
                elif command == b"sync" and not self.frozen:
                    self.sync_all()
                elif command.startswith(b"cut-at-sync ") and command[12:].isdigit() and int(command[12:]) > 0:
                    self.cut_at_sync = int(command[12:])
                elif command.startswith(b"hold-write ") and len(words := command.split()) == 3:
                    if not all(w.isdigit() for w in words[1:]):
                        raise mfusepy.FuseOSError(errno.EINVAL)
                    self._release.clear()
                    self.hold_range = (int(words[1]), int(words[2]))
                elif command == b"release":
                    self.hold_range = None
                    self._release.set()
                else:
                    raise mfusepy.FuseOSError(errno.EINVAL)
                return len(data)
            self._check()
            fd, node = self._fd(fh)
            n = os.pwrite(fd, data, offset)
            node.mark(offset, offset + n)
            self.counters["write"] += 1
            if fh & _SYNC_BIT:
                self._sync_file(fd, node)
            return n

    def _maybe_hold(self, start: int, end: int) -> None:
        with self._mu:
            rng = self.hold_range
            if rng is None or end <= rng[0] or start >= rng[1]:
                return
            self.hold_range, self.held = None, True
        self._release.wait()
        with self._mu:
            self.held = False

    def truncate(self, path: str | None, length: int, fh: int | None = None) -> int:
        with self._mu:
            if path == CONTROL_PATH or fh == CONTROL_FH:
                return 0
            self._check()
            if fh is not None:
                fd, node = self._fd(fh)
                old = os.fstat(fd).st_size
                os.ftruncate(fd, length)
            else:
                live = self._live(path or "/")
                node, old = self._node_of(live), os.lstat(live).st_size
                os.truncate(live, length)
            node.mark(min(old, length), max(old, length))
            return 0

    def fsync(self, path: str | None, datasync: int, fh: int) -> int:
        with self._mu:
            if fh == CONTROL_FH:
                return 0
            self._sync_point()
            fd, node = self._fd(fh)
            self._sync_file(fd, node)
            self.counters["fsync"] += 1
            return 0

    def flush(self, path: str | None, fh: int) -> int:
        return 0

    def release(self, path: str | None, fh: int) -> int:
        with self._mu:
            entry = self.fds.pop(fh, None)
            if entry is not None:
                os.close(entry[0])
            return 0

    def opendir(self, path: str) -> int:
        with self._mu:
            self._check()
            if not os.path.isdir(self._live(path)):
                raise mfusepy.FuseOSError(errno.ENOTDIR)
            self.next_dir_fh += 1
            self.dirs[self.next_dir_fh] = path
            return self.next_dir_fh

    def releasedir(self, path: str | None, fh: int) -> int:
        with self._mu:
            self.dirs.pop(fh, None)
            return 0

    def fsyncdir(self, path: str | None, datasync: int, fh: int) -> int:
        with self._mu:
            self._sync_point()
            # The handle's path is the one opened: a directory renamed since is not followed.
            self._sync_dir(self._live(path or self.dirs[fh]))
            self.counters["fsyncdir"] += 1
            return 0

    def mkdir(self, path: str, mode: int) -> int:
        with self._mu:
            self._check()
            live = self._live(path)
            os.mkdir(live, mode)
            node = self._new("d", os.lstat(live).st_ino, mode)
            self.durable[node.id] = {}
            return 0

    def rmdir(self, path: str) -> int:
        with self._mu:
            self._check()
            live = self._live(path)
            ino = os.lstat(live).st_ino
            os.rmdir(live)
            self.by_ino.pop(ino, None)
            return 0

    def unlink(self, path: str) -> int:
        with self._mu:
            self._check()
            if path == CONTROL_PATH:
                raise mfusepy.FuseOSError(errno.EPERM)
            live = self._live(path)
            self._forget(live)
            os.unlink(live)
            return 0

    def rename(self, old: str, new: str, flags: int = 0) -> int:
        with self._mu:
            self._check()
            if CONTROL_PATH in (old, new):
                raise mfusepy.FuseOSError(errno.EPERM)
            src, dst = self._live(old), self._live(new)
            if flags:
                # Both names keep their inodes (exchange) or nothing is replaced (noreplace):
                # the node map stays right as it is.
                if flags & ~(_RENAME_NOREPLACE | _RENAME_EXCHANGE):
                    raise mfusepy.FuseOSError(errno.EINVAL)
                if _LIBC.renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) != 0:
                    raise mfusepy.FuseOSError(ctypes.get_errno())
                return 0
            src_ino = os.lstat(src).st_ino
            if os.path.lexists(dst) and os.lstat(dst).st_ino != src_ino:
                self._forget(dst)
            os.rename(src, dst)
            return 0

    def symlink(self, target: str, source: str) -> int:
        with self._mu:
            self._check()
            live = self._live(target)
            os.symlink(source, live)
            self._new("l", os.lstat(live).st_ino, 0o777).target = source
            return 0

    def link(self, target: str, source: str) -> int:
        raise mfusepy.FuseOSError(errno.EPERM)

    def mknod(self, path: str, mode: int, dev: int) -> int:
        raise mfusepy.FuseOSError(errno.EPERM)

    def chmod(self, path: str | None, mode: int) -> int:
        with self._mu:
            self._check()
            live = self._live(path or "/")
            os.chmod(live, mode)
            self._node_of(live).mode = stat.S_IMODE(mode)
            return 0

    def chown(self, path: str | None, uid: int, gid: int) -> int:
        with self._mu:
            self._check()
            os.lchown(self._live(path or "/"), uid, gid)
            return 0

    def utimens(self, path: str | None, times: tuple[int, int] | None = None) -> int:
        with self._mu:
            self._check()
            if path is not None:
                os.utime(self._live(path), ns=times, follow_symlinks=False)
            return 0


class _FUSE(mfusepy.FUSE):  # type: ignore[misc]
    """mfusepy drops the file handle of ``ftruncate`` and the flags of ``rename`` under
    libfuse 3 (a RENAME_EXCHANGE became a plain rename); pass them on. And every open
    keeps the kernel's page cache (``keep_cache``: ``PowerCutFS.init_with_config`` says
    why), except the control file's, which is read past the cache (``direct_io``): its
    content changes with every report."""

    def open(self, path: bytes, fip: Any) -> int:
        fi = fip.contents
        fi.fh = self.operations.open(path.decode(), fi.flags)
        self._cache_mode(fi)
        return 0

    def create(self, path: bytes, mode: int, fip: Any) -> int:
        fi = fip.contents
        fi.fh = self.operations.create(path.decode(), mode, fi.flags)
        self._cache_mode(fi)
        return 0

    @staticmethod
    def _cache_mode(fi: Any) -> None:
        if fi.fh == CONTROL_FH:
            fi.direct_io = 1
        else:
            fi.keep_cache = 1

    def rename_fuse_3(self, old: bytes, new: bytes, flags: int) -> int:
        result: int = self.operations.rename(old.decode(), new.decode(), flags)
        return result

    def truncate_fuse_3(self, path: bytes | None, length: int, fip: Any) -> int:
        fh = fip.contents.fh if fip else None
        result: int = self.operations.truncate(None if path is None else path.decode(), length, fh)
        return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--backing", required=True, help="live directory (passed through)")
    ap.add_argument("--state", required=True, help="empty directory for durable contents")
    ap.add_argument("--image", required=True, help="where a cut writes the durable tree (must not exist)")
    ap.add_argument("mountpoint")
    args = ap.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if os.environ.get("POWERCUT_DEBUG") else logging.WARNING, stream=sys.stderr
    )
    fs = PowerCutFS(args.backing, args.state, args.image)
    _FUSE(fs, args.mountpoint, foreground=True, hard_remove=True, fsname="powercut", subtype="powercut")
    return 0


if __name__ == "__main__":
    sys.exit(main())
