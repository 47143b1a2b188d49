"""``restore/sources.py``: classification by name and magic, decompressing streams (real
gzip/zstd/tar files made by the real CLIs where it matters), sidecar forms, bounded memory."""

from __future__ import annotations

import gzip
import hashlib
import io
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import zstandard

from unisondb.restore import sources
from unisondb.restore.errors import BackupCorrupt, EncryptedInput
from unisondb.restore.inventory import check_sidecar
from unisondb.restore.sources import Kind

K = sources.classify_name


@pytest.mark.parametrize(
    ("name", "kind", "codec", "plain"),
    [
        ("000000042.wal", Kind.SEGMENT, "none", "000000042.wal"),
        ("000000042.wal.gz", Kind.SEGMENT, "gzip", "000000042.wal"),
        ("000000042.wal.zst", Kind.SEGMENT, "zstd", "000000042.wal"),
        ("btree-20250108-0000.db.zst", Kind.SNAPSHOT, "zstd", "btree-20250108-0000.db"),
        ("snapshot-20250108.db.gz", Kind.SNAPSHOT, "gzip", "snapshot-20250108.db"),
        ("users-20250108.snapshot", Kind.SNAPSHOT, "none", "users-20250108.snapshot"),
        ("data.mdb", Kind.SNAPSHOT, "none", "data.mdb"),
        ("wal-20250108-1200.tar.gz", Kind.ARCHIVE, "gzip", "wal-20250108-1200.tar.gz"),
        ("wal.tgz", Kind.ARCHIVE, "gzip", "wal.tgz"),
        ("wal.tar.zst", Kind.ARCHIVE, "zstd", "wal.tar.zst"),
        ("000000042.wal.sha256", Kind.SIDECAR, "none", "000000042.wal.sha256"),
        ("btree-1.db.zst.gpg", Kind.ENCRYPTED, "zstd", "btree-1.db"),
        ("42.wal", Kind.UNKNOWN, "none", "42.wal"),
        ("notes.gz", Kind.UNKNOWN, "gzip", "notes"),
    ],
)
def test_classify_by_name(name: str, kind: Kind, codec: str, plain: str) -> None:
    c = K(name)
    assert (c.kind, c.codec, c.plain_name) == (kind, codec, plain)


def _lmdb_like() -> bytes:
    return b"\0" * 16 + (0xBEEFC0DE).to_bytes(4, "little") + b"\0" * 4076


def test_magic_wins_over_the_name(tmp_path: Path) -> None:
    lying = tmp_path / "000000001.wal.gz"  # says gzip, is a plain segment
    lying.write_bytes(b"UDBW" + b"\0" * 200)
    assert sources.classify(lying).codec == "none"
    anon = tmp_path / "latest"  # no suffix at all: a zstd-compressed LMDB file
    anon.write_bytes(zstandard.ZstdCompressor().compress(_lmdb_like()))
    c = sources.classify(anon)
    assert (c.kind, c.codec) == (Kind.SNAPSHOT, "zstd")
    tar = tmp_path / "x.bin"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        info = tarfile.TarInfo("wal/000000001.wal")
        info.size = 4
        t.addfile(info, io.BytesIO(b"UDBW"))
    tar.write_bytes(buf.getvalue())
    assert sources.classify(tar).kind is Kind.ARCHIVE
    armored = tmp_path / "x.asc"
    armored.write_text("-----BEGIN PGP MESSAGE-----\n")
    assert sources.classify(armored).kind is Kind.ENCRYPTED
    with pytest.raises(EncryptedInput, match="gpg --decrypt --output"):
        sources.codec_of(armored)


def _read(path: Path) -> bytes:
    with sources.open_plain(path) as f:
        return f.read()


def test_concatenated_members_and_zero_padding(tmp_path: Path) -> None:
    p = tmp_path / "a.gz"
    p.write_bytes(gzip.compress(b"one") + gzip.compress(b"two") + b"\0" * 1000)
    assert _read(p) == b"onetwo"
    z = tmp_path / "a.zst"
    c = zstandard.ZstdCompressor(write_checksum=True)
    z.write_bytes(c.compress(b"one") + c.compress(b"two"))
    assert _read(z) == b"onetwo"


@pytest.mark.parametrize("codec", ["gzip", "zstd"])
def test_damage_is_named(tmp_path: Path, codec: str) -> None:
    raw = tmp_path / "000000001.wal"
    raw.write_bytes(bytes(range(256)) * 4000)
    tool = ["gzip", "-k"] if codec == "gzip" else ["zstd", "-q"]
    subprocess.run([*tool, str(raw)], check=True)
    comp = tmp_path / (raw.name + (".gz" if codec == "gzip" else ".zst"))
    good = comp.read_bytes()
    assert _read(comp) == raw.read_bytes()
    cases = {
        "truncated": good[: len(good) // 2],
        "empty": good[:0] + (b"\x1f\x8b" if codec == "gzip" else b"\x28\xb5\x2f\xfd"),
        "garbage after the end": good + b"trailing junk",
        "corrupt": good[: len(good) // 2] + bytes([good[len(good) // 2] ^ 1]) + good[len(good) // 2 + 1 :],
    }
    for why, data in cases.items():
        comp.write_bytes(data)
        with pytest.raises(BackupCorrupt, match=f"{comp}: {codec} data is") as exc:
            _read(comp)
        if why not in ("corrupt", "empty"):  # those may read as "corrupt" or "truncated"
            assert why in str(exc.value)


def test_archive_members_and_their_sidecars(tmp_path: Path) -> None:
    d = tmp_path / "wal" / "20250108-1200"
    d.mkdir(parents=True)
    seg = d / "000000003.wal"
    seg.write_bytes(b"UDBW" + b"\1" * 100)
    subprocess.run(f"sha256sum {seg.name} > {seg.name}.sha256", shell=True, cwd=d, check=True)
    (d / "README").write_text("ignored")
    tgz = tmp_path / "wal-20250108-1200.tar.gz"
    subprocess.run(["tar", "-czf", str(tgz), "-C", str(tmp_path), "wal/20250108-1200"], check=True)
    with sources.staging(tmp_path) as stg:
        found = sources.find_segments(tgz)
        virtual = tgz / "wal/20250108-1200/000000003.wal"
        assert found.segments == [virtual] and found.unreadable == []
        assert sources.read_segment(virtual) == seg.read_bytes()
        res = check_sidecar(virtual, hashlib.sha256(seg.read_bytes()).hexdigest())
        assert res.status == "ok" and res.sidecar == "000000003.wal.sha256"
        assert stg._root is not None and stg._root.parent == tmp_path
    assert not list(tmp_path.glob("unisondb-inputs-*"))  # staging removed at the end
    data = tgz.read_bytes()
    tgz.write_bytes(data[: len(data) - 40])
    with sources.staging(tmp_path):
        found = sources.find_segments(tgz)
        assert found.segments == [] and str(tgz) in found.unreadable[0][1]


def test_sidecar_for_the_plain_or_the_compressed_form(tmp_path: Path) -> None:
    plain = b"UDBW" + b"\2" * 300
    gz = tmp_path / "000000007.wal.gz"
    gz.write_bytes(gzip.compress(plain))
    pd, sd = hashlib.sha256(plain).hexdigest(), hashlib.sha256(gz.read_bytes()).hexdigest()
    assert check_sidecar(gz, pd).status == "missing"
    plain_side = tmp_path / "000000007.wal.sha256"
    comp_side = tmp_path / "000000007.wal.gz.sha256"
    plain_side.write_text(f"{pd}  000000007.wal\n")
    res = check_sidecar(gz, pd)
    assert (res.status, res.sidecar, res.note) == ("ok", "000000007.wal.sha256 (decompressed content)", None)
    comp_side.write_text(f"{sd}  000000007.wal.gz\n")
    res = check_sidecar(gz, pd)
    assert res.status == "ok" and res.sidecar == (
        "000000007.wal.gz.sha256 (compressed file) and 000000007.wal.sha256 (decompressed content)"
    )
    plain_side.unlink()
    comp_side.write_text(f"{pd}  000000007.wal\n")  # the plain digest under the .gz name
    assert check_sidecar(gz, pd).sidecar == "000000007.wal.gz.sha256 (decompressed content)"
    comp_side.write_text("0" * 64 + "  000000007.wal.gz\n")
    res = check_sidecar(gz, pd)
    assert res.status == "mismatch" and res.sidecar == "000000007.wal.gz.sha256"


def test_memory_stays_bounded_while_decompressing(tmp_path: Path) -> None:
    """512 MiB of plain snapshot from a few KiB of zstd: peak RSS stays far below it."""
    comp = tmp_path / "big.db.zst"
    subprocess.run(f"head -c 536870912 /dev/zero | zstd -q -o {comp}", shell=True, check=True)
    code = (
        "import resource, sys; from pathlib import Path; from unisondb.restore import sources\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "with sources.staging(Path(sys.argv[2])):\n"
        "    p = sources.materialize(Path(sys.argv[1])); n = p.stat().st_size\n"
        "print(n, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) // 1024)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(comp), str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout.split()
    assert int(out[0]) == 1 << 29
    assert int(out[1]) < 64, f"peak RSS grew by {out[1]} MiB"
