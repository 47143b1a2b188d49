"""Storage faults while writing, sealing or rotating: cut back and go on, never corrupt the log.

EIO and ENOSPC cannot be produced on demand by a real disk here, so these tests inject
them by patching ``fsutil.fdatasync`` / ``ActiveSegment.seal`` / ``ActiveSegment.create``
(fakes for fault injection only; the real full disk is in tests/integration/test_disk_full.py).
What they check is real: after the failure the segment is cut back and the engine keeps
serving, or stalls (507) until a retry succeeds; only a cut back that fails as well stops it
(``Unavailable``); a restart recovers every acknowledged write with contiguous LSNs and
whole segments.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

import pytest

from unisondb.config import EngineConfig
from unisondb.errors import NoSpace, StorageError, Unavailable
from unisondb.storage import fsutil, layout, segment
from unisondb.storage.engine import Engine, _Request
from unisondb.storage.record import Entry, EntryKind

NS = "ns"


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


def _check_log_whole(data_dir: Path, cfg: EngineConfig, expected: dict[bytes, bytes]) -> None:
    eng = Engine.open(data_dir, NS, cfg)
    try:
        for key, value in expected.items():
            assert eng.get(key) == value, key
        lsn = 0
        for _seg_id, path in segment.iter_segment_files(layout.wal_dir(data_dir, NS)):
            for rec, _s, _e in segment.scan(path).records:
                assert rec.lsn == lsn + 1 or lsn == 0
                lsn = rec.lsn
    finally:
        eng.close()


def test_failed_fsync_while_sealing_cuts_the_footer_back_and_keeps_serving(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = EngineConfig()
    eng = Engine.open(data_dir, NS, cfg)
    for i in range(3):
        eng.put(b"before%d" % i, b"v")
    real: Callable[[int], None] = fsutil.fdatasync
    armed = {"on": True}

    def flaky(fd: int) -> None:
        if armed["on"]:
            armed["on"] = False
            raise OSError(errno.EIO, "Input/output error")
        real(fd)

    monkeypatch.setattr(segment.fsutil, "fdatasync", flaky)
    active = eng.wal.active
    assert active is not None
    size = active.size
    with pytest.raises(StorageError):
        eng.rotate()
    # The footer was cut off again (and the cut synced): the segment is still active and
    # whole, so writes go on in it and a later rotation seals it.
    assert eng.wal.active is active and active.size == size and not active.broken
    assert (active.path.stat().st_size) == size
    eng.put(b"after", b"w")
    assert eng.rotate() == active.header.segment_id
    monkeypatch.setattr(segment.fsutil, "fdatasync", real)
    eng.close()
    _check_log_whole(data_dir, cfg, {**{b"before%d" % i: b"v" for i in range(3)}, b"after": b"w"})


def test_footer_enospc_during_a_mid_group_rotation_acks_what_is_durable(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = EngineConfig(segment_size=4096)
    eng = Engine.open(data_dir, NS, cfg)
    eng.put(b"k0", b"v" * 100)
    real_seal = segment.ActiveSegment.seal

    def failing_seal(self: segment.ActiveSegment, fingerprint: bytes | None) -> segment.SegmentFooter:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(segment.ActiveSegment, "seal", failing_seal)
    futures: list[Future[int]] = []
    with eng._cond:  # hold the writer so these form one group that must rotate midway
        for i in range(1, 60):
            fut: Future[int] = Future()
            eng._enqueue(_Request((Entry(EntryKind.PUT, b"k%d" % i, b"x" * 100),), fut))
            futures.append(fut)
    acked: dict[bytes, bytes] = {b"k0": b"v" * 100}
    failed = 0
    for i, fut in enumerate(futures, 1):
        try:
            lsn = fut.result(timeout=30)
        except NoSpace:
            failed += 1
            continue
        assert failed == 0, "only a prefix of the group can be durable"
        assert lsn == i + 1
        acked[b"k%d" % i] = b"x" * 100
    # Records before the rotation point were synced and applied: acknowledged. The rest
    # were never written and fail with 507.
    assert 1 < len(acked) < 60 and failed > 0
    with pytest.raises(NoSpace):
        eng.put(b"after", b"y")  # the full segment still cannot be sealed
    monkeypatch.setattr(segment.ActiveSegment, "seal", real_seal)
    lsn = eng.put(b"after", b"y")  # space is back: the rotation succeeds, writes resume
    assert lsn == len(acked) + 1  # the LSNs of the failed writes were handed out again
    acked[b"after"] = b"y"
    eng.close()
    _check_log_whole(data_dir, cfg, acked)


def test_failure_to_create_the_next_segment_stalls_until_a_retry_creates_it(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = EngineConfig(disk_full_retry=3600)  # only retry_now retries here
    eng = Engine.open(data_dir, NS, cfg)
    eng.put(b"a", b"1")

    def no_space(directory: Path, header: segment.SegmentHeader) -> segment.ActiveSegment:
        raise OSError(errno.ENOSPC, "No space left on device", str(directory))

    monkeypatch.setattr(segment.ActiveSegment, "create", staticmethod(no_space))
    with pytest.raises(NoSpace):
        eng.rotate()
    with pytest.raises(NoSpace, match="no space left on device"):
        eng.put(b"b", b"2")  # refused at once, not queued forever
    assert eng.get(b"a") == b"1"  # reads go on
    assert eng.retry_now() is False
    monkeypatch.undo()
    assert eng.retry_now() is True
    assert eng.stalled is None
    eng.put(b"b", b"2")
    eng.close()
    _check_log_whole(data_dir, cfg, {b"a": b"1", b"b": b"2"})


def test_failed_wal_fsync_cuts_the_group_off_and_reuses_its_lsns(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = EngineConfig()
    eng = Engine.open(data_dir, NS, cfg)
    eng.put(b"a", b"1")
    active = eng.wal.active
    assert active is not None
    size = active.size
    real: Callable[[int], None] = fsutil.fdatasync
    armed = {"on": True}

    def flaky(fd: int) -> None:
        if armed["on"]:
            armed["on"] = False
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd)

    monkeypatch.setattr(segment.fsutil, "fdatasync", flaky)
    with pytest.raises(NoSpace):
        eng.put(b"lost", b"x")
    # Its bytes might or might not have reached the disk: they were cut off again, durably
    # (what follows the records is at most the zero-filler's zeros).
    assert active.size == size and not any(active.path.read_bytes()[size:])
    assert eng.put(b"b", b"2") == 2
    monkeypatch.undo()
    eng.close()
    _check_log_whole(data_dir, cfg, {b"a": b"1", b"b": b"2", b"lost": None})  # type: ignore[dict-item]


def test_a_cut_back_that_fails_too_stops_the_engine(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The one remaining fail-stop: the segment's end is unknown, only recovery decides."""
    cfg = EngineConfig()
    eng = Engine.open(data_dir, NS, cfg)
    eng.put(b"a", b"1")

    def eio(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(segment.fsutil, "fdatasync", eio)
    with pytest.raises(StorageError):
        eng.put(b"b", b"2")
    with pytest.raises(Unavailable):
        eng.put(b"c", b"3")
    monkeypatch.undo()
    eng.close()
    _check_log_whole(data_dir, cfg, {b"a": b"1"})
