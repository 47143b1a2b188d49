"""Archive retention: keep snapshots by count and age, and every segment a kept snapshot needs.

Policy (``--archive-retention-snapshots N``, ``--archive-retention-age D``; both 0 = off, the
default, and the archive only grows):

* ``N``: the newest ``N`` complete snapshots (by manifest creation time) are kept;
* ``D``: every point of the last ``D`` stays restorable — every snapshot created within ``D`` is
  kept, and so is the newest one created at or before ``now - D`` (it is the base a restore to
  the start of the window replays from);
* a snapshot is deleted only when **both** rules allow it, and the newest complete snapshot is
  never deleted.

The **promised window** is then: ``--target-lsn >= W_lsn`` and ``--target-time >= W_time``, where
``W_lsn`` is the smallest LSN and ``W_time`` the earliest creation time of the kept snapshots
(``restore --from`` picks a snapshot by LSN and by manifest creation time, ``fetch.py``).

Segments: a restore from a snapshot at LSN ``s`` replays only records after ``s`` (of whichever
history continues it, ``restore/timeline.py``), so a segment object whose last LSN is ``<= W_lsn``
is needed by no kept snapshot, of any history, and is deleted. Every segment ending after
``W_lsn`` is kept, whatever its history — an abandoned fork's tail may be kept longer than
needed, never the reverse.

Order, so that a crash at any point leaves only extra objects and every manifest in the archive
still names a snapshot whose WAL is all there:

1. the retention record ``PREFIX/NS/retention.json`` is written (plain JSON, compare-and-swap)
   with the new window, before anything is deleted;
2. pruned snapshots, oldest first, each as manifest → manifest copy → snapshot object (while the
   copy remains it is still a complete backup; after it, an unfinished upload, never offered);
3. then the segments below the window, lowest LSN first, in batches of up to 1000 per DeleteObjects
   request (the batches in order, so what remains is nearly a contiguous suffix; within a batch
   the store picks the order — all of it is below the window either way).

Unfinished snapshots (no readable manifest) below ``W_lsn`` are leftovers of a crash and are deleted
the same way. A snapshot written with another key (before a rotation, or before encryption was
switched on or off) cannot be read but is not damaged: it counts as complete, with its manifest
object's LastModified (from the LIST) as its creation time, so it keeps its place in the window and
ages out like any other (a restore from it needs its own key). The caller holds the namespace's
snapshot lock so no snapshot is being published meanwhile, and the writer lease: every delete first
checks ``lease_held()``.

Pruning LISTs the namespace once per run (it is not the steady-state path; it runs on its own
schedule, ``--archive-retention-interval``, default 1 h). Manifests are immutable, so those read
once are cached by name.

The record::

    {"format": 1, "namespace": "users", "oldest_lsn": 1200, "oldest_history": "<32 hex>",
     "oldest_time": 1700000000.0, "keep_snapshots": 7, "keep_age": 604800.0,
     "kept": [[1200, "<32 hex>"], ...], "pruned_at": 1700090000.0, "writer_id": "..."}
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import structlog

from unisondb.archive import naming
from unisondb.archive.manifest import SnapshotManifest, read_manifest
from unisondb.archive.naming import ArchiveName, NameKind
from unisondb.archive.objectfmt import ArchiveKey
from unisondb.archive.store import DELETE_BATCH, ObjectStore
from unisondb.errors import CorruptArchive, InvalidRequest, LeaseHeld, NotFound

log = structlog.get_logger(__name__)

FORMAT = 1


@dataclass(frozen=True)
class RetentionPolicy:
    #: Keep the newest this many complete snapshots (0: the count does not keep any beyond one).
    keep_snapshots: int = 0
    #: Keep every point of the last this many seconds restorable (0: age keeps nothing).
    keep_age: float = 0.0

    @property
    def enabled(self) -> bool:
        return self.keep_snapshots > 0 or self.keep_age > 0


@dataclass
class SnapshotEntry:
    """One snapshot LSN of one history as the listing shows it."""

    history_id: bytes
    lsn: int
    #: Names present, in the order they are deleted (manifest, copy, snapshot object).
    keys: dict[NameKind, str] = field(default_factory=dict)
    #: Whether the listed names are of an encrypted archive (``.enc``).
    encrypted: bool = False
    #: When the manifest object was stored (LIST's LastModified).
    stored_at: float | None = None
    manifest: SnapshotManifest | None = None
    #: Written with another key (or none/one when we have one/none): unreadable, not damaged.
    foreign: bool = False

    @property
    def created_at(self) -> float | None:
        if self.manifest is not None:
            return self.manifest.created_at
        return self.stored_at if self.foreign else None

    @property
    def complete(self) -> bool:
        return self.created_at is not None and NameKind.SNAPSHOT in self.keys

    def delete_order(self) -> list[tuple[str, str]]:
        """(object name, metric kind) in the order they are deleted."""
        order = (NameKind.MANIFEST, NameKind.MANIFEST_COPY, NameKind.SNAPSHOT)
        return [
            (self.keys[k], "snapshot" if k is NameKind.SNAPSHOT else "manifest")
            for k in order
            if k in self.keys
        ]


@dataclass(frozen=True)
class PrunePlan:
    kept: list[SnapshotEntry]
    pruned: list[SnapshotEntry]  # complete snapshots the policy lets go, oldest first
    orphans: list[SnapshotEntry]  # unfinished or damaged snapshots below the window
    segments: list[str]  # segment objects wholly below the window, lowest LSN first
    window_lsn: int | None
    window_time: float | None


def plan(
    policy: RetentionPolicy,
    snapshots: Iterable[SnapshotEntry],
    segments: Iterable[tuple[str, ArchiveName]],
    now: float,
) -> PrunePlan:
    """What to keep and delete (pure). Nothing is deleted when there is no complete snapshot."""
    entries = list(snapshots)
    complete = sorted(
        (e for e in entries if e.complete),
        key=lambda e: (e.created_at or 0.0, e.lsn),
        reverse=True,
    )
    if not policy.enabled or not complete:
        return PrunePlan(complete, [], [], [], None, None)
    keep_ids: set[int] = set(range(max(policy.keep_snapshots, 1)))
    if policy.keep_age > 0:
        cutoff = now - policy.keep_age
        for i, e in enumerate(complete):
            keep_ids.add(i)
            if (e.created_at or 0.0) <= cutoff:
                break  # the base of the window's start; everything older may go
    kept = [e for i, e in enumerate(complete) if i in keep_ids]
    pruned = [e for i, e in enumerate(complete) if i not in keep_ids]
    pruned.reverse()  # oldest first
    window_lsn = min(e.lsn for e in kept)
    window_time = min(e.created_at or 0.0 for e in kept)
    orphans = sorted(
        (e for e in entries if not e.complete and not e.foreign and e.lsn < window_lsn), key=lambda e: e.lsn
    )
    doomed = sorted(
        (
            (n.first_lsn, n.segment_id or 0, k)
            for k, n in segments
            if n.kind is NameKind.SEGMENT and n.last_lsn <= window_lsn
        )
    )
    return PrunePlan(kept, pruned, orphans, [k for _, _, k in doomed], window_lsn, window_time)


@dataclass(frozen=True)
class PruneResult:
    window_lsn: int | None
    window_time: float | None
    kept_snapshots: int
    deleted_snapshots: int
    deleted_segments: int
    deleted_objects: int


class Retention:
    """Prunes one namespace of one archive; one per namespace archiver (it caches manifests)."""

    def __init__(
        self,
        store: ObjectStore,
        prefix: str,
        namespace: str,
        policy: RetentionPolicy,
        *,
        archive_key: ArchiveKey | None,
        writer_id: str,
        lease_held: Callable[[], bool],
        on_delete: Callable[[str], None] | None = None,  # called with the metric kind
        stopping: Callable[[], bool] = lambda: False,
        batch: int = DELETE_BATCH,
    ) -> None:
        self.store = store
        self.prefix = prefix
        self.namespace = namespace
        self.policy = policy
        self._key = archive_key
        self.writer_id = writer_id
        self._lease_held = lease_held
        self._on_delete = on_delete
        self._stopping = stopping
        self._batch = batch
        self._manifests: dict[tuple[bytes, int], SnapshotManifest] = {}

    def catalog(self) -> tuple[list[SnapshotEntry], list[tuple[str, ArchiveName]]]:
        """LIST the namespace and read (or recall) each snapshot's manifest."""
        entries: dict[tuple[bytes, int], SnapshotEntry] = {}
        segments: list[tuple[str, ArchiveName]] = []
        for info in self.store.list(naming.namespace_prefix(self.prefix, self.namespace)):
            name = naming.parse_key(self.prefix, info.key)
            if name is None or name.namespace != self.namespace:
                continue
            if name.kind is NameKind.SEGMENT:
                segments.append((info.key, name))
                continue
            ident = (name.history_id, name.first_lsn)
            entry = entries.setdefault(ident, SnapshotEntry(name.history_id, name.first_lsn))
            entry.keys[name.kind] = info.key
            if name.kind is not NameKind.SNAPSHOT:
                entry.encrypted = name.encrypted
                stamp = info.last_modified
                if stamp is not None:
                    entry.stored_at = stamp if entry.stored_at is None else min(entry.stored_at, stamp)
        for ident, entry in entries.items():
            if NameKind.MANIFEST not in entry.keys and NameKind.MANIFEST_COPY not in entry.keys:
                continue
            if entry.encrypted != (self._key is not None):
                entry.foreign = True  # plain while we encrypt, or the reverse
                continue
            cached = self._manifests.get(ident)
            if cached is None:
                try:
                    cached = read_manifest(
                        self.store, self.prefix, self.namespace, entry.history_id, entry.lsn, self._key
                    )
                except InvalidRequest:
                    entry.foreign = True  # another key id (a rotation): unreadable, not damaged
                    continue
                except CorruptArchive as exc:
                    # Unreadable (damaged, or another key): not a backup, so it keeps nothing.
                    log.warning(
                        "archive.retention_manifest_unreadable", namespace=self.namespace, error=str(exc)
                    )
                    continue
                self._manifests[ident] = cached
            entry.manifest = cached
        return list(entries.values()), segments

    def prune(self, now: float) -> PruneResult:
        snapshots, segments = self.catalog()
        p = plan(self.policy, snapshots, segments, now)
        if p.window_lsn is None:
            return PruneResult(None, None, len(p.kept), 0, 0, 0)
        deleted = snapshots_deleted = segments_deleted = 0
        if p.pruned or p.orphans or p.segments:
            self._write_record(p, now)
        for entry in [*p.pruned, *p.orphans]:
            if self._stopping():
                break  # a shutdown: the next run goes on from here
            for key, kind in entry.delete_order():
                self._check_lease(key)
                self.store.delete(key)
                self._deleted(kind, 1)
                deleted += 1
            snapshots_deleted += 1
            self._manifests.pop((entry.history_id, entry.lsn), None)
        else:  # segments only once every pruned snapshot is gone (not after a stop)
            for start in range(0, len(p.segments), self._batch):
                if self._stopping():
                    break
                keys = p.segments[start : start + self._batch]
                self._check_lease(keys[0])
                self.store.delete_many(keys)
                self._deleted("segment", len(keys))
                deleted += len(keys)
                segments_deleted += len(keys)
        result = PruneResult(
            p.window_lsn,
            p.window_time,
            len(p.kept),
            snapshots_deleted,
            segments_deleted,
            deleted,
        )
        log.info(
            "archive.retention_pruned",
            namespace=self.namespace,
            window_lsn=p.window_lsn,
            window_time=p.window_time,
            kept=len(p.kept),
            snapshots_deleted=result.deleted_snapshots,
            segments_deleted=result.deleted_segments,
        )
        return result

    def _check_lease(self, key: str) -> None:
        if not self._lease_held():
            raise LeaseHeld(
                f"archive retention of {self.namespace} stopped: this server no longer holds the lease "
                f"(the next object was {self.store.where(key)})"
            )

    def _deleted(self, kind: str, n: int) -> None:
        if self._on_delete is not None:
            for _ in range(n):
                self._on_delete(kind)

    def _write_record(self, p: PrunePlan, now: float) -> None:
        assert p.window_lsn is not None
        oldest = min(p.kept, key=lambda e: e.lsn)
        record = {
            "format": FORMAT,
            "namespace": self.namespace,
            "oldest_lsn": p.window_lsn,
            "oldest_history": oldest.history_id.hex(),
            "oldest_time": p.window_time,
            "keep_snapshots": self.policy.keep_snapshots,
            "keep_age": self.policy.keep_age,
            "kept": [[e.lsn, e.history_id.hex()] for e in sorted(p.kept, key=lambda e: e.lsn)],
            "pruned_at": now,
            "writer_id": self.writer_id,
        }
        body = json.dumps(record, sort_keys=True, separators=(",", ":")).encode()
        key = naming.retention_key(self.prefix, self.namespace)
        existing = self.store.head(key)
        if existing is None:
            self.store.put_if_absent(key, body)
        else:
            self.store.put_if_match(key, body, existing.etag)


def read_record(store: ObjectStore, prefix: str, namespace: str) -> dict[str, object] | None:
    """The namespace's retention record, or None when retention never pruned it."""
    key = naming.retention_key(prefix, namespace)
    try:
        data, _ = store.get(key)
    except NotFound:
        return None
    try:
        raw = json.loads(data)
    except ValueError as exc:
        raise CorruptArchive(f"{store.where(key)}: unreadable retention record ({exc})") from exc
    if not isinstance(raw, dict):
        raise CorruptArchive(f"{store.where(key)}: unreadable retention record (not an object)")
    return raw
