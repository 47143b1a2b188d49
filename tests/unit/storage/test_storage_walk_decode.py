"""The walker's inline decode (``storage/walk.py``) against the storage decoder.

The replay decodes every record inside the one walker (``Walk.records``) instead of calling
``record.decode`` per record; this checks that both give the same records for every shape
a record takes (one or many entries, puts and deletes, empty values, buffers as input), and
that a record whose entries are malformed — with a correct CRC, so only the entry checks
can catch it — is refused with ``record.decode``'s own reason.
"""

from __future__ import annotations

import struct
from pathlib import Path

import crc32c
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from unisondb.errors import CorruptLog
from unisondb.storage import record, segment
from unisondb.storage.record import Entry, EntryKind
from unisondb.storage.segment import SegmentHeader
from unisondb.storage.walk import Walk

ENTRY = st.one_of(
    st.builds(Entry, st.just(EntryKind.PUT), st.binary(min_size=1, max_size=40), st.binary(max_size=300)),
    st.builds(Entry, st.just(EntryKind.DELETE), st.binary(min_size=1, max_size=40)),
)
RECORDS = st.lists(st.lists(ENTRY, min_size=0, max_size=4), min_size=1, max_size=12)


def _unsealed(first_lsn: int, bodies: list[bytes]) -> bytes:
    return SegmentHeader(1, 1, first_lsn, 0).encode() + b"".join(bodies)


@settings(max_examples=60, deadline=None, database=None)
@given(records=RECORDS, as_view=st.booleans())
def test_inline_decode_equals_record_decode(records: list[list[Entry]], as_view: bool) -> None:
    data = _unsealed(5, [record.encode(5 + i, 100 + i, ents) for i, ents in enumerate(records)])
    header = segment.decode_header(data, Path("x.wal"))
    w = Walk(Path("x.wal"), memoryview(data) if as_view else data, header, None)
    got = list(w.records())
    assert len(got) == len(records)
    for lsn, time_ns, start, end, rec in got:
        want, want_end = record.decode(data, start)
        assert rec == want and end == want_end and (lsn, time_ns) == (want.lsn, want.time_ns)
        assert rec is not None
        assert all(type(e.key) is bytes and type(e.value) is bytes for e in rec.entries)
    # CRC-only records are not decoded, and the walk is the same otherwise.
    assert [item[:4] for item in Walk(Path("x.wal"), data, header, None).records(1, 0)] == [
        item[:4] for item in got
    ]


def _with_crc(body: bytes) -> bytes:
    length = struct.pack("<I", len(body))
    return struct.pack("<I", crc32c.crc32c(body, crc32c.crc32c(length))) + length + body


@pytest.mark.parametrize(
    ("entries", "reason"),
    [
        (struct.pack("<BHI", 3, 1, 0) + b"k", "malformed entry"),  # unknown kind
        (struct.pack("<BHI", 1, 5, 0) + b"k", "malformed entry"),  # key past the record
        (struct.pack("<BHI", 1, 1, 0) + b"kx", "trailing bytes inside record"),
        (b"\x01\x01", "entry header runs past record end"),
    ],
)
def test_malformed_entries_are_refused_with_the_decoders_reason(
    tmp_path: Path, entries: bytes, reason: str
) -> None:
    body = record.BODY_FIXED.pack(1, 1, record.OP_WRITE, 1) + entries
    data = _unsealed(1, [_with_crc(body)])
    with pytest.raises(record.RecordError, match=reason):
        record.decode(data, segment.HEADER_SIZE)
    header = segment.decode_header(data, tmp_path / "x.wal")
    w = Walk(tmp_path / "x.wal", data, header, None)
    assert list(w.records()) == []
    assert w.tail_error == f"{reason} at offset {segment.HEADER_SIZE}"
    # In a sealed segment the same record, decoded, is corrupt (a CRC-only walk does not
    # look at entries: the module docstring of walk.py).
    footer = segment.SegmentFooter(1, 1, 1, 1)
    sealed = Walk(tmp_path / "x.wal", data + footer.encode(), header, footer)
    with pytest.raises(CorruptLog, match=reason):
        list(sealed.records())


def _as_ops(records: list[list[Entry]]) -> list[tuple[bytes, bytes | None]]:
    return [(e.key, e.value if e.kind == EntryKind.PUT else None) for ents in records for e in ents]


@settings(max_examples=60, deadline=None, database=None)
@given(records=RECORDS, as_view=st.booleans(), lo=st.integers(0, 14), span=st.integers(0, 14))
def test_ops_are_the_decoded_entries_of_the_decoded_records(
    records: list[list[Entry]], as_view: bool, lo: int, span: int
) -> None:
    # The replay's decode (``ops``): the same entries as the records ``record.decode``
    # gives, for the same LSN range, flat and in order; every record still walked.
    data = _unsealed(5, [record.encode(5 + i, 100 + i, ents) for i, ents in enumerate(records)])
    header = segment.decode_header(data, Path("x.wal"))
    ops: list[tuple[bytes, bytes | None]] = []
    got = list(
        Walk(Path("x.wal"), memoryview(data) if as_view else data, header, None).records(
            lo, lo + span, ops=ops
        )
    )
    assert [item[:4] for item in got] == [
        item[:4] for item in Walk(Path("x.wal"), data, header, None).records()
    ]
    assert all(item[4] is None for item in got)
    assert ops == _as_ops([ents for i, ents in enumerate(records) if lo <= 5 + i <= lo + span])
    assert all(type(k) is bytes and (v is None or type(v) is bytes) for k, v in ops)


def test_ops_stop_at_the_first_record_after_the_time_bound() -> None:
    # A ``--target-time`` cut: the record after the bound and every one after it (even an
    # earlier time: the cut is where the time is first passed) are not appended.
    ents = [[Entry(EntryKind.PUT, b"k%d" % i, b"v")] for i in range(5)]
    times = [10, 20, 30, 25, 40]
    data = _unsealed(
        1, [record.encode(1 + i, t, e) for i, (t, e) in enumerate(zip(times, ents, strict=True))]
    )
    header = segment.decode_header(data, Path("x.wal"))
    ops: list[tuple[bytes, bytes | None]] = []
    got = list(Walk(Path("x.wal"), data, header, None).records(1, 5, ops=ops, ops_until_ns=20))
    assert len(got) == 5
    assert ops == [(b"k0", b"v"), (b"k1", b"v")]


@pytest.mark.parametrize(
    ("entries", "reason"),
    [
        (struct.pack("<BHI", 3, 1, 0) + b"k", "malformed entry"),
        (struct.pack("<BHI", 1, 5, 0) + b"k", "malformed entry"),
        (struct.pack("<BHI", 1, 1, 0) + b"kx", "trailing bytes inside record"),
        (b"\x01\x01", "entry header runs past record end"),
    ],
)
def test_ops_refuse_malformed_entries_and_append_nothing_of_them(entries: bytes, reason: str) -> None:
    good = record.encode(1, 1, [Entry(EntryKind.PUT, b"a", b"1")])
    body = record.BODY_FIXED.pack(2, 2, record.OP_WRITE, 1) + entries
    data = _unsealed(1, [good, _with_crc(body)])
    header = segment.decode_header(data, Path("x.wal"))
    w = Walk(Path("x.wal"), data, header, None)
    ops: list[tuple[bytes, bytes | None]] = []
    assert [item[0] for item in w.records(ops=ops)] == [1]
    assert ops == [(b"a", b"1")]
    assert w.tail_error == f"{reason} at offset {segment.HEADER_SIZE + len(good)}"
