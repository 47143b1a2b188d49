"""Give back the pages of a memory-mapped file that this process has touched.

LMDB maps its whole data file (``MAP_SHARED``, read-only: py-lmdb never uses
``MDB_WRITEMAP`` here) and every page a cursor or a write transaction reads stays mapped
into the process, so a pass over a 2 GiB B-tree leaves a 2 GiB resident set. Those pages
are clean page-cache pages: ``madvise(MADV_DONTNEED)`` on the mapping drops them from this
process's page tables and the next touch maps them again from the page cache (a minor
fault; nothing is lost or re-read from disk). A restore and a snapshot content scan call
``release`` between batches, which bounds their peak RSS whatever the file's size.

Why between transactions is not enough: on a page fault Linux maps up to 16 neighbouring
pages that are in the page cache ("fault-around", measured here even under
``MADV_RANDOM``, which LMDB sets), so a transaction of a few thousand puts at random keys
maps ~64 KiB per put — hundreds of MiB of a big B-tree within one transaction. A restore
therefore releases every few hundred records inside its transactions
(``BTree.apply_ops(every=...)``). That is safe in the middle of an LMDB transaction: without
``MDB_WRITEMAP`` LMDB never writes through the map, and the pages a transaction reads are
not rewritten while it runs, so a page touched again is mapped again with the same bytes.

Reading ``/proc/self/maps`` costs milliseconds, so the ranges are cached per
``generation``: the caller passes a value that changes whenever the file may have been
mapped anew (the LMDB map size: ``set_mapsize`` unmaps and maps again, and an old address
may by then hold other memory, which ``MADV_DONTNEED`` would zero). The same thread that
maps (LMDB's writer) calls ``release``, so the mapping cannot change in between.

The mapping's address is not exposed by py-lmdb, so it is found in ``/proc/self/maps``
(Linux; elsewhere ``release`` does nothing). Only mappings of exactly this file are
touched.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

MADV_DONTNEED = 4
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

_libc: ctypes.CDLL | None = None


def _madvise() -> ctypes._NamedFuncPointer | None:
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(None, use_errno=True)
        except OSError:
            return None
    fn = getattr(_libc, "madvise", None)
    if fn is not None:
        fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        fn.restype = ctypes.c_int
    return fn


class MappedFile:
    """The mappings of one file in this process (``release`` finds them each time: LMDB
    maps the file again when its map grows)."""

    def __init__(self, path: Path) -> None:
        try:
            # Inode and name (on overlay file systems the device in /proc/self/maps is not
            # the one stat reports).
            self._ident: tuple[int, bytes] | None = (os.stat(path).st_ino, os.fsencode(path.resolve()))
        except OSError:
            self._ident = None
        self._fn = _madvise() if self._ident is not None else None
        #: Bytes of mappings released so far (for tests).
        self.released = 0
        self._cached: tuple[object, list[tuple[int, int]]] | None = None

    def ranges(self) -> list[tuple[int, int]]:
        """(start, end) addresses of this process's mappings of the file."""
        if self._ident is None:
            return []
        ino, name = self._ident
        out = []
        try:
            with open("/proc/self/maps", "rb") as f:
                for line in f:
                    parts = line.split(maxsplit=5)
                    if len(parts) < 6 or int(parts[4]) != ino or parts[5].rstrip(b"\n") != name:
                        continue
                    lo, hi = (int(x, 16) for x in parts[0].split(b"-"))
                    out.append((lo, hi))
        except OSError:
            return []
        return out

    def release(self, generation: object = None) -> None:
        """Drop every page of the file from this process's resident set (not from the
        page cache). ``generation``: see the module docstring (None: read the ranges
        afresh). Best effort: a failure only leaves the pages mapped."""
        if self._fn is None:
            return
        if generation is None or self._cached is None or self._cached[0] != generation:
            self._cached = (generation, self.ranges())
        for lo, hi in self._cached[1]:
            if self._fn(lo, hi - lo, MADV_DONTNEED) == 0:
                self.released += hi - lo

    def release_over(self, limit: int, generation: object = None) -> None:
        """``release`` if this process's file-backed resident memory exceeds ``limit``
        bytes (read from ``/proc/self/statm``, far cheaper than a release)."""
        try:
            with open("/proc/self/statm", "rb") as f:
                shared = int(f.read().split()[2]) * _PAGE_SIZE
        except (OSError, ValueError, IndexError):
            shared = limit + 1
        if shared > limit:
            self.release(generation)

    def close(self) -> None:
        self._fn = None
