"""Backup inputs: what a file is, and how to read its plain bytes.

Every command that discovers or reads backup files (``restore``, ``backup verify``,
``backup list``, ``wal list|inspect``) goes through this module, so the Backup and Restore
document's compressed files are inputs like any other: ``000000042.wal.gz`` (its
archival script's ``gzip``), ``*.wal.zst`` (``contrib/``), ``btree-DATE.db.zst``
(``zstd --rm``), ``*.db.gz`` and ``wal-DATE.tar.gz`` (``tar -czf ... wal/DATE``).

An input is always named by its **origin**: the file the operator has, or for a file inside
an archive the virtual path ``<archive>/<member name>`` (e.g.
``.../wal-20250108-1200.tar.gz/wal/20250108-1200/000000042.wal``). Messages name origins;
the staging copies are an implementation detail.

Classification, by name (a trailing ``.gz``/``.zst``/``.zstd`` is taken off first)::

    NNNNNNNNN.wal                          segment
    *.db, *.mdb, *.snapshot                snapshot
    *.sha256                               sidecar
    *.tar, *.tar.gz, *.tgz, *.tar.zst      archive
    *.gpg, *.pgp, *.asc                    encrypted
    anything else                          unknown

and by magic bytes (which win over the name: a ``.wal.gz`` that is not gzip is read as
what it is; for a compressed file the decompressed start is examined)::

    1f 8b              gzip                  28 b5 2f fd        zstd
    "UDBW" at 0        segment               de c0 ef be at 16  snapshot (LMDB meta page)
    "ustar" at 257     tar archive           "-----BEGIN PGP", OpenPGP PKESK/SKESK packet
                                             tag at 0 (84-87, 8c-8f, c1, c3)  encrypted

Reading, bounded in memory (never the whole stored file at once):

* a compressed **segment** is decompressed on each read into one ``bytes`` (a plain segment
  is read whole too, in one ``read``; ``MAX_SEGMENT_BYTES`` caps both) — no disk needed; a
  restore holds one segment at a time;
* a compressed **snapshot** is decompressed once into the staging directory (LMDB needs a
  real file), hashing the stored and the plain bytes in the same pass;
* an **archive** is read once in ``tarfile`` streaming mode; its segment and sidecar
  members are extracted into staging (names are never used as paths: each member gets a
  fresh numbered file), everything else is skipped.

Damage in the compressed stream (truncation, a flipped bit caught by gzip's CRC-32 or
zstd's content checksum, trailing garbage, a cut tar) is a ``BackupCorrupt`` naming the
origin; a partial staged file is deleted before the error propagates.

Staging lives in a private temporary directory (``$TMPDIR`` or the caller's scratch dir),
removed when the command's ``staging()`` block ends; a killed process leaves at most that
directory under the temp dir, never anything in a restore target.
"""

from __future__ import annotations

import atexit
import hashlib
import io
import os
import shutil
import tarfile
import tempfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, BinaryIO

import zstandard

from unisondb.errors import InvalidRequest, NotFound, UnisonDBError, from_os_error
from unisondb.restore.errors import BackupCorrupt, EncryptedInput
from unisondb.storage import layout

#: Largest plain segment read into memory (compressed or not); far above any configured
#: segment size plus one maximal record, so it only stops decompression bombs.
MAX_SEGMENT_BYTES = 1 << 30
_IN_CHUNK = 64 << 10
#: zstd's decompressobj cannot bound its output, so it is fed pieces sized from the ratio
#: seen so far to yield about ``_OUT_CHUNK`` each; the smallest piece bounds the worst case
#: (all RLE blocks: ~32 KiB of output per input byte) at 16 MiB per call.
_ZSTD_MIN_PIECE = 512
_OUT_CHUNK = 1 << 20
_COPY_CHUNK = 1 << 20

CODEC_SUFFIXES = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}
_ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.zst", ".tar.zstd", ".tzst")
_ENCRYPTED_SUFFIXES = (".gpg", ".pgp", ".asc")
_SNAPSHOT_SUFFIXES = (".db", ".mdb", ".snapshot")
_TEST_COMMAND = {"gzip": "gzip -t {p}", "zstd": "zstd -t {p}", "none": "sha256sum {p}"}
_LMDB_MAGIC = (0xBEEFC0DE).to_bytes(4, "little")
_PGP_TAGS = {0x84, 0x85, 0x86, 0x87, 0x8C, 0x8D, 0x8E, 0x8F, 0xC1, 0xC3}


class Kind(StrEnum):
    SEGMENT = "segment"
    SNAPSHOT = "snapshot"
    SIDECAR = "sidecar"
    ARCHIVE = "archive"
    ENCRYPTED = "encrypted"
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class Classified:
    kind: Kind
    #: "none", "gzip" or "zstd": how the stored bytes are encoded.
    codec: str
    #: The name without its compression suffix ("000000042.wal" for "000000042.wal.gz").
    plain_name: str
    segment_id: int | None = None


def classify_name(name: str) -> Classified:
    """What a file name says it is (no file is read)."""
    low = name.lower()
    if low.endswith(_ENCRYPTED_SUFFIXES):
        inner = classify_name(name.rsplit(".", 1)[0])
        return Classified(Kind.ENCRYPTED, inner.codec, inner.plain_name, inner.segment_id)
    if low.endswith(".sha256"):
        return Classified(Kind.SIDECAR, "none", name)
    if low.endswith(_ARCHIVE_SUFFIXES):
        codec = (
            "gzip"
            if low.endswith((".gz", ".tgz"))
            else "zstd"
            if low.endswith((".zst", ".zstd", ".tzst"))
            else "none"
        )
        return Classified(Kind.ARCHIVE, codec, name)
    codec, plain = "none", name
    for suffix, c in CODEC_SUFFIXES.items():
        if low.endswith(suffix) and len(name) > len(suffix):
            codec, plain = c, name[: -len(suffix)]
            break
    seg_id = layout.parse_segment_name(plain)
    if seg_id is not None:
        return Classified(Kind.SEGMENT, codec, plain, seg_id)
    if plain.lower().endswith(_SNAPSHOT_SUFFIXES):
        return Classified(Kind.SNAPSHOT, codec, plain)
    return Classified(Kind.UNKNOWN, codec, plain)


def _magic_codec(head: bytes) -> str | None:
    if head.startswith(b"\x1f\x8b"):
        return "gzip"
    if head.startswith(b"\x28\xb5\x2f\xfd"):
        return "zstd"
    return None


def _magic_kind(head: bytes) -> Kind | None:
    if head.startswith(b"-----BEGIN PGP"):
        return Kind.ENCRYPTED
    if head.startswith(b"UDBW"):
        return Kind.SEGMENT
    if len(head) >= 20 and head[16:20] == _LMDB_MAGIC:
        return Kind.SNAPSHOT
    if len(head) >= 262 and head[257:262] == b"ustar":
        return Kind.ARCHIVE
    return None


def classify(path: Path) -> Classified:
    """Name and magic bytes together (see the module docstring); reads at most a few KiB."""
    by_name = classify_name(path.name)
    if by_name.kind is Kind.SIDECAR:
        return by_name
    head = _read_head(local(path), 512)
    codec = _magic_codec(head) or "none"
    kind = _magic_kind(head)
    if codec != "none":
        try:
            with _decoded(local(path), codec, path) as f:
                kind = _magic_kind(f.read(512))
        except BackupCorrupt:
            kind = None  # damaged: the name decides; the read that matters will say why
    elif kind is None and by_name.kind is Kind.UNKNOWN and head[:1] and head[0] in _PGP_TAGS:
        kind = Kind.ENCRYPTED
    if by_name.kind is Kind.ENCRYPTED or kind is Kind.ENCRYPTED:
        return Classified(Kind.ENCRYPTED, by_name.codec, by_name.plain_name, by_name.segment_id)
    if kind is Kind.ARCHIVE or (kind is None and by_name.kind is Kind.ARCHIVE):
        return Classified(Kind.ARCHIVE, codec, by_name.plain_name)
    return Classified(kind or by_name.kind, codec, by_name.plain_name, by_name.segment_id)


def encrypted_error(path: Path) -> EncryptedInput:
    out = (
        path.with_name(path.name.rsplit(".", 1)[0])
        if path.suffix.lower() in _ENCRYPTED_SUFFIXES
        else path.with_name(path.name + ".decrypted")
    )
    return EncryptedInput(
        f"{path} is encrypted (OpenPGP); UnisonDB does not decrypt backups",
        hint=f"decrypt it first: gpg --decrypt --output {out} {path}",
    )


def _read_head(path: Path, n: int) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except FileNotFoundError:
        raise NotFound(f"backup file not found: {path}") from None
    except OSError as exc:
        raise from_os_error(exc, path) from exc


# --- decompressing streams ---


class _Decoder(io.RawIOBase):
    """A read-only stream of the plain bytes of a gzip or zstd file.

    Concatenated members/frames are read in sequence (``gzip`` and ``zstd`` both write
    them); the stream must end exactly at a member/frame end (zero padding is tolerated),
    otherwise the file was cut or has garbage appended. ``stored_sha256`` is the digest of
    the bytes as stored, complete once the stream has been read to its end.
    """

    def __init__(self, raw: BinaryIO, codec: str, origin: Path) -> None:
        super().__init__()
        self._raw, self._codec, self._origin = raw, codec, origin
        self._hash = hashlib.sha256()
        self._buf = b""
        self._pos = 0
        self._pending = b""  # stored bytes not yet given to the decompressor
        # zlib's Decompress or zstandard's decompressobj: same eof/unused_data protocol.
        self._obj: Any = self._new()
        self._started = False  # the current member/frame has consumed input
        self._stored = 0
        self._piece = _ZSTD_MIN_PIECE
        self._eof = False
        self._done = False

    def _new(self) -> Any:
        if self._codec == "gzip":
            return zlib.decompressobj(31)
        return zstandard.ZstdDecompressor().decompressobj()

    def readable(self) -> bool:
        return True

    @property
    def stored_sha256(self) -> str:
        return self._hash.hexdigest()

    def corrupt(self, why: str) -> BackupCorrupt:
        cmd = _TEST_COMMAND[self._codec].format(p=self._origin)
        return BackupCorrupt(
            f"{self._origin}: {self._codec} data is {why}",
            hint=f"the file is damaged (an interrupted copy, a full disk or "
            f"bit rot); `{cmd}` shows it too; fetch another copy",
        )

    def _more_input(self) -> bytes:
        if self._pending:
            data, self._pending = self._pending, b""
            return data
        if self._eof:
            return b""
        try:
            data = self._raw.read(_IN_CHUNK)
        except OSError as exc:
            raise from_os_error(exc, self._origin) from exc
        if not data:
            self._eof = True
        self._hash.update(data)
        self._stored += len(data)
        return data

    def _fill(self) -> bytes:
        """The next piece of plain bytes (b"" at the clean end of the stream)."""
        while not self._done:
            data = self._more_input()
            if not data:
                if self._started or not self._stored:
                    raise self.corrupt(
                        "truncated (the stream ends inside a compressed block)"
                        if self._stored
                        else "empty (the file has no bytes)"
                    )
                self._done = True
                return b""
            out: bytes
            try:
                if self._codec == "gzip":
                    out = self._obj.decompress(data, _OUT_CHUNK)
                    self._pending = self._obj.unconsumed_tail
                else:
                    n = self._piece
                    piece, self._pending = data[:n], data[n:]
                    out = self._obj.decompress(piece)
                    ratio = max(1, len(out) // max(1, len(piece)))
                    self._piece = max(_ZSTD_MIN_PIECE, min(_IN_CHUNK, _OUT_CHUNK // ratio))
            except (zlib.error, zstandard.ZstdError) as exc:
                raise self.corrupt(f"corrupt ({exc})") from None
            self._started = True
            if self._obj.eof:
                self._next_member()
            if out:
                return out
        return b""

    def _next_member(self) -> None:
        """After a member/frame ended: another one, zero padding to the end, or garbage."""
        rest = self._obj.unused_data + self._pending
        self._pending = b""
        while len(rest) < 4 and (more := self._more_input()):
            rest += more
        if not rest:
            self._done = True
        elif _magic_codec(rest) == self._codec:
            self._pending = rest
            self._obj = self._new()
            self._started = False
        elif not rest.strip(b"\0") and self._rest_is_zero():
            self._done = True
        else:
            raise self.corrupt(
                f"followed by bytes that are not {self._codec} data (garbage "
                "after the end, or a damaged member header)"
            )

    def _rest_is_zero(self) -> bool:
        """Zero padding after the last member (tape/dd style): read and check it all."""
        while data := self._more_input():
            if data.strip(b"\0"):
                return False
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        while self._pos >= len(self._buf):
            self._buf, self._pos = self._fill(), 0
            if not self._buf:
                return 0
        n = min(len(b), len(self._buf) - self._pos)
        b[:n] = self._buf[self._pos : self._pos + n]
        self._pos += n
        return n

    def close(self) -> None:
        try:
            self._raw.close()
        finally:
            super().close()


@contextmanager
def _decoded(path: Path, codec: str, origin: Path) -> Iterator[_Decoder]:
    try:
        raw = open(path, "rb")  # closed by the decoder
    except FileNotFoundError:
        raise NotFound(f"backup file not found: {origin}") from None
    except OSError as exc:
        raise from_os_error(exc, origin) from exc
    dec = _Decoder(raw, codec, origin)
    try:
        yield dec
    finally:
        dec.close()


@contextmanager
def open_plain(path: Path) -> Iterator[BinaryIO]:
    """The plain (decompressed) bytes of any input, as a read-only stream."""
    staged = _lookup_materialized(path)
    if staged is not None:
        with open(staged, "rb") as f:
            yield f
        return
    src = local(path)
    codec = codec_of(path)
    if codec == "none":
        try:
            f = open(src, "rb")
        except FileNotFoundError:
            raise NotFound(f"backup file not found: {path}") from None
        except OSError as exc:
            raise from_os_error(exc, path) from exc
        with f:
            yield f
        return
    with _decoded(src, codec, path) as dec:
        yield io.BufferedReader(dec, _COPY_CHUNK)
        _note_stored_digest(path, dec)


def _note_stored_digest(path: Path, dec: _Decoder) -> None:
    if dec._done:
        stg = current()
        stg.stored_digests[_key(path)] = dec.stored_sha256


def codec_of(path: Path) -> str:
    """ "none", "gzip" or "zstd", from the stored bytes' magic; raises for encrypted files."""
    if _lookup_materialized(path) is not None:
        return "none"
    head = _read_head(local(path), 512)
    codec = _magic_codec(head)
    if codec is not None:
        return codec
    if head.startswith(b"-----BEGIN PGP") or classify_name(path.name).kind is Kind.ENCRYPTED:
        raise encrypted_error(path)
    return "none"


def stored_codec(path: Path) -> str:
    """Like ``codec_of`` but for the file as stored, even after it was materialized."""
    return _magic_codec(_read_head(local(path), 8)) or "none"


def read_segment(path: Path) -> bytes:
    """All plain bytes of a segment input (plain, gzip, zstd or an archive member).

    One buffer of the file's size: a plain file is read into it in one call, a
    decompressed stream is joined once at the end (no growing buffer copied again)."""
    chunks: list[bytes] = []
    n = 0
    with open_plain(path) as f:
        try:
            size = os.fstat(f.fileno()).st_size if codec_of(path) == "none" else -1
        except (OSError, io.UnsupportedOperation):
            size = -1
        if 0 <= size <= MAX_SEGMENT_BYTES:
            data = f.read(size + 1)  # one more: a file that grew is read whole below
            if len(data) <= size:
                return data
            chunks.append(data)
            n = len(data)
        while chunk := f.read(_COPY_CHUNK):
            chunks.append(chunk)
            n += len(chunk)
            if n > MAX_SEGMENT_BYTES:
                raise BackupCorrupt(
                    f"{path} holds more than {MAX_SEGMENT_BYTES >> 20} MiB of plain data: not a WAL segment",
                    hint="move it out of the --wal directory",
                )
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def sha256_plain(path: Path) -> str:
    h = hashlib.sha256()
    with open_plain(path) as f:
        while chunk := f.read(_COPY_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def stored_sha256(path: Path) -> str:
    """sha256 of the bytes as stored (the compressed file), from the last full read if any."""
    for stg in _all():
        known = stg.stored_digests.get(_key(path))
        if known is not None:
            return known
    h = hashlib.sha256()
    try:
        with open(local(path), "rb") as f:
            while chunk := f.read(_COPY_CHUNK):
                h.update(chunk)
    except OSError as exc:
        raise from_os_error(exc, path) from exc
    return h.hexdigest()


def plain_size(path: Path) -> int:
    staged = _lookup_materialized(path)
    try:
        if staged is not None:
            return staged.stat().st_size
        if codec_of(path) == "none":
            return local(path).stat().st_size
    except OSError as exc:
        raise from_os_error(exc, path) from exc
    n = 0
    with open_plain(path) as f:
        while chunk := f.read(_COPY_CHUNK):
            n += len(chunk)
    return n


def exists(path: Path) -> bool:
    """True if the input exists (a real file, or a member of an expanded archive)."""
    k = _key(path)
    return any(k in stg.members for stg in _all()) or os.path.isfile(path)


def read_small(path: Path, limit: int = 1 << 20) -> bytes | None:
    """The bytes of a small input (a sidecar), or None if it does not exist."""
    try:
        with open(local(path), "rb") as f:
            data = f.read(limit + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise from_os_error(exc, path) from exc
    if len(data) > limit:
        raise BackupCorrupt(f"{path} is larger than {limit} bytes: not a checksum file")
    return data


# --- staging ---


def _key(path: Path) -> str:
    return os.path.abspath(path)


class Staging:
    """A private temporary directory holding decompressed snapshots and archive members."""

    def __init__(self, parent: Path | None = None) -> None:
        self.parent = parent
        self._root: Path | None = None
        self._n = 0
        #: origin → staged plain copy (snapshots).
        self.materialized: dict[str, Path] = {}
        #: virtual member path → extracted file (archive members, stored as in the archive).
        self.members: dict[str, Path] = {}
        #: origin → sha256 of its stored (compressed) bytes, learnt while decompressing.
        self.stored_digests: dict[str, str] = {}
        #: archive origin → its member origins (segments and sidecars), once expanded.
        self.archives: dict[str, list[Path]] = {}

    def _new_file(self, name: str) -> Path:
        if self._root is None:
            try:
                self._root = Path(tempfile.mkdtemp(prefix="unisondb-inputs-", dir=self.parent))
            except OSError as exc:
                raise from_os_error(exc, self.parent or tempfile.gettempdir()) from exc
        self._n += 1
        return self._root / f"{self._n:06d}-{name}"

    def materialize(self, origin: Path) -> Path:
        """Decompress ``origin`` into staging (once); the staged plain copy's path."""
        k = _key(origin)
        known = _lookup_materialized(origin)  # an enclosing block may have it already
        if known is not None:
            return known
        codec = codec_of(origin)
        if codec == "none":
            return local(origin)
        dest = self._new_file(classify_name(origin.name).plain_name or "input")
        try:
            with _decoded(local(origin), codec, origin) as dec, open(dest, "xb") as out:
                while chunk := dec.read(_COPY_CHUNK):
                    out.write(chunk)
                self.stored_digests[k] = dec.stored_sha256
        except OSError as exc:
            _unlink(dest)
            raise from_os_error(exc, dest) from exc
        except BaseException:
            _unlink(dest)
            raise
        self.materialized[k] = dest
        return dest

    def release(self, origin: Path) -> None:
        """Delete a staged copy that is no longer needed (``backup list`` one at a time)."""
        dest = self.materialized.pop(_key(origin), None)
        if dest is not None:
            _unlink(dest)

    def expand_archive(self, origin: Path) -> list[Path]:
        """Extract the segment and sidecar members of a tar archive; their origins."""
        k = _key(origin)
        for stg in _all():
            if k in stg.archives:
                return stg.archives[k]
        codec = codec_of(origin)
        found: list[Path] = []
        created: list[Path] = []
        try:
            with _archive_stream(origin, codec) as stream:
                try:
                    self._extract(origin, stream, found, created)
                except (tarfile.TarError, EOFError) as exc:
                    raise BackupCorrupt(
                        f"{origin}: the tar archive is truncated or corrupt ({exc})",
                        hint=f"`tar -tf {origin}` shows it too; fetch another copy",
                    ) from None
                # Read what tar left (its end-of-archive blocks): the digest covers every byte.
                while stream.read(_COPY_CHUNK):
                    pass
            self._check_archive_sidecar(origin)
        except BaseException:
            for p in created:
                _unlink(p)
            for v in found:
                self.members.pop(_key(v), None)
            raise
        self.archives[k] = found
        return found

    def _extract(self, origin: Path, stream: BinaryIO, found: list[Path], created: list[Path]) -> None:
        tar = tarfile.open(fileobj=stream, mode="r|")
        for member in tar:
            c = classify_name(member.name.rsplit("/", 1)[-1])
            if c.kind not in (Kind.SEGMENT, Kind.SIDECAR) or not member.isfile():
                continue  # snapshots, directories, links, devices: not WAL inputs
            # The member name is only ever a key (the virtual path), never a file we create.
            virtual = origin / os.path.normpath(member.name.lstrip("/"))
            src = tar.extractfile(member)
            assert src is not None
            dest = self._new_file(member.name.rsplit("/", 1)[-1])
            created.append(dest)
            with open(dest, "xb") as out:
                while chunk := src.read(_COPY_CHUNK):
                    out.write(chunk)
                if out.tell() != member.size:
                    raise tarfile.ReadError(f"member {member.name} is cut short")
            self.members[_key(virtual)] = dest
            found.append(virtual)
        tar.close()

    def _check_archive_sidecar(self, origin: Path) -> None:
        digest = self.stored_digests.get(_key(origin))
        if digest is None:
            return
        from unisondb.restore.inventory import check_sidecar  # the one sidecar rule

        res = check_sidecar(origin, digest, stored=digest)
        if res.status == "mismatch":
            raise BackupCorrupt(
                f"checksum mismatch: {origin} has sha256 {digest} but {res.sidecar} expects {res.expected}",
                hint="the archive changed after it was written; fetch another copy",
            )

    def close(self) -> None:
        if self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)
            self._root = None
        self.materialized.clear()
        self.members.clear()
        self.stored_digests.clear()
        self.archives.clear()


@contextmanager
def _archive_stream(origin: Path, codec: str) -> Iterator[BinaryIO]:
    """The archive's tar bytes, hashing the stored bytes as they are read."""
    if codec == "none":
        hashing = _HashingReader(local(origin), origin)
        try:
            yield hashing  # type: ignore[misc]
        finally:
            hashing.close()
        if hashing.complete:
            current().stored_digests[_key(origin)] = hashing.hexdigest()
        return
    with _decoded(local(origin), codec, origin) as dec:
        reader = io.BufferedReader(dec, _COPY_CHUNK)
        yield reader
        if dec._done:
            current().stored_digests[_key(origin)] = dec.stored_sha256


class _HashingReader(io.RawIOBase):
    def __init__(self, path: Path, origin: Path) -> None:
        super().__init__()
        try:
            self._f = open(path, "rb")
        except OSError as exc:
            raise from_os_error(exc, origin) from exc
        self._h = hashlib.sha256()
        self.complete = False

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        n = self._f.readinto(b)
        if not n:
            self.complete = True
            return 0
        self._h.update(b[:n])
        return n

    def hexdigest(self) -> str:
        return self._h.hexdigest()

    def close(self) -> None:
        self._f.close()
        super().close()


def _unlink(p: Path) -> None:
    try:
        p.unlink()
    except FileNotFoundError:
        pass


_active: list[Staging] = []
_default: Staging | None = None


def current() -> Staging:
    """The innermost ``staging()`` block's staging; outside any block, a process-wide one
    removed at exit (library callers that never opened a block still work)."""
    global _default
    if _active:
        return _active[-1]
    if _default is None:
        _default = Staging()
        atexit.register(_default.close)
    return _default


@contextmanager
def staging(parent: Path | None = None) -> Iterator[Staging]:
    """Stage compressed inputs under ``parent`` (default: the temp dir) for this block."""
    stg = Staging(parent)
    _active.append(stg)
    try:
        yield stg
    finally:
        _active.remove(stg)
        stg.close()


def _all() -> list[Staging]:
    """Every live staging, innermost first (a nested block sees what outer ones staged)."""
    return [*reversed(_active), *([_default] if _default else [])]


def local(path: Path) -> Path:
    """A real file holding the input's stored bytes: itself, or an extracted archive member."""
    k = _key(path)
    for stg in _all():
        if k in stg.members:
            return stg.members[k]
    return path


def _lookup_materialized(path: Path) -> Path | None:
    k = _key(path)
    for stg in _all():
        if k in stg.materialized:
            return stg.materialized[k]
    return None


def materialize(origin: Path) -> Path:
    """A plain local file with the input's content (decompressed into staging if needed)."""
    return current().materialize(origin)


# --- discovery ---


@dataclass(slots=True)
class Found:
    """What a walk over backup directories turned up."""

    segments: list[Path]
    #: (origin, reason): inputs that look like segments but cannot be read.
    unreadable: list[tuple[Path, str]]


def find_segments(root: Path, *, recursive: bool = True) -> Found:
    """Every segment input under ``root`` (a directory, an archive or one segment file):
    plain, gzip, zstd and archive members, sorted by origin path."""
    if not root.exists():
        raise NotFound(f"WAL directory not found: {root}")
    found = Found([], [])
    if root.is_file():
        _add_file(root, found, explicit=True)
    elif not root.is_dir():
        raise NotFound(
            f"not a directory: {root}",
            hint="--wal takes a directory of NNNNNNNNN.wal[.gz|.zst] files or wal-*.tar.gz archives",
        )
    elif recursive:
        for dirpath, dirnames, files in os.walk(root):
            dirnames.sort()
            for name in sorted(files):
                _add_file(Path(dirpath) / name, found)
    else:
        for p in sorted(root.iterdir()):
            if p.is_file():
                _add_file(p, found)
    found.segments.sort()
    return found


def _add_file(p: Path, found: Found, *, explicit: bool = False) -> None:
    c = classify_name(p.name)
    if p.name.endswith(".tmp"):
        return  # a copy in progress (the server's and contrib's temporary names)
    if c.kind is Kind.SEGMENT:
        found.segments.append(p)
    elif c.kind is Kind.ARCHIVE:
        try:
            found.segments += [
                m for m in current().expand_archive(p) if classify_name(m.name).kind is Kind.SEGMENT
            ]
        except UnisonDBError as exc:
            found.unreadable.append((p, str(exc)))
    elif c.kind is Kind.ENCRYPTED and (
        explicit or classify_name(c.plain_name).kind in (Kind.SEGMENT, Kind.ARCHIVE)
    ):
        found.unreadable.append((p, str(encrypted_error(p))))
    elif explicit:
        raise InvalidRequest(
            f"{p} is not a WAL segment or archive (by its name)",
            hint="segments are named NNNNNNNNN.wal (optionally .gz or .zst); archives *.tar.gz",
        )
