"""What is on disk: snapshots, WAL segments, ``.sha256`` sidecars, and the restore target.

Everything here is read-only: files are opened ``O_RDONLY`` and nothing is created,
renamed or locked next to them. Inputs are found and read through ``sources.py``, so a
snapshot or segment may be plain, gzip, zstd or a member of a tar archive; every path in
the dataclasses below is the input's origin (see ``sources.py``). Planning (``plan.py``)
works on the dataclasses this module returns, never on files.

Sidecars follow ``sha256sum`` (the one parser: ``unisondb/sha256sum.py``), so
``sha256sum -c <file>.sha256`` works in the file's directory. For a compressed input
``X.gz`` both ``X.gz.sha256`` and ``X.sha256`` are looked for, and each may hold the digest
of the compressed file or of the decompressed content; every one present must match one of
the two, and the result says which file and which form was checked.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import lmdb

from unisondb import sha256sum
from unisondb.errors import CorruptLog, InvalidRequest, NotFound, UnisonDBError, from_os_error
from unisondb.restore import sources
from unisondb.restore.errors import BackupCorrupt, BackupMismatch, CompressedInput
from unisondb.storage import layout, lmdbfile, segment, snapfile
from unisondb.storage.btree import CHECKPOINT_KEY, Checkpoint
from unisondb.storage.fingerprint import PARALLEL_MIN_PAIRS, Fingerprint, ScanJob, scan_lmdb, start_scan
from unisondb.storage.fingerprint import short as fp_short
from unisondb.storage.history import NO_HISTORY, Lineage

SIDECAR_SUFFIX = ".sha256"
#: LMDB meta page: 16-byte page header, then the meta's magic (little-endian 0xBEEFC0DE).
_LMDB_MAGIC = (0xBEEFC0DE).to_bytes(4, "little")

#: Called with the number of bytes just processed (progress bars).
ByteCallback = Callable[[int], None]


# --- checksums ---


def sidecar_path(path: Path) -> Path:
    return path.with_name(path.name + SIDECAR_SUFFIX)


def sidecar_candidates(path: Path) -> list[Path]:
    """``<path>.sha256`` and, for a compressed name, ``<name without .gz/.zst>.sha256``."""
    out = [sidecar_path(path)]
    plain = sources.classify_name(path.name).plain_name
    if plain != path.name:
        out.append(path.with_name(plain + SIDECAR_SUFFIX))
    return out


def has_sidecar(path: Path) -> bool:
    return any(sources.exists(p) for p in sidecar_candidates(path))


def sha256_file(path: Path, on_bytes: ByteCallback | None = None) -> str:
    """sha256 of the input's plain (decompressed) content."""
    h = hashlib.sha256()
    with sources.open_plain(path) as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            if on_bytes is not None:
                on_bytes(len(chunk))
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True, slots=True)
class ChecksumResult:
    """The outcome of comparing a file with its ``.sha256`` sidecar(s)."""

    path: Path
    sha256: str
    #: "ok", "missing" (no sidecar: a warning) or "mismatch" (fatal).
    status: str
    expected: str | None = None
    note: str | None = None
    #: Which sidecar(s) were checked, and against what, e.g.
    #: "000000001.wal.sha256 (decompressed content)"; the mismatching one on "mismatch".
    sidecar: str | None = None

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {"path": str(self.path), "sha256": self.sha256, "sidecar": self.status}
        if self.sidecar is not None:
            out["checked"] = self.sidecar
        if self.expected is not None and self.status == "mismatch":
            out["expected"] = self.expected
        if self.note:
            out["note"] = self.note
        return out


def _read_entries(side: Path) -> list[sha256sum.Entry] | None:
    """Entries of one sidecar; None if absent. Unparsable is ``BackupCorrupt``: it exists,
    so someone meant it to be checked."""
    data = sources.read_small(side)
    if data is None:
        return None
    entries = sha256sum.parse(data.decode("utf-8", errors="replace"))
    if entries is None:
        raise BackupCorrupt(
            f"checksum file {side} is not in sha256sum format ('<64 hex digits>  <file name>')"
        )
    return entries


def read_sidecar(path: Path) -> tuple[str, str | None] | None:
    """(digest, named basename) from ``<path>.sha256``; None if there is no sidecar."""
    entries = _read_entries(sidecar_path(path))
    if entries is None:
        return None
    pick = sha256sum.entry_for(entries, (path.name,))
    if pick is None:
        raise BackupCorrupt(
            f"checksum file {sidecar_path(path)} lists several files, none of them {path.name}"
        )
    return pick[0].digest, pick[0].name


def check_sidecar(path: Path, digest: str, *, stored: str | None = None) -> ChecksumResult:
    """Compare ``digest`` (of the plain content) with every sidecar of ``path``.

    For a compressed input a sidecar may instead hold the digest of the compressed file
    (``stored``; computed here when not given).
    """
    compressed = sources.stored_codec(path) != "none"
    plain_name = sources.classify_name(path.name).plain_name
    names = (path.name, plain_name)
    checked: list[str] = []
    note = None
    found = False
    for side in sidecar_candidates(path):
        entries = _read_entries(side)
        if entries is None:
            continue
        found = True
        pick = sha256sum.entry_for(entries, names)
        if pick is None:
            raise BackupCorrupt(f"checksum file {side} lists several files, none of them {path.name}")
        entry, named = pick
        if not named and entry.name is not None:
            note = (
                f"{side.name} names {entry.name!r}, not {path.name!r} (file renamed?); "
                "the digest was compared anyway"
            )
        if entry.digest == digest:
            checked.append(f"{side.name} (decompressed content)" if compressed else side.name)
            continue
        if compressed:
            if stored is None:
                stored = sources.stored_sha256(path)
            if entry.digest == stored:
                checked.append(f"{side.name} (compressed file)")
                continue
        return ChecksumResult(path, digest, "mismatch", expected=entry.digest, note=note, sidecar=side.name)
    if not found:
        names_text = " or ".join(p.name for p in sidecar_candidates(path))
        return ChecksumResult(
            path,
            digest,
            "missing",
            note=f"no {names_text}: content cannot be checked against the checksum taken at backup time",
        )
    return ChecksumResult(path, digest, "ok", expected=digest, note=note, sidecar=" and ".join(checked))


def raise_on_mismatch(result: ChecksumResult) -> None:
    if result.status == "mismatch":
        raise BackupCorrupt(
            f"checksum mismatch: {result.path} has sha256 {result.sha256} but "
            f"{result.sidecar or sidecar_path(result.path).name} expects {result.expected}",
            hint="the file changed after the backup was taken (bit rot, a partial copy or a "
            "different file with the same name); fetch another copy, or use an older backup",
        )


# --- compression sniffing ---


def detect_compression(path: Path) -> tuple[str, str] | None:
    """(format, suggested command) if ``path`` is gzip/zstd-compressed (by magic bytes)."""
    codec = sources.stored_codec(path)
    if codec == "none":
        return None
    out = sources.classify_name(path.name).plain_name
    cmd = f"zstd -d {path} -o {path.with_name(out)}" if codec == "zstd" else f"gunzip -k {path}"
    return codec, cmd


def looks_like_lmdb(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(20)
    except OSError:
        return False
    return len(head) == 20 and head[16:20] == _LMDB_MAGIC


# --- snapshots ---


@dataclass(frozen=True, slots=True)
class SnapshotInfo:
    path: Path
    size: int
    checkpoint: Checkpoint
    #: False when the snapshot has no checkpoint record (an empty database).
    has_checkpoint: bool
    keys: int
    #: Structural problems found (always empty: a damaged file raises); None if not checked.
    structural_problems: tuple[str, ...] | None = None


def inspect_snapshot(path: Path, *, structural: bool = True) -> SnapshotInfo:
    """Check that ``path`` is a sound LMDB data file holding a UnisonDB checkpoint.

    ``structural`` walks every reachable page first (``lmdbfile``: page headers and node
    arrays read with ``read()``, never mapped), so a damaged file is reported, not opened. The
    file is then opened read-only without a lock file: nothing is written next to it.
    """
    origin = path
    try:
        path.stat()
    except FileNotFoundError:
        raise NotFound(f"snapshot not found: {path}") from None
    except OSError as exc:
        raise from_os_error(exc, path) from exc
    if path.is_dir():
        raise NotFound(
            f"snapshot path is a directory, expected a file: {path}",
            hint="pass the snapshot file itself (an LMDB data.mdb copy)",
        )
    kind = sources.classify(path)
    if kind.kind is sources.Kind.ENCRYPTED:
        raise sources.encrypted_error(path)
    if kind.kind is sources.Kind.ARCHIVE:
        raise InvalidRequest(
            f"{path} is a tar archive; --snapshot takes one snapshot file",
            hint="extract the snapshot from it, or pass the archive to --wal",
        )
    if kind.codec != "none" and kind.kind is not sources.Kind.SNAPSHOT:
        raise CompressedInput(
            f"{path} is {kind.codec}-compressed but does not hold an LMDB snapshot "
            f"(it holds a {kind.kind.value} file)",
            hint="a snapshot is the file written by POST /api/v1/<ns>/btree/backup, "
            "optionally compressed with gzip or zstd",
        )
    # A compressed snapshot is decompressed once into staging (LMDB needs a real file);
    # every later read of ``origin`` goes to that copy (sources.open_plain).
    path = sources.materialize(origin)
    st = path.stat()
    # Size and meta pages before LMDB maps the file (a truncated copy is a SIGBUS), and
    # with ``structural`` every reachable page's structure (lmdbfile's own walk: py-lmdb's
    # ``lmdb.verify`` refuses valid files — a big value overwritten by a small one in one
    # transaction keeps its longer overflow run).
    lmdbfile.check_file(path, "snapshot", shown=origin, walk=structural)
    # A self-verifying snapshot proves every byte without a sidecar (storage/snapfile.py).
    snapfile.check(path) if structural else snapfile.read_trailer(path)
    problems: tuple[str, ...] | None = () if structural else None
    cp, has_cp, keys = _read_checkpoint_readonly(path, st.st_size, origin)
    return SnapshotInfo(origin, st.st_size, cp, has_cp, keys, problems)


#: (file, sha256 of its bytes, fingerprint state) triples whose content was proven in this
#: process: ``backup verify --replay`` checks the snapshot, then restores it, and the same
#: bytes (same sha256, computed again by the restore) are not hashed pair by pair twice.
_CONTENT_PROVEN: set[tuple[Path, str, bytes]] = set()


def check_snapshot_content(info: SnapshotInfo, sha256: str | None = None) -> None:
    """Hash every key/value pair of the snapshot and compare with the state fingerprint its
    checkpoint recorded: a changed value is caught without any ``.sha256`` sidecar (and
    also in a plain LMDB copy that has no trailer). One cursor pass, read-only, in key
    ranges hashed in parallel (``fingerprint.scan_lmdb``).

    ``sha256`` is the digest of the file's bytes the caller has just computed; content
    already proven in this process for the same bytes is not scanned again."""
    start_content_check(info, sha256, background=False).wait()


class ContentCheck:
    """A snapshot content check (``check_snapshot_content``), possibly still running in
    worker processes: ``wait`` returns once it is proven, or raises ``BackupCorrupt``."""

    def __init__(self, info: SnapshotInfo, memo: tuple[Path, str, bytes] | None, job: ScanJob | None) -> None:
        self.info, self._memo, self._job = info, memo, job
        self._done = job is None
        #: Seconds ``wait`` blocked (the part of the scan nothing else overlapped).
        self.waited = 0.0

    def wait(self) -> None:
        if self._done:
            return
        started = time.perf_counter()
        assert self._job is not None
        try:
            scanned = self._job.result()
        except lmdb.Error as exc:
            raise BackupCorrupt(f"cannot read snapshot {self.info.path}: {exc}") from exc
        finally:
            self.waited += time.perf_counter() - started
        _compare_content(self.info, scanned)
        self._done = True
        if self._memo is not None:
            _CONTENT_PROVEN.add(self._memo)

    def cancel(self) -> None:
        if self._job is not None and not self._done:
            self._job.cancel()

    def remember(self, sha256: str) -> None:
        """The input's sha256, known only once a check started before it was computed
        is under way: a proven content is then remembered for this file and digest."""
        if self._memo is None and self.info.has_checkpoint:
            self._memo = (self.info.path.resolve(), sha256, self.info.checkpoint.fp_state)


#: CPU niceness of a background content check's workers. A restore's own thread (copy,
#: structure walk, replay) is its critical path, and the check only has to be done before
#: publishing: niced, it runs on the CPU time that path leaves (measured, docs/RESTORE.md).
BACKGROUND_CHECK_NICE = 10


def start_content_check(
    info: SnapshotInfo, sha256: str | None, *, background: bool, workers: int = 1
) -> ContentCheck:
    """Start ``check_snapshot_content``: in the background (``workers`` processes, for a
    restore that copies and replays meanwhile), or now (``background=False``, every core)."""
    cp = info.checkpoint
    memo = None if sha256 is None else (info.path.resolve(), sha256, cp.fp_state)
    if not info.has_checkpoint or (memo is not None and memo in _CONTENT_PROVEN):
        return ContentCheck(info, None, None)
    local = sources.materialize(info.path)  # the plain copy of a compressed snapshot
    map_size = max(info.size, 1 << 20)
    # A worker process costs ~0.1-0.3 s to start: worth it only for a big keyspace.
    if background and info.keys >= PARALLEL_MIN_PAIRS:
        try:
            job = start_scan(local, map_size, workers=workers, nice=BACKGROUND_CHECK_NICE)
            return ContentCheck(info, memo, job)
        except lmdb.Error as exc:
            raise BackupCorrupt(f"cannot read snapshot {info.path}: {exc}") from exc
    try:
        scanned = scan_lmdb(local, map_size)
    except lmdb.Error as exc:
        raise BackupCorrupt(f"cannot read snapshot {info.path}: {exc}") from exc
    _compare_content(info, scanned)
    if memo is not None:
        _CONTENT_PROVEN.add(memo)
    return ContentCheck(info, None, None)


def _compare_content(info: SnapshotInfo, scanned: Fingerprint) -> None:
    cp = info.checkpoint
    if scanned.state() != cp.fp_state:
        raise BackupCorrupt(
            f"snapshot {info.path} does not hold the state it recorded: its keys and values "
            f"hash to {fp_short(scanned.digest())}, its checkpoint says "
            f"{fp_short(cp.fingerprint)} (LSN {cp.applied_lsn})",
            hint="the file was altered or damaged after it was written; use another copy or "
            "an older snapshot",
        )


def _read_checkpoint_readonly(local: Path, size: int, path: Path) -> tuple[Checkpoint, bool, int]:
    try:
        env = lmdb.open(
            str(local), subdir=False, readonly=True, lock=False, max_dbs=4, map_size=max(size, 1 << 20)
        )
    except lmdb.Error as exc:
        raise BackupCorrupt(f"cannot open snapshot {path} as LMDB: {exc}") from exc
    try:
        try:
            meta = env.open_db(b"meta", create=False)
            kv = env.open_db(b"kv", create=False)
        except lmdb.NotFoundError:
            raise BackupMismatch(
                f"{path} is an LMDB file but not a UnisonDB snapshot (no 'kv'/'meta' sub-databases)"
            ) from None
        with env.begin() as txn:
            raw = txn.get(CHECKPOINT_KEY, db=meta)
            keys = int(txn.stat(kv)["entries"])
    except lmdb.Error as exc:
        raise BackupCorrupt(f"cannot read snapshot {path}: {exc}") from exc
    finally:
        env.close()
    if raw is None:
        if keys:
            raise BackupCorrupt(
                f"snapshot {path} holds {keys} keys but no checkpoint: it cannot say which "
                "WAL records it contains"
            )
        return Checkpoint(), False, 0
    try:
        return Checkpoint.decode(bytes(raw)), True, keys
    except CorruptLog as exc:
        raise BackupCorrupt(f"snapshot {path}: {exc.message}") from None


# --- WAL segments ---


@dataclass(frozen=True, slots=True)
class SegmentMeta:
    """One segment file as planning sees it: header, footer (or scan) and any damage."""

    path: Path
    segment_id: int
    timeline: int
    first_lsn: int
    last_lsn: int  # first_lsn - 1 when empty
    count: int
    min_time_ns: int
    max_time_ns: int
    created_ns: int
    ns_crc: int
    size: int
    sealed: bool
    #: Why this file cannot be trusted (None = fine as far as header/footer go).
    damage: str | None = None
    lineage: Lineage = Lineage()
    #: State fingerprint digests before the first record (header) and after the last
    #: (footer; None if unsealed or sealed without one).
    start_fp: bytes | None = None
    end_fp: bytes | None = None

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def history(self) -> bytes:
        return self.lineage.history

    def to_json(self) -> dict[str, object]:
        from unisondb.restore.timefmt import format_ns

        return {
            "segmentId": self.segment_id,
            "path": str(self.path),
            "timeline": self.timeline,
            "firstLsn": self.first_lsn,
            "lastLsn": self.last_lsn,
            "records": self.count,
            "minTime": format_ns(self.min_time_ns) if self.count else None,
            "maxTime": format_ns(self.max_time_ns) if self.count else None,
            "bytes": self.size,
            "sealed": self.sealed,
            "damage": self.damage,
            "history": self.history.hex(),
            "parentHistory": self.lineage.parent.hex() if self.lineage.parent != NO_HISTORY else None,
            "forkLsn": self.lineage.fork_lsn,
            "startFingerprint": self.start_fp.hex() if self.start_fp else None,
            "endFingerprint": self.end_fp.hex() if self.end_fp else None,
        }


def read_segment_meta(path: Path) -> SegmentMeta:
    """Header + footer of a sealed segment; a full (read-only) scan of an unsealed one.

    A plain file is read by header and footer only; a compressed one or an archive member
    is decompressed (the footer is at the end of the plain bytes). ``size`` is always the
    plain size. Raises ``CorruptLog``/``BackupCorrupt`` if the header (or the compressed
    stream) is unreadable; other damage is reported in ``damage`` so listing tools can show
    it.
    """
    data: bytes | None = None
    if sources.codec_of(path) == "none" and sources.local(path) == path:
        summary = segment.read_summary(path)
        h, footer, size = summary.header, summary.footer, summary.size
    else:
        data = sources.read_segment(path)
        h = segment.decode_header(data, path)
        footer, size = segment.try_decode_footer(data), len(data)
    named = layout.parse_segment_name(sources.classify_name(path.name).plain_name)
    damage = None
    if named is not None and named != h.segment_id:
        damage = f"header says segment {h.segment_id} but the file is named for segment {named}"
    if footer is not None:
        f = footer
        return SegmentMeta(
            path,
            h.segment_id,
            h.timeline,
            h.first_lsn,
            f.last_lsn,
            f.count,
            f.min_time_ns,
            f.max_time_ns,
            h.created_ns,
            h.ns_crc,
            size,
            True,
            damage,
            h.lineage,
            h.start_fp,
            f.fingerprint,
        )
    if data is None:
        data = sources.read_segment(path)
    if (
        size >= segment.HEADER_SIZE + segment.FOOTER_SIZE
        and data[size - segment.FOOTER_SIZE : size - segment.FOOTER_SIZE + 4] == segment.FOOTER_MAGIC
    ):
        damage = damage or "footer checksum mismatch (the footer is damaged)"
    last, count, tmin, tmax = h.first_lsn - 1, 0, 0, 0
    try:
        # Every record CRC-checked by the one record walker; entries are not decoded.
        w = segment.walk_bytes(path, data)
    except CorruptLog as exc:
        damage = damage or exc.message
    else:
        last, count, tmin, tmax = w.last_lsn, w.count, w.min_time_ns, w.max_time_ns
        if w.tail_error is not None:
            damage = damage or (
                f"damaged or incomplete record ({w.tail_error}); the file is truncated or corrupt"
            )
    return SegmentMeta(
        path,
        h.segment_id,
        h.timeline,
        h.first_lsn,
        last,
        count,
        tmin,
        tmax,
        h.created_ns,
        h.ns_crc,
        size,
        False,
        damage,
        h.lineage,
        h.start_fp,
    )


@dataclass(slots=True)
class WalInventory:
    """Every segment file found under the ``--wal`` directories."""

    dirs: tuple[Path, ...]
    #: One entry per segment id (the first copy found); duplicates are in ``copies``.
    segments: list[SegmentMeta] = field(default_factory=list)
    #: Every file per segment id, including identical duplicates.
    copies: dict[int, list[Path]] = field(default_factory=dict)
    #: Files whose header cannot be read: (path, reason).
    unreadable: list[tuple[Path, str]] = field(default_factory=list)
    #: Same segment id, different content: (file a, file b).
    conflicts: list[tuple[Path, Path]] = field(default_factory=list)

    def by_id(self) -> dict[int, SegmentMeta]:
        return {s.segment_id: s for s in self.segments}

    @property
    def max_segment_id(self) -> int:
        return max((s.segment_id for s in self.segments), default=0)

    @property
    def max_timeline(self) -> int:
        return max((s.timeline for s in self.segments), default=0)


def find_segment_files(directory: Path) -> list[Path]:
    """Every segment input under ``directory`` (recursively; plain, .gz, .zst, archive
    members), sorted by path. Inputs that cannot be read are left out; ``collect_wal``
    reports them."""
    return sources.find_segments(directory).segments


def collect_wal(dirs: Iterable[Path], on_file: Callable[[Path], None] | None = None) -> WalInventory:
    """Read the header/footer of every segment under ``dirs``; detect conflicting copies.

    ``dirs`` may also name single files: a segment (any compression) or a tar archive.
    """
    inv = WalInventory(tuple(dirs))
    metas: dict[int, list[SegmentMeta]] = {}
    seen_paths: set[Path] = set()
    for d in inv.dirs:
        found = sources.find_segments(d)
        inv.unreadable += found.unreadable
        for p in found.segments:
            real = p.resolve() if sources.local(p) == p else p
            if real in seen_paths:
                continue
            seen_paths.add(real)
            if on_file is not None:
                on_file(p)
            try:
                meta = read_segment_meta(p)
            except UnisonDBError as exc:
                inv.unreadable.append((p, exc.message))
                continue
            metas.setdefault(meta.segment_id, []).append(meta)
    for seg_id in sorted(metas):
        group = metas[seg_id]
        inv.segments.append(group[0])
        inv.copies[seg_id] = [m.path for m in group]
        for other in group[1:]:
            if not _same_content(group[0], other):
                inv.conflicts.append((group[0].path, other.path))
    return inv


def _same_content(a: SegmentMeta, b: SegmentMeta) -> bool:
    if a.size != b.size:
        return False
    return sha256_file(a.path) == sha256_file(b.path)


def raise_on_conflicts(inv: WalInventory) -> None:
    if inv.conflicts:
        a, b = inv.conflicts[0]
        more = f" (and {len(inv.conflicts) - 1} more conflicting pairs)" if len(inv.conflicts) > 1 else ""
        raise BackupMismatch(
            f"two different files claim the same segment id: {a} and {b}{more}",
            hint="segment ids are unique per namespace; these come from different data "
            "directories or namespaces. Pass only the WAL directories of this namespace",
        )


# --- the restore target ---


@dataclass(frozen=True, slots=True)
class TargetSegment:
    segment_id: int
    path: Path
    timeline: int | None  # None if the header could not be read
    first_lsn: int | None
    last_lsn: int | None
    size: int
    #: None if the file could not be read.
    sealed: bool | None = None


@dataclass(frozen=True, slots=True)
class ExistingNamespace:
    """What ``<data-dir>/<ns>`` holds now (read without locking or writing anything)."""

    path: Path
    exists: bool
    has_btree: bool
    segments: tuple[TargetSegment, ...]
    #: PID text from LOCK if another process holds it, "" if held with no PID, None if free.
    locked_by: str | None

    @property
    def has_data(self) -> bool:
        return self.has_btree or bool(self.segments)

    @property
    def max_segment_id(self) -> int:
        return max((s.segment_id for s in self.segments), default=0)

    @property
    def max_archivable_segment_id(self) -> int:
        """Highest id that a WAL backup may have copied: sealed (or unreadable) segments.

        The backup API copies only sealed segments, so an unsealed one (the active segment
        of the stopped server) is in no archive; its id may be reused by the new history.
        """
        return max((s.segment_id for s in self.segments if s.sealed is not False), default=0)

    @property
    def max_timeline(self) -> int:
        return max((s.timeline or 0 for s in self.segments), default=0)


def inspect_target(data_dir: Path, namespace: str) -> ExistingNamespace:
    ns_dir = layout.namespace_dir(data_dir, namespace)
    if not ns_dir.exists():
        return ExistingNamespace(ns_dir, False, False, (), None)
    has_btree = (layout.btree_dir(data_dir, namespace) / "data.mdb").exists()
    segs = []
    for seg_id, p in segment.iter_segment_files(layout.wal_dir(data_dir, namespace)):
        try:
            size = p.stat().st_size
        except OSError:
            size = 0
        try:
            meta = read_segment_meta(p)
            segs.append(
                TargetSegment(seg_id, p, meta.timeline, meta.first_lsn, meta.last_lsn, size, meta.sealed)
            )
        except UnisonDBError:
            segs.append(TargetSegment(seg_id, p, None, None, None, size))
    return ExistingNamespace(
        ns_dir, True, has_btree, tuple(segs), probe_lock(layout.lock_path(data_dir, namespace))
    )


def probe_lock(path: Path) -> str | None:
    """Who holds the flock on ``path`` (PID text or ""), or None if nobody does.

    Opens the file read-only and releases the probe lock at once: nothing is written.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise from_os_error(exc, path) from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return os.pread(fd, 32, 0).decode(errors="replace").strip()
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
