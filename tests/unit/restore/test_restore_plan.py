"""``build_plan``: refusals, target resolution and the new history (pure, no files)."""

from __future__ import annotations

from pathlib import Path

import pytest

from unisondb.errors import InvalidRequest, LsnGap
from unisondb.restore.errors import BackupCorrupt, BackupMismatch, BadTarget
from unisondb.restore.inventory import (
    ExistingNamespace,
    SegmentMeta,
    SnapshotInfo,
    TargetSegment,
    WalInventory,
)
from unisondb.restore.plan import RestorePlan, Target, build_plan
from unisondb.storage.btree import Checkpoint
from unisondb.storage.history import NO_HISTORY, Lineage, fork_segment_id
from unisondb.storage.segment import namespace_crc

NS = "users"
CRC = namespace_crc(NS)


def hid(tl: int) -> bytes:
    return bytes([tl]) * 16


def lineage(tl: int, first: int) -> Lineage:
    """History ``tl`` (a fork of history tl - 1 right before ``first``, for tl > 1)."""
    if tl == 1:
        return Lineage(hid(1), NO_HISTORY, 0, 1)
    return Lineage(hid(tl), hid(tl - 1), first - 1, tl)


def seg(
    seg_id: int,
    tl: int,
    first: int,
    last: int,
    *,
    ns_crc: int = CRC,
    damage: str | None = None,
    sealed: bool = True,
) -> SegmentMeta:
    return SegmentMeta(
        Path(f"/b/{seg_id:09d}.wal"),
        seg_id,
        tl,
        first,
        last,
        last - first + 1,
        1000 + first * 10,
        1000 + last * 10,
        seg_id,
        ns_crc,
        100,
        sealed,
        damage,
        lineage(tl, first),
    )


def snap(lsn: int, tl: int = 1, seg_id: int = 1) -> SnapshotInfo:
    # offset 0: no anchor comparison (that needs file bytes; covered by integration tests)
    return SnapshotInfo(
        Path("/b/s.db"), 4096, Checkpoint(lsn, seg_id, 0, tl, 1000 + lsn * 10, history=hid(tl)), True, 10
    )


def inv(*segs: SegmentMeta) -> WalInventory:
    i = WalInventory((Path("/b"),))
    i.segments = sorted(segs, key=lambda s: s.segment_id)
    i.copies = {s.segment_id: [s.path] for s in segs}
    return i


def plan(
    snapshot: SnapshotInfo, inventory: WalInventory, target: Target | None = None, **kw: object
) -> RestorePlan:
    return build_plan(NS, Path("/data"), snapshot, inventory, target or Target(), **kw)  # type: ignore[arg-type]


SEGS = (seg(1, 1, 1, 100), seg(2, 1, 101, 200), seg(3, 1, 201, 300))


def test_lsn_target_inside_the_chain() -> None:
    p = plan(snap(50), inv(*SEGS), Target("lsn", lsn=250))
    assert p.end_lsn == 250
    assert [(ln.segment.segment_id, ln.from_lsn, ln.to_lsn) for ln in p.links_through(250)] == [
        (1, 51, 100),
        (2, 101, 200),
        (3, 201, 250),
    ]


def test_new_timeline_and_segment_id_exceed_everything_seen() -> None:
    existing = ExistingNamespace(
        Path("/data/users"),
        True,
        True,
        (TargetSegment(9, Path("/data/users/wal/000000009.wal"), 4, 301, 320, 10),),
        None,
    )
    p = plan(
        snap(50),
        inv(*SEGS, seg(7, 3, 400, 410)),
        Target("lsn", lsn=120),
        history_choice=hid(1).hex(),
        existing=existing,
    )
    assert p.new_timeline == 5  # above the existing namespace's timeline 4
    assert p.new_segment_id == fork_segment_id(9, 1) == 10  # above every id seen
    assert any("requires --force" in w for w in p.warnings)
    assert any("000000009" in w and "will be deleted" in w for w in p.warnings)


def test_time_target_needs_a_newer_record() -> None:
    p = plan(snap(50), inv(*SEGS), Target("time", time_ns=1000 + 150 * 10))
    assert p.end_lsn is None  # resolved while verifying, from the records
    with pytest.raises(BadTarget, match="after the last record"):
        plan(snap(50), inv(*SEGS), Target("time", time_ns=1000 + 300 * 10))


@pytest.mark.parametrize("target", [Target("lsn", lsn=49), Target("time", time_ns=1000 + 499)])
def test_target_before_the_snapshot(target: Target) -> None:
    with pytest.raises(BadTarget, match="before the snapshot"):
        plan(snap(50), inv(*SEGS), target)


def test_gap_before_the_target_names_every_missing_range() -> None:
    segs = (seg(1, 1, 1, 100), seg(3, 1, 201, 300), seg(5, 1, 401, 500))
    with pytest.raises(LsnGap) as exc:
        plan(snap(50), inv(*segs), Target("lsn", lsn=450))
    msg = str(exc.value)
    assert "LSNs 101..200" in msg and "LSNs 301..400" in msg
    assert "000000002.wal" in msg and "000000004.wal" in msg


def test_no_target_with_a_hole_is_refused_and_suggests_the_explicit_lsn() -> None:
    with pytest.raises(LsnGap, match="--target-lsn 100"):
        plan(snap(50), inv(seg(1, 1, 1, 100), seg(3, 1, 201, 300)))


def test_target_beyond_everything() -> None:
    with pytest.raises(BadTarget, match="ends at LSN 300"):
        plan(snap(50), inv(*SEGS), Target("lsn", lsn=301))


def test_foreign_namespace_and_conflicts_and_damage() -> None:
    with pytest.raises(BackupMismatch, match="another namespace"):
        plan(snap(50), inv(*SEGS, seg(4, 1, 301, 310, ns_crc=CRC ^ 1)))
    i = inv(*SEGS)
    i.conflicts = [(Path("/a/000000002.wal"), Path("/b/000000002.wal"))]
    with pytest.raises(BackupMismatch, match="same segment id"):
        plan(snap(50), i)
    with pytest.raises(BackupCorrupt, match="damaged"):
        plan(snap(50), inv(seg(1, 1, 1, 100), seg(2, 1, 101, 200, damage="footer checksum")))
    # Damage in a segment the restore cannot need is only a warning.
    p = plan(snap(150), inv(seg(1, 1, 1, 100, damage="x"), seg(2, 1, 101, 200)))
    assert any("ignoring damaged segment" in w for w in p.warnings)


def test_a_history_that_does_not_continue_the_snapshot_cannot_be_chosen() -> None:
    with pytest.raises(BadTarget, match="does not continue the snapshot"):
        plan(snap(50, tl=2), inv(*SEGS), history_choice=hid(1).hex())


def test_both_targets_is_an_error() -> None:
    with pytest.raises(InvalidRequest):
        Target.from_options(5, 10)


def test_no_target_warns_when_the_rest_is_another_history() -> None:
    p = plan(snap(120), inv(seg(1, 1, 1, 100), seg(3, 2, 81, 300)))
    assert p.end_lsn == 120
    assert any("another history" in w for w in p.warnings)


def test_the_other_history_warning_says_where_it_branched() -> None:
    # Timeline 2 branched off timeline 1 after LSN 150, well after the snapshot (LSN 50).
    # The chain follows timeline 2 to LSN 180; LSN 181 exists only in timeline 1's segment
    # 2, the history timeline 2 replaced: not one "that branched off before the snapshot".
    p = plan(snap(50), inv(seg(1, 1, 1, 100), seg(2, 1, 101, 200), seg(3, 2, 151, 180)))
    assert p.end_lsn == 180
    [w] = [w for w in p.warnings if "another history" in w or "older history" in w]
    assert "before the snapshot" not in w
    assert "000000002.wal (timeline 1" in w and "LSN 151" in w
    # ...and the one that did branch before the snapshot is still described as such.
    p = plan(snap(120), inv(seg(1, 1, 1, 100), seg(3, 2, 81, 300)))
    [w] = [w for w in p.warnings if "another history" in w]
    assert "after LSN 80" in w and "before the snapshot" in w
    # A history not chosen (--history) that branched after the snapshot says so.
    p = plan(
        snap(50),
        inv(seg(1, 1, 1, 100), seg(2, 1, 101, 150), seg(3, 2, 151, 300)),
        history_choice=hid(1).hex(),
    )
    [w] = [w for w in p.warnings if "another history that" in w]
    assert "before the snapshot" not in w and "--history" in w and "after LSN 150" in w
