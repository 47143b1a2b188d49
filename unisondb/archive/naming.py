"""Object names of an archive: a plain listing (``aws s3 ls --recursive``) is the catalog.

Under an archive URL ``s3://bucket/PREFIX``::

    PREFIX/writer.lease                                            the single-writer lease (lease.py)
    PREFIX/NS/HISTORY/wal/FIRST-LAST-SEGMENT.wal.zst[.enc]         one sealed WAL segment
    PREFIX/NS/HISTORY/snapshots/LSN.snapshot.zst[.enc]             one snapshot (B-tree at LSN)
    PREFIX/NS/HISTORY/snapshots/LSN.manifest.zst[.enc]             written after the snapshot
    PREFIX/NS/HISTORY/snapshots/LSN.manifest.copy.zst[.enc]        written after the manifest
    PREFIX/NS/retention.json                                       the window retention keeps (retention.py)

``NS`` is the namespace, ``HISTORY`` the 32 lowercase hex digits of the 16-byte history id, ``FIRST``,
``LAST`` and ``LSN`` are LSNs as 20 decimal digits and ``SEGMENT`` the segment id as 9 (the local file
name's width), so names sort in log order. ``.enc`` marks an encrypted object. A snapshot without a
readable manifest (or copy) is an unfinished upload, never a backup.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

from unisondb.storage.layout import is_namespace_name, validate_namespace

LEASE_NAME = "writer.lease"
RETENTION_NAME = "retention.json"

_HISTORY = r"(?P<history>[0-9a-f]{32})"
_SEGMENT_RE = re.compile(
    _HISTORY + r"/wal/(?P<first>\d{20})-(?P<last>\d{20})-(?P<segment>\d{9,})"
    r"\.wal\.zst(?P<enc>\.enc)?$"
)
_SNAPSHOT_RE = re.compile(
    _HISTORY + r"/snapshots/(?P<lsn>\d{20})\.(?P<what>snapshot|manifest|manifest\.copy)"
    r"\.zst(?P<enc>\.enc)?$"
)


class NameKind(Enum):
    SEGMENT = "segment"
    SNAPSHOT = "snapshot"
    MANIFEST = "manifest"
    MANIFEST_COPY = "manifest.copy"


@dataclass(frozen=True)
class ArchiveName:
    """What an object name says, before the object itself is read."""

    kind: NameKind
    namespace: str
    history_id: bytes
    first_lsn: int
    last_lsn: int
    segment_id: int | None
    encrypted: bool


def _root(prefix: str, namespace: str, history_id: bytes) -> str:
    validate_namespace(namespace)
    if len(history_id) != 16:
        raise ValueError("history id must be 16 bytes")
    return f"{prefix}/{namespace}/{history_id.hex()}" if prefix else f"{namespace}/{history_id.hex()}"


def _suffix(encrypted: bool) -> str:
    return ".zst.enc" if encrypted else ".zst"


def lease_key(prefix: str) -> str:
    return f"{prefix}/{LEASE_NAME}" if prefix else LEASE_NAME


def retention_key(prefix: str, namespace: str) -> str:
    """The namespace's retention record (not an archive object: plain JSON, see retention.py)."""
    return namespace_prefix(prefix, namespace) + RETENTION_NAME


def namespace_prefix(prefix: str, namespace: str) -> str:
    """Where one namespace's objects live: the LIST prefix for a catalog rebuild."""
    validate_namespace(namespace)
    return f"{prefix}/{namespace}/" if prefix else f"{namespace}/"


def segment_key(
    prefix: str,
    namespace: str,
    history_id: bytes,
    first_lsn: int,
    last_lsn: int,
    segment_id: int,
    encrypted: bool,
) -> str:
    if not 0 <= first_lsn <= last_lsn or segment_id < 0:
        raise ValueError(f"bad segment {segment_id} LSN range {first_lsn}..{last_lsn}")
    return (
        f"{_root(prefix, namespace, history_id)}/wal/"
        f"{first_lsn:020d}-{last_lsn:020d}-{segment_id:09d}.wal{_suffix(encrypted)}"
    )


def snapshot_key(
    prefix: str,
    namespace: str,
    history_id: bytes,
    lsn: int,
    encrypted: bool,
    kind: NameKind = NameKind.SNAPSHOT,
) -> str:
    if kind is NameKind.SEGMENT or lsn < 0:
        raise ValueError(f"bad snapshot name kind {kind} or LSN {lsn}")
    return f"{_root(prefix, namespace, history_id)}/snapshots/{lsn:020d}.{kind.value}{_suffix(encrypted)}"


def parse_key(prefix: str, key: str) -> ArchiveName | None:
    """What ``key`` names, or None for anything else under the prefix (the lease, foreign files)."""
    head = f"{prefix}/" if prefix else ""
    if not key.startswith(head):
        return None
    namespace, _, rest = key[len(head) :].partition("/")
    if not is_namespace_name(namespace):
        return None
    if match := _SEGMENT_RE.match(rest):
        return ArchiveName(
            NameKind.SEGMENT,
            namespace,
            bytes.fromhex(match["history"]),
            int(match["first"]),
            int(match["last"]),
            int(match["segment"]),
            bool(match["enc"]),
        )
    if match := _SNAPSHOT_RE.match(rest):
        lsn = int(match["lsn"])
        return ArchiveName(
            NameKind(match["what"]),
            namespace,
            bytes.fromhex(match["history"]),
            lsn,
            lsn,
            None,
            bool(match["enc"]),
        )
    return None
