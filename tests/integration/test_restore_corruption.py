"""Damaged or mismatched backups fail closed: clear error, non-zero exit, target untouched.

Every case runs the real CLI entry point (``unisondb.cli.main``) with ``--force`` against a
namespace that already holds data, so the only reason to refuse is the damage; the whole
target tree is hashed before and after.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from test_restore_support import NS, History, tree_digest, write_sidecar

from unisondb.cli import main
from unisondb.restore import restore
from unisondb.restore.verify import verify_backup_set
from unisondb.storage import segment

Base = tuple[History, Path, Path]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Base:
    h = History(tmp_path_factory.mktemp("corrupt"))
    h.open()
    h.write_random(70)
    snap, _cp = h.snapshot("s.db")
    h.write_random(200)
    h.backup_wal("wal/a")
    h.close()
    return h, snap, h.backup_root


@pytest.fixture
def case(base: Base, tmp_path: Path) -> tuple[History, Path, Path, Path]:
    """A private copy of the backups plus a target namespace that already holds data."""
    h, _snap, root = base
    backups = tmp_path / "backups"
    shutil.copytree(root, backups)
    target = tmp_path / "target"
    restore(target, NS, backups / "snapshots" / "s.db", [backups / "wal"], target_lsn=90)
    return h, backups / "snapshots" / "s.db", backups / "wal" / "a", target


def _segments(wal: Path) -> list[Path]:
    return sorted(wal.glob("*.wal"))


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x5A
    path.write_bytes(bytes(data))


def _run_fails(
    capsys: pytest.CaptureFixture[str], target: Path, snap: Path, wal: Path, *extra: str
) -> tuple[int, str]:
    before = tree_digest(target / NS)
    capsys.readouterr()
    rc = main(
        [
            "restore",
            "--data-dir",
            str(target),
            "--namespace",
            NS,
            "--snapshot",
            str(snap),
            "--wal",
            str(wal),
            "--force",
            *extra,
        ]
    )
    err = capsys.readouterr().err
    assert rc != 0
    assert err.startswith("error: "), err
    assert tree_digest(target / NS) == before, "the target must be untouched"
    assert not [p for p in target.iterdir() if p.name.startswith(f".restore-{NS}-")]
    return rc, err


def test_snapshot_byte_flip_fails_its_checksum(
    case: tuple[History, Path, Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    _h, snap, wal, target = case
    _flip(snap, snap.stat().st_size // 2)
    rc, err = _run_fails(capsys, target, snap, wal)
    assert rc == 6 and "checksum mismatch" in err and str(snap) in err


def test_snapshot_damage_without_sidecar_fails_the_lmdb_check(
    case: tuple[History, Path, Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    _h, snap, wal, target = case
    snap.with_name(snap.name + ".sha256").unlink()
    _flip(snap, 4096 + 16)  # the magic of the second meta page
    rc, err = _run_fails(capsys, target, snap, wal)
    assert rc == 6 and "bad magic" in err and "LMDB meta page 1" in err


def test_truncated_snapshot_fails(
    case: tuple[History, Path, Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    _h, snap, wal, target = case
    snap.write_bytes(snap.read_bytes()[:8192])
    write_sidecar(snap)  # even with a matching checksum the structure check catches it
    rc, err = _run_fails(capsys, target, snap, wal)
    assert rc == 6 and "snapshot" in err


@pytest.mark.parametrize("with_sidecar", [True, False])
def test_segment_body_byte_flip(
    case: tuple[History, Path, Path, Path], capsys: pytest.CaptureFixture[str], with_sidecar: bool
) -> None:
    _h, snap, wal, target = case
    victim = _segments(wal)[2]
    if not with_sidecar:
        victim.with_name(victim.name + ".sha256").unlink()
    _flip(victim, segment.HEADER_SIZE + 200)
    rc, err = _run_fails(capsys, target, snap, wal)
    assert rc == 6 and str(victim) in err
    assert ("checksum mismatch" if with_sidecar else "damaged") in err


def test_segment_footer_byte_flip(
    case: tuple[History, Path, Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    _h, snap, wal, target = case
    victim = _segments(wal)[3]
    victim.with_name(victim.name + ".sha256").unlink()
    _flip(victim, victim.stat().st_size - 20)
    rc, err = _run_fails(capsys, target, snap, wal)
    assert rc == 6 and str(victim) in err and "footer" in err


def test_truncated_segment(
    case: tuple[History, Path, Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    _h, snap, wal, target = case
    victim = _segments(wal)[2]
    victim.write_bytes(victim.read_bytes()[:-70])
    victim.with_name(victim.name + ".sha256").unlink()
    rc, err = _run_fails(capsys, target, snap, wal)
    assert rc == 6 and str(victim) in err


def test_missing_middle_segment_names_the_range(
    case: tuple[History, Path, Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    _h, snap, wal, target = case
    victim = _segments(wal)[3]
    s = segment.read_summary(victim)
    assert s.footer is not None
    victim.unlink()
    victim.with_name(victim.name + ".sha256").unlink()
    rc, err = _run_fails(capsys, target, snap, wal)
    assert rc == 6
    assert f"LSNs {s.header.first_lsn}..{s.footer.last_lsn}" in err
    assert victim.name in err  # "probably segment 000000004.wal"
    # Restoring up to the hole must be asked for explicitly.
    out = restore(target, NS, snap, [wal], force=True, target_lsn=s.header.first_lsn - 1)
    assert out.summary is not None and out.summary.end_lsn == s.header.first_lsn - 1


def test_segment_from_another_namespace(
    case: tuple[History, Path, Path, Path], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    _h, snap, wal, target = case
    other = History(tmp_path / "other", ns="orders", seed=7)
    other.open()
    other.write_random(5)
    other_dir = other.backup_wal("wal/x")
    other.close()
    foreign = _segments(other_dir)[0]
    shutil.copy(foreign, wal / "000000099.wal")
    (wal / "000000099.wal").write_bytes(_renamed(foreign.read_bytes(), 99))
    rc, err = _run_fails(capsys, target, snap, wal)
    assert rc == 5 and "another namespace" in err and "000000099.wal" in err


def _renamed(data: bytes, seg_id: int) -> bytes:
    """A segment's bytes with a new id in the header (CRC recomputed)."""
    h = segment.decode_header(data, Path("x"))
    new = segment.SegmentHeader(seg_id, h.timeline, h.first_lsn, h.created_ns, h.ns_crc)
    return new.encode() + data[segment.HEADER_SIZE :]


def test_same_segment_id_with_different_content(
    case: tuple[History, Path, Path, Path], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    _h, snap, wal, target = case
    other = History(tmp_path / "other", seed=99)
    other.open()
    other.write_random(120)
    other_dir = other.backup_wal("wal/b")
    other.close()
    shutil.copytree(other_dir, wal.parent / "b")
    rc, err = _run_fails(capsys, target, snap, wal.parent)  # both histories
    assert rc == 5 and "same segment id" in err


def test_snapshot_with_the_wal_of_another_history(
    case: tuple[History, Path, Path, Path], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    _h, snap, _wal, target = case
    other = History(tmp_path / "other", seed=99)
    other.open()
    other.write_random(150)
    other_dir = other.backup_wal("wal/b")
    other.close()
    # Another server's WAL is never replayed onto this snapshot: the plan says so plainly and
    # the restore ends at the snapshot (backup verify fails on such a set).
    capsys.readouterr()
    rc = main(
        [
            "restore",
            "--data-dir",
            str(target),
            "--namespace",
            NS,
            "--snapshot",
            str(snap),
            "--wal",
            str(other_dir),
            "--force",
            "--dry-run",
            "--json",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0
    plan = json.loads(out)["plan"]
    assert plan["result"]["lsn"] == plan["snapshot"]["lsn"] and not plan["wal"]["replay"]
    assert any("are not used" in w for w in plan["warnings"])
    rep, _s, _i = verify_backup_set(snap, [other_dir], NS)
    assert not rep.ok and any("unrelated" in p for p in rep.problems)


def test_snapshot_on_a_newer_timeline_with_only_old_wal(
    case: tuple[History, Path, Path, Path], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    _h, snap, wal, target = case
    # A restore starts timeline 2; a snapshot taken there cannot continue with timeline 1.
    r = History(tmp_path / "r", base_lsn=100)
    restore(r.data_dir, NS, snap, [wal], target_lsn=100)
    r.open()
    r.write_random(10)
    snap2, cp2 = r.snapshot("tl2.db")
    r.write_random(10)
    r.close()
    assert cp2.timeline == 2
    rc, err = _run_fails(capsys, target, snap2, wal, "--target-lsn", str(cp2.applied_lsn + 5))
    assert rc == 2 and "another history" in err


def test_truncated_compressed_snapshot_is_refused_naming_it(
    case: tuple[History, Path, Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """A .zst snapshot is read directly (tests/integration/test_restore_compressed.py);
    one cut short is refused with the file named and the target untouched."""
    import subprocess

    _h, snap, wal, target = case
    subprocess.run(["zstd", "-q", str(snap)], check=True)
    zst = snap.with_name(snap.name + ".zst")
    data = zst.read_bytes()
    zst.write_bytes(data[: len(data) // 2])
    rc, err = _run_fails(capsys, target, zst, wal)
    assert rc == 6 and str(zst) in err and "truncated" in err


def test_unreadable_segment_header(
    case: tuple[History, Path, Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    _h, snap, wal, target = case
    victim = _segments(wal)[1]
    _flip(victim, 20)
    victim.with_name(victim.name + ".sha256").unlink()
    rc, err = _run_fails(capsys, target, snap, wal)
    assert rc == 6 and str(victim) in err


def test_identical_duplicate_segments_are_fine(case: tuple[History, Path, Path, Path]) -> None:
    h, snap, wal, target = case
    shutil.copytree(wal, wal.parent / "copy-of-a")  # e.g. two overlapping backup runs
    out = restore(target, NS, snap, [wal.parent], force=True)
    assert out.summary is not None and out.summary.end_lsn == h.last_lsn
