"""Sidecars, compression sniffing and lock probing (small real files)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from unisondb.errors import BadBTreeFile
from unisondb.restore.errors import BackupCorrupt, CompressedInput
from unisondb.restore.inventory import (
    check_sidecar,
    detect_compression,
    inspect_snapshot,
    probe_lock,
    read_sidecar,
)
from unisondb.storage.lockfile import NamespaceLock


def _file(tmp_path: Path, data: bytes = b"hello") -> tuple[Path, str]:
    p = tmp_path / "000000001.wal"
    p.write_bytes(data)
    return p, hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize(
    "line",
    ["{h}  000000001.wal\n", "{h} *000000001.wal\n", "\\{h}  000000001.wal\n", "{h}\n", "{H}  000000001.wal"],
)
def test_sidecar_formats(tmp_path: Path, line: str) -> None:
    p, h = _file(tmp_path)
    p.with_name(p.name + ".sha256").write_text(line.format(h=h, H=h.upper()))
    assert check_sidecar(p, h).status == "ok"
    assert check_sidecar(p, "0" * 64).status == "mismatch"


def test_sidecar_missing_renamed_and_garbage(tmp_path: Path) -> None:
    p, h = _file(tmp_path)
    assert check_sidecar(p, h).status == "missing"
    p.with_name(p.name + ".sha256").write_text(f"{h}  other-name.wal\n")
    res = check_sidecar(p, h)
    assert res.status == "ok" and res.note is not None and "other-name.wal" in res.note
    p.with_name(p.name + ".sha256").write_text("not a checksum\n")
    with pytest.raises(BackupCorrupt, match="sha256sum format"):
        read_sidecar(p)


@pytest.mark.parametrize(("magic", "fmt"), [(b"\x28\xb5\x2f\xfd", "zstd"), (b"\x1f\x8b", "gzip")])
def test_damaged_compressed_snapshot_is_named(tmp_path: Path, magic: bytes, fmt: str) -> None:
    p = tmp_path / "snap.db.zst"
    p.write_bytes(magic + b"\0" * 100)
    found = detect_compression(p)
    assert found is not None and found[0] == fmt
    with pytest.raises(BackupCorrupt, match=f"{p}: {fmt} data is"):
        inspect_snapshot(p)


def test_compressed_non_snapshot_is_refused(tmp_path: Path) -> None:
    import gzip

    p = tmp_path / "notes.txt.gz"
    p.write_bytes(gzip.compress(b"hello" * 100))
    with pytest.raises(CompressedInput, match="gzip-compressed but does not hold"):
        inspect_snapshot(p)


def test_not_an_lmdb_file(tmp_path: Path) -> None:
    p = tmp_path / "snap.db"
    p.write_bytes(b"x" * 8192)
    with pytest.raises(BadBTreeFile, match="not an LMDB data file"):
        inspect_snapshot(p)


def test_probe_lock_reports_the_holder_and_writes_nothing(tmp_path: Path) -> None:
    lock = tmp_path / "LOCK"
    assert probe_lock(lock) is None and not lock.exists()
    with NamespaceLock(lock):
        before = lock.read_bytes()
        assert probe_lock(lock) == before.decode().strip()
        assert lock.read_bytes() == before
    assert probe_lock(lock) is None
