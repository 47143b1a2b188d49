"""Publishing immutable archive objects: create-if-absent, never overwrite, idempotent on retry.

An archive object is written once with ``If-None-Match: *``. If the name is taken, the existing
object's header (a ranged GET of its first bytes) decides:

* same content identity (kind, namespace, history, LSN range, size, SHA-256, fingerprint) — an
  earlier attempt already published it (a retry after a timeout, a restart after SIGKILL): done;
* a snapshot of the same state — same kind, namespace, history, LSN and state fingerprint, other
  bytes: two snapshots taken at one LSN (the start-up snapshot and an on-demand one on an idle
  namespace) differ only in the checkpoint's wall-clock time, and the fingerprint proves they hold
  the same pairs. The existing object stands for both: done, and the caller's manifest names the
  existing object's SHA-256;
* anything else — ``ArchiveConflict``: the archive is never overwritten.

Encrypted objects differ byte-for-byte on every encoding (fresh nonces), which is why identity is
the header's content fields and not the object's ETag.
"""

from __future__ import annotations

import io
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from unisondb.archive import objectfmt
from unisondb.archive.objectfmt import ArchiveKey, Identity, Kind, ObjectHeader
from unisondb.archive.store import ObjectStore
from unisondb.errors import ArchiveConflict, ObjectExists


@dataclass(frozen=True)
class Published:
    key: str
    header: ObjectHeader
    size: int  # bytes of the encoded object (0 if it was already there)
    already: bool  # True: an identical object was already in the archive


def _identity(h: ObjectHeader) -> tuple[object, ...]:
    if h.kind is Kind.SNAPSHOT and any(h.fingerprint):
        # The state, not its bytes (see the module docstring).
        return (h.kind, h.namespace, h.history_id, h.first_lsn, h.last_lsn, h.fingerprint)
    return (h.kind, h.namespace, h.history_id, h.first_lsn, h.last_lsn, h.plain_size, h.sha256, h.fingerprint)


class Spooled:
    """An object encoded to a temporary file, ready to publish; close it when done (a context manager).

    Encoding is split from uploading so the archiver can encode the next segment while this one
    uploads (zstd, hashlib, AES-GCM and socket I/O all release the GIL)."""

    def __init__(self, spool: IO[bytes], header: ObjectHeader, size: int) -> None:
        self.spool = spool
        self.header = header
        self.size = size

    def close(self) -> None:
        self.spool.close()

    def __enter__(self) -> Spooled:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def encode_spooled(
    path: Path, ident: Identity, *, archive_key: ArchiveKey | None = None, spool_dir: Path | None = None
) -> Spooled:
    """Encode ``path`` to a temporary file (bounded memory; S3 needs a known length)."""
    spool = tempfile.TemporaryFile(dir=spool_dir)
    try:
        header = objectfmt.encode_file(path, spool, ident, archive_key)
        size = spool.tell()
        spool.seek(0)
    except BaseException:
        spool.close()
        raise
    return Spooled(spool, header, size)


def publish_spooled(store: ObjectStore, key: str, spooled: Spooled) -> Published:
    """Publish an encoded object under ``key`` (create-if-absent, see the module docstring)."""
    spooled.spool.seek(0)
    return _publish(store, key, spooled.spool, spooled.header, spooled.size)


def publish_file(
    store: ObjectStore,
    key: str,
    path: Path,
    ident: Identity,
    *,
    archive_key: ArchiveKey | None = None,
    spool_dir: Path | None = None,
) -> Published:
    """Encode ``path`` and publish it."""
    with encode_spooled(path, ident, archive_key=archive_key, spool_dir=spool_dir) as spooled:
        return publish_spooled(store, key, spooled)


def publish_bytes(
    store: ObjectStore, key: str, content: bytes, header: ObjectHeader, archive_key: ArchiveKey | None = None
) -> Published:
    """Publish small content (a manifest) whose header the caller built with ``new_header``."""
    out = io.BytesIO()
    size = objectfmt.encode(io.BytesIO(content), out, header, archive_key)
    out.seek(0)
    return _publish(store, key, out, header, size)


def _publish(store: ObjectStore, key: str, body: IO[bytes], header: ObjectHeader, size: int) -> Published:
    try:
        store.put_if_absent(key, body)
        return Published(key, header, size, already=False)
    except ObjectExists:
        pass
    data, _ = store.get(key, length=objectfmt.HEADER_SIZE)
    existing = objectfmt.parse_header(data, store.where(key))
    if _identity(existing) != _identity(header):
        raise ArchiveConflict(
            f"{store.where(key)} already exists with different content (SHA-256 "
            f"{existing.sha256.hex()[:16]}…, LSNs {existing.first_lsn}..{existing.last_lsn}; ours "
            f"{header.sha256.hex()[:16]}…, LSNs {header.first_lsn}..{header.last_lsn}); the archive "
            "is never overwritten",
            hint="another server or an older history wrote this name: check --archive-url",
        )
    return Published(key, existing, 0, already=True)
