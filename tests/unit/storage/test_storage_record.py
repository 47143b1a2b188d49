"""WAL record codec (unisondb/storage/record.py)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from unisondb.storage import record
from unisondb.storage.record import Entry, EntryKind, Record, RecordError

U64 = st.integers(min_value=0, max_value=2**64 - 1)


@st.composite
def entries(draw: st.DrawFn, max_value: int = 4096, max_entries: int = 4) -> list[Entry]:
    n = draw(st.integers(min_value=1, max_value=max_entries))
    out = []
    for _ in range(n):
        key = draw(st.binary(min_size=1, max_size=record.MAX_KEY))
        if draw(st.booleans()):
            out.append(Entry(EntryKind.PUT, key, draw(st.binary(min_size=0, max_size=max_value))))
        else:
            out.append(Entry(EntryKind.DELETE, key))
    return out


SETTINGS = settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@SETTINGS
@given(lsn=U64, time_ns=U64, ents=entries())
def test_round_trip(lsn: int, time_ns: int, ents: list[Entry]) -> None:
    data = record.encode(lsn, time_ns, ents)
    assert record.encoded_size(ents) == len(data)
    rec, end = record.decode(data, 0)
    assert rec == Record(lsn, time_ns, tuple(ents))
    assert end == len(data)
    # At a non-zero offset inside a larger buffer, and through a memoryview.
    buf = b"\xaa" * 13 + data + b"\x55" * 7
    rec2, end2 = record.decode(memoryview(buf), 13)
    assert rec2 == rec
    assert end2 == 13 + len(data)


@SETTINGS
@given(lsn=U64, time_ns=U64, ents=entries(max_value=512, max_entries=3))
def test_every_strict_prefix_is_incomplete(lsn: int, time_ns: int, ents: list[Entry]) -> None:
    data = record.encode(lsn, time_ns, ents)
    for cut in range(len(data)):
        with pytest.raises(RecordError) as info:
            record.decode(data[:cut], 0)
        assert info.value.incomplete, (cut, info.value.reason)
        # The same prefix at the end of a buffer holding an earlier record.
        with pytest.raises(RecordError) as info:
            record.decode(data + data[:cut], len(data))
        assert info.value.incomplete, (cut, info.value.reason)


@SETTINGS
@given(lsn=U64, time_ns=U64, ents=entries(max_value=256, max_entries=3), data=st.data())
def test_random_single_bit_flip_is_detected(
    lsn: int, time_ns: int, ents: list[Entry], data: st.DataObject
) -> None:
    encoded = bytearray(record.encode(lsn, time_ns, ents))
    bit = data.draw(st.integers(min_value=0, max_value=len(encoded) * 8 - 1))
    encoded[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(RecordError):
        record.decode(bytes(encoded), 0)


def test_every_single_bit_flip_is_detected_exhaustively() -> None:
    ents = [
        Entry(EntryKind.PUT, b"ab", b"xyz"),
        Entry(EntryKind.DELETE, b"k"),
        Entry(EntryKind.PUT, b"empty", b""),
    ]
    data = record.encode(42, 123_456_789, ents)
    assert record.decode(data, 0)[0].entries == tuple(ents)
    undetected = []
    for i in range(len(data)):
        for b in range(8):
            flipped = bytearray(data)
            flipped[i] ^= 1 << b
            try:
                record.decode(bytes(flipped), 0)
            except RecordError:
                continue
            undetected.append((i, b))
    assert undetected == []


def test_zero_fill_is_incomplete() -> None:
    with pytest.raises(RecordError) as info:
        record.decode(b"\0" * 64, 0)
    assert info.value.incomplete


def test_length_out_of_range_is_not_incomplete() -> None:
    data = bytearray(record.encode(1, 1, [Entry(EntryKind.PUT, b"k", b"v")]))
    struct.pack_into("<I", data, 4, record.MIN_BODY - 1)
    with pytest.raises(RecordError) as info:
        record.decode(bytes(data), 0)
    assert not info.value.incomplete
    struct.pack_into("<I", data, 4, record.MAX_BODY + 1)
    with pytest.raises(RecordError) as info:
        record.decode(bytes(data), 0)
    assert not info.value.incomplete


def test_extreme_field_values() -> None:
    ents = [Entry(EntryKind.PUT, b"\xff" * record.MAX_KEY, b"\0" * 4096)]
    data = record.encode(2**64 - 1, 2**64 - 1, ents)
    rec, end = record.decode(data, 0)
    assert (rec.lsn, rec.time_ns, rec.entries, end) == (2**64 - 1, 2**64 - 1, tuple(ents), len(data))
