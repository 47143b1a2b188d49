"""Archive object format: a self-describing header, a zstd body (optionally AES-256-GCM chunks), a trailer.

Every object the archiver writes (a WAL segment, a snapshot, a manifest) has this layout, so any one
object can be verified alone: what it is, which namespace/history/LSN range it holds, the SHA-256 and
the state fingerprint of its content, and with which key it was encrypted. All integers little-endian.

Header (208 bytes)::

    Offset  Size  Field
    0       4     magic         b"UDBA"
    4       2     version       1
    6       1     kind          1 segment, 2 snapshot, 3 manifest
    7       1     flags         bit 0: body is encrypted; other bits zero
    8       16    history_id    opaque history identity (from the segment header / checkpoint)
    24      8     first_lsn     first LSN the content holds (a snapshot: its LSN)
    32      8     last_lsn      last LSN the content holds (a snapshot: its LSN)
    40      8     plain_size    bytes of content before compression
    48      32    sha256        SHA-256 of the content before compression
    80      32    fingerprint   opaque state fingerprint (zero when the producer has none)
    112     8     key_id        first 8 bytes of SHA-256(b"unisondb-archive-key-id\\0" + key); zero if plain
    120     8     nonce_prefix  random per object; zero if plain
    128     4     chunk_size    plaintext bytes per encrypted chunk; zero if plain
    132     1     ns_len        length of the namespace name
    133     64    namespace     UTF-8, zero padded
    197     7     reserved      zero
    204     4     crc           CRC32C of bytes [0, 204)

Body: the content as one zstd frame (level 1, with zstd's content checksum). If encrypted, the frame
is cut into chunks of ``chunk_size`` bytes, each sealed with AES-256-GCM::

    nonce = nonce_prefix (8) || chunk index (4, little-endian)
    aad   = the 208 header bytes || chunk index (4) || final flag (1: 1 for the last chunk, else 0)
    chunk = ciphertext || 16-byte tag

Every chunk but the last holds exactly ``chunk_size`` plaintext bytes and the last holds fewer (zero
if the frame is an exact multiple), so the reader knows the last chunk by its length; a truncated or
reordered body, or a changed header, fails a tag.

Trailer (16 bytes)::

    0       8     body_size     bytes between header and trailer
    8       4     body_crc      CRC32C of the body bytes
    12      4     magic         b"UDBE"

The trailer catches truncation and appended bytes of a plain object, where no tag does. The key
itself is never stored; only its id, so a reader with the wrong key fails before decrypting anything
and key rotation can tell objects apart. Encoding and decoding stream with bounded memory (a few
chunks plus the zstd window); a decoder writes to a caller-owned ``dst`` and raises on the first
problem, so the caller must discard ``dst`` on error.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import stat
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import IO, Protocol, cast

import crc32c
import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from unisondb.errors import CorruptArchive, InvalidRequest, from_os_error

MAGIC = b"UDBA"
TRAILER_MAGIC = b"UDBE"
VERSION = 1
HEADER = struct.Struct("<4sHBB16sQQQ32s32s8s8sIB64s7xI")
TRAILER = struct.Struct("<QI4s")
HEADER_SIZE = HEADER.size  # 208
TRAILER_SIZE = TRAILER.size  # 16
CHUNK_SIZE = 64 * 1024
TAG_SIZE = 16
FLAG_ENCRYPTED = 0x01
# Level 1, not zstd's default 3: encoding is the archiver's bottleneck over a fast link
# (bench/results/2026-12-01-archive.md), and on these machines level 1 encoded JSON-like segments
# 2.3-2.5x faster than level 3 at no larger size, incompressible ones 1.7x (same-run medians of 5).
# Decoding does not depend on the level.
ZSTD_LEVEL = 1
_MAX_WINDOW = 1 << 27  # refuse zstd frames that would need more than 128 MiB of window
_IO_SIZE = 1 << 20
_KEY_ID_DOMAIN = b"unisondb-archive-key-id\0"


class _Readable(Protocol):
    def read(self, n: int = ..., /) -> bytes: ...


class Kind(IntEnum):
    SEGMENT = 1
    SNAPSHOT = 2
    MANIFEST = 3


@dataclass(frozen=True)
class ArchiveKey:
    """A 256-bit key. ``key_id`` is recorded in each object; the key never is."""

    secret: bytes
    key_id: bytes

    @classmethod
    def from_bytes(cls, secret: bytes) -> ArchiveKey:
        if len(secret) != 32:
            raise InvalidRequest(f"archive key must be 32 bytes, got {len(secret)}")
        return cls(secret, hashlib.sha256(_KEY_ID_DOMAIN + secret).digest()[:8])

    def __repr__(self) -> str:  # never print the secret
        return f"ArchiveKey(key_id={self.key_id.hex()})"


def load_key(path: Path) -> ArchiveKey:
    """``--archive-key-file``: 64 hex characters (one line) or 32 raw bytes, readable by its owner only."""
    try:
        mode = path.stat().st_mode
        raw = path.read_bytes()
    except OSError as exc:
        raise from_os_error(exc, path) from exc
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise InvalidRequest(
            f"archive key file {path} is readable by group or others", hint=f"chmod 600 {path}"
        )
    text = raw.strip()
    if len(text) == 64:
        try:
            return ArchiveKey.from_bytes(bytes.fromhex(text.decode("ascii")))
        except (UnicodeDecodeError, ValueError):
            pass
    if len(raw) == 32:
        return ArchiveKey.from_bytes(raw)
    raise InvalidRequest(
        f"archive key file {path} holds {len(raw)} bytes: expected 64 hex characters or 32 raw bytes",
        hint="create one with: openssl rand -hex 32 > FILE",
    )


@dataclass(frozen=True)
class ObjectHeader:
    kind: Kind
    namespace: str
    history_id: bytes
    first_lsn: int
    last_lsn: int
    plain_size: int
    sha256: bytes
    fingerprint: bytes = bytes(32)
    key_id: bytes = bytes(8)
    nonce_prefix: bytes = bytes(8)
    chunk_size: int = 0

    @property
    def encrypted(self) -> bool:
        return self.chunk_size != 0

    def pack(self) -> bytes:
        ns = self.namespace.encode("utf-8")
        flags = FLAG_ENCRYPTED if self.encrypted else 0
        body = HEADER.pack(
            MAGIC,
            VERSION,
            int(self.kind),
            flags,
            self.history_id,
            self.first_lsn,
            self.last_lsn,
            self.plain_size,
            self.sha256,
            self.fingerprint,
            self.key_id,
            self.nonce_prefix,
            self.chunk_size,
            len(ns),
            ns,
            0,
        )[:-4]
        return body + struct.pack("<I", crc32c.crc32c(body))


def parse_header(data: bytes, where: str) -> ObjectHeader:
    """The header from the first ``HEADER_SIZE`` bytes of an object; ``CorruptArchive`` if it is bad."""
    if len(data) < HEADER_SIZE:
        raise CorruptArchive(f"{where}: truncated header ({len(data)} of {HEADER_SIZE} bytes)")
    (
        magic,
        version,
        kind,
        flags,
        history,
        first,
        last,
        plain_size,
        sha,
        fingerprint,
        key_id,
        nonce,
        chunk_size,
        ns_len,
        ns,
        crc,
    ) = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise CorruptArchive(f"{where}: not a UnisonDB archive object (magic {magic!r})")
    if crc32c.crc32c(data[: HEADER_SIZE - 4]) != crc:
        raise CorruptArchive(f"{where}: header checksum mismatch (the header was changed or damaged)")
    if version != VERSION:
        raise CorruptArchive(
            f"{where}: archive object version {version}, this build reads {VERSION}",
            hint="restore with the UnisonDB release that wrote the archive",
        )
    try:
        kind_ = Kind(kind)
        namespace = ns[:ns_len].decode("utf-8")
    except (ValueError, UnicodeDecodeError) as exc:
        raise CorruptArchive(f"{where}: invalid header field ({exc})") from exc
    encrypted = bool(flags & FLAG_ENCRYPTED)
    if flags & ~FLAG_ENCRYPTED or encrypted != (chunk_size != 0) or first > last or ns_len > 64:
        raise CorruptArchive(f"{where}: inconsistent header fields")
    return ObjectHeader(
        kind_, namespace, history, first, last, plain_size, sha, fingerprint, key_id, nonce, chunk_size
    )


@dataclass(frozen=True, slots=True)
class Identity:
    """What an object holds, as its header states it: the fields the archive's writers pass
    for every object (one value instead of six keyword arguments at every layer)."""

    kind: Kind
    namespace: str
    history_id: bytes
    first_lsn: int
    last_lsn: int
    #: State fingerprint after ``last_lsn`` (None: not known, stored as zeros).
    fingerprint: bytes | None = None


def new_header(
    ident: Identity, plain_size: int, sha256: bytes, key: ArchiveKey | None = None
) -> ObjectHeader:
    """A header for new content; the nonce prefix is drawn fresh for every encrypted object."""
    kind, namespace, history_id = ident.kind, ident.namespace, ident.history_id
    first_lsn, last_lsn = ident.first_lsn, ident.last_lsn
    fingerprint = ident.fingerprint if ident.fingerprint is not None else bytes(32)
    if len(history_id) != 16 or len(sha256) != 32 or len(fingerprint) != 32:
        raise ValueError("history_id is 16 bytes, sha256 and fingerprint 32 bytes")
    if len(namespace.encode("utf-8")) > 64 or not 0 <= first_lsn <= last_lsn:
        raise ValueError(f"bad namespace {namespace!r} or LSN range {first_lsn}..{last_lsn}")
    if key is None:
        return ObjectHeader(kind, namespace, history_id, first_lsn, last_lsn, plain_size, sha256, fingerprint)
    return ObjectHeader(
        kind,
        namespace,
        history_id,
        first_lsn,
        last_lsn,
        plain_size,
        sha256,
        fingerprint,
        key.key_id,
        secrets.token_bytes(8),
        CHUNK_SIZE,
    )


def file_digest(path: Path) -> tuple[int, bytes]:
    """Size and SHA-256 of a file (the first of the two passes ``encode_file`` makes)."""
    digest = hashlib.sha256()
    size = 0
    try:
        with open(path, "rb") as f:
            while piece := f.read(_IO_SIZE):
                digest.update(piece)
                size += len(piece)
    except OSError as exc:
        raise from_os_error(exc, path) from exc
    return size, digest.digest()


def encode(src: IO[bytes], dst: IO[bytes], header: ObjectHeader, key: ArchiveKey | None = None) -> int:
    """Write header, body and trailer of ``src`` (whose size and SHA-256 the header states) to ``dst``.

    Returns the object's size. Raises ``InvalidRequest`` if ``src`` is not what the header says (it
    changed after it was hashed), so a wrong SHA-256 is never published.
    """
    if header.encrypted != (key is not None) or (key is not None and key.key_id != header.key_id):
        raise ValueError("the header's encryption fields do not match the key")
    head = header.pack()
    dst.write(head)
    sink = _BodyWriter(dst, head, key, header)
    compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=True).compressobj()
    digest = hashlib.sha256()
    size = 0
    while piece := src.read(_IO_SIZE):
        digest.update(piece)
        size += len(piece)
        sink.write(compressor.compress(piece))
    sink.write(compressor.flush())
    if size != header.plain_size or digest.digest() != header.sha256:
        raise InvalidRequest(
            f"content changed while it was archived ({size} bytes, header says "
            f"{header.plain_size}); not uploading it"
        )
    body_size, body_crc = sink.finish()
    dst.write(TRAILER.pack(body_size, body_crc, TRAILER_MAGIC))
    return HEADER_SIZE + body_size + TRAILER_SIZE


def encode_file(path: Path, dst: IO[bytes], ident: Identity, key: ArchiveKey | None = None) -> ObjectHeader:
    """Encode a file (a sealed segment, a snapshot): hash it, then stream it through ``encode``."""
    size, sha = file_digest(path)
    header = new_header(ident, size, sha, key)
    try:
        with open(path, "rb") as f:
            encode(f, dst, header, key)
    except OSError as exc:
        raise from_os_error(exc, path) from exc
    return header


def decode(src: IO[bytes], dst: IO[bytes], key: ArchiveKey | None, where: str) -> ObjectHeader:
    """Verify and decode one object from ``src`` into ``dst``; returns its header.

    Checks, in order: header magic/CRC/version, the key id, every chunk's tag (encrypted), the zstd
    frame, the content's size and SHA-256, and the trailer (size, CRC, nothing after it).
    """
    header = parse_header(_read_exact(src, HEADER_SIZE), where)
    head = header.pack()
    if header.encrypted:
        if key is None:
            raise InvalidRequest(
                f"{where} is encrypted (key id {header.key_id.hex()})",
                hint="pass the archive key with --archive-key-file",
            )
        if key.key_id != header.key_id:
            raise InvalidRequest(
                f"{where} was encrypted with key id {header.key_id.hex()}, "
                f"the given key has id {key.key_id.hex()}",
                hint="use the key file this archive was written with",
            )
    body = _BodyReader(src, where)
    # Both readers implement the read() that zstandard's stream_reader uses.
    frames = cast(
        IO[bytes],
        _ChunkReader(_decrypt_chunks(body, head, header, key, where))
        if key is not None and header.encrypted
        else body,
    )
    reader = zstandard.ZstdDecompressor(max_window_size=_MAX_WINDOW).stream_reader(
        frames, read_size=CHUNK_SIZE, read_across_frames=True
    )
    digest = hashlib.sha256()
    size = 0
    try:
        while piece := reader.read(_IO_SIZE):
            size += len(piece)
            if size > header.plain_size:
                raise CorruptArchive(
                    f"{where}: content is longer than the {header.plain_size} bytes its header states"
                )
            digest.update(piece)
            dst.write(piece)
    except zstandard.ZstdError as exc:
        raise CorruptArchive(f"{where}: compressed body is damaged ({exc})") from exc
    body.finish()
    if size != header.plain_size:
        raise CorruptArchive(f"{where}: content is {size} bytes, its header states {header.plain_size}")
    if digest.digest() != header.sha256:
        raise CorruptArchive(
            f"{where}: content SHA-256 {digest.hexdigest()} does not match the header's {header.sha256.hex()}"
        )
    return header


def _read_exact(src: _Readable, n: int) -> bytes:
    parts = []
    while n > 0:
        piece = src.read(n)
        if not piece:
            break
        parts.append(piece)
        n -= len(piece)
    return b"".join(parts)


def _nonce(prefix: bytes, index: int) -> bytes:
    return prefix + struct.pack("<I", index)


def _aad(head: bytes, index: int, final: bool) -> bytes:
    return head + struct.pack("<IB", index, 1 if final else 0)


class _BodyWriter:
    """Writes the body: passes compressed bytes through, or seals them into fixed-size chunks."""

    def __init__(self, dst: IO[bytes], head: bytes, key: ArchiveKey | None, header: ObjectHeader) -> None:
        self._dst = dst
        self._head = head
        self._aead = AESGCM(key.secret) if key is not None else None
        self._prefix = header.nonce_prefix
        self._chunk = header.chunk_size
        self._pending = bytearray()
        self._index = 0
        self._size = 0
        self._crc = 0

    def _emit(self, data: bytes) -> None:
        self._dst.write(data)
        self._size += len(data)
        self._crc = crc32c.crc32c(data, self._crc)

    def write(self, data: bytes) -> None:
        if self._aead is None:
            if data:
                self._emit(data)
            return
        self._pending += data
        while len(self._pending) > self._chunk:  # keep the remainder: the last chunk must be short
            self._seal(bytes(self._pending[: self._chunk]), final=False)
            del self._pending[: self._chunk]

    def _seal(self, plain: bytes, final: bool) -> None:
        assert self._aead is not None
        self._emit(
            self._aead.encrypt(_nonce(self._prefix, self._index), plain, _aad(self._head, self._index, final))
        )
        self._index += 1

    def finish(self) -> tuple[int, int]:
        if self._aead is not None:
            if len(self._pending) == self._chunk:
                self._seal(bytes(self._pending), final=False)
                self._pending.clear()
            self._seal(bytes(self._pending), final=True)
        return self._size, self._crc


class _BodyReader:
    """Reads the body from ``src`` while holding back the last TRAILER_SIZE bytes (the trailer)."""

    def __init__(self, src: IO[bytes], where: str) -> None:
        self._src = src
        self._where = where
        self._buf = bytearray()
        self._eof = False
        self._size = 0
        self._crc = 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        n = n if n >= 0 else _IO_SIZE
        while not self._eof and len(self._buf) < n + TRAILER_SIZE:
            piece = self._src.read(max(n, _IO_SIZE))
            if not piece:
                self._eof = True
            self._buf += piece
        take = max(0, min(n, len(self._buf) - TRAILER_SIZE))
        out = bytes(self._buf[:take])
        del self._buf[:take]
        self._size += len(out)
        self._crc = crc32c.crc32c(out, self._crc)
        return out

    def finish(self) -> None:
        """After the body: the trailer must be exactly what is left and must match the body."""
        if self.read(1):
            raise CorruptArchive(f"{self._where}: unexpected bytes after the compressed body")
        if len(self._buf) < TRAILER_SIZE:
            raise CorruptArchive(f"{self._where}: truncated (the trailer is missing)")
        size, crc, magic = TRAILER.unpack(bytes(self._buf))
        if magic != TRAILER_MAGIC or size != self._size:
            raise CorruptArchive(
                f"{self._where}: truncated or extended (trailer says a {size}-byte body, read {self._size})"
            )
        if crc != self._crc:
            raise CorruptArchive(f"{self._where}: body checksum mismatch")


def _decrypt_chunks(
    body: _BodyReader, head: bytes, header: ObjectHeader, key: ArchiveKey, where: str
) -> Iterator[bytes]:
    aead = AESGCM(key.secret)
    full = header.chunk_size + TAG_SIZE
    index = 0
    while True:
        sealed = _read_exact(body, full)
        final = len(sealed) < full
        if len(sealed) < TAG_SIZE:
            raise CorruptArchive(f"{where}: truncated (encrypted chunk {index} is incomplete)")
        try:
            yield aead.decrypt(_nonce(header.nonce_prefix, index), sealed, _aad(head, index, final))
        except InvalidTag as exc:
            raise CorruptArchive(
                f"{where}: encrypted chunk {index} fails authentication (tampered, "
                "truncated, reordered, or a key with a colliding id)"
            ) from exc
        if final:
            return
        index += 1


class _ChunkReader:
    """A minimal file-like ``read`` over an iterator of byte chunks (zstd's stream_reader wants one)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._buf = b""

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        while len(self._buf) < max(n, 1):
            piece = next(self._chunks, None)
            if piece is None:
                break
            self._buf += piece
        n = len(self._buf) if n < 0 else n
        out, self._buf = self._buf[:n], self._buf[n:]
        return out


def generate_key_file(path: Path) -> ArchiveKey:
    """Write a fresh random key as hex, mode 0600 (for tests and ``openssl rand -hex 32`` users)."""
    secret = secrets.token_bytes(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret.hex() + "\n")
    return ArchiveKey.from_bytes(secret)
