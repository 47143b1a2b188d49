"""The one error tree of UnisonDB.

Every failure that crosses a module boundary is one of these. Each edge translates
them exactly once: the HTTP layer (``api/errors.py``) maps ``http_status``, the CLI
(``cli/__init__.py``) maps ``exit_code``. Foreign exceptions (``OSError``,
``lmdb.Error``) are converted at the storage boundary with ``raise ... from exc``.

Grouped by who has to act::

    UnisonDBError
    ├── InvalidRequest          400  the caller sent something we refuse (bad key, bad JSON, bad path)
    │   └── PayloadTooLarge     413  the body is over the documented limit
    ├── NotFound                404  unknown namespace, segment or route
    ├── Conflict                409  a file or state already exists and differs
    ├── BackupGap               409  asked for segments that retention already deleted
    ├── ArchiveConflict         409  the archive holds something else under a name we write
    │   ├── ObjectExists        409  create-if-absent found the name taken (If-None-Match: * got 412)
    │   ├── ObjectChanged       409  compare-and-swap found another version (If-Match got 412)
    │   └── LeaseHeld           409  another server is the archive's writer
    ├── StorageError            500  the operator must act on the machine
    │   ├── PermissionDenied    500  EACCES/EPERM on a path
    │   ├── NoSpace             507  ENOSPC/EDQUOT on a path
    │   ├── CorruptSnapshot     500  a snapshot file fails its self-verifying trailer
    │   ├── CorruptArchive      500  an archive object fails its checksum, authentication or structure
    │   └── CorruptLog          500  a WAL segment fails its checksum or structure
    │       ├── LsnGap          500  replay would skip LSNs
    │       ├── TimelineConflict 500 segments of another history hold records after the checkpoint
    │       └── BadBTreeFile    500  an LMDB file is empty, truncated, zero-filled or foreign
    │                                (found before LMDB maps it: storage/lmdbfile.py)
    ├── LockedError             exit 3  another process holds the namespace LOCK
    └── Unavailable             503  the engine is closed or shutting down
        └── ArchiveUnavailable  503  the object store did not answer or answered 5xx (retry later)
"""

from __future__ import annotations

import errno
from pathlib import Path


class UnisonDBError(Exception):
    """Base of every error we raise on purpose."""

    http_status = 500
    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message} (hint: {self.hint})"
        return self.message


class InvalidRequest(UnisonDBError):
    http_status = 400
    exit_code = 2


class PayloadTooLarge(InvalidRequest):
    http_status = 413


class NotFound(UnisonDBError):
    http_status = 404
    exit_code = 4


class Conflict(UnisonDBError):
    http_status = 409
    exit_code = 5


class BackupGap(Conflict):
    """Segments the caller expects are no longer on disk (deleted by retention)."""


class StorageError(UnisonDBError):
    http_status = 500
    exit_code = 6


class PermissionDenied(StorageError):
    http_status = 500


class NoSpace(StorageError):
    http_status = 507


class CorruptSnapshot(StorageError):
    """A snapshot's bytes no longer match the digest in its own trailer (``snapfile``)."""


class CorruptLog(StorageError):
    """A WAL segment is damaged somewhere other than the torn tail of the newest segment."""

    def __init__(
        self,
        message: str,
        *,
        path: Path | str | None = None,
        offset: int | None = None,
        hint: str | None = None,
    ) -> None:
        where = ""
        if path is not None:
            where = f"{path}"
            if offset is not None:
                where += f" at offset {offset}"
            where += ": "
        super().__init__(where + message, hint=hint)
        self.path = path
        self.offset = offset


class LsnGap(CorruptLog):
    """Replay found a hole in the LSN sequence."""


class TimelineConflict(CorruptLog):
    """Segments of another timeline hold records after the checkpoint."""


class ArchiveConflict(Conflict):
    """The archive already holds something else under a name we write: never overwritten."""


class ObjectExists(ArchiveConflict):
    """A create-if-absent write (``If-None-Match: *``) found the name taken."""


class ObjectChanged(ArchiveConflict):
    """A compare-and-swap write (``If-Match: <etag>``) found a newer version than the one we read."""


class LeaseHeld(ArchiveConflict):
    """Another server holds (or took over) the single-writer lease of an archive prefix."""


class CorruptArchive(StorageError):
    """An archive object fails its header checksum, SHA-256, authentication tag or structure."""


class BadBTreeFile(CorruptLog):
    """A B-tree (LMDB) file that LMDB must not map: empty, cut short, zero-filled or foreign.

    Raised by ``storage/lmdbfile.py`` *before* ``lmdb.open``: mapping a file shorter than
    its meta page claims ends the process with SIGBUS instead of an error. The message
    names the file itself (no ``path:`` prefix), so ``path`` is kept as an attribute only.
    """

    def __init__(self, message: str, *, path: Path | str, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.path = path


class LockedError(UnisonDBError):
    http_status = 503
    exit_code = 3


class Unavailable(UnisonDBError):
    http_status = 503
    exit_code = 7


class ArchiveUnavailable(Unavailable):
    """The object store could not be reached, timed out or answered 5xx/throttling: retryable."""


def from_os_error(exc: OSError, path: Path | str | None = None) -> UnisonDBError:
    """Translate an OSError into our tree, naming the path the way the docs show it.

    ``permission denied: <path>`` and ``no space left on device: <path>`` are the exact
    messages the Backup and Restore document's troubleshooting section shows.
    """
    where = path if path is not None else (exc.filename or "")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return PermissionDenied(f"permission denied: {where}")
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return NoSpace(f"no space left on device: {where}")
    reason = exc.strerror or str(exc)
    return StorageError(f"I/O error: {reason.lower()}: {where}")
