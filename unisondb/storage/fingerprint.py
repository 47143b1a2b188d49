"""The state fingerprint: an order-independent hash of a whole keyspace.

Definition. For a live pair (key, value)::

    h(key, value) = SHAKE-256("unisondb-fp-1" || u16le(len(key)) || key || value), 256 bytes
                    read as a little-endian 2048-bit integer
    F(state)      = sum of h(k, v) over every live pair, modulo 2**2048

A put of ``k`` from ``old`` to ``new`` is ``F - h(k, old) + h(k, new)``; a delete is
``F - h(k, old)``. Because addition is commutative and invertible, the fingerprint of a
state does not depend on the order or batching of the writes that built it: a restore that
replays records into a snapshot, a server that applied them one by one, and a full scan of
the keys all arrive at the same value exactly when they hold the same pairs. The length
prefix makes (key, value) unambiguous, so ``("ab", "c")`` and ``("a", "bc")`` differ.

This is AdHash (Bellare–Micciancio 1997) with a 2048-bit modulus — the construction behind
Facebook's LtHash, which uses 1024 lanes of 16 bits instead of one big integer.
Collision argument: for accidental damage (a flipped byte, a spliced record, a missing
or duplicated write) the difference of two fingerprints is a sum of a few independent
pseudo-random 2048-bit values, which is 0 with probability 2**-2048. Against an adversary
who chooses keys and values, finding two different sets with one fingerprint is a
modular subset-sum problem; the best generic attack (Wagner's k-tree algorithm) costs about
2**(2*sqrt(2048)) ≈ 2**90 hash evaluations. (With a 256-bit modulus it would be about
2**32, which is why the state is 2048 bits wide.) Note that adding a pair twice is not the
same as adding it once, so a duplicated write is caught as well.

Where it lives: the full 256-byte state is in the B-tree checkpoint (updated in the same
LMDB transaction as the data, so it is always exact for the data beside it). Everything
else records the 32-byte *digest* ``BLAKE2b-256(state)``: segment headers (state before
the first record), segment footers (state after the last), snapshots and the HTTP API.

Cost of a full scan (measured, bench/results/2026-12-01-speed.md): almost all of it is the
SHAKE-256 call per pair (~1.9 µs; a bare cursor pass is ~0.5 µs), and creating a fresh
OpenSSL context for each pair was a large part of the rest. The hash of every pair
therefore starts from a *copy* of one context that has already absorbed the prefix (the
same bytes in the same order, so bit-identical output), the loop binds its names locally
and keeps no per-pair objects beyond the digest, and ``scan_lmdb`` splits a big
keyspace into key ranges of equal size hashed by separate processes (hashlib holds the
GIL for inputs this small, so threads would not help). The sum is the same whatever the
split: addition modulo 2**2048 is commutative.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import struct
import subprocess
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from unisondb.errors import CorruptSnapshot
from unisondb.storage.mapped import MappedFile

STATE_BYTES = 256
DIGEST_BYTES = 32
_MOD = 1 << (STATE_BYTES * 8)
_MASK = _MOD - 1
_PREFIX = b"unisondb-fp-1"
_KEYLEN = struct.Struct("<H")
#: Digest of the empty keyspace (state 0).
EMPTY_STATE = bytes(STATE_BYTES)
#: A SHAKE-256 context that has absorbed the prefix; every pair's hash starts from a copy.
#: (``copy()`` only reads it, under the GIL, so sharing it between threads is safe.)
_BASE = hashlib.shake_256(_PREFIX)
#: Below this many pairs a scan runs in this process only (starting a worker costs more).
PARALLEL_MIN_PAIRS = 200_000
#: At most this many processes hash one keyspace.
MAX_WORKERS = 4
#: Pairs hashed between two releases of the file's mapped pages (``mapped.py``): the
#: scan's resident set stays bounded whatever the file's size (a release costs ~0.1 ms).
RELEASE_EVERY = 4096


def item_hash(key: bytes, value: bytes) -> int:
    # One ``update`` of the joined bytes absorbs exactly what three would (the same
    # output), for a third of the calls; the copy of the joined pair costs less.
    h = _BASE.copy()
    h.update(_KEYLEN.pack(len(key)) + key + value)
    return int.from_bytes(h.digest(STATE_BYTES), "little")


def sum_items(items: Iterable[tuple[bytes, bytes]]) -> int:
    """Sum of ``item_hash`` over ``items`` (not reduced): the inner loop of every scan.

    ``item_hash`` inlined: names bound to locals, no call per pair. The pairs may be
    ``bytes`` or buffers (py-lmdb cursors yield ``bytes``); hashlib takes either."""
    copy = _BASE.copy
    pack = _KEYLEN.pack
    from_bytes = int.from_bytes
    size = STATE_BYTES
    total = 0
    for key, value in items:
        h = copy()
        h.update(pack(len(key)) + key + value)  # see ``item_hash``
        total += from_bytes(h.digest(size), "little")
    return total


class Fingerprint:
    """A mutable fingerprint state (one 2048-bit integer)."""

    __slots__ = ("_value",)

    def __init__(self, state: bytes | int = 0) -> None:
        self._value = int.from_bytes(state, "little") if isinstance(state, bytes) else state

    @classmethod
    def of_items(cls, items: Iterable[tuple[bytes, bytes]]) -> Fingerprint:
        """Fingerprint of a whole keyspace, from a scan of its pairs."""
        return cls(sum_items(items) & _MASK)

    def add(self, key: bytes, value: bytes) -> None:
        self._value = (self._value + item_hash(key, value)) & _MASK

    def remove(self, key: bytes, value: bytes) -> None:
        self._value = (self._value - item_hash(key, value)) & _MASK

    def change(self, added: Iterable[tuple[bytes, bytes]], removed: Iterable[tuple[bytes, bytes]]) -> None:
        """``add`` every pair of ``added`` and ``remove`` every pair of ``removed`` (the
        order does not matter), reducing once."""
        self._value = (self._value + sum_items(added) - sum_items(removed)) & _MASK

    def state(self) -> bytes:
        return self._value.to_bytes(STATE_BYTES, "little")

    def digest(self) -> bytes:
        return state_digest(self.state())

    def copy(self) -> Fingerprint:
        return Fingerprint(self._value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Fingerprint) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


def state_digest(state: bytes) -> bytes:
    """The 32-byte digest recorded wherever the full state is too big to carry."""
    return hashlib.blake2b(state, digest_size=DIGEST_BYTES).digest()


#: Digest of the empty keyspace.
EMPTY_DIGEST = state_digest(EMPTY_STATE)


def short(digest: bytes) -> str:
    """How a digest is shown to people: the first 16 hex digits (64 bits)."""
    return digest.hex()[:16]


# --- scanning an LMDB file ---


def default_workers() -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(cores, MAX_WORKERS))


def scan_lmdb(path: Path, map_size: int, *, db: bytes = b"kv", workers: int | None = None) -> Fingerprint:
    """Fingerprint of every pair of sub-database ``db`` of the LMDB file ``path``.

    The file is opened read-only without a lock file, so it must not change while it is
    scanned (a snapshot file, a staged copy). With ``workers`` > 1 and at least
    ``PARALLEL_MIN_PAIRS`` pairs, the keyspace is cut into ranges holding equal numbers of
    pairs (``ScanJob``): ranges 1.. are hashed by worker processes while this one hashes
    range 0, and the sums are added. ``lmdb.Error`` (damage) propagates to the caller.
    """
    import lmdb  # here, so importing this module does not need LMDB

    workers = default_workers() if workers is None else max(1, workers)
    env = lmdb.open(str(path), subdir=False, readonly=True, lock=False, max_dbs=4, map_size=map_size)
    try:
        sub = env.open_db(db, create=False)
        with env.begin(db=sub) as txn:
            entries = int(txn.stat(sub)["entries"])
            if workers == 1 or entries < PARALLEL_MIN_PAIRS:
                it = txn.cursor().iternext(keys=True, values=True)
                return Fingerprint(_sum_released(it, entries, MappedFile(path)) & _MASK)
            ranges = _ranges(txn, entries, workers)
            job = ScanJob(path, map_size, db, ranges[1:])
            try:
                first = _sum_range(txn.cursor(), *ranges[0], MappedFile(path))
            except BaseException:
                job.cancel()
                raise
    finally:
        env.close()
    return job.result(first)


def start_scan(path: Path, map_size: int, *, db: bytes = b"kv", workers: int = 1, nice: int = 0) -> ScanJob:
    """``scan_lmdb`` entirely in ``workers`` background processes (this one keeps working:
    a restore replays the WAL meanwhile); ``ScanJob.result()`` waits for the fingerprint.
    ``nice``: the workers' CPU niceness (added to this process's), so that they run on
    the time the caller's own work leaves over."""
    import lmdb

    env = lmdb.open(str(path), subdir=False, readonly=True, lock=False, max_dbs=4, map_size=map_size)
    try:
        sub = env.open_db(db, create=False)
        with env.begin(db=sub) as txn:
            entries = int(txn.stat(sub)["entries"])
            ranges = _ranges(txn, entries, workers if entries >= PARALLEL_MIN_PAIRS else 1)
    finally:
        env.close()
    return ScanJob(path, map_size, db, ranges, nice=nice)


#: One key range of a scan: (first key, b"" for the first of the keyspace; number of
#: pairs; the key of the pair just after them, None at the end).
_Range = tuple[bytes, int, "bytes | None"]


def _ranges(txn: Any, entries: int, workers: int) -> list[_Range]:
    # Range i starts at position entries*i//workers; no range is empty.
    positions = sorted({entries * i // workers for i in range(1, workers)} - {0})
    cuts = _cut_keys(txn.cursor(), positions)
    starts = [0, *positions[: len(cuts)], entries]
    bounds = [b"", *cuts]
    ends: list[bytes | None] = [*cuts, None]
    return [(bounds[i], starts[i + 1] - starts[i], ends[i]) for i in range(len(bounds))]


class ScanJob:
    """Key ranges of one LMDB file being hashed by worker processes (``python -c``, not
    ``multiprocessing``: nothing of the caller's ``__main__`` is run again).

    Each range must end exactly at the next range's first key, so together they cover
    every pair once. A worker that cannot start or fails makes ``result`` hash the whole
    file in this process instead, so damage is reported the same way as without workers.
    """

    def __init__(self, path: Path, map_size: int, db: bytes, ranges: list[_Range], *, nice: int = 0) -> None:
        self.path, self.map_size, self.db = path, map_size, db
        self._procs: list[subprocess.Popen[bytes]] | None = []
        try:
            for r in ranges:
                self._procs.append(_start_worker(path, map_size, db, *r, nice=nice))
        except OSError:
            self.cancel()
            self._procs = None

    def result(self, *more: int | None) -> Fingerprint:
        """Wait for the workers; ``more`` are sums of ranges hashed elsewhere (``scan_lmdb``)."""
        parts = None if self._procs is None else self._collect()
        if parts is None:
            return scan_lmdb(self.path, self.map_size, db=self.db, workers=1)
        total = 0
        for part in (*more, *parts):
            if part is None:
                # The file changed between the cut and the scan: the ranges would not
                # cover every pair exactly once.
                raise CorruptSnapshot(
                    f"{self.path} changed while its key/value pairs were being hashed",
                    hint="nothing may write to a snapshot file; run the command again",
                )
            total += part
        return Fingerprint(total & _MASK)

    def _collect(self) -> list[int | None] | None:
        assert self._procs is not None
        parts: list[int | None] = []
        try:
            for proc in self._procs:
                out, _err = proc.communicate()
                words = out.split()
                if proc.returncode != 0 or len(words) != 2 or words[0] not in (b"sum", b"range"):
                    return None
                parts.append(int(words[1], 16) if words[0] == b"sum" else None)
            return parts
        finally:
            self.cancel()

    def cancel(self) -> None:
        """Stop the workers still running (only the processes this job started)."""
        for proc in self._procs or ():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()


def _start_worker(
    path: Path, map_size: int, db: bytes, start: bytes, count: int, end: bytes | None, *, nice: int = 0
) -> subprocess.Popen[bytes]:
    root = str(Path(__file__).resolve().parents[2])  # the directory holding ``unisondb``
    code = (
        f"import sys; sys.path.insert(0, {root!r}); "
        "from unisondb.storage.fingerprint import _worker; _worker()"
    )
    end_hex = "-" if end is None else end.hex()
    args = [str(path), str(map_size), db.hex(), start.hex(), str(count), end_hex, str(nice)]
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,  # a failed worker is redone here, which reports the error
    )


def _worker() -> None:
    """Worker process entry: prints ``sum <hex>`` or ``range 0`` (see ``_sum_range``)."""
    import lmdb

    path, map_size, db, start, count, end, nice = sys.argv[1:8]
    if int(nice):
        os.nice(int(nice))  # before any work (a plain setpriority: cannot fail upwards)
    env = lmdb.open(path, subdir=False, readonly=True, lock=False, max_dbs=4, map_size=int(map_size))
    try:
        sub = env.open_db(bytes.fromhex(db), create=False)
        with env.begin(db=sub) as txn:
            total = _sum_range(
                txn.cursor(),
                bytes.fromhex(start),
                int(count),
                None if end == "-" else bytes.fromhex(end),
                MappedFile(Path(path)),
            )
    finally:
        env.close()
    sys.stdout.write("range 0\n" if total is None else f"sum {total:x}\n")


def _cut_keys(cursor: Any, positions: list[int]) -> list[bytes]:
    """The keys at ``positions`` (increasing, > 0): the first keys of ranges 1.."""
    keys = cursor.iternext(keys=True, values=False)
    cuts: list[bytes] = []
    pos = 0  # position of the next key ``keys`` yields
    for at in positions:
        key = next(itertools.islice(keys, at - pos, None), None)
        if key is None:
            break
        cuts.append(bytes(key))
        pos = at + 1
    return cuts


def _sum_released(it: Iterator[tuple[bytes, bytes]], count: int, pages: MappedFile) -> int:
    """``sum_items`` over at most ``count`` pairs of ``it``, giving the mapped pages back
    every ``RELEASE_EVERY`` pairs."""
    total = 0
    while count > 0:
        n = min(count, RELEASE_EVERY)
        total += sum_items(itertools.islice(it, n))
        count -= n
        pages.release(generation=0)  # a read-only map is never mapped anew
    return total


def _sum_range(cursor: Any, start: bytes, count: int, end: bytes | None, pages: MappedFile) -> int | None:
    """The unreduced sum over ``count`` pairs from ``start`` (b"": the first key); None
    unless the pair after them has key ``end`` (None: there is none)."""
    found = cursor.set_range(start) if start else cursor.first()
    if not found:
        return 0 if count == 0 and end is None else None
    it = cursor.iternext(keys=True, values=True)
    total = _sum_released(it, count, pages)
    after = next(it, None)
    if (None if after is None else bytes(after[0])) != end:
        return None
    return total
