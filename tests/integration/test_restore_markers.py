"""Point-in-time restore to every marker, by LSN and by time, compared with a model.

One history (in-process engine, 4 KiB segments so it rotates often): writes, a snapshot in
the middle of a segment, more writes, an engine restart, more writes, WAL backups. Every
marker from the snapshot's LSN to the last LSN is restored by ``--target-lsn`` and by
``--target-time`` (the exact record time and a time between two records), and the whole
restored keyspace must equal the model's.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_restore_support import NS, History, read_checkpoint, read_keyspace

from unisondb.restore import restore
from unisondb.restore.errors import BadTarget
from unisondb.restore.timefmt import format_ns
from unisondb.storage import segment
from unisondb.storage.engine import Engine


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> tuple[History, Path, list[Path]]:
    h = History(tmp_path_factory.mktemp("markers"))
    h.open()
    h.write_random(75)
    snap, cp = h.snapshot("mid.db")
    assert cp.applied_lsn == 75
    h.write_random(60)
    first_dir = h.backup_wal("wal/20250108-1200")
    h.restart()  # a new segment starts; the history continues on the same timeline
    h.write_random(90)
    second_dir = h.backup_wal("wal/20250108-1300")
    h.close()
    return h, snap, [first_dir, second_dir]


def _segment_bounds(dirs: list[Path]) -> set[int]:
    out: set[int] = set()
    for d in dirs:
        for p in d.glob("*.wal"):
            s = segment.read_summary(p)
            assert s.footer is not None
            out |= {s.header.first_lsn, s.footer.last_lsn}
    return out


def test_restore_to_every_marker_by_lsn_and_time(
    history: tuple[History, Path, list[Path]], tmp_path: Path
) -> None:
    h, snap, dirs = history
    times = h.times()
    last = h.last_lsn
    assert last == 225
    bounds = _segment_bounds(dirs)
    assert len(bounds) >= 8, "the history should span several segments"
    markers = sorted({m for m in range(75, last + 1, 6)} | {m for m in bounds if m >= 75} | {75, 76, last})
    target = tmp_path / "restored"
    last_timeline = 1
    for i, m in enumerate(markers):
        out = restore(target, NS, snap, dirs, target_lsn=m, force=i > 0)
        assert out.summary is not None and out.summary.end_lsn == m
        assert read_keyspace(target) == h.state_at(m), f"LSN target {m}"
        cp = read_checkpoint(target)
        # Each restore forks a new history; its timeline counter is above every one seen
        # (the previous restore's, left in the target's wal/, included).
        assert cp.applied_lsn == m and cp.timeline > last_timeline
        last_timeline = cp.timeline
        if m == last:
            continue  # a time target needs a newer record to be certain (tested below)
        exact = times[m]
        expected = max(n for n, t in times.items() if t <= exact)
        out = restore(target, NS, snap, dirs, target_time=format_ns(exact), force=True)
        assert out.summary is not None and out.summary.end_lsn == expected
        assert read_keyspace(target) == h.state_at(expected), f"time target at LSN {m}"
        if times[m + 1] - times[m] > 1:
            between = times[m] + (times[m + 1] - times[m]) // 2
            out = restore(target, NS, snap, dirs, target_time=between, force=True)
            assert out.summary is not None and out.summary.end_lsn == m


def test_no_target_restores_to_the_end_and_says_where(
    history: tuple[History, Path, list[Path]], tmp_path: Path
) -> None:
    h, snap, dirs = history
    out = restore(tmp_path / "d", NS, snap, dirs)
    assert out.summary is not None and out.summary.end_lsn == h.last_lsn
    assert out.verified.plan.chain.end_lsn == h.last_lsn
    assert read_keyspace(tmp_path / "d") == h.state_at(h.last_lsn)


def test_time_target_at_or_after_the_last_record_is_refused(
    history: tuple[History, Path, list[Path]], tmp_path: Path
) -> None:
    h, snap, dirs = history
    last_time = h.times()[h.last_lsn]
    for t in (last_time, last_time + 10**9):
        with pytest.raises(BadTarget, match="after the last record"):
            restore(tmp_path / "d", NS, snap, dirs, target_time=t)
    assert not (tmp_path / "d" / NS).exists()


def test_targets_before_the_snapshot_are_refused(
    history: tuple[History, Path, list[Path]], tmp_path: Path
) -> None:
    h, snap, dirs = history
    times = h.times()
    with pytest.raises(BadTarget, match="before the snapshot"):
        restore(tmp_path / "d", NS, snap, dirs, target_lsn=74)
    with pytest.raises(BadTarget, match="before the snapshot"):
        restore(tmp_path / "d", NS, snap, dirs, target_time=times[75] - 1)
    with pytest.raises(BadTarget, match="beyond the available WAL"):
        restore(tmp_path / "d", NS, snap, dirs, target_lsn=h.last_lsn + 1)
    # The snapshot's own LSN and time are valid targets.
    out = restore(tmp_path / "d", NS, snap, dirs, target_lsn=75)
    assert out.summary is not None and out.summary.records_replayed == 0
    assert read_keyspace(tmp_path / "d") == h.state_at(75)


def test_snapshot_only_restore_serves_the_snapshot(
    history: tuple[History, Path, list[Path]], tmp_path: Path
) -> None:
    h, snap, _dirs = history
    out = restore(tmp_path / "d", NS, snap)
    assert out.summary is not None and out.summary.end_lsn == 75
    eng = Engine.open(tmp_path / "d", NS, h.config)
    try:
        assert dict(eng.btree.items()) == h.state_at(75)
        assert eng.checkpoint().timeline == 2
        lsn = eng.put(b"after", b"restore")
        assert lsn == 76
    finally:
        eng.close()
