"""The recorded SHA-256 of a sealed WAL segment: ``<segment>.sha256`` beside it in ``wal/``.

Format (the document's sidecar format, so ``cd wal && sha256sum -c 000000042.wal.sha256``
checks the live segment)::

    <64 lower-case hex digits><space><space>000000042.wal\\n

Written by the WAL writer when it seals a segment, from a hash it computed while appending
(``SegmentHasher``: header, every record, footer — the exact bytes it wrote, never read
back). A segment sealed on open after a crash, or one written before this file existed,
has none until its hash is first needed (a WAL backup hashes what it checked and records
it).

Trust: the hash stands for the segment's bytes only while the segment has not changed
since it was recorded; a WAL backup then publishes it without hashing the segment again
(it still checks every byte's CRC32C on the way: header, records and footer are all
CRC-covered). ``read(path, changed_ns=...)`` enforces that:

* it is written ``<name>.sha256.<pid>-<n>.tmp`` → rename, *without* fsync (the seal is on
  the writer's path and must not pay two more fsyncs). After a power cut it may be
  missing, empty or torn; ``read`` then returns None (torn/unparseable files are ignored,
  and removed at the next open) and the hash is computed again on first need;
* it may be stale (a segment file replaced, rewritten or re-permissioned after the hash
  was recorded): the segment's inode-change time (``st_ctime``, which no user call can set)
  is then later than the sidecar's modification time, and ``read`` returns None, so the
  backup hashes the bytes it checked and rewrites the file. A sidecar whose mtime was set
  back (``cp -p``, ``tar``) is only ever *more* suspect, never less;
* what it cannot see is a sidecar edited by hand to a wrong digest after the seal: the
  backup would publish that digest, and ``unisondb backup verify`` / every restore (which
  hash what they read) refuse the copy — the segment's bytes themselves are still
  CRC-checked and correct (docs/ARCHITECTURE.md, "what a WAL backup's .sha256 vouches for");
* it is removed with its segment (``Wal.delete_segment``); one left by a crash between the
  two unlinks, a torn one, or a ``.tmp``, is removed when the WAL is opened (``clean``).
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

from unisondb import sha256sum
from unisondb.storage.fsutil import TMP_SUFFIX
from unisondb.storage.layout import SEGMENT_RE

SUFFIX = ".sha256"


def sidecar_path(segment_path: Path) -> Path:
    return segment_path.with_name(segment_path.name + SUFFIX)


def read(segment_path: Path, changed_ns: int | None = None) -> str | None:
    """The digest recorded for ``segment_path``, or None if there is none usable.

    Missing, unreadable, torn, or naming another file: all None (never an error — the
    caller computes the hash instead). ``changed_ns``: the segment's ``st_ctime_ns``; a
    sidecar last modified before it is stale (the segment changed after its hash was
    recorded): None. Both times come from the same kernel clock."""
    try:
        with open(sidecar_path(segment_path), "rb") as f:
            if changed_ns is not None and os.fstat(f.fileno()).st_mtime_ns < changed_ns:
                return None
            text = f.read(4096).decode("utf-8", errors="replace")
    except OSError:
        return None
    entries = sha256sum.parse(text)
    if entries is None or len(entries) != 1 or entries[0].name != segment_path.name:
        return None
    return entries[0].digest


_tmp_seq = 0
_tmp_lock = threading.Lock()


def write(segment_path: Path, hexdigest: str) -> None:
    """Record ``hexdigest`` for ``segment_path`` (tmp + rename, not fsynced: see above).

    Raises OSError; callers treat a failure as "no recorded hash" (never fatal)."""
    global _tmp_seq
    with _tmp_lock:
        _tmp_seq += 1
        seq = _tmp_seq
    side = sidecar_path(segment_path)
    # A name of its own per writer: the WAL writer and a backup repairing a stale file may
    # write at once; whichever rename lands last wins, and both say the same thing.
    tmp = side.with_name(f"{side.name}.{os.getpid()}-{seq}{TMP_SUFFIX}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            data = sha256sum.line(hexdigest, segment_path.name).encode()
            if os.write(fd, data) != len(data):
                raise OSError(28, "short write")
        finally:
            os.close(fd)
        os.rename(tmp, side)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def remove(segment_path: Path) -> None:
    """Remove the sidecar of a segment that is being deleted (absent: nothing to do)."""
    try:
        os.unlink(sidecar_path(segment_path))
    except FileNotFoundError:
        pass


def clean(directory: Path) -> list[Path]:
    """At WAL open: remove sidecars whose segment is gone (a crash between the two unlinks)
    and sidecars that do not parse or name another file (torn by a power cut after their
    unsynced rename), so that nothing reading ``wal/`` as a backup input — ``sha256sum -c``,
    ``unisondb backup verify`` — meets a damaged checksum file. Costs one small read per
    sealed segment."""
    removed: list[Path] = []
    try:
        names = set(os.listdir(directory))
    except OSError:
        return removed
    for name in names:
        seg = name[: -len(SUFFIX)]
        if not (name.endswith(SUFFIX) and SEGMENT_RE.match(seg)):
            continue  # not ours
        if seg in names and read(directory / seg) is not None:
            continue
        try:
            os.unlink(directory / name)
            removed.append(directory / name)
        except OSError:
            pass  # a hint: harmless if it stays
    return removed


class SegmentHasher:
    """SHA-256 of the bytes written to the active segment, as they are written.

    Valid only while every byte of the file from offset 0 went through ``update`` in
    order: ``covers(end)`` asks whether the hash is of exactly ``[0, end)``. A rollback or
    truncation (a failed fdatasync, a cut-back write) moves the file's end below what was
    hashed; SHA-256 cannot be rewound, so the next ``update`` at an offset other than the
    hashed end invalidates the hasher for good and the segment's hash is computed on
    first need instead.
    """

    __slots__ = ("_h", "end")

    def __init__(self, header: bytes) -> None:
        self._h: hashlib._Hash | None = hashlib.sha256(header)
        self.end = len(header)

    @property
    def valid(self) -> bool:
        return self._h is not None

    def update(self, offset: int, data: bytes) -> None:
        if self._h is None:
            return
        if offset != self.end:
            self._h = None
            return
        self._h.update(data)
        self.end += len(data)

    def finish(self, end_before_footer: int, footer: bytes) -> str | None:
        """The digest of header + records + ``footer`` if it covers the file, else None."""
        if self._h is None or end_before_footer != self.end:
            return None
        h = self._h.copy()
        h.update(footer)
        return h.hexdigest()
