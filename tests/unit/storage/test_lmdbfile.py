"""``storage/lmdbfile.py``: the pre-``lmdb.open`` check of an LMDB file, on real files.

Every file here is written by py-lmdb itself (a live environment through ``BTree`` and the
compacted snapshot ``BTree.snapshot_to`` makes), then cut, zeroed, overwritten or
replaced by what an operator's pipeline produces (gzip, zstd, tar, gpg).
"""

from __future__ import annotations

import gzip
import io
import os
import random
import shutil
import struct
import subprocess
import tarfile
from pathlib import Path

import lmdb
import lmdb.verify as lmdb_verify
import pytest

from unisondb.errors import BadBTreeFile, CorruptLog, StorageError
from unisondb.storage import lmdbfile
from unisondb.storage.btree import BTree, Checkpoint
from unisondb.storage.record import Entry, EntryKind, Record

PSIZE = 4096


def _fill(btree: BTree, n: int, value_size: int = 200, seed: int = 7) -> None:
    rng = random.Random(seed)
    for lsn in range(1, n + 1):
        entry = Entry(EntryKind.PUT, b"key-%05d" % lsn, rng.randbytes(value_size))
        btree.apply([Record(lsn, lsn, (entry,))], Checkpoint(applied_lsn=lsn, segment_id=1))


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A closed live environment's data.mdb with 300 keys (~20 pages)."""
    db = tmp_path_factory.mktemp("live") / "db"
    bt = BTree(db, map_size=1 << 24)
    _fill(bt, 300)
    bt.close()
    return db / "data.mdb"


@pytest.fixture(scope="module")
def snapshot(live: Path) -> bytes:
    bt = BTree(live.parent, map_size=1 << 24)
    try:
        buf = live.parent.parent / "snap.db"
        with open(buf, "wb") as f:
            bt.snapshot_to(f)
    finally:
        bt.close()
    return buf.read_bytes()


def _env_facts(path: Path) -> tuple[int, int, int, int, int]:
    env = lmdb.open(str(path), subdir=False, readonly=True, lock=False, max_dbs=4)
    try:
        info, psize = env.info(), env.stat()["psize"]
        with env.begin() as txn:
            kv = env.open_db(b"kv", txn=txn, create=False)
            entries = txn.stat(kv)["entries"]
        return psize, info["last_pgno"], info["last_txnid"], info["map_size"], entries
    finally:
        env.close()


def _write(tmp_path: Path, data: bytes, name: str = "snap.db") -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


# --- what the meta page says, against what LMDB itself reports ---


def test_live_file_matches_what_lmdb_reports(live: Path) -> None:
    info = lmdbfile.check_file(live, "btree")
    psize, last_pgno, txnid, _map_size, entries = _env_facts(live)
    assert (info.page_size, info.last_page, info.txnid) == (psize, last_pgno, txnid)
    assert info.page_size == PSIZE and info.entries == entries == 300
    assert info.subdb_entries["meta"] == 1  # the checkpoint
    assert info.file_size >= info.btree_bytes and info.free_tail_pages == 0
    # the current meta is the one LMDB picks: the higher txnid, in slot txnid % 2
    assert info.meta_page == info.txnid % 2


def test_compact_snapshot_is_exactly_its_pages(tmp_path: Path, snapshot: bytes) -> None:
    p = _write(tmp_path, snapshot)
    info = lmdbfile.check_file(p)
    psize, last_pgno, txnid, _opener_map_size, entries = _env_facts(p)
    assert (info.page_size, info.last_page, info.txnid) == (psize, last_pgno, txnid)
    assert info.map_size == 1 << 24  # mm_mapsize: the writer's map, not the reader's
    assert info.entries == entries == 300
    assert info.file_size == info.btree_bytes == (last_pgno + 1) * PSIZE


def test_documented_offsets(tmp_path: Path, snapshot: bytes) -> None:
    """The byte layout in the module docstring, checked field by field on a real file."""
    info = lmdbfile.check_file(_write(tmp_path, snapshot))
    page = snapshot[info.meta_page * PSIZE :][: lmdbfile.META_PAGE_BYTES]
    assert struct.unpack_from("<Q", page, 0)[0] == info.meta_page  # mp_pgno
    assert struct.unpack_from("<H", page, 10)[0] & lmdbfile.P_META  # mp_flags
    assert struct.unpack_from("<II", page, 16) == (lmdbfile.MAGIC, lmdbfile.DATA_VERSION)
    assert struct.unpack_from("<Q", page, 32)[0] == info.map_size  # mm_mapsize
    assert struct.unpack_from("<I", page, 40)[0] == PSIZE  # free DB md_pad = page size
    assert struct.unpack_from("<Q", page, 88 + 32)[0] == 2  # main DB md_entries: kv, meta
    assert struct.unpack_from("<QQ", page, 136) == (info.last_page, info.txnid)


def test_a_trailer_after_the_pages_is_accepted(tmp_path: Path, snapshot: bytes) -> None:
    # The self-verifying snapshot trailer is appended after the LMDB bytes.
    p = _write(tmp_path, snapshot + random.Random(3).randbytes(4096))
    info = lmdbfile.check_file(p)
    assert info.file_size == info.btree_bytes + 4096
    _env_facts(p)  # and LMDB agrees the file opens


# --- cut short ---


def _cuts(size: int) -> list[int]:
    return [0, 1, 4095, 4096, 8191, 8192, size // 2, size - 1]


@pytest.mark.parametrize("role", ["snapshot", "btree"])
def test_every_truncation_is_refused_with_file_and_advice(
    tmp_path: Path, snapshot: bytes, role: lmdbfile.Role
) -> None:
    for n in _cuts(len(snapshot)):
        p = _write(tmp_path, snapshot[:n], f"cut{n}.db")
        with pytest.raises(BadBTreeFile) as exc:
            lmdbfile.check_file(p, role)
        msg = str(exc.value)
        assert str(p) in msg and "(hint: " in msg and "\n" not in msg, msg
        expected = "empty" if n == 0 else "cut short" if n < PSIZE + 152 else "truncated"
        assert expected in msg, (n, msg)
        if n >= PSIZE + 152:
            assert f"spans {len(snapshot)} bytes" in msg, msg
        assert ("unisondb restore" in msg) == (role == "btree"), msg
        assert isinstance(exc.value, CorruptLog) and exc.value.exit_code == 6
        assert exc.value.http_status == 500 and exc.value.path == p


def test_check_if_present(tmp_path: Path, snapshot: bytes) -> None:
    assert lmdbfile.check_if_present(tmp_path / "data.mdb") is None
    with pytest.raises(BadBTreeFile, match="is empty"):
        lmdbfile.check_if_present(_write(tmp_path, b"", "data.mdb"))


def test_short_by_free_pages_only_is_a_valid_live_file(tmp_path: Path) -> None:
    """LMDB counts pages it never wrote (allocated and freed in one txn) in mm_last_pg.

    A seeded put/delete load reaches that state; the file is then shorter than the meta
    page claims, LMDB reads every key of it fine, and the check must accept it (else the
    server would refuse its own data after a restart).
    """
    rng = random.Random(1)  # reaches the state after 182 commits
    # sync=False: what matters is the file's bytes, which pwrite puts there either way
    env = lmdb.open(str(tmp_path / "env"), map_size=1 << 28, max_dbs=4, sync=False)
    kv = env.open_db(b"kv")
    data = tmp_path / "env" / "data.mdb"
    short: Path | None = None
    for _txn in range(3000):
        with env.begin(write=True) as txn:
            for _ in range(rng.randrange(1, 60)):
                k = b"key-%05d" % rng.randrange(3000)
                if rng.random() < 0.5:
                    txn.put(k, rng.randbytes(rng.choice([16, 100, 1000, 3000, 9000])), db=kv)
                else:
                    txn.delete(k, db=kv)
        if data.stat().st_size < (env.info()["last_pgno"] + 1) * env.stat()["psize"]:
            short = tmp_path / "short.mdb"
            shutil.copyfile(data, short)
            break
    env.close()
    assert short is not None, "the seeded load no longer leaves loose pages at the end"
    info = lmdbfile.check_file(short, "btree")
    assert info.free_tail_pages > 0 and info.file_size < info.btree_bytes
    psize, last_pgno, _txnid, _m, entries = _env_facts(short)
    assert info.last_page == last_pgno and info.entries == entries
    # ... but a cut that loses pages the tree uses is refused
    cut = short.read_bytes()[: (info.file_size // psize * 3 // 4) * psize]
    with pytest.raises(BadBTreeFile, match="B-tree is past the end of the file"):
        lmdbfile.check_file(_write(tmp_path, cut))


def test_short_file_walk_accepts_what_lmdb_verify_rejects(tmp_path: Path) -> None:
    """A big value overwritten by a small one in one transaction keeps its overflow run.

    LMDB reads such a file fine, but ``lmdb.verify`` reports the run (and a "leak");
    the engine's group commit does exactly this when two batches write one key. The
    short-file walk must accept it (the property test found this on a live data.mdb).
    """
    rng = random.Random(7)  # reaches a short file after 112 commits
    env = lmdb.open(str(tmp_path / "env"), map_size=1 << 28, max_dbs=4, sync=False)
    kv = env.open_db(b"kv")
    data = tmp_path / "env" / "data.mdb"
    short = tmp_path / "short.mdb"
    for _txn in range(2000):
        with env.begin(write=True) as txn:
            for _ in range(rng.randrange(1, 60)):
                k = b"key-%05d" % rng.randrange(3000)
                r = rng.random()
                if r < 0.1:
                    txn.put(k, rng.randbytes(9000), db=kv)
                    txn.put(k, rng.randbytes(85), db=kv)
                elif r < 0.5:
                    txn.put(k, rng.randbytes(rng.choice([16, 100, 1000, 3000, 9000])), db=kv)
                else:
                    txn.delete(k, db=kv)
        if data.stat().st_size < (env.info()["last_pgno"] + 1) * env.stat()["psize"]:
            shutil.copyfile(data, short)
            break
    env.close()
    assert short.exists(), "the seeded load no longer leaves loose pages at the end"
    assert lmdb_verify.verify(str(short), subdir=False)  # type: ignore[no-untyped-call]
    info = lmdbfile.check_file(short, "btree")
    assert info.free_tail_pages > 0
    assert info.entries == _env_facts(short)[4]
    e = lmdb.open(str(short), subdir=False, readonly=True, lock=False, max_dbs=4)
    with e.begin() as txn:
        assert sum(len(v) for _k, v in txn.cursor(db=e.open_db(b"kv", txn=txn))) > 0
    e.close()


# --- damaged meta pages ---


@pytest.mark.parametrize(
    ("offset", "value", "words"),
    [
        (10, struct.pack("<H", 0x02), "P_META 0x08 not set"),
        (16, struct.pack("<I", 0xDEADBEEF), "not an LMDB data file"),
        (PSIZE + 16, struct.pack("<I", 0xDEADBEEF), "bad magic 0xdeadbeef in LMDB meta page 1"),
        (20, struct.pack("<I", 3), "data version 3"),
        (40, struct.pack("<I", 3000), "impossible page size 3000"),
        (PSIZE + 40, struct.pack("<I", 8192), "disagree on the page size"),
    ],
)
def test_damaged_meta_fields(tmp_path: Path, snapshot: bytes, offset: int, value: bytes, words: str) -> None:
    data = bytearray(snapshot)
    data[offset : offset + len(value)] = value
    with pytest.raises(BadBTreeFile, match=words):
        lmdbfile.check_file(_write(tmp_path, bytes(data)))


def test_last_page_and_roots_must_fit(tmp_path: Path, snapshot: bytes) -> None:
    info = lmdbfile.check_file(_write(tmp_path, snapshot))
    base = info.meta_page * PSIZE
    huge = bytearray(snapshot)
    huge[base + 136 : base + 144] = struct.pack("<Q", 1 << 40)  # mm_last_pg far past EOF
    with pytest.raises(BadBTreeFile, match="truncated"):
        lmdbfile.check_file(_write(tmp_path, bytes(huge)))
    root = bytearray(snapshot)
    root[base + 88 + 40 : base + 88 + 48] = struct.pack("<Q", info.last_page + 5)
    with pytest.raises(BadBTreeFile, match="root of its main B-tree"):
        lmdbfile.check_file(_write(tmp_path, bytes(root)))


def test_the_newer_meta_wins(tmp_path: Path, snapshot: bytes) -> None:
    info = lmdbfile.check_file(_write(tmp_path, snapshot))
    other = 1 - info.meta_page
    data = bytearray(snapshot)
    data[other * PSIZE + 144 : other * PSIZE + 152] = struct.pack("<Q", info.txnid + 1)
    assert lmdbfile.check_file(_write(tmp_path, bytes(data))).meta_page == other


# --- not LMDB at all ---


def test_zero_filled(tmp_path: Path) -> None:
    with pytest.raises(BadBTreeFile, match="all 65536 bytes are zero"):
        lmdbfile.check_file(_write(tmp_path, bytes(65536)))


def test_random_garbage_is_refused(tmp_path: Path) -> None:
    rng = random.Random(20240601)
    for i in range(50):
        p = _write(tmp_path, rng.randbytes(rng.choice([1, 100, 4096, 8192, 20000])), f"g{i}")
        with pytest.raises(BadBTreeFile, match="not an LMDB data file|cut short"):
            lmdbfile.check_file(p)


def test_random_garbage_is_rarely_mistaken_for_a_known_format() -> None:
    rng = random.Random(99)
    named = [d for d in (lmdbfile.describe_foreign(rng.randbytes(600)) for _ in range(5000)) if d]
    assert len(named) <= 10, named[:5]


def _expect_foreign(p: Path, kind: str, command: str) -> None:
    with pytest.raises(BadBTreeFile) as exc:
        lmdbfile.check_file(p)
    msg = str(exc.value)
    assert f"looks like {kind}" in msg and command in msg and str(p) in msg, msg


def test_gzip(tmp_path: Path, snapshot: bytes) -> None:
    p = _write(tmp_path, gzip.compress(snapshot), "snap.db.gz")
    _expect_foreign(p, "a gzip-compressed file", f"gzip -dc {p} > {tmp_path / 'snap.db'}")


@pytest.mark.skipif(shutil.which("zstd") is None, reason="zstd CLI not installed")
def test_zstd(tmp_path: Path, snapshot: bytes) -> None:
    raw = _write(tmp_path, snapshot)
    subprocess.run(["zstd", "-q", str(raw)], check=True)
    p = tmp_path / "snap.db.zst"
    _expect_foreign(p, "a zstd-compressed file", f"zstd -d {p} -o {raw}")


def test_tar(tmp_path: Path, snapshot: bytes) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        ti = tarfile.TarInfo("snap.db")
        ti.size = len(snapshot)
        tar.addfile(ti, io.BytesIO(snapshot))
    _expect_foreign(_write(tmp_path, buf.getvalue(), "s.tar"), "a tar archive", "tar -xf")


@pytest.mark.skipif(shutil.which("gpg") is None, reason="gpg not installed")
@pytest.mark.parametrize("armor", [False, True])
def test_gpg(tmp_path: Path, snapshot: bytes, armor: bool) -> None:
    raw = _write(tmp_path, snapshot)
    home = tmp_path / "gnupg"
    home.mkdir(mode=0o700)
    out = tmp_path / "snap.db.gpg"
    subprocess.run(
        [
            "gpg",
            "--batch",
            "--quiet",
            "--homedir",
            str(home),
            "--pinentry-mode",
            "loopback",
            "--passphrase",
            "test",
            "--symmetric",
            *(["--armor"] if armor else []),
            "-o",
            str(out),
            str(raw),
        ],
        check=True,
        capture_output=True,
        env={**os.environ, "GNUPGHOME": str(home)},
    )
    _expect_foreign(out, "a gpg-encrypted file", f"gpg --decrypt -o {raw} {out}")


def test_wal_segment_and_text(tmp_path: Path) -> None:
    from unisondb.storage import segment

    header = segment.SegmentHeader(1, 1, 1, 0, segment.namespace_crc("users")).encode()
    _expect_foreign(
        _write(tmp_path, header + bytes(200), "000000001.wal"), "a UnisonDB WAL segment", "--wal DIR"
    )
    side = _write(tmp_path, b"ab" * 32 + b"  snap.db\n", "snap.db.sha256")
    _expect_foreign(side, "a text file (begins 'abab", "")


def test_unreadable_file_is_a_storage_error(tmp_path: Path, snapshot: bytes) -> None:
    if os.geteuid() == 0:
        pytest.skip("root reads files regardless of their mode")
    p = _write(tmp_path, snapshot)
    p.chmod(0)
    with pytest.raises(StorageError, match="permission denied"):
        lmdbfile.check_file(p)


def test_a_directory(tmp_path: Path) -> None:
    with pytest.raises(BadBTreeFile, match="is a directory"):
        lmdbfile.check_file(tmp_path)


# --- the BTree refuses before LMDB maps ---


def test_btree_refuses_a_cut_data_mdb_and_creates_nothing(tmp_path: Path, snapshot: bytes) -> None:
    db = tmp_path / "db"
    db.mkdir()
    (db / "data.mdb").write_bytes(snapshot[:8192])
    with pytest.raises(BadBTreeFile, match="B-tree file .*data.mdb is truncated"):
        BTree(db)
    assert sorted(os.listdir(db)) == ["data.mdb"]  # no lock.mdb: LMDB never opened it
    assert (db / "data.mdb").read_bytes() == snapshot[:8192]
