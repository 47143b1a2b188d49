"""Downloading from the archive into a local staging directory: for restore, list and verify.

The catalog is a LIST of ``PREFIX/NS/`` parsed by ``naming.parse_key`` (the one place anything
lists; the upload path never does). ``list_namespace`` returns it; from it:

* ``fetch_for_restore`` (``unisondb restore --from``) picks the **snapshot**: among those with a
  readable manifest (or manifest copy; a snapshot without one is an unfinished upload and never
  used), the newest at or before the target — its LSN ``<= --target-lsn`` and its manifest's
  creation time ``<= --target-time`` (the snapshot's state is older than its creation, so it never
  holds a write after the target) — and every **segment** of any history whose last LSN is after
  the snapshot's (the local restore's lineage logic, ``restore/timeline.py``, decides which history
  continues the snapshot). The first failure ends it.
* ``fetch_catalog`` (``unisondb backup list|verify --from``) downloads every complete snapshot (or
  only the newest) and every segment, collecting what fails instead of stopping, so the local
  catalog and verifier (``restore/catalog.py``, ``restore/verify.py``) report on the archive as on
  a backup directory. ``Staged.object_of`` maps each staged file back to its object's URL, so
  their reports can name objects, not staging paths.

Staging layout (what the local tools read)::

    STAGING/snapshot.db                          restore: the chosen snapshot
    STAGING/snapshots/HISTORY-LSN.db             list/verify: each complete snapshot
    STAGING/wal/HISTORY/NNNNNNNNN.wal            every downloaded segment
    <each of those>.sha256                       its content's SHA-256 from the object header

Each object is decoded (``objectfmt.decode``: key id, every GCM tag, zstd, SHA-256, trailer) through
a ``.tmp`` file renamed only after its checks passed; its header must also agree with its name
(kind, namespace, history, LSNs) and a snapshot with its manifest's SHA-256, so a renamed or
swapped object is caught. Downloads run ``PARALLEL`` at a time in a bounded thread pool, and report
stored bytes to a ``restore.progress.Progress`` (a bar on a terminal).
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from unisondb import sha256sum
from unisondb.archive import naming, objectfmt
from unisondb.archive.manifest import SnapshotManifest, read_manifest
from unisondb.archive.naming import ArchiveName, NameKind
from unisondb.archive.objectfmt import ArchiveKey, Kind
from unisondb.archive.store import ArchiveURL, ObjectStore
from unisondb.errors import CorruptArchive, InvalidRequest, NotFound, UnisonDBError
from unisondb.restore.inventory import SIDECAR_SUFFIX
from unisondb.restore.progress import Progress
from unisondb.storage import fsutil

#: Objects downloaded at once (bounded: each holds one HTTP connection and one decoder).
PARALLEL = 4

#: A staged sidecar named on its own (``check_sidecar`` reports the basename it read).
_STAGED_SIDECAR = re.compile(r"\b(?:[0-9a-f]{32}-\d{20}\.db|\d{9}\.wal)\.sha256\b")

_KIND_OF_NAME = {NameKind.SEGMENT: Kind.SEGMENT, NameKind.SNAPSHOT: Kind.SNAPSHOT}


@dataclass(frozen=True)
class Listed:
    """One object of the catalog: its key, what its name says, its stored size."""

    key: str
    name: ArchiveName
    size: int


@dataclass(frozen=True)
class Catalog:
    url: ArchiveURL
    namespace: str
    objects: list[Listed]

    @property
    def where(self) -> str:
        return f"{self.url}/{self.namespace}/"

    def of(self, kind: NameKind) -> list[Listed]:
        return [o for o in self.objects if o.name.kind is kind]

    @property
    def encrypted(self) -> bool:
        return any(o.name.encrypted for o in self.objects)


def list_namespace(store: ObjectStore, url: ArchiveURL, namespace: str) -> Catalog:
    """LIST the namespace's objects; ``NotFound`` if it has none (a wrong --from or --namespace)."""
    objects = []
    for info in store.list(naming.namespace_prefix(url.prefix, namespace)):
        parsed = naming.parse_key(url.prefix, info.key)
        if parsed is not None and parsed.namespace == namespace:
            objects.append(Listed(info.key, parsed, info.size))
    catalog = Catalog(url, namespace, objects)
    if not objects:
        raise NotFound(
            f"the archive {catalog.where} holds no objects of namespace {namespace}",
            hint="check --from and --namespace (the prefix is the one given to --archive-url)",
        )
    return catalog


def _require_key(catalog: Catalog, key: ArchiveKey | None) -> None:
    if key is None and catalog.encrypted:
        raise InvalidRequest(
            f"the archive {catalog.where} is encrypted", hint="pass the archive key with --archive-key-file"
        )


def manifests(
    store: ObjectStore, catalog: Catalog, key: ArchiveKey | None
) -> Iterator[tuple[Listed, SnapshotManifest | None, str | None]]:
    """Every snapshot, newest LSN first, with its manifest — or None and why (an unfinished upload).

    Lazy: a restore stops at the first one that fits, reading one or two manifests.
    """
    snaps = sorted(
        catalog.of(NameKind.SNAPSHOT), key=lambda o: (o.name.first_lsn, o.name.history_id), reverse=True
    )
    for obj in snaps:
        try:
            manifest = read_manifest(
                store, catalog.url.prefix, catalog.namespace, obj.name.history_id, obj.name.first_lsn, key
            )
        except CorruptArchive as exc:
            yield obj, None, str(exc)
            continue
        yield obj, manifest, None


# --- restore -------------------------------------------------------------------------------------


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
    progress: Progress | None = None,
) -> Fetched:
    started = time.perf_counter()
    catalog = list_namespace(store, url, namespace)
    _require_key(catalog, key)
    snap_obj, manifest = _choose_snapshot(store, catalog, key, target_lsn, target_time_ns)
    segments = [o for o in catalog.of(NameKind.SEGMENT) if o.name.last_lsn > manifest.lsn]
    wal_dir = staging / "wal"
    wal_dir.mkdir(parents=True, exist_ok=True)
    snapshot = staging / "snapshot.db"
    jobs = [_Job(snap_obj, snapshot, manifest.snapshot_sha256)]
    jobs += [_Job(o, _segment_path(wal_dir, o.name)) for o in segments]
    done = _download_all(store, jobs, key, progress or Progress(), keep_going=False)
    return Fetched(
        snapshot, wal_dir, manifest, len(segments), done.plain_bytes, time.perf_counter() - started
    )


def _choose_snapshot(
    store: ObjectStore,
    catalog: Catalog,
    key: ArchiveKey | None,
    target_lsn: int | None,
    target_time_ns: int | None,
) -> tuple[Listed, SnapshotManifest]:
    skipped: list[str] = []
    for obj, manifest, why in manifests(store, catalog, key):
        if target_lsn is not None and obj.name.first_lsn > target_lsn:
            continue
        if manifest is None:  # an unfinished upload: never a backup
            skipped.append(str(why))
            continue
        if target_time_ns is not None and manifest.created_at * 1e9 > target_time_ns:
            continue
        return obj, manifest
    detail = f" (skipped: {'; '.join(skipped)})" if skipped else ""
    raise NotFound(
        f"no complete snapshot of namespace {catalog.namespace} at or before the target in "
        f"{catalog.where}{detail}",
        hint="check --from and --namespace; a server publishes one when archiving "
        "starts and every --archive-snapshot-interval",
    )


# --- list and verify -----------------------------------------------------------------------------


@dataclass
class Staged:
    """What ``fetch_catalog`` put into staging, and what it could not."""

    catalog: Catalog
    wal_dir: Path
    #: Complete snapshots downloaded, newest LSN first, with their manifests.
    snapshots: list[tuple[Path, SnapshotManifest]]
    #: Staged file -> the URL of the object it was decoded from.
    object_of: dict[Path, str]
    #: Snapshots without a readable manifest (unfinished uploads): one line each.
    incomplete: list[str]
    #: Objects that failed to download or decode: one line each (a verify problem).
    failed: list[str]
    plain_bytes: int
    stored_bytes: int
    seconds: float
    _by_text: dict[str, str] | None = field(default=None, repr=False)

    def relabel(self, text: str) -> str:
        """``text`` with every staged path replaced by its object's URL, and the staged sidecars
        by where their digest came from (one regex pass: reports have a string per segment)."""
        root = str(self.wal_dir.parent)
        if root not in text and SIDECAR_SUFFIX not in text:
            return text
        urls = self._urls()

        def one(match: re.Match[str]) -> str:
            found = match[0]
            if found.endswith(SIDECAR_SUFFIX):
                return "the object header"
            if found in urls:
                return urls[found]
            return self.catalog.where if found.rstrip("/") == str(self.wal_dir) else found

        text = re.sub(re.escape(root) + r"/[^\s:,;()'\"]*", one, text)
        return _STAGED_SIDECAR.sub("the object header", text)

    def _urls(self) -> dict[str, str]:
        if self._by_text is None:
            self._by_text = {str(p): url for p, url in self.object_of.items()}
        return self._by_text


def fetch_catalog(
    store: ObjectStore,
    url: ArchiveURL,
    namespace: str,
    staging: Path,
    *,
    key: ArchiveKey | None,
    newest_snapshot_only: bool = False,
    progress: Progress | None = None,
) -> Staged:
    """Download every segment and every complete snapshot (or only the newest) of ``namespace``.

    Failures of single objects are collected (``Staged.failed``), not raised: the caller reports
    on everything else. Listing, credentials and key errors still raise.
    """
    started = time.perf_counter()
    catalog = list_namespace(store, url, namespace)
    _require_key(catalog, key)
    wal_dir = staging / "wal"
    wal_dir.mkdir(parents=True, exist_ok=True)
    jobs: list[_Job] = []
    incomplete: list[str] = []
    chosen: list[tuple[Path, SnapshotManifest]] = []
    for obj, manifest, why in manifests(store, catalog, key):
        if manifest is None:
            # read_manifest says "... (an unfinished upload is not a backup): <each attempt>".
            detail = str(why).split("): ", 1)[-1]
            incomplete.append(
                f"{store.where(obj.key)}: no usable manifest, an unfinished upload that no restore "
                f"uses ({detail})"
            )
            continue
        if newest_snapshot_only and chosen:
            continue
        dest = staging / "snapshots" / f"{obj.name.history_id.hex()}-{obj.name.first_lsn:020d}.db"
        chosen.append((dest, manifest))
        jobs.append(_Job(obj, dest, manifest.snapshot_sha256))
    jobs += [_Job(o, _segment_path(wal_dir, o.name)) for o in catalog.of(NameKind.SEGMENT)]
    done = _download_all(store, jobs, key, progress or Progress(), keep_going=True)
    return Staged(
        catalog,
        wal_dir,
        [(p, m) for p, m in chosen if p.exists()],
        {j.dest: store.where(j.obj.key) for j in jobs},
        incomplete,
        done.failed,
        done.plain_bytes,
        done.stored_bytes,
        time.perf_counter() - started,
    )


# --- downloading ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Job:
    obj: Listed
    dest: Path
    #: A snapshot's SHA-256 as its manifest records it (hex), checked against the object header.
    sha256: str | None = None


@dataclass
class _Done:
    plain_bytes: int = 0
    stored_bytes: int = 0
    failed: list[str] = field(default_factory=list)


def _segment_path(wal_dir: Path, name: ArchiveName) -> Path:
    assert name.segment_id is not None
    return wal_dir / name.history_id.hex() / f"{name.segment_id:09d}.wal"


def _download_all(
    store: ObjectStore, jobs: list[_Job], key: ArchiveKey | None, progress: Progress, *, keep_going: bool
) -> _Done:
    done = _Done(stored_bytes=sum(j.obj.size for j in jobs))
    progress.phase("download", done.stored_bytes)
    lock = threading.Lock()

    def one(job: _Job) -> None:
        try:
            size = _download(store, job, key, progress)
        except UnisonDBError as exc:
            if not keep_going:
                raise
            with lock:
                done.failed.append(str(exc))
            return
        with lock:
            done.plain_bytes += size

    pool = ThreadPoolExecutor(PARALLEL)
    try:
        futures = [pool.submit(one, job) for job in jobs]
        for future in as_completed(futures):
            future.result()  # the first failure (restore): raised once the pool has stopped
    finally:
        # A failed restore must not go on downloading: drop what has not started.
        pool.shutdown(wait=True, cancel_futures=True)
        progress.close()
    return done


class _Counting:
    """A reader that reports every byte it hands out to the progress display."""

    def __init__(self, raw: IO[bytes], progress: Progress) -> None:
        self._raw = raw
        self._progress = progress

    def read(self, n: int = -1) -> bytes:
        data = self._raw.read(n)
        if data:
            self._progress.advance(len(data))
        return data

    def close(self) -> None:
        self._raw.close()


def _download(store: ObjectStore, job: _Job, key: ArchiveKey | None, progress: Progress) -> int:
    where = store.where(job.obj.key)
    dest = job.dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + fsutil.TMP_SUFFIX)
    try:
        body = _Counting(store.open(job.obj.key), progress)
        try:
            with open(tmp, "wb") as out:
                header = objectfmt.decode(body, out, key, where)  # type: ignore[arg-type]
                size = out.tell()
        finally:
            body.close()
        _check_identity(header, job, where)
        # The content's SHA-256 from the (verified) header, as the sidecar the local tools
        # check: so they report "sha256 ok" rather than "no .sha256" for an archive object.
        sidecar = dest.with_name(dest.name + SIDECAR_SUFFIX)
        sidecar.write_text(sha256sum.line(header.sha256.hex(), dest.name))
        os.replace(tmp, dest)
    except BaseException:
        fsutil.remove_quietly(tmp)
        raise
    return size


def _check_identity(header: objectfmt.ObjectHeader, job: _Job, where: str) -> None:
    """The header (authenticated when encrypted) must say what the name says: a renamed or copied
    object would otherwise be replayed as a different segment."""
    name = job.obj.name
    said = (_KIND_OF_NAME.get(name.kind), name.namespace, name.history_id, name.first_lsn, name.last_lsn)
    has = (header.kind, header.namespace, header.history_id, header.first_lsn, header.last_lsn)
    if said != has:
        raise CorruptArchive(
            f"{where}: its header describes {header.kind.name.lower()} {header.namespace}/"
            f"{header.history_id.hex()} LSN {header.first_lsn}..{header.last_lsn}, not what its name says",
            hint="an object was renamed or copied inside the archive; restore from another snapshot",
        )
    if job.sha256 is not None and header.sha256.hex() != job.sha256:
        raise CorruptArchive(
            f"{where}: SHA-256 {header.sha256.hex()[:16]}… differs from its manifest's {job.sha256[:16]}…",
            hint="the snapshot object was replaced after its manifest was written",
        )
