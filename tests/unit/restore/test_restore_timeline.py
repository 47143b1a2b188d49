"""Chain selection across timelines (pure: fabricated segment metadata, no files)."""

from __future__ import annotations

from pathlib import Path

from unisondb.restore.inventory import SegmentMeta
from unisondb.restore.timeline import coverage_holes, overlaps, select_chain


def seg(seg_id: int, tl: int, first: int, last: int, *, t0: int = 0,
        damage: str | None = None) -> SegmentMeta:
    return SegmentMeta(Path(f"/b/{seg_id:09d}.wal"), seg_id, tl, first, last, last - first + 1,
                       t0 + first, t0 + last, 0, 0, 100, True, damage)


def spans(chain_links: list) -> list[tuple[int, int, int, int]]:  # type: ignore[type-arg]
    return [(ln.segment.segment_id, ln.timeline, ln.from_lsn, ln.to_lsn) for ln in chain_links]


def test_single_timeline_chain_starts_inside_a_segment() -> None:
    segs = [seg(1, 1, 1, 100), seg(2, 1, 101, 200), seg(3, 1, 201, 250)]
    chain = select_chain(150, 1, segs)
    assert spans(chain.links) == [(2, 1, 151, 200), (3, 1, 201, 250)]
    assert chain.end_lsn == 250 and not chain.holes


def test_segments_before_the_snapshot_are_ignored() -> None:
    chain = select_chain(200, 1, [seg(1, 1, 1, 100), seg(2, 1, 101, 200)])
    assert chain.links == [] and chain.end_lsn == 200


def test_hole_is_named_with_the_probably_missing_segment_ids() -> None:
    segs = [seg(1, 1, 1, 100), seg(2, 1, 101, 200), seg(5, 1, 401, 500)]
    chain = select_chain(50, 1, segs)
    assert chain.end_lsn == 200
    assert [(h.first_lsn, h.last_lsn, h.missing_ids) for h in chain.holes] == [(201, 400, (3, 4))]
    assert spans(chain.beyond) == [(5, 1, 401, 500)]
    assert "000000003.wal..000000004.wal" in chain.holes[0].describe()


def test_higher_timeline_takes_over_at_its_first_lsn() -> None:
    # Timeline 2 was started by a restore to LSN 150: its first segment begins at 151.
    segs = [seg(1, 1, 1, 100), seg(2, 1, 101, 200), seg(3, 1, 201, 300),
            seg(4, 2, 151, 180), seg(5, 2, 181, 260)]
    chain = select_chain(50, 1, segs)
    assert spans(chain.links) == [(1, 1, 51, 100), (2, 1, 101, 150), (4, 2, 151, 180),
                                  (5, 2, 181, 260)]
    assert [(s.at_lsn, s.from_timeline, s.to_timeline) for s in chain.switches] == [(151, 1, 2)]
    # The abandoned timeline-1 records 151..300 are never used.


def test_timeline_cap_follows_the_old_history() -> None:
    segs = [seg(1, 1, 1, 100), seg(2, 1, 101, 200), seg(3, 1, 201, 300), seg(4, 2, 151, 180)]
    chain = select_chain(50, 1, segs, timeline_cap=1)
    assert spans(chain.links) == [(1, 1, 51, 100), (2, 1, 101, 200), (3, 1, 201, 300)]


def test_a_timeline_that_branched_before_the_snapshot_is_never_entered() -> None:
    # Timeline 2 branched at LSN 80; the snapshot is at LSN 120 on timeline 1.
    segs = [seg(1, 1, 1, 100), seg(2, 1, 101, 200), seg(3, 2, 81, 300)]
    chain = select_chain(120, 1, segs)
    assert spans(chain.links) == [(2, 1, 121, 200)]
    # ... even if timeline 1 is missing there: a hole, not a silent mix of histories.
    chain = select_chain(120, 1, [seg(1, 1, 1, 100), seg(3, 2, 81, 300)])
    assert chain.links == [] and chain.holes == []


def test_snapshot_on_the_new_timeline_continues_there() -> None:
    segs = [seg(1, 1, 1, 100), seg(2, 1, 101, 200), seg(4, 2, 151, 180), seg(5, 2, 181, 260)]
    chain = select_chain(170, 2, segs)
    assert spans(chain.links) == [(4, 2, 171, 180), (5, 2, 181, 260)]
    # ...and never falls back to timeline 1, even where timeline 2 has no segment.
    chain = select_chain(170, 2, [seg(1, 1, 1, 100), seg(2, 1, 101, 200), seg(4, 2, 151, 180)])
    assert chain.end_lsn == 180


def test_restore_that_starts_exactly_after_the_snapshot() -> None:
    # A restore to exactly the snapshot's LSN 100 made timeline 2 start at 101.
    segs = [seg(1, 1, 1, 100), seg(2, 1, 101, 200), seg(3, 2, 101, 150)]
    chain = select_chain(100, 1, segs)
    assert spans(chain.links) == [(3, 2, 101, 150)]


def test_several_restores_chain_in_timeline_order() -> None:
    segs = [seg(1, 1, 1, 300), seg(2, 2, 101, 250), seg(3, 3, 201, 400)]
    chain = select_chain(10, 1, segs)
    assert spans(chain.links) == [(1, 1, 11, 100), (2, 2, 101, 200), (3, 3, 201, 400)]


def test_max_lsn_stops_the_walk() -> None:
    segs = [seg(1, 1, 1, 100), seg(2, 1, 101, 200), seg(4, 1, 301, 400)]
    chain = select_chain(10, 1, segs, max_lsn=150)
    assert chain.end_lsn == 200 and chain.holes == []


def test_damaged_and_empty_segments_are_not_used() -> None:
    segs = [seg(1, 1, 1, 100), seg(2, 1, 101, 200, damage="bad"), seg(3, 1, 201, 200)]
    chain = select_chain(10, 1, segs)
    assert chain.end_lsn == 100


def test_coverage_holes_and_overlaps_per_timeline() -> None:
    segs = [seg(1, 1, 1, 100), seg(3, 1, 201, 300), seg(4, 2, 151, 160), seg(5, 2, 161, 170),
            seg(6, 1, 290, 310)]
    assert [(h.timeline, h.first_lsn, h.last_lsn, h.missing_ids) for h in coverage_holes(segs)] \
        == [(1, 101, 200, (2, 2))]
    assert [(a.segment_id, b.segment_id) for a, b in overlaps(segs)] == [(3, 6)]
