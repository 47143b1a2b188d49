"""What an ``lmdb.Error`` means in the error tree (one place for the B-tree and snapshots).

py-lmdb raises ``lmdb.Error`` with the C library's message (e.g. ``mdb_env_copyfd3: No
space left on device``), not an errno, so the message is matched against the errno texts
we act on. On a full file system LMDB's *commit* usually says ``mdb_txn_commit:
Input/output error`` instead of ENOSPC: ``mdb_page_flush`` turns a short ``pwritev`` (the
disk filled up part way) into EIO. Measured on an 8 MiB tmpfs with py-lmdb: the commit that
fills the disk fails with EIO, later commits that fit in freed pages succeed, and the
environment stays usable. So an EIO while the environment's file system is nearly full
(``fsutil.NEARLY_FULL_BYTES``) is reported as "no space left on device".
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import lmdb

from unisondb.errors import StorageError, UnisonDBError, from_os_error
from unisondb.storage import fsutil

#: errno values whose message LMDB may report, most specific first.
_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EIO, errno.EFBIG)


def translate(exc: lmdb.Error, path: Path, *, what: str, fs_path: Path | None = None) -> UnisonDBError:
    """``exc`` as one of our errors naming ``path``; ``fs_path`` is a directory on the file
    system LMDB was writing to (for the nearly-full check; default: ``path``'s parent)."""
    text = str(exc)
    for code in _ERRNOS:
        if os.strerror(code) in text:
            if code == errno.EIO and fsutil.nearly_full(fs_path or path.parent):
                code = errno.ENOSPC
            return from_os_error(OSError(code, os.strerror(code)), path)
    return StorageError(f"{what} failed: {text}: {path}")
