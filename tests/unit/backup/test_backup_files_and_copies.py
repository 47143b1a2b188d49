"""Unit tests of durable publishing, sidecars, WAL copies and snapshots (real files, real
engine, no fakes)."""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from unisondb.api.backup import parse_btree_params, parse_wal_params
from unisondb.backup import checksum, paths
from unisondb.backup.files import TargetDir, hash_fd, write_all
from unisondb.backup.snapshot import take_snapshot
from unisondb.backup.wal_backup import backup_wal, plan
from unisondb.config import EngineConfig
from unisondb.errors import BackupGap, Conflict, InvalidRequest
from unisondb.storage import layout
from unisondb.storage.engine import Engine

NS = "users"


@pytest.fixture
def tdir(tmp_path: Path) -> Iterator[TargetDir]:
    d = tmp_path / "t"
    d.mkdir()
    t = TargetDir(os.open(d, os.O_RDONLY | os.O_DIRECTORY), d)
    yield t
    t.close()


def test_publish_failure_leaves_nothing(tdir: TargetDir) -> None:
    def boom(fd: int) -> None:
        write_all(fd, b"partial")
        raise OSError(28, "No space left on device")

    with pytest.raises(Exception, match=f"no space left on device: {tdir.path / 'f'}"):
        tdir.publish("f", boom)
    assert list(tdir.path.iterdir()) == []


def test_publish_keep_false_leaves_existing_alone(tdir: TargetDir) -> None:
    (tdir.path / "f").write_bytes(b"old")
    tdir.publish("f", lambda fd: write_all(fd, b"new"), keep=lambda _r: False)
    assert (tdir.path / "f").read_bytes() == b"old"
    assert sorted(p.name for p in tdir.path.iterdir()) == ["f"]


def test_publish_refuses_a_foreign_tmp(tdir: TargetDir) -> None:
    (tdir.path / "f.tmp").write_bytes(b"someone else's")
    with pytest.raises(Conflict, match="another backup is writing"):
        tdir.publish("f", lambda fd: write_all(fd, b"x"))
    assert (tdir.path / "f.tmp").read_bytes() == b"someone else's"
    assert not (tdir.path / "f").exists()


def test_hash_fd_matches_sha256sum(tmp_path: Path) -> None:
    p = tmp_path / "x"
    p.write_bytes(os.urandom(3 << 20 | 17))
    fd = os.open(p, os.O_RDONLY)
    try:
        digest, size = hash_fd(fd)
    finally:
        os.close(fd)
    out = subprocess.run(["sha256sum", str(p)], capture_output=True, text=True, check=True)
    assert (digest, size) == (out.stdout.split()[0], p.stat().st_size)


def test_sidecar_is_sha256sum_compatible_and_never_overwritten(tdir: TargetDir) -> None:
    name = "we ird\\name.db"
    (tdir.path / name).write_bytes(b"payload")
    digest = tdir.hash_file(name)
    assert checksum.ensure_sidecar(tdir, name, digest) is True
    assert checksum.ensure_sidecar(tdir, name, digest) is False
    r = subprocess.run(["sha256sum", "-c", name + ".sha256"], cwd=tdir.path, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    with pytest.raises(Conflict, match="records a different checksum"):
        checksum.ensure_sidecar(tdir, name, "0" * 64)
    # A sidecar written by `sha256sum -b` (binary-mode '*') says the same thing: accepted.
    (tdir.path / (name + ".sha256")).write_text(f"{digest} *{name}\n")
    assert checksum.ensure_sidecar(tdir, name, digest) is False


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({}, "missing field 'backupDir'"),
        ({"backupDir": "w", "afterSegmentId": True}, "got a boolean"),
        ({"backupDir": "w", "afterSegmentId": 1.5}, "non-integer number"),
        ({"backupDir": "w", "afterSegmentId": "3"}, "got a string"),
        ({"backupDir": "w", "afterSegmentId": -1}, "must be >= 0"),
        ({"backupDir": "w", "rotate": "yes"}, "rotate must be true or false"),
        ({"backupDir": "w", "rotate": 1}, "rotate must be true or false"),
    ],
)
def test_wal_params_rejected(body: dict[str, object], words: str) -> None:
    with pytest.raises(InvalidRequest, match=words):
        parse_wal_params(body)


def test_wal_params_defaults_and_unknown_fields() -> None:
    p = parse_wal_params({"backupDir": "w", "afterSegmentId": None, "rotate": None, "x": 1})
    assert (p.after_segment_id, p.backup_dir, p.rotate) == (0, ("w",), False)
    p = parse_wal_params({"backupDir": "./w/", "afterSegmentId": 7, "rotate": True})
    assert (p.after_segment_id, p.backup_dir, p.rotate) == (7, ("w",), True)
    assert parse_btree_params({"path": "s/x.db", "other": 1}) == ("s", "x.db")
    with pytest.raises(InvalidRequest, match="missing field 'path'"):
        parse_btree_params({})


# --- WAL copies and snapshots over a real engine ---


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    eng = Engine.open(tmp_path / "data", NS, EngineConfig(segment_size=64 << 10))
    for i in range(60):
        eng.put(b"k%03d" % i, os.urandom(4096))
    eng.rotate()
    yield eng
    eng.close()


def target(eng: Engine, rel: str, is_file: bool) -> paths.Resolved:
    parts = paths.parse_relative(rel, "x", is_file=is_file)
    return paths.resolve(layout.backup_root(eng.data_dir, NS), parts, "x", is_file=is_file)


def test_wal_copy_is_identical_and_source_untouched(engine: Engine) -> None:
    sealed = engine.wal.sealed_segments()
    before = {s.segment_id: (s.path.read_bytes(), os.stat(s.path).st_mtime_ns) for s in sealed}
    copies = backup_wal(engine, target(engine, "w", False), 0)
    assert [c.segment_id for c in copies] == sorted(before)
    for c in copies:
        assert c.copied and c.path.read_bytes() == before[c.segment_id][0]
    for s in sealed:
        assert (s.path.read_bytes(), os.stat(s.path).st_mtime_ns) == before[s.segment_id]
    again = backup_wal(engine, target(engine, "w", False), 0)
    assert [(c.segment_id, c.copied, c.bytes_written) for c in again] == [
        (c.segment_id, False, 0) for c in copies
    ]
    assert backup_wal(engine, target(engine, "w", False), sealed[-1].segment_id) == []


def test_wal_copy_conflicts_never_overwrite(engine: Engine) -> None:
    first = engine.wal.sealed_segments()[0]
    dest = layout.backup_root(engine.data_dir, NS) / "w"
    dest.mkdir(parents=True)
    name = f"{first.segment_id:09d}.wal"
    (dest / name).write_bytes(b"not that segment")
    with pytest.raises(Conflict, match="already exists with different content"):
        backup_wal(engine, target(engine, "w", False), 0)
    assert (dest / name).read_bytes() == b"not that segment"
    # A stale sidecar for a file that is gone is checked *before* copying.
    (dest / name).unlink()
    (dest / (name + ".sha256")).write_text(f"{'1' * 64}  {name}\n")
    with pytest.raises(Conflict, match="records a different checksum"):
        backup_wal(engine, target(engine, "w", False), 0)
    assert not (dest / name).exists() and not list(dest.glob("*.tmp"))


def test_wal_gap_names_the_missing_ids(engine: Engine) -> None:
    sealed = engine.wal.sealed_segments()
    assert len(sealed) >= 4
    for s in sealed[:3]:
        engine.wal.delete_segment(s.segment_id)  # what retention does
    oldest = sealed[3].segment_id
    with pytest.raises(BackupGap, match=f"segment ids 2-{oldest - 1} are no longer on disk"):
        plan(engine, 1)
    with pytest.raises(BackupGap, match=f"segment id {oldest - 1} is no longer on disk"):
        plan(engine, oldest - 2)
    assert [s.segment_id for s in plan(engine, oldest - 1)][0] == oldest
    assert plan(engine, 0)[0].segment_id == oldest


def test_snapshot_same_state_is_idempotent_and_new_state_conflicts(engine: Engine) -> None:
    snap = take_snapshot(engine, target(engine, "s/a.db", True))
    assert snap.copied and snap.checkpoint.applied_lsn == 60
    again = take_snapshot(engine, target(engine, "s/a.db", True))
    assert not again.copied and again.sha256 == snap.sha256
    engine.put(b"new", b"state")
    with pytest.raises(Conflict, match="at LSN 61"):
        take_snapshot(engine, target(engine, "s/a.db", True))
    assert snap.path.read_bytes() and not list(snap.path.parent.glob("*.tmp"))
    fd = os.open(snap.path, os.O_RDONLY)
    try:
        assert hash_fd(fd)[0] == snap.sha256
    finally:
        os.close(fd)


def test_concurrent_identical_requests_share_the_work(engine: Engine) -> None:
    """Four simultaneous identical WAL backups: all succeed, each segment is written once."""
    results: list[list[tuple[int, bool]]] = []
    errors: list[BaseException] = []

    def one() -> None:
        try:
            copies = backup_wal(engine, target(engine, "same", False), 0)
            results.append([(c.segment_id, c.copied) for c in copies])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    ids = [s.segment_id for s in engine.wal.sealed_segments()]
    assert all([sid for sid, _ in r] == ids for r in results)
    for i, sid in enumerate(ids):
        assert sum(r[i][1] for r in results) == 1, f"segment {sid} written more than once"
    dest = layout.backup_root(engine.data_dir, NS) / "same"
    assert sorted(p.name for p in dest.iterdir()) == sorted(
        [f"{i:09d}.wal" for i in ids] + [f"{i:09d}.wal.sha256" for i in ids]
    )
