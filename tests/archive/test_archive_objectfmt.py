"""Archive object format: round trips, and every kind of damage fails with a clear error."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import pytest

from unisondb.archive import objectfmt
from unisondb.archive.objectfmt import (
    CHUNK_SIZE,
    HEADER_SIZE,
    TRAILER_SIZE,
    ArchiveKey,
    Identity,
    Kind,
    decode,
    encode,
    encode_file,
    load_key,
    new_header,
    parse_header,
)
from unisondb.errors import CorruptArchive, InvalidRequest

HISTORY = bytes(range(16))
FINGERPRINT = bytes(range(100, 132))
KEY = ArchiveKey.from_bytes(b"k" * 32)


def _content(size: int) -> bytes:
    # Half random (incompressible), half repetitive, so both zstd paths and several chunks are used.
    return (os.urandom(size // 2) + b"unisondb " * (size // 18 + 1))[:size]


def _encode(content: bytes, key: ArchiveKey | None) -> bytes:
    ident = Identity(Kind.SEGMENT, "users", HISTORY, 10, 99, FINGERPRINT)
    header = new_header(ident, len(content), hashlib.sha256(content).digest(), key)
    out = io.BytesIO()
    assert encode(io.BytesIO(content), out, header, key) == len(out.getvalue())
    return out.getvalue()


def _decode(blob: bytes, key: ArchiveKey | None) -> bytes:
    out = io.BytesIO()
    decode(io.BytesIO(blob), out, key, "s3://b/p/obj")
    return out.getvalue()


@pytest.mark.parametrize("key", [None, KEY], ids=["plain", "encrypted"])
@pytest.mark.parametrize("size", [0, 1, CHUNK_SIZE - 1, 3 * CHUNK_SIZE, 1_500_000])
def test_round_trip(key: ArchiveKey | None, size: int) -> None:
    content = _content(size)
    blob = _encode(content, key)
    assert _decode(blob, key) == content
    header = parse_header(blob, "x")
    assert (header.kind, header.namespace, header.history_id) == (Kind.SEGMENT, "users", HISTORY)
    assert (header.first_lsn, header.last_lsn, header.plain_size) == (10, 99, size)
    assert header.fingerprint == FINGERPRINT and header.encrypted == (key is not None)
    assert header.sha256 == hashlib.sha256(content).digest()


def test_exact_chunk_multiple_ends_with_an_empty_final_chunk() -> None:
    # zstd output of incompressible data is a little longer than the input, so search for a size
    # whose compressed frame is an exact multiple of the chunk size; the last chunk is then tag-only.
    import zstandard

    base = os.urandom(2 * CHUNK_SIZE)
    for cut in range(2 * CHUNK_SIZE - 64, 2 * CHUNK_SIZE):
        stream = zstandard.ZstdCompressor(level=3, write_checksum=True).compressobj()  # as encode() does
        frame = stream.compress(base[:cut]) + stream.flush()
        if len(frame) % CHUNK_SIZE == 0:
            break
    else:
        pytest.skip("no exact multiple in the searched range")
    blob = _encode(base[:cut], KEY)
    chunks = len(frame) // CHUNK_SIZE
    assert len(blob) == HEADER_SIZE + chunks * (CHUNK_SIZE + 16) + 16 + TRAILER_SIZE
    assert _decode(blob, KEY) == base[:cut]


def test_encrypted_object_does_not_contain_the_plain_content() -> None:
    content = b"secret-value-" * 5000
    blob = _encode(content, KEY)
    assert b"secret-value-" not in blob
    assert KEY.secret not in blob and KEY.key_id in blob


# Each region of an object, as (name, offset function); flipping one byte there must be caught.
REGIONS = {
    "magic": lambda n: 0,
    "kind": lambda n: 6,
    "history": lambda n: 8,
    "lsn": lambda n: 30,
    "sha256": lambda n: 50,
    "fingerprint": lambda n: 90,
    "key_id": lambda n: 113,
    "namespace": lambda n: 134,
    "header_crc": lambda n: 205,
    "body_start": lambda n: HEADER_SIZE + 3,
    "body_middle": lambda n: (HEADER_SIZE + n - TRAILER_SIZE) // 2,
    "body_end": lambda n: n - TRAILER_SIZE - 1,
    "trailer_size": lambda n: n - TRAILER_SIZE,
    "trailer_crc": lambda n: n - 8,
    "trailer_magic": lambda n: n - 1,
}


@pytest.mark.parametrize("key", [None, KEY], ids=["plain", "encrypted"])
@pytest.mark.parametrize("region", sorted(REGIONS))
def test_tampering_any_region_is_detected(key: ArchiveKey | None, region: str) -> None:
    blob = bytearray(_encode(_content(300_000), key))
    blob[REGIONS[region](len(blob))] ^= 0x01
    with pytest.raises((CorruptArchive, InvalidRequest)) as info:
        _decode(bytes(blob), key)
    message = str(info.value)
    assert "s3://b/p/obj" in message
    if region == "key_id" and key is not None:
        # A consistent-looking header CRC is not what caught this: the CRC covers the key id too.
        assert "header checksum" in message


def test_header_tamper_with_recomputed_crc_fails_authentication() -> None:
    """An attacker who fixes the header CRC still cannot change a header field of an encrypted object."""
    blob = bytearray(_encode(_content(200_000), KEY))
    header = parse_header(bytes(blob), "x")
    forged = objectfmt.ObjectHeader(**{**header.__dict__, "last_lsn": header.last_lsn + 1000})
    blob[:HEADER_SIZE] = forged.pack()
    with pytest.raises(CorruptArchive, match="fails authentication"):
        _decode(bytes(blob), KEY)


def test_swapped_chunks_fail_authentication() -> None:
    blob = bytearray(_encode(os.urandom(3 * CHUNK_SIZE), KEY))
    full = CHUNK_SIZE + 16
    a = HEADER_SIZE
    first, second = bytes(blob[a : a + full]), bytes(blob[a + full : a + 2 * full])
    blob[a : a + full], blob[a + full : a + 2 * full] = second, first
    # The trailer CRC is order-dependent too; fix it so only the AEAD can object.
    import struct

    import crc32c

    body = bytes(blob[HEADER_SIZE:-TRAILER_SIZE])
    blob[-TRAILER_SIZE:] = struct.pack("<QI4s", len(body), crc32c.crc32c(body), b"UDBE")
    with pytest.raises(CorruptArchive, match="chunk 0 fails authentication"):
        _decode(bytes(blob), KEY)


def test_dropping_the_final_chunk_is_detected() -> None:
    blob = _encode(os.urandom(3 * CHUNK_SIZE), KEY)
    full = CHUNK_SIZE + 16
    body = blob[HEADER_SIZE:-TRAILER_SIZE]
    kept = body[: (len(body) // full) * full]  # whole non-final chunks only
    import struct

    import crc32c

    forged = blob[:HEADER_SIZE] + kept + struct.pack("<QI4s", len(kept), crc32c.crc32c(kept), b"UDBE")
    with pytest.raises(CorruptArchive, match="truncated|authentication"):
        _decode(forged, KEY)


@pytest.mark.parametrize("key", [None, KEY], ids=["plain", "encrypted"])
@pytest.mark.parametrize("cut", [1, 3, TRAILER_SIZE, TRAILER_SIZE + 5, CHUNK_SIZE, "half", "header"])
def test_truncation_is_detected(key: ArchiveKey | None, cut: int | str) -> None:
    blob = _encode(_content(300_000), key)
    if cut == "half":
        short = blob[: len(blob) // 2]
    elif cut == "header":
        short = blob[: HEADER_SIZE - 1]
    else:
        assert isinstance(cut, int)
        short = blob[:-cut]
    with pytest.raises(CorruptArchive, match="truncated|damaged|states|authentication|checksum"):
        _decode(short, key)


@pytest.mark.parametrize("key", [None, KEY], ids=["plain", "encrypted"])
def test_appended_bytes_are_detected(key: ArchiveKey | None) -> None:
    blob = _encode(_content(100_000), key)
    for extra in (b"\x00", b"\x28\xb5", os.urandom(40)):
        with pytest.raises(CorruptArchive):
            _decode(blob + extra, key)


def test_wrong_key_is_refused_before_decrypting() -> None:
    blob = _encode(_content(50_000), KEY)
    other = ArchiveKey.from_bytes(b"o" * 32)
    with pytest.raises(InvalidRequest, match=f"key id {KEY.key_id.hex()}.*id {other.key_id.hex()}"):
        _decode(blob, other)
    with pytest.raises(InvalidRequest, match="is encrypted.*--archive-key-file"):
        _decode(blob, None)


def test_wrong_key_with_the_same_id_fails_authentication() -> None:
    """Key ids are 64 bits; if two keys ever collide, the tags still refuse the wrong one."""
    blob = _encode(_content(50_000), KEY)
    impostor = ArchiveKey(b"o" * 32, KEY.key_id)
    with pytest.raises(CorruptArchive, match="fails authentication"):
        _decode(blob, impostor)


def test_content_that_changes_while_encoding_is_refused() -> None:
    content = _content(10_000)
    header = new_header(
        Identity(Kind.SEGMENT, "users", HISTORY, 1, 2), len(content), hashlib.sha256(b"other").digest()
    )
    with pytest.raises(InvalidRequest, match="changed while it was archived"):
        encode(io.BytesIO(content), io.BytesIO(), header, None)


def test_encode_file_streams_a_file(tmp_path: Path) -> None:
    src = tmp_path / "000000001.wal"
    src.write_bytes(_content(2_000_000))
    out = io.BytesIO()
    header = encode_file(src, out, Identity(Kind.SEGMENT, "default", HISTORY, 1, 500), KEY)
    assert header.plain_size == 2_000_000
    assert _decode(out.getvalue(), KEY) == src.read_bytes()


def test_load_key(tmp_path: Path) -> None:
    good = tmp_path / "key"
    made = objectfmt.generate_key_file(good)
    assert load_key(good) == made and "secret" not in repr(made) and made.secret.hex() not in repr(made)
    raw = tmp_path / "raw"
    raw.write_bytes(b"r" * 32)
    raw.chmod(0o600)
    assert load_key(raw).secret == b"r" * 32
    short = tmp_path / "short"
    short.write_text("abcd\n")
    short.chmod(0o600)
    with pytest.raises(InvalidRequest, match=r"short holds 5 bytes.*openssl rand -hex 32"):
        load_key(short)
    good.chmod(0o644)
    with pytest.raises(InvalidRequest, match="readable by group or others.*chmod 600"):
        load_key(good)
    with pytest.raises(Exception, match="missing"):
        load_key(tmp_path / "missing")


@pytest.mark.parametrize("key", [None, KEY], ids=["plain", "encrypted"])
def test_decode_memory_is_bounded(key: ArchiveKey | None) -> None:
    """A 64 MiB object decodes with Python buffers of a few MiB (tracemalloc sees our buffers)."""
    import tracemalloc

    class Sink(io.RawIOBase):
        def write(self, b: object) -> int:
            return len(b)  # type: ignore[arg-type]

    size = 64 << 20
    content = bytes(size)
    blob = _encode(content, key)
    tracemalloc.start()
    try:
        decode(io.BytesIO(blob), Sink(), key, "x")  # type: ignore[arg-type]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, peak
