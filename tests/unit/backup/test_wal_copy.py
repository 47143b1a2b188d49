"""Seal-time SHA-256 of WAL segments and the batched WAL-backup publish (issue 10 item 2).

Real engine, real files, real ``sha256sum``. The only fakes are faults a real part cannot
produce on demand (an fsync or rename that fails with EIO, a WAL writer's hash that is
wrong), and each test says so.
"""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from unisondb.backup import files, paths, wal_backup
from unisondb.backup.wal_backup import backup_wal
from unisondb.config import EngineConfig
from unisondb.errors import StorageError
from unisondb.storage import fsutil, layout, seghash
from unisondb.storage.engine import Engine
from unisondb.storage.seghash import SegmentHasher

NS = "users"


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def sha256sum_c(directory: Path) -> None:
    sidecars = sorted(p.name for p in directory.glob("*.sha256"))
    assert sidecars, f"no sidecars in {directory}"
    r = subprocess.run(["sha256sum", "-c", *sidecars], cwd=directory, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def fill(eng: Engine, n: int, tag: str = "k") -> None:
    for i in range(n):
        eng.put(b"%s%04d" % (tag.encode(), i), os.urandom(4096))


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def engine(data_dir: Path) -> Iterator[Engine]:
    eng = Engine.open(data_dir, NS, EngineConfig(segment_size=64 << 10))
    fill(eng, 60)
    eng.rotate()
    yield eng
    eng.close()


def target(eng: Engine, rel: str) -> paths.Resolved:
    parts = paths.parse_relative(rel, "x", is_file=False)
    return paths.resolve(layout.backup_root(eng.data_dir, NS), parts, "x", is_file=False)


def dest_dir(eng: Engine, rel: str) -> Path:
    return layout.backup_root(eng.data_dir, NS) / rel


# --- the hash recorded at seal time ---


def test_seal_records_the_sha256_of_the_bytes_written(engine: Engine) -> None:
    sealed = engine.sealed_segments()
    assert len(sealed) >= 3
    for s in sealed:
        # Hashed while appending, never read back: and it is the hash of the file.
        assert s.sha256 == sha(s.path)
        assert seghash.read(s.path) == s.sha256
    sha256sum_c(sealed[0].path.parent)  # the live wal/ directory checks with sha256sum -c
    # The active segment has none.
    assert not seghash.sidecar_path(engine.segments()[-1].path).exists()


_CRASHER = """
import os, sys
from pathlib import Path
from unisondb.config import EngineConfig
from unisondb.storage.engine import Engine
eng = Engine.open(Path(sys.argv[1]), "users", EngineConfig(segment_size=1 << 20))
for i in range(10):
    eng.put(b"k%d" % i, os.urandom(4096))
print(eng.segments()[-1].path)
sys.stdout.flush()
os._exit(0)  # no close, no seal: what a kill -9 leaves
"""


def test_a_segment_sealed_on_open_has_its_hash_computed_on_first_need(data_dir: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-c", _CRASHER, str(data_dir)], capture_output=True, text=True, check=True
    ).stdout
    active = Path(out.strip().splitlines()[-1])
    eng = Engine.open(data_dir, NS, EngineConfig(segment_size=1 << 20))
    try:
        (info,) = [s for s in eng.sealed_segments() if s.path == active]
        assert info.sha256 is None and seghash.read(active) is None  # sealed on open: unknown
        copies = backup_wal(eng, target(eng, "w"), 0)
        assert [c.sha256 for c in copies if c.segment_id == info.segment_id] == [sha(active)]
        assert seghash.read(active) == sha(active)  # recorded at first need
    finally:
        eng.close()


def test_a_segment_cut_back_and_sealed_again_loses_its_old_recorded_hash(data_dir: Path) -> None:
    """A sealed segment whose footer is cut off (what a torn-tail repair sees) is active
    again at open and sealed on the next start: its old sidecar is gone, not stale."""
    eng = Engine.open(data_dir, NS, EngineConfig(segment_size=1 << 20))
    fill(eng, 5)
    eng.rotate()
    seg = eng.sealed_segments()[-1].path
    eng.close()
    assert seghash.read(seg) is not None
    for p in seg.parent.glob("*.wal"):
        if p != seg:
            p.unlink()  # the empty segment the clean stop began
    with open(seg, "r+b") as f:
        f.truncate(seg.stat().st_size - 80)  # footer gone: an unsealed newest segment
    eng = Engine.open(data_dir, NS, EngineConfig(segment_size=1 << 20))
    try:
        assert seghash.read(seg) is None and not seghash.sidecar_path(seg).exists()
        copies = backup_wal(eng, target(eng, "w"), 0)
        assert [c.sha256 for c in copies] == [sha(s.path) for s in eng.sealed_segments()]
        sha256sum_c(seg.parent)
    finally:
        eng.close()


def test_hasher_gives_up_after_a_rollback() -> None:
    h = SegmentHasher(b"H" * 128)
    h.update(128, b"r1")
    assert h.finish(130, b"F") == hashlib.sha256(b"H" * 128 + b"r1F").hexdigest()
    h.update(128, b"r2")  # the file was cut back to 128 and written again: cannot rewind
    assert not h.valid and h.finish(130, b"F") is None
    h = SegmentHasher(b"H")
    h.update(1, b"abc")
    assert h.finish(2, b"F") is None  # the file ends elsewhere than what was hashed


def test_retention_deletes_the_sidecar_and_open_removes_orphans_and_torn_ones(
    engine: Engine, data_dir: Path
) -> None:
    first, second, third, fourth = engine.sealed_segments()[:4]
    engine.wal.delete_segment(first.segment_id)  # what retention does
    assert not first.path.exists() and not seghash.sidecar_path(first.path).exists()
    # A crash between the segment's unlink and its sidecar's leaves an orphan:
    second.path.unlink()
    engine.close()
    assert seghash.sidecar_path(second.path).exists()
    (data_dir / NS / "wal" / "notes.sha256").write_text("an operator's file\n")
    seghash.sidecar_path(third.path).write_bytes(b"")  # torn by a power cut after its rename
    eng = Engine.open(data_dir, NS, EngineConfig(segment_size=64 << 10))
    try:
        assert not seghash.sidecar_path(second.path).exists()
        assert not seghash.sidecar_path(third.path).exists()
        assert seghash.read(fourth.path) == fourth.sha256  # whole ones stay
        assert (data_dir / NS / "wal" / "notes.sha256").exists()  # not ours: left alone
    finally:
        eng.close()


# --- a stale, torn or wrong recorded hash is detected and never published ---


@pytest.mark.parametrize("bad", ["stale", "torn", "other-name"])
def test_a_stale_recorded_hash_is_detected_and_never_published(data_dir: Path, bad: str) -> None:
    eng = Engine.open(data_dir, NS, EngineConfig(segment_size=64 << 10))
    fill(eng, 40)
    eng.rotate()
    eng.close()
    eng = Engine.open(data_dir, NS, EngineConfig(segment_size=64 << 10))  # hashes from the files now
    try:
        seg = eng.sealed_segments()[1]
        assert seg.sha256 is None
        side = seghash.sidecar_path(seg.path)
        if bad == "stale":
            # The segment changed after its hash was recorded (replaced by hand beside an
            # old sidecar): its inode-change time is later than the sidecar's mtime.
            side.write_text(f"{'ab' * 32}  {seg.path.name}\n")
            changed = seg.path.stat().st_ctime_ns
            os.utime(side, ns=(changed - 10**9, changed - 10**9))
        elif bad == "torn":  # a power cut after the unsynced rename
            side.write_bytes(b"3f2a")
        else:
            side.write_text(f"{sha(seg.path)}  000000999.wal\n")
        with structlog.testing.capture_logs() as logs:
            copies = backup_wal(eng, target(eng, "w"), 0)
        out = dest_dir(eng, "w")
        assert [c.sha256 for c in copies] == [sha(s.path) for s in eng.sealed_segments()]
        sha256sum_c(out)  # every published sidecar is true of the bytes copied
        assert (out / (seg.path.name + ".sha256")).read_text() == f"{sha(seg.path)}  {seg.path.name}\n"
        assert seghash.read(seg.path) == sha(seg.path)  # repaired
        mismatches = [e for e in logs if e["event"] == "wal_backup.recorded_sha256_mismatch"]
        assert [e["recorded"] for e in mismatches] == (["ab" * 32] if bad == "stale" else [])
    finally:
        eng.close()


def _count_hashing(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A spy (the real hash still runs): how many segments the backup hashed itself."""
    calls: list[int] = []
    real = wal_backup._sha256_hex

    def counting(data: bytes) -> str:
        calls.append(len(data))
        return real(data)

    monkeypatch.setattr(wal_backup, "_sha256_hex", counting)
    return calls


def test_a_seal_time_hash_is_published_without_hashing_again(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """This process's seal and a sidecar recorded by an earlier run both stand for the
    file (unchanged since): the backup checks every record's CRC but does not hash again;
    a segment whose sidecar is missing is hashed (first need), and only that one."""
    calls = _count_hashing(monkeypatch)
    eng = Engine.open(data_dir, NS, EngineConfig(segment_size=64 << 10))
    fill(eng, 40)
    eng.rotate()
    try:
        assert all(s.sha256 for s in eng.sealed_segments())
        backup_wal(eng, target(eng, "w1"), 0)
        assert calls == []
        sha256sum_c(dest_dir(eng, "w1"))
    finally:
        eng.close()
    eng = Engine.open(data_dir, NS, EngineConfig(segment_size=64 << 10))
    try:
        sealed = eng.sealed_segments()
        assert all(s.sha256 is None for s in sealed)  # an earlier run's: from wal/*.sha256
        seghash.sidecar_path(sealed[2].path).unlink()
        copies = backup_wal(eng, target(eng, "w2"), 0)
        assert calls == [sealed[2].size]
        assert [c.sha256 for c in copies] == [sha(s.path) for s in sealed]
        sha256sum_c(dest_dir(eng, "w2"))
    finally:
        eng.close()


def test_a_file_already_in_the_target_is_compared_by_its_checked_bytes(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Re-running a backup into the same directory hashes the source: a recorded hash is
    never what decides between "identical" and Conflict."""
    calls = _count_hashing(monkeypatch)
    first = backup_wal(engine, target(engine, "w"), 0)
    again = backup_wal(engine, target(engine, "w"), 0)
    assert [c.copied for c in again] == [False] * len(first)
    assert len(calls) == len(first)


def test_a_sidecar_edited_by_hand_after_the_seal_is_caught_by_the_copy_check(
    data_dir: Path,
) -> None:
    """The one case the seal-time hash cannot see (docs/ARCHITECTURE.md): a wal/ sidecar
    rewritten by hand, newer than its segment. The backup publishes it, and the copy's own
    check (sha256sum -c, as every restore and ``backup verify`` do) refuses that file,
    naming it; the segment's bytes were CRC-checked and are right."""
    eng = Engine.open(data_dir, NS, EngineConfig(segment_size=64 << 10))
    fill(eng, 40)
    eng.rotate()
    eng.close()
    eng = Engine.open(data_dir, NS, EngineConfig(segment_size=64 << 10))
    try:
        seg = eng.sealed_segments()[1]
        seghash.sidecar_path(seg.path).write_text(f"{'ab' * 32}  {seg.path.name}\n")
        backup_wal(eng, target(eng, "w"), 0)
        out = dest_dir(eng, "w")
        assert (out / seg.path.name).read_bytes() == seg.path.read_bytes()
        check = subprocess.run(
            ["sha256sum", "-c", "--strict", seg.path.name + ".sha256"],
            cwd=out,
            capture_output=True,
            text=True,
        )
        assert check.returncode == 1 and f"{seg.path.name}: FAILED" in check.stdout
        # What docs/OPERATIONS.md tells the operator: delete both sidecars, run it again.
        seghash.sidecar_path(seg.path).unlink()
        (out / (seg.path.name + ".sha256")).unlink()
        again = backup_wal(eng, target(eng, "w"), 0)
        assert not any(c.copied for c in again)
        sha256sum_c(out)
    finally:
        eng.close()


# --- the batched publish ---


def test_one_directory_fsync_per_batch(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """Counts real fsyncs by descriptor type: each file once, the directory once per batch."""
    synced: list[str] = []
    real = fsutil.fsync

    out = dest_dir(engine, "w")

    def counting(fd: int) -> None:
        link = f"/proc/self/fd/{fd}"
        if not os.path.isdir(link):
            synced.append("file")
        elif os.readlink(link) == str(out):  # not the parents made durable when creating it
            synced.append("dir")
        real(fd)

    monkeypatch.setattr(fsutil, "fsync", counting)
    monkeypatch.setattr(wal_backup, "BATCH_FILES", 2)
    n = len(engine.sealed_segments())
    copies = backup_wal(engine, target(engine, "w"), 0)
    assert len(copies) == n >= 3
    assert synced.count("file") == 2 * n  # every segment and every sidecar, before its rename
    assert synced.count("dir") == (n + 1) // 2
    sha256sum_c(dest_dir(engine, "w"))


def test_copy_range_falls_back_when_the_kernel_copy_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FAKE: copy_file_range refused with EXDEV (a real one needs two filesystems on an old
    kernel), then sendfile with EINVAL; the copy is the same every way, and throttle sees
    every byte before it is copied."""
    src_p, data = tmp_path / "src", os.urandom(files.COPY_CHUNK * 2 + 12345)
    src_p.write_bytes(data)
    seen: list[int] = []
    for refuse in ([], ["copy_file_range"], ["copy_file_range", "sendfile"]):
        for name in refuse:

            def refused(*_a: object, _n: str = name) -> int:
                raise OSError(errno.EXDEV if _n == "copy_file_range" else errno.EINVAL, _n)

            monkeypatch.setattr(os, name, refused)
        dst_p = tmp_path / f"dst-{len(refuse)}"
        src, dst = os.open(src_p, os.O_RDONLY), os.open(dst_p, os.O_RDWR | os.O_CREAT)
        try:
            seen.clear()
            files.copy_range(src, dst, len(data), seen.append)
        finally:
            os.close(src)
            os.close(dst)
        assert dst_p.read_bytes() == data and sum(seen) == len(data)
        monkeypatch.undo()


def _fail_nth(monkeypatch: pytest.MonkeyPatch, module: object, name: str, n: int, kind: str) -> None:
    real = getattr(module, name)
    calls = [0]

    def failing(*args: object, **kw: object) -> object:
        fd = args[0] if args else None
        is_file = kind != "file" or (isinstance(fd, int) and not os.path.isdir(f"/proc/self/fd/{fd}"))
        if is_file:
            calls[0] += 1
            if calls[0] == n:
                raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real(*args, **kw)

    monkeypatch.setattr(module, name, failing)


def assert_only_whole_files(out: Path, sources: dict[str, bytes]) -> None:
    """Every segment present is byte-identical to its source; every sidecar has its file
    and checks; nothing else (no ``.tmp``) is there."""
    for p in out.iterdir():
        if p.name.endswith(".sha256"):
            assert (out / p.name[: -len(".sha256")]).exists(), f"{p.name} without its file"
        else:
            assert p.name in sources, f"unexpected {p.name}"
            assert p.read_bytes() == sources[p.name]
    if list(out.glob("*.sha256")):
        sha256sum_c(out)


@pytest.mark.parametrize(
    "step",
    ["fsync of the 3rd file", "fsync of the 1st file", "rename of the 4th file", "directory fsync"],
)
def test_a_fault_at_each_step_of_a_batch_leaves_whole_files_and_a_rerun_completes(
    engine: Engine, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    """FAKE: EIO from an fsync or a rename (a real disk does not fail on demand)."""
    sealed = engine.sealed_segments()
    sources = {s.path.name: s.path.read_bytes() for s in sealed}
    out = dest_dir(engine, "w")
    if step.startswith("fsync"):
        _fail_nth(monkeypatch, fsutil, "fsync", 3 if "3rd" in step else 1, "file")
    elif step.startswith("rename"):
        _fail_nth(monkeypatch, os, "rename", 4, "any")
    else:
        real = fsutil.fsync

        def dir_fails(fd: int) -> None:
            if os.path.isdir(f"/proc/self/fd/{fd}"):
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            real(fd)

        monkeypatch.setattr(fsutil, "fsync", dir_fails)
    with pytest.raises(StorageError, match="input/output error|I/O error"):
        backup_wal(engine, target(engine, "w"), 0)
    monkeypatch.undo()
    assert_only_whole_files(out, sources)
    names = sorted(p.name for p in out.iterdir())
    if step == "fsync of the 3rd file":  # group 2's segment: group 1 published, nothing after
        assert names == [sealed[0].path.name, sealed[0].path.name + ".sha256"]
    elif step == "fsync of the 1st file":
        assert names == []
    elif step == "rename of the 4th file":  # group 2's sidecar: its segment is withdrawn
        assert names == [sealed[0].path.name, sealed[0].path.name + ".sha256"]
    copies = backup_wal(engine, target(engine, "w"), 0)
    assert [c.segment_id for c in copies] == [s.segment_id for s in sealed]
    assert_only_whole_files(out, sources)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [n for s in sealed for n in (s.path.name, s.path.name + ".sha256")]
    )


def test_the_source_changing_under_the_copy_is_refused(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sealed segment must never change; if something rewrites it between the check and
    the kernel copy, the copy is not published (the file is touched for real)."""
    real = files.copy_range
    victim = engine.sealed_segments()[1].path

    def touching(src: int, dst: int, size: int, throttle: object = None) -> None:
        if os.path.samestat(os.fstat(src), os.stat(victim)):
            os.utime(victim, ns=(1, 1))
        real(src, dst, size)

    monkeypatch.setattr(files, "copy_range", touching)
    with pytest.raises(StorageError, match="changed while being backed up"):
        backup_wal(engine, target(engine, "w"), 0)
    out = dest_dir(engine, "w")
    first = engine.sealed_segments()[0].path.name
    assert sorted(p.name for p in out.iterdir()) == [first, first + ".sha256"]


# --- pacing (backup/pacing.py) ---


def test_a_wal_backup_is_charged_to_the_servers_pacer(engine: Engine) -> None:
    """Without an explicit throttle the copy goes through the installed pacer: with a
    ``--backup-rate-limit`` below its size it waits (recorded by a fake sleep, nothing
    sleeps) and the wait is the ``pace`` phase, taken out of ``write``."""
    from unisondb.backup import pacing, phases

    slept: list[float] = []
    size = sum(s.size for s in engine.sealed_segments())
    assert size > 128 << 10
    pacer = pacing.Pacer(64 << 10, sleep=slept.append)  # 64 KiB/s, 1 s of burst
    previous = pacing.current()
    pacing.install(pacer)
    try:
        with phases.collecting() as ph:
            copies = backup_wal(engine, target(engine, "paced"), 0)
    finally:
        pacing.install(previous)
    assert sum(c.size for c in copies) == size
    assert sum(slept) > 0.5 and ph["pace"] == pytest.approx(sum(slept))
    assert ph["write"] >= 0.0  # the (here: fake) sleeps moved out of the copy's time
    sha256sum_c(dest_dir(engine, "paced"))
