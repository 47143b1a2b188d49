"""Snapshot file format: the LMDB copy followed by one self-verifying 4096-byte trailer.

A snapshot written by ``POST /api/v1/<ns>/btree/backup`` is::

    [0, data_len)              LMDB's copy, plain or compacting (a complete data.mdb)
    [data_len, data_len+4096)  the trailer below

LMDB reads only the pages its meta page names and never looks past the last one, so the
file opens as an LMDB environment as it is (py-lmdb read-only, ``lmdb.verify``, and a
server started on it after the document's ``cp snapshot <ns>/db/data.mdb``). The trailer
makes the file prove itself without any ``.sha256`` sidecar: the sha256 of every data byte
is in it and the trailer itself is covered by a CRC, so any changed byte anywhere in the
file is found by ``verify``.

Trailer (4096 bytes, little-endian)::

    Offset  Size  Field
    0       8     magic           b"UDBSNAP\\x01"
    8       4     version         1
    12      4     flags           0 (reserved)
    16      8     data_len        bytes before the trailer (= file size - 4096)
    24      32    data_sha256     sha256 of bytes [0, data_len)
    56      8     created_ns      wall-clock nanoseconds when the snapshot was written
    64      2     namespace_len   at most 64
    66      64    namespace       UTF-8, zero padded
    130     2     checkpoint_len  at most 512
    132     512   checkpoint      ``Checkpoint.encode()`` read in the copy's transaction
                                  (opaque here; ``SnapshotTrailer.decode_checkpoint``)
    644     3448  reserved        zero
    4092    4     crc             CRC32C of bytes [0, 4092)

Which files have a trailer: ``read_trailer`` looks at the last 4096 bytes.

* Exactly the magic and a valid CRC → a trailer (an unknown version, or a ``data_len``
  that is not ``size - 4096``, is then ``CorruptSnapshot``). Random bytes pass both
  checks with probability 2^-96, so any change to the data is then caught by the sha256.
* The magic within two bytes, or the exact magic with a bad CRC → a damaged trailer
  (``CorruptSnapshot``) — but only if those 4096 bytes lie past the last page the LMDB
  meta page claims. Inside LMDB's pages they are a page of the database itself (the last
  page of a live ``data.mdb`` can be raw bytes of a user's large value), so user data can
  never make a live file look like a damaged snapshot and stop the server from starting.
* Anything else → no trailer (``None``): a plain LMDB file such as a live ``data.mdb``
  copied by hand, which only a sidecar can check.

So every single changed byte of a snapshot is found: in the data by the sha256 (the
trailer still reads), in the trailer by its CRC (the trailer lies past LMDB's pages).
Residual: a client that deliberately stores a value forging a CRC-valid trailer at the
exact end of the live file would make the next start refuse it; random data cannot.

When a snapshot becomes a live ``data.mdb`` (the manual restore procedure), the server
verifies it once at start and then ``strip``s the trailer (truncate to ``data_len``,
fsync) before LMDB opens it for writing: ``install_check``, called by ``BTree``.
"""

from __future__ import annotations

import hashlib
import os
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import crc32c

from unisondb.errors import CorruptSnapshot, from_os_error
from unisondb.storage import fsutil

if TYPE_CHECKING:
    from unisondb.storage.btree import Checkpoint

MAGIC = b"UDBSNAP\x01"
VERSION = 1
TRAILER_SIZE = 4096
MAX_NAMESPACE = 64
MAX_CHECKPOINT = 512
_HEAD = struct.Struct("<8sIIQ32sQ")  # magic .. created_ns: 64 bytes
_NS_AT = 64
_CP_AT = 130
_CRC_AT = TRAILER_SIZE - 4
CHUNK = 1 << 20
#: A trailer whose magic differs in at most this many bytes is a damaged trailer.
_NEAR_MAGIC = 2

ByteCallback = Callable[[int], None]


@dataclass(frozen=True, slots=True)
class SnapshotTrailer:
    data_len: int
    data_sha256: bytes
    created_ns: int
    namespace: str
    #: ``Checkpoint.encode()`` of the state the data holds; opaque to this module.
    checkpoint: bytes
    version: int = VERSION
    flags: int = 0
    #: The 4096 encoded bytes as found in the file.
    raw: bytes = b""

    @property
    def data_sha256_hex(self) -> str:
        return self.data_sha256.hex()

    def decode_checkpoint(self) -> Checkpoint:
        from unisondb.storage.btree import Checkpoint

        return Checkpoint.decode(self.checkpoint)


def encode_trailer(
    data_len: int, data_sha256: bytes, namespace: str, checkpoint: bytes, created_ns: int | None = None
) -> bytes:
    ns = namespace.encode("utf-8")
    if len(ns) > MAX_NAMESPACE:
        raise ValueError(f"namespace {namespace!r} is longer than {MAX_NAMESPACE} bytes")
    if len(checkpoint) > MAX_CHECKPOINT:
        raise ValueError(f"checkpoint of {len(checkpoint)} bytes is over {MAX_CHECKPOINT}")
    if len(data_sha256) != 32:
        raise ValueError("data_sha256 must be the 32-byte digest")
    buf = bytearray(TRAILER_SIZE)
    _HEAD.pack_into(
        buf, 0, MAGIC, VERSION, 0, data_len, data_sha256, time.time_ns() if created_ns is None else created_ns
    )
    struct.pack_into("<H", buf, _NS_AT, len(ns))
    buf[_NS_AT + 2 : _NS_AT + 2 + len(ns)] = ns
    struct.pack_into("<H", buf, _CP_AT, len(checkpoint))
    buf[_CP_AT + 2 : _CP_AT + 2 + len(checkpoint)] = checkpoint
    struct.pack_into("<I", buf, _CRC_AT, crc32c.crc32c(bytes(buf[:_CRC_AT])))
    return bytes(buf)


def decode_trailer(
    raw: bytes, file_size: int, path: Path | str, lmdb_end: int | None = None
) -> SnapshotTrailer | None:
    """The trailer in ``raw`` (the file's last 4096 bytes), None if there is none.

    ``lmdb_end``: where the LMDB pages end by the file's meta page (None: unknown).
    """
    if len(raw) != TRAILER_SIZE:
        return None
    differing = _magic_distance(raw)
    if differing > _NEAR_MAGIC:
        return None
    (crc,) = struct.unpack_from("<I", raw, _CRC_AT)
    if differing or crc32c.crc32c(raw[:_CRC_AT]) != crc:
        if lmdb_end is not None and lmdb_end > file_size - TRAILER_SIZE:
            return None  # a page of the database that happens to look like this
        raise _damaged(path, "its trailer (last 4096 bytes) fails its CRC32C")
    _magic, version, flags, data_len, digest, created_ns = _HEAD.unpack_from(raw, 0)
    if version != VERSION or flags != 0:
        raise CorruptSnapshot(
            f"{path}: snapshot trailer version {version} flags {flags:#x} is not one this "
            f"UnisonDB reads (version {VERSION})",
            hint="read it with the UnisonDB version that wrote it",
        )
    if data_len != file_size - TRAILER_SIZE:
        raise _damaged(
            path,
            f"the file is {file_size} bytes but its trailer says "
            f"{data_len} data bytes + {TRAILER_SIZE} (truncated or appended to)",
        )
    (ns_len,) = struct.unpack_from("<H", raw, _NS_AT)
    (cp_len,) = struct.unpack_from("<H", raw, _CP_AT)
    if ns_len > MAX_NAMESPACE or cp_len > MAX_CHECKPOINT:
        raise _damaged(path, "its trailer has impossible field lengths")
    return SnapshotTrailer(
        data_len=data_len,
        data_sha256=digest,
        created_ns=created_ns,
        namespace=raw[_NS_AT + 2 : _NS_AT + 2 + ns_len].decode("utf-8", errors="replace"),
        checkpoint=bytes(raw[_CP_AT + 2 : _CP_AT + 2 + cp_len]),
        version=version,
        flags=flags,
        raw=bytes(raw),
    )


def read_trailer_fd(fd: int, path: Path | str) -> SnapshotTrailer | None:
    try:
        size = os.fstat(fd).st_size
        if size < TRAILER_SIZE:
            return None
        raw = os.pread(fd, TRAILER_SIZE, size - TRAILER_SIZE)
        # The meta page is read only when the tail looks like a trailer (2 small reads).
        lmdb_end = _lmdb_end(fd) if _magic_distance(raw) <= _NEAR_MAGIC else None
    except OSError as exc:
        raise from_os_error(exc, path) from exc
    return decode_trailer(raw, size, path, lmdb_end)


def read_trailer(path: Path) -> SnapshotTrailer | None:
    """The file's trailer; None for a plain LMDB file. ``CorruptSnapshot`` if it is damaged."""
    fd = _open(path)
    try:
        return read_trailer_fd(fd, path)
    finally:
        os.close(fd)


def verify_fd(
    fd: int, path: Path | str, on_bytes: ByteCallback | None = None, hint: str | None = None
) -> tuple[SnapshotTrailer, str]:
    """Check every byte of the file behind ``fd``; (trailer, sha256 hex of the whole file).

    Streams the data bytes through sha256 (1 MiB at a time) and compares the digest with
    the trailer's; the whole-file digest, which the ``.sha256`` sidecar records, comes
    from the same pass.
    """
    trailer = read_trailer_fd(fd, path)
    if trailer is None:
        raise CorruptSnapshot(
            f"{path} has no snapshot trailer: it is not a self-verifying snapshot",
            hint="check it against its .sha256 sidecar instead",
        )
    h = hashlib.sha256()
    off = 0
    try:
        while off < trailer.data_len:
            chunk = os.pread(fd, min(CHUNK, trailer.data_len - off), off)
            if not chunk:
                break
            h.update(chunk)
            off += len(chunk)
            if on_bytes is not None:
                on_bytes(len(chunk))
    except OSError as exc:
        raise from_os_error(exc, path) from exc
    actual = h.digest()
    if off != trailer.data_len or actual != trailer.data_sha256:
        raise CorruptSnapshot(
            f"{path} is corrupt: sha256 of its {trailer.data_len} data bytes is "
            f"{actual.hex()} but its trailer records {trailer.data_sha256_hex}",
            hint=hint
            or "the file changed after it was written (disk or transfer damage); "
            "use another copy of this snapshot or an older one",
        )
    h.update(trailer.raw)
    return trailer, h.hexdigest()


def verify(path: Path, on_bytes: ByteCallback | None = None, hint: str | None = None) -> SnapshotTrailer:
    """Check a snapshot against its own trailer; ``CorruptSnapshot`` naming what differs."""
    return verify_and_digest(path, on_bytes, hint)[0]


def verify_and_digest(
    path: Path, on_bytes: ByteCallback | None = None, hint: str | None = None
) -> tuple[SnapshotTrailer, str]:
    fd = _open(path)
    try:
        return verify_fd(fd, path, on_bytes, hint)
    finally:
        os.close(fd)


def check(path: Path, on_bytes: ByteCallback | None = None) -> SnapshotTrailer | None:
    """``verify`` if the file has a trailer; None for a plain LMDB file."""
    if read_trailer(path) is None:
        return None
    return verify(path, on_bytes)


def strip(path: Path) -> None:
    """Cut the trailer off (truncate to ``data_len``) and fsync: the file is a plain data.mdb."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise from_os_error(exc, path) from exc
    try:
        trailer = read_trailer_fd(fd, path)
        if trailer is None:
            return
        os.ftruncate(fd, trailer.data_len)
        os.fsync(fd)
    except OSError as exc:
        raise from_os_error(exc, path) from exc
    finally:
        os.close(fd)


@dataclass(frozen=True, slots=True)
class Installed:
    """A snapshot ``install_check`` verified and turned into a live data.mdb."""

    path: Path
    trailer: SnapshotTrailer
    verify_seconds: float


#: Written (durably) in ``<ns>/db/`` before a hand-installed snapshot's trailer is stripped;
#: the engine forks a new history because of it and removes it once the fork is durable,
#: so a crash anywhere in between still ends in a fork.
INSTALL_MARKER = "INSTALLED-SNAPSHOT"


def install_check(db_dir: Path, *, mark: bool = False) -> Installed | None:
    """Before LMDB opens ``db_dir/data.mdb``: verify and strip a snapshot copied in by hand.

    A live data.mdb never has a trailer, so a normal start costs one 4 KiB read. A
    snapshot installed with ``cp`` is checked once (a full sha256 pass) and then becomes
    a plain data.mdb; a crash between the two only repeats the check at the next start.
    """
    data = db_dir / "data.mdb"
    if not data.is_file():
        return None
    hint = (
        f"{data} was copied from a snapshot that is damaged; copy another snapshot "
        "(or an older one) to it, or run 'unisondb restore'"
    )
    try:
        trailer = read_trailer(data)
    except CorruptSnapshot as exc:
        raise CorruptSnapshot(exc.message, hint=hint) from None
    if trailer is None:
        return None
    started = time.perf_counter()
    verify(data, hint=hint)
    if mark:
        fsutil.write_file_atomic(db_dir / INSTALL_MARKER, trailer.namespace.encode())
    strip(data)
    # Not logged here: offline tools (restore) open staged B-trees with stdout as output.
    return Installed(data, trailer, time.perf_counter() - started)


#: LMDB meta page fields (page offsets; full layout in storage/lmdbfile.py's docstring).
_LMDB_MAGIC = 0xBEEFC0DE
_P_META = 0x08


def _magic_distance(raw: bytes) -> int:
    """How many of the first 8 bytes differ from the magic."""
    return sum(a != b for a, b in zip(raw[:8].ljust(8, b"\0"), MAGIC, strict=True))


def _lmdb_end(fd: int) -> int | None:
    """End of the LMDB pages, ``(mm_last_pg + 1) * page size``, by the winning meta page.

    Only consulted when the last 4096 bytes look like a damaged trailer. The meta page
    with the higher txnid wins (meta 0 on a tie), as in LMDB's ``mdb_env_read_header``.
    None if no meta page is valid.
    """
    head = os.pread(fd, 4096, 0)
    psize = struct.unpack_from("<I", head, 40)[0] if len(head) >= 44 else 0
    if psize < 512 or psize > 65536 or psize & (psize - 1):
        psize = 4096  # meta 0's page size field is damaged: LMDB's default
    best: tuple[int, int] | None = None
    for page in (head[:psize], os.pread(fd, 152, psize)):
        if len(page) < 152:
            continue
        (flags,) = struct.unpack_from("<H", page, 10)
        (magic,) = struct.unpack_from("<I", page, 16)
        last_pg, txnid = struct.unpack_from("<QQ", page, 136)
        if magic == _LMDB_MAGIC and flags & _P_META and (best is None or txnid > best[1]):
            best = (last_pg, txnid)
    return None if best is None else (best[0] + 1) * psize


def _open(path: Path) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise from_os_error(exc, path) from exc


def _damaged(path: Path | str, what: str) -> CorruptSnapshot:
    return CorruptSnapshot(
        f"{path} is a damaged snapshot: {what}",
        hint="use another copy of this snapshot or an older one",
    )
