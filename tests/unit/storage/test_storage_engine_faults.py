"""Storage faults while sealing or rotating: the engine must stop, never corrupt the log.

EIO and ENOSPC cannot be produced on demand by a real disk here, so these tests inject
them by patching ``fsutil.fdatasync`` / ``ActiveSegment.seal`` / ``ActiveSegment.create``
(fakes for fault injection only). What they check is real: after the failure the engine
refuses writes (``Unavailable``), and a restart recovers every acknowledged write with
contiguous LSNs and whole segments.
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


def test_failed_fsync_while_sealing_stops_the_engine(
        data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
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
    with pytest.raises(StorageError):
        eng.rotate()
    with pytest.raises(Unavailable):
        eng.put(b"after", b"w")  # never appended after a half-sealed footer
    monkeypatch.setattr(segment.fsutil, "fdatasync", real)
    eng.close()
    _check_log_whole(data_dir, cfg, {b"before%d" % i: b"v" for i in range(3)})


def test_footer_enospc_during_a_mid_group_rotation_spends_the_lsns(
        data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
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
    for fut in futures:
        with pytest.raises(NoSpace):
            fut.result(timeout=30)
    with pytest.raises(Unavailable):
        eng.put(b"after", b"y")  # no LSN of the failed group is handed out again
    monkeypatch.setattr(segment.ActiveSegment, "seal", real_seal)
    eng.close()
    _check_log_whole(data_dir, cfg, {b"k0": b"v" * 100})


def test_failure_to_create_the_next_segment_stops_the_engine_instead_of_hanging(
        data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = EngineConfig()
    eng = Engine.open(data_dir, NS, cfg)
    eng.put(b"a", b"1")

    def no_space(directory: Path, header: segment.SegmentHeader) -> segment.ActiveSegment:
        raise OSError(errno.ENOSPC, "No space left on device", str(directory))

    monkeypatch.setattr(segment.ActiveSegment, "create", staticmethod(no_space))
    with pytest.raises(NoSpace):
        eng.rotate()
    with pytest.raises(Unavailable):
        eng.put(b"b", b"2")  # refused at once, not queued forever
    monkeypatch.undo()
    eng.close()
    _check_log_whole(data_dir, cfg, {b"a": b"1"})
