"""The self-verifying snapshot trailer (``unisondb/storage/snapfile.py``), on real LMDB files."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
from pathlib import Path

import lmdb
import lmdb.verify as lmdb_verify
import pytest

from unisondb.errors import CorruptSnapshot
from unisondb.storage import snapfile
from unisondb.storage.btree import CHECKPOINT_KEY, BTree, Checkpoint

CP = Checkpoint(applied_lsn=42, segment_id=3, offset=4096, timeline=1, time_ns=7)


def lmdb_copy(tmp_path: Path, keys: int = 200, value_size: int = 300) -> tuple[Path, dict[bytes, bytes]]:
    """A compacted LMDB copy (what a snapshot's data part is) of a small real environment."""
    env = lmdb.open(str(tmp_path / "env"), map_size=1 << 26, max_dbs=4)
    kv, meta = env.open_db(b"kv"), env.open_db(b"meta")
    rng = random.Random(1)
    data = {b"k%04d" % i: rng.randbytes(value_size) for i in range(keys)}
    with env.begin(write=True) as txn:
        for k, v in data.items():
            txn.put(k, v, db=kv)
        txn.put(CHECKPOINT_KEY, CP.encode(), db=meta)
    out = tmp_path / "copy.mdb"
    with open(out, "wb") as f:
        env.copyfd(f.fileno(), compact=True)
    env.close()
    return out, data


def make_snapshot(tmp_path: Path, **kw: int) -> tuple[Path, dict[bytes, bytes]]:
    path, data = lmdb_copy(tmp_path, **kw)
    raw = path.read_bytes()
    snap = tmp_path / "s.db"
    snap.write_bytes(
        raw
        + snapfile.encode_trailer(
            len(raw), hashlib.sha256(raw).digest(), "users", CP.encode(), created_ns=123
        )
    )
    return snap, data


def read_all(path: Path) -> dict[bytes, bytes]:
    env = lmdb.open(str(path), subdir=False, readonly=True, lock=False, max_dbs=4)
    try:
        kv = env.open_db(b"kv", create=False)
        with env.begin() as txn:
            return dict(txn.cursor(db=kv).iternext())
    finally:
        env.close()


def test_trailer_round_trip_and_layout(tmp_path: Path) -> None:
    snap, _ = make_snapshot(tmp_path)
    t = snapfile.read_trailer(snap)
    assert t is not None
    size = snap.stat().st_size
    assert (t.data_len, t.namespace, t.created_ns, t.version, t.flags) == (size - 4096, "users", 123, 1, 0)
    assert t.decode_checkpoint() == CP
    raw = snap.read_bytes()
    assert t.data_sha256 == hashlib.sha256(raw[: t.data_len]).digest()
    tail = raw[t.data_len :]
    assert tail[:8] == b"UDBSNAP\x01" and len(tail) == snapfile.TRAILER_SIZE
    assert tail[64:66] == b"\x05\x00" and tail[66:71] == b"users"
    assert tail[644:4092] == bytes(4092 - 644)
    got, whole = snapfile.verify_and_digest(snap)
    assert got == t and whole == hashlib.sha256(raw).hexdigest()


def test_lmdb_reads_a_file_with_the_trailer(tmp_path: Path) -> None:
    """The premise of the format: LMDB ignores the bytes after its last page."""
    snap, data = make_snapshot(tmp_path, keys=3000, value_size=700)
    assert read_all(snap) == data
    assert lmdb_verify.verify(str(snap), subdir=False) == []  # type: ignore[no-untyped-call]


def test_plain_lmdb_file_has_no_trailer(tmp_path: Path) -> None:
    plain, _ = lmdb_copy(tmp_path)
    assert snapfile.read_trailer(plain) is None
    assert snapfile.check(plain) is None
    (tmp_path / "tiny").write_bytes(b"x" * 100)
    assert snapfile.read_trailer(tmp_path / "tiny") is None
    with pytest.raises(CorruptSnapshot, match="no snapshot trailer"):
        snapfile.verify(plain)


def test_every_single_byte_change_is_detected(tmp_path: Path) -> None:
    """Flip bytes in every page (a sample per page) and every trailer byte: all caught."""
    snap, _ = make_snapshot(tmp_path)
    original = snap.read_bytes()
    data_len = len(original) - 4096
    pages = data_len // 4096
    assert pages >= 5
    rng = random.Random(7)
    offsets = [
        p * 4096 + o for p in range(pages) for o in {0, 1, 16, 17, 2048, 4095, *rng.sample(range(4096), 12)}
    ]
    offsets += range(data_len, len(original))  # every trailer byte
    missed = []
    with open(snap, "r+b") as f:
        for off in offsets:
            for mask in (0x01, 0xFF):
                f.seek(off)
                f.write(bytes([original[off] ^ mask]))
                f.flush()
                try:
                    snapfile.verify(snap)
                except CorruptSnapshot:
                    pass
                else:
                    missed.append((off, mask))
                f.seek(off)
                f.write(original[off : off + 1])
                f.flush()
    assert missed == []
    snapfile.verify(snap)  # restored: intact again (the loop really flipped and restored)


def test_corruption_message_names_file_digests_and_what_to_do(tmp_path: Path) -> None:
    snap, _ = make_snapshot(tmp_path)
    t = snapfile.read_trailer(snap)
    assert t is not None
    with open(snap, "r+b") as f:
        f.seek(t.data_len // 2)
        b = f.read(1)
        f.seek(t.data_len // 2)
        f.write(bytes([b[0] ^ 0x40]))
    with pytest.raises(CorruptSnapshot) as err:
        snapfile.verify(snap)
    msg = str(err.value)
    actual = hashlib.sha256(snap.read_bytes()[: t.data_len]).hexdigest()
    assert str(snap) in msg and t.data_sha256_hex in msg and actual in msg
    assert "use another copy" in msg
    assert err.value.exit_code == 6 and "\n" not in msg


def test_bytes_inserted_before_the_trailer_are_caught(tmp_path: Path) -> None:
    """A length change with the trailer still last (a bad splice or copy) is refused."""
    snap, _ = make_snapshot(tmp_path)
    raw = snap.read_bytes()
    spliced = tmp_path / "spliced.db"
    spliced.write_bytes(raw[:4096] + raw)
    with pytest.raises(CorruptSnapshot, match="truncated or appended"):
        snapfile.read_trailer(spliced)


def test_strip_and_install_check(tmp_path: Path) -> None:
    snap, data = make_snapshot(tmp_path)
    db = tmp_path / "ns" / "db"
    db.mkdir(parents=True)
    shutil.copy(snap, db / "data.mdb")
    inst = snapfile.install_check(db)
    assert inst is not None and inst.trailer.namespace == "users"
    assert (db / "data.mdb").stat().st_size == inst.trailer.data_len
    assert snapfile.read_trailer(db / "data.mdb") is None
    assert snapfile.install_check(db) is None  # a plain data.mdb: one 4 KiB read, nothing else
    bt = BTree(db)
    try:
        assert dict(bt.items()) == data and bt.read_checkpoint() == CP
    finally:
        bt.close()
    assert snapfile.install_check(tmp_path / "missing") is None


def test_install_check_refuses_a_damaged_snapshot_and_leaves_it(tmp_path: Path) -> None:
    snap, _ = make_snapshot(tmp_path)
    db = tmp_path / "ns" / "db"
    db.mkdir(parents=True)
    raw = bytearray(snap.read_bytes())
    raw[8192 + 100] ^= 0x04
    (db / "data.mdb").write_bytes(raw)
    with pytest.raises(CorruptSnapshot) as err:
        BTree(db)
    assert str(db / "data.mdb") in str(err.value)
    assert "copy another snapshot" in str(err.value)
    assert (db / "data.mdb").read_bytes() == raw  # not stripped, not opened: evidence kept
    assert not (db / "lock.mdb").exists()


def test_encode_refuses_oversized_fields() -> None:
    with pytest.raises(ValueError):
        snapfile.encode_trailer(0, bytes(32), "n" * 65, b"")
    with pytest.raises(ValueError):
        snapfile.encode_trailer(0, bytes(32), "n", bytes(513))
    assert len(snapfile.encode_trailer(0, bytes(32), "n" * 64, bytes(512))) == 4096


def test_user_value_that_looks_like_a_damaged_trailer_never_blocks_a_live_file(tmp_path: Path) -> None:
    """The last page of a live data.mdb can be raw bytes of a large value: never a trailer."""
    db = tmp_path / "db"
    env = lmdb.open(str(db), map_size=1 << 26, max_dbs=4)
    kv = env.open_db(b"kv")
    fake = b"UDBSNAP\x01" + b"\xaa" * 4088  # the magic, but no valid CRC
    value = bytearray(random.Random(3).randbytes(3 * 4096 - 16))
    value[4096 - 16 : 2 * 4096 - 16] = fake  # lands at the start of overflow pages 2 and 3
    value[2 * 4096 - 16 :] = fake[: len(value) - (2 * 4096 - 16)]
    live = db / "data.mdb"
    for i in range(20):  # until the allocator puts an overflow page last
        with env.begin(write=True) as txn:
            txn.put(b"big-%d" % i, bytes(value), db=kv)
        with open(live, "rb") as f:
            f.seek(-4096, os.SEEK_END)
            if f.read(8) == fake[:8]:
                break
    else:
        pytest.fail("no overflow page ended the file; the test needs another layout")
    env.close()
    before = live.read_bytes()
    assert snapfile.read_trailer(live) is None
    assert snapfile.install_check(db) is None
    assert live.read_bytes() == before
    bt = BTree(db)
    try:
        assert bt.get(b"big-0") == bytes(value)
    finally:
        bt.close()
