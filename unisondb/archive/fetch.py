"""Fetching what a restore needs from the archive into a local staging directory.

The catalog is a LIST of ``PREFIX/NS/`` parsed by ``naming.parse_key`` (a restore is the one place
that lists). From it:

1. the **snapshot**: among those with a readable manifest (or manifest copy; a snapshot without one
   is an unfinished upload and never used), the newest one at or before the target — its LSN
   ``<= --target-lsn`` and its manifest's creation time ``<= --target-time`` (the snapshot's state
   is older than its creation, so it never holds a write after the target);
2. every **segment** of any history whose last LSN is after the snapshot's LSN (the local restore's
   lineage logic, ``restore/timeline.py``, decides which history continues the snapshot).

Each object is decoded (``objectfmt.decode``: key id, every GCM tag, zstd, SHA-256, trailer) into
``STAGING/snapshot.db`` and ``STAGING/wal/HISTORY/NNNNNNNNN.wal`` through a ``.tmp`` file renamed only
after its checks passed. The caller then runs the ordinary local restore on those files, which
verifies them again (record CRCs, LSN contiguity, fingerprints) before touching the target.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from unisondb.archive import naming, objectfmt
from unisondb.archive.manifest import SnapshotManifest, read_manifest
from unisondb.archive.naming import ArchiveName, NameKind
from unisondb.archive.objectfmt import ArchiveKey
from unisondb.archive.store import ArchiveURL, ObjectStore
from unisondb.errors import CorruptArchive, InvalidRequest, NotFound
from unisondb.storage import fsutil

#: Objects downloaded at once.
PARALLEL = 4


@dataclass(frozen=True)
class Fetched:
    snapshot: Path
    wal_dir: Path
    manifest: SnapshotManifest
    segments: int
    bytes_downloaded: int
    seconds: float


def fetch_for_restore(
    store: ObjectStore,
    url: ArchiveURL,
    namespace: str,
    staging: Path,
    *,
    key: ArchiveKey | None,
    target_lsn: int | None = None,
    target_time_ns: int | None = None,
) -> Fetched:
    started = time.perf_counter()
    names: list[tuple[str, ArchiveName]] = []
    for info in store.list(naming.namespace_prefix(url.prefix, namespace)):
        parsed = naming.parse_key(url.prefix, info.key)
        if parsed is not None and parsed.namespace == namespace:
            names.append((info.key, parsed))
    manifest = _choose_snapshot(store, url, namespace, names, key, target_lsn, target_time_ns)
    segments = [(k, n) for k, n in names if n.kind is NameKind.SEGMENT and n.last_lsn > manifest.lsn]
    wal_dir = staging / "wal"
    snapshot = staging / "snapshot.db"
    jobs = [(manifest.snapshot_key, snapshot)]
    for k, n in segments:
        assert n.segment_id is not None
        jobs.append((k, wal_dir / n.history_id.hex() / f"{n.segment_id:09d}.wal"))
    wal_dir.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(PARALLEL) as pool:
        sizes = list(pool.map(lambda job: _download(store, job[0], job[1], key), jobs))
    return Fetched(snapshot, wal_dir, manifest, len(segments), sum(sizes), time.perf_counter() - started)


def _choose_snapshot(
    store: ObjectStore,
    url: ArchiveURL,
    namespace: str,
    names: list[tuple[str, ArchiveName]],
    key: ArchiveKey | None,
    target_lsn: int | None,
    target_time_ns: int | None,
) -> SnapshotManifest:
    where = f"{url}/{namespace}/"
    candidates = sorted(
        {
            (n.first_lsn, n.history_id)
            for _, n in names
            if n.kind is NameKind.SNAPSHOT and (target_lsn is None or n.first_lsn <= target_lsn)
        },
        reverse=True,
    )
    if key is None and any(n.encrypted for _, n in names if n.kind is NameKind.SNAPSHOT):
        raise InvalidRequest(
            f"the archive {where} is encrypted", hint="pass the archive key with --archive-key-file"
        )
    skipped: list[str] = []
    for lsn, history_id in candidates:
        try:
            manifest = read_manifest(store, url.prefix, namespace, history_id, lsn, key)
        except CorruptArchive as exc:  # an unfinished upload: never a backup
            skipped.append(str(exc))
            continue
        if target_time_ns is not None and manifest.created_at * 1e9 > target_time_ns:
            continue
        return manifest
    detail = f" (skipped: {'; '.join(skipped)})" if skipped else ""
    raise NotFound(
        f"no complete snapshot of namespace {namespace} at or before the target in {where}{detail}",
        hint="check --from and --namespace; a server publishes one when archiving "
        "starts and every --archive-snapshot-interval",
    )


def _download(store: ObjectStore, object_key: str, dest: Path, key: ArchiveKey | None) -> int:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + fsutil.TMP_SUFFIX)
    try:
        body = store.open(object_key)
        try:
            with open(tmp, "wb") as out:
                objectfmt.decode(body, out, key, store.where(object_key))
                size = out.tell()
        finally:
            body.close()
        os.replace(tmp, dest)
    except BaseException:
        fsutil.remove_quietly(tmp)
        raise
    return size
