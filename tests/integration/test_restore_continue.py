"""Life after a point-in-time restore: writes continue on a new timeline, the WAL backup
loop (``afterSegmentId``) keeps working, and a second restore reaches the new writes —
never the abandoned ones — unless ``--timeline`` asks for the old history.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from test_restore_support import NS, History, read_checkpoint, read_keyspace, wal_times

from unisondb.restore import restore
from unisondb.restore.timefmt import format_ns
from unisondb.storage import segment


def _ids(d: Path) -> list[tuple[int, int]]:
    """(segment id, timeline) of every segment in a backup dir."""
    out = []
    for p in sorted(d.glob("*.wal")):
        h = segment.read_summary(p).header
        out.append((h.segment_id, h.timeline))
    return out


def test_restore_then_continue_then_restore_again(tmp_path: Path) -> None:
    # --- the original history (timeline 1) with an hourly-style backup loop ---
    a = History(tmp_path / "a")
    a.open()
    a.write_random(100)
    s1, cp1 = a.snapshot("s1.db")
    a.write_random(100)
    a.backup_wal("wal/h1")
    a.write_random(100)
    a.backup_wal("wal/h2")
    a.close()
    last_backed_up = a.last_backed_up
    old_dirs = [a.backup_root / "wal" / "h1", a.backup_root / "wal" / "h2"]

    # --- point-in-time restore into the original data dir (an operator's mistake at 181) ---
    out = restore(a.data_dir, NS, s1, old_dirs, target_lsn=180, force=True)
    assert out.summary is not None
    assert out.summary.timeline == 2
    # Right after the last backed-up id: the replaced wal/ only had its (unsealed) active
    # segment beyond it, which no backup can hold; so the loop sees no skipped id.
    assert out.summary.next_segment_id == last_backed_up + 1
    # The backup directories survive the restore (they are outside <data>/<ns>).
    assert all(d.is_dir() for d in old_dirs)

    # --- writes continue; the same backup loop state (afterSegmentId) keeps working ---
    b = History(a.root, seed=5, base_lsn=180)
    b.last_backed_up = last_backed_up
    b.open()
    assert b.eng.checkpoint().timeline == 2
    b.write_random(40)
    b.restart()
    b.write_random(40)
    s2, cp2 = b.snapshot("s2.db")
    b.write_random(40)
    new_dir = b.backup_wal("wal/h3")
    b.close()
    copied = _ids(new_dir)
    assert copied, "the loop must copy the new segments"
    assert all(seg_id > last_backed_up and tl == 2 for seg_id, tl in copied)
    base = a.state_at(180)
    new_state = b.state_at(b.last_lsn, base=base)
    assert read_keyspace(a.data_dir) == new_state
    assert cp2.timeline == 2

    all_dirs = [a.backup_root / "wal"]  # h1, h2 and h3, searched recursively
    # --- second restore from the OLD snapshot: follows timeline 2 from LSN 181 ---
    out = restore(tmp_path / "r1", NS, s1, all_dirs)
    assert out.summary is not None and out.summary.end_lsn == b.last_lsn
    assert read_keyspace(tmp_path / "r1") == new_state
    assert read_checkpoint(tmp_path / "r1").timeline == 3
    switches = out.verified.plan.chain.switches
    assert [(s.at_lsn, s.from_timeline, s.to_timeline) for s in switches] == [(181, 1, 2)]

    # ... to a time inside the new writes
    times = wal_times(new_dir)
    mid = 180 + 60
    out = restore(tmp_path / "r2", NS, s1, all_dirs, target_time=format_ns(times[mid]))
    assert out.summary is not None and out.summary.end_lsn == mid
    assert read_keyspace(tmp_path / "r2") == b.state_at(mid, base=base)

    # ... from the snapshot taken on timeline 2
    out = restore(tmp_path / "r3", NS, s2, all_dirs, target_lsn=b.last_lsn - 5)
    assert read_keyspace(tmp_path / "r3") == b.state_at(b.last_lsn - 5, base=base)

    # ... and the abandoned history only when asked for explicitly
    out = restore(tmp_path / "r4", NS, s1, all_dirs, history_choice="timeline:1")
    assert out.summary is not None and out.summary.end_lsn == 300
    assert read_keyspace(tmp_path / "r4") == a.state_at(300)
    assert out.summary.timeline == 3  # still a fresh timeline: 2 is taken

    # A snapshot of the new timeline cannot be sent down the old one.
    with pytest.raises(Exception, match="does not continue the snapshot"):
        restore(tmp_path / "r5", NS, s2, all_dirs, history_choice="timeline:1")


def test_restoring_twice_from_the_same_backups_never_reuses_a_timeline(tmp_path: Path) -> None:
    a = History(tmp_path / "a")
    a.open()
    a.write_random(50)
    s1, _ = a.snapshot("s1.db")
    a.write_random(100)
    wal = a.backup_wal("wal/x")
    a.close()
    seen = set()
    for target in (60, 90, 120):
        # --timeline 1: each time a point of the ORIGINAL history, which the earlier restores
        # abandoned (without it the newest timeline would be followed from LSN 61 on).
        out = restore(a.data_dir, NS, s1, [wal], target_lsn=target, force=True, history_choice="timeline:1")
        assert read_keyspace(a.data_dir) == a.state_at(target)
        assert out.summary is not None
        b = History(a.root, seed=target, base_lsn=target)
        b.last_backed_up = a.last_backed_up
        b.open()
        b.write_random(10)
        b.backup_wal(f"wal/after-{target}")
        b.close()
        seen.add(out.summary.timeline)
        # the next restore sees every backup dir, including the new timeline's segments
        wal = a.backup_root / "wal"
        a.last_backed_up = b.last_backed_up
    assert seen == {2, 3, 4}


def test_restore_into_a_fresh_machine_then_backups_continue(tmp_path: Path) -> None:
    """Disaster recovery: the data dir is gone; only the backup tree is left."""
    a = History(tmp_path / "a")
    a.open()
    a.write_random(60)
    s1, _ = a.snapshot("s1.db")
    a.write_random(60)
    a.backup_wal("wal/x")
    a.close()
    backups = tmp_path / "offsite"
    shutil.copytree(a.backup_root, backups)
    shutil.rmtree(a.data_dir)
    out = restore(a.data_dir, NS, backups / "snapshots" / "s1.db", [backups / "wal"])
    assert out.summary is not None and out.summary.end_lsn == 120
    assert read_keyspace(a.data_dir) == a.state_at(120)
    b = History(a.root, seed=3, base_lsn=120)
    b.last_backed_up = a.last_backed_up
    b.open()
    b.write_random(5)
    d = b.backup_wal("wal/y")
    b.close()
    assert all(seg_id > a.last_backed_up and tl == 2 for seg_id, tl in _ids(d))
