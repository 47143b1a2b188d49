"""Snapshot manifests: written after the snapshot object, then a copy, so completeness is explicit.

A snapshot object without a readable manifest or manifest copy is an unfinished upload (the writer
died between the two PUTs) and is never offered as a backup. The manifest is an archive object
(``objectfmt``, kind 3) whose content is canonical JSON::

    {"format": 1, "namespace": "users", "history_id": "<32 hex>", "lsn": 1234,
     "snapshot_key": "<object name>", "snapshot_sha256": "<64 hex>", "snapshot_plain_size": 4096,
     "snapshot_object_size": 1200, "fingerprint": "<64 hex>", "created_at": 1700000000.0,
     "writer_id": "..."}

so it is checksummed (and, in an encrypted archive, authenticated) like every other object.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from unisondb.archive import naming, objectfmt
from unisondb.archive.naming import NameKind
from unisondb.archive.objectfmt import ArchiveKey, Identity, Kind
from unisondb.archive.publish import publish_bytes, publish_file
from unisondb.archive.store import ObjectStore
from unisondb.errors import CorruptArchive, NotFound

FORMAT = 1


@dataclass(frozen=True)
class SnapshotManifest:
    namespace: str
    history_id: str
    lsn: int
    snapshot_key: str
    snapshot_sha256: str
    snapshot_plain_size: int
    snapshot_object_size: int
    fingerprint: str
    created_at: float
    writer_id: str
    format: int = FORMAT

    def encode(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":")).encode()


def publish_snapshot(
    store: ObjectStore,
    prefix: str,
    path: Path,
    *,
    namespace: str,
    history_id: bytes,
    lsn: int,
    fingerprint: bytes | None,
    writer_id: str,
    archive_key: ArchiveKey | None = None,
    created_at: float | None = None,
    spool_dir: Path | None = None,
) -> SnapshotManifest:
    """Upload a snapshot file, then its manifest, then the manifest copy (in that order)."""
    encrypted = archive_key is not None
    key = naming.snapshot_key(prefix, namespace, history_id, lsn, encrypted)
    ident = Identity(Kind.SNAPSHOT, namespace, history_id, lsn, lsn, fingerprint)
    published = publish_file(store, key, path, ident, archive_key=archive_key, spool_dir=spool_dir)
    size = published.size
    if published.already:
        info = store.head(key)
        if info is None:
            raise NotFound(
                f"{store.where(key)} vanished right after it was published",
                hint="something deletes objects under this prefix; check lifecycle rules",
            )
        size = info.size
    manifest = SnapshotManifest(
        namespace,
        history_id.hex(),
        lsn,
        key,
        published.header.sha256.hex(),
        published.header.plain_size,
        size,
        published.header.fingerprint.hex(),
        created_at if created_at is not None else time.time(),
        writer_id,
    )
    if published.already:
        # A retry after a crash between the PUTs: keep the manifest that may already be there (its
        # created_at differs from ours), so the copy matches it and nothing is overwritten.
        try:
            existing = read_manifest(store, prefix, namespace, history_id, lsn, archive_key)
            if existing.snapshot_sha256 == manifest.snapshot_sha256:
                manifest = existing
        except CorruptArchive:
            pass
    content = manifest.encode()
    for kind in (NameKind.MANIFEST, NameKind.MANIFEST_COPY):
        ident = Identity(Kind.MANIFEST, namespace, history_id, lsn, lsn, published.header.fingerprint)
        header = objectfmt.new_header(ident, len(content), hashlib.sha256(content).digest(), archive_key)
        publish_bytes(
            store,
            naming.snapshot_key(prefix, namespace, history_id, lsn, encrypted, kind),
            content,
            header,
            archive_key,
        )
    return manifest


def read_manifest(
    store: ObjectStore,
    prefix: str,
    namespace: str,
    history_id: bytes,
    lsn: int,
    archive_key: ArchiveKey | None,
) -> SnapshotManifest:
    """The snapshot's manifest, falling back to the copy if the first is missing or damaged."""
    encrypted = archive_key is not None
    errors: list[str] = []
    for kind in (NameKind.MANIFEST, NameKind.MANIFEST_COPY):
        key = naming.snapshot_key(prefix, namespace, history_id, lsn, encrypted, kind)
        try:
            data, _ = store.get(key)
            out = io.BytesIO()
            header = objectfmt.decode(io.BytesIO(data), out, archive_key, store.where(key))
            raw: dict[str, Any] = json.loads(out.getvalue())
            manifest = SnapshotManifest(**raw)
            if (
                header.kind is not Kind.MANIFEST
                or manifest.lsn != lsn
                or manifest.namespace != namespace
                or manifest.history_id != history_id.hex()
            ):
                raise CorruptArchive(f"{store.where(key)}: manifest describes another snapshot")
            return manifest
        except (NotFound, CorruptArchive) as exc:
            errors.append(str(exc))
        except (ValueError, TypeError) as exc:
            errors.append(f"{store.where(key)}: unreadable manifest ({exc})")
    raise CorruptArchive(
        f"snapshot at LSN {lsn} of {namespace} has no usable manifest (an unfinished "
        f"upload is not a backup): {'; '.join(errors)}"
    )
