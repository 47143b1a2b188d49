"""Chain selection across histories (pure: fabricated segment metadata, no files)."""

from __future__ import annotations

from pathlib import Path

import pytest

from unisondb.restore.errors import BackupMismatch, BadTarget
from unisondb.restore.inventory import SegmentMeta
from unisondb.restore.timeline import coverage_holes, overlaps, select_chain
from unisondb.storage.history import NO_HISTORY, Lineage


def hid(n: int) -> bytes:
    return bytes([n]) * 16


H1 = Lineage(hid(1), NO_HISTORY, 0, 1)


def child(n: int, parent: Lineage, fork_lsn: int) -> Lineage:
    return Lineage(hid(n), parent.history, fork_lsn, parent.timeline + 1)


def seg(
    seg_id: int, lin: Lineage, first: int, last: int, *, created: int = 0, damage: str | None = None
) -> SegmentMeta:
    return SegmentMeta(
        Path(f"/b/{seg_id:09d}.wal"),
        seg_id,
        lin.timeline,
        first,
        last,
        last - first + 1,
        first,
        last,
        created or seg_id,
        0,
        100,
        True,
        damage,
        lin,
    )


def spans(chain_links: list) -> list[tuple[int, int, int, int]]:  # type: ignore[type-arg]
    return [(ln.segment.segment_id, ln.timeline, ln.from_lsn, ln.to_lsn) for ln in chain_links]


def test_single_history_chain_starts_inside_a_segment() -> None:
    segs = [seg(1, H1, 1, 100), seg(2, H1, 101, 200), seg(3, H1, 201, 250)]
    chain = select_chain(150, H1.history, segs)
    assert spans(chain.links) == [(2, 1, 151, 200), (3, 1, 201, 250)]
    assert chain.end_lsn == 250 and not chain.holes and chain.target == H1.history


def test_segments_before_the_snapshot_are_ignored() -> None:
    chain = select_chain(200, H1.history, [seg(1, H1, 1, 100), seg(2, H1, 101, 200)])
    assert chain.links == [] and chain.end_lsn == 200


def test_hole_is_named_with_the_probably_missing_segment_ids() -> None:
    segs = [seg(1, H1, 1, 100), seg(2, H1, 101, 200), seg(5, H1, 401, 500)]
    chain = select_chain(50, H1.history, segs)
    assert chain.end_lsn == 200
    assert [(h.first_lsn, h.last_lsn, h.missing_ids) for h in chain.holes] == [(201, 400, (3, 4))]
    assert spans(chain.beyond) == [(5, 1, 401, 500)]
    assert "000000003.wal..000000004.wal" in chain.holes[0].describe()


def test_the_splice_of_finding_1_never_happens() -> None:
    """Snapshot s1 at LSN 150 of H1; H1 went on to 250 (segments 1-3); a server started on
    s1 forked H2 at 150, whose segments (ids from 1003) hold different records 151..230."""
    h2 = child(2, H1, 150)
    segs = [
        seg(1, H1, 1, 100),
        seg(2, H1, 101, 202),
        seg(3, H1, 203, 250),
        seg(1003, h2, 151, 230, created=5000),
    ]
    newest = select_chain(150, H1.history, segs)
    assert spans(newest.links) == [(1003, 2, 151, 230)]  # never H1's 151..250
    assert newest.target == h2.history and newest.end_lsn == 230
    assert [a.history for a in newest.alternatives] == [H1.history]
    old = select_chain(150, H1.history, segs, H1.history.hex()[:6])
    assert spans(old.links) == [(2, 1, 151, 202), (3, 1, 203, 250)]


def test_child_history_takes_over_at_its_fork() -> None:
    h2 = child(2, H1, 150)
    segs = [
        seg(1, H1, 1, 100),
        seg(2, H1, 101, 200),
        seg(3, H1, 201, 300),
        seg(1004, h2, 151, 180),
        seg(1005, h2, 181, 260),
    ]
    chain = select_chain(50, H1.history, segs)
    assert spans(chain.links) == [(1, 1, 51, 100), (2, 1, 101, 150), (1004, 2, 151, 180), (1005, 2, 181, 260)]
    assert [(s.at_lsn, s.from_history, s.to_history) for s in chain.switches] == [
        (151, H1.history, h2.history)
    ]


def test_a_history_that_forked_before_the_snapshot_is_never_entered() -> None:
    h2 = child(2, H1, 80)  # forked at LSN 80; the snapshot is at 120 of H1
    segs = [seg(1, H1, 1, 200), seg(1002, h2, 81, 400, created=9000)]
    chain = select_chain(120, H1.history, segs)
    assert spans(chain.links) == [(1, 1, 121, 200)] and not chain.alternatives
    with pytest.raises(BadTarget, match="does not continue the snapshot"):
        select_chain(120, H1.history, segs, h2.history.hex())


def test_two_servers_with_one_namespace_name_never_mix() -> None:
    """Finding 5: A's segments 1-2 and B's segments 3-5; B is no continuation of A."""
    b = Lineage(hid(9), NO_HISTORY, 0, 1)
    segs = [
        seg(1, H1, 1, 100),
        seg(2, H1, 101, 200),
        seg(3, b, 201, 300, created=9000),
        seg(4, b, 301, 400, created=9001),
    ]
    chain = select_chain(50, H1.history, segs)
    assert spans(chain.links) == [(1, 1, 51, 100), (2, 1, 101, 200)]
    assert chain.end_lsn == 200 and not chain.alternatives and not chain.beyond


def test_snapshot_on_a_forked_history_follows_its_parent_nowhere() -> None:
    h2 = child(2, H1, 150)
    segs = [seg(1, H1, 1, 300), seg(1002, h2, 151, 200), seg(1003, h2, 201, 260)]
    chain = select_chain(180, h2.history, segs, start_timeline=2)
    assert spans(chain.links) == [(1002, 2, 181, 200), (1003, 2, 201, 260)]


def test_sibling_forks_pick_the_newest_and_name_the_other() -> None:
    a = child(2, H1, 100)
    b = Lineage(hid(3), H1.history, 120, 3)  # a second restore gets the next timeline
    segs = [seg(1, H1, 1, 200), seg(1001, a, 101, 150, created=10000), seg(2001, b, 121, 170, created=20000)]
    chain = select_chain(90, H1.history, segs)
    assert chain.target == b.history
    assert {x.history for x in chain.alternatives} == {H1.history, a.history}
    assert spans(chain.links) == [(1, 1, 91, 120), (2001, 3, 121, 170)]
    chosen = select_chain(90, H1.history, segs, "timeline:2")
    assert spans(chosen.links) == [(1, 1, 91, 100), (1001, 2, 101, 150)]


def test_grandchild_follows_the_whole_lineage() -> None:
    h2 = child(2, H1, 100)
    h3 = child(3, h2, 150)
    segs = [seg(1, H1, 1, 300), seg(1002, h2, 101, 200), seg(2003, h3, 151, 180, created=99999)]
    chain = select_chain(50, H1.history, segs)
    assert spans(chain.links) == [(1, 1, 51, 100), (1002, 2, 101, 150), (2003, 3, 151, 180)]


def test_missing_share_of_a_parent_is_a_hole() -> None:
    h2 = child(2, H1, 150)
    segs = [seg(1, H1, 1, 100), seg(1003, h2, 151, 200)]  # H1's 101..150 are missing
    chain = select_chain(50, H1.history, segs)
    assert chain.end_lsn == 100
    assert [(h.first_lsn, h.last_lsn, h.history) for h in chain.holes] == [(101, 150, H1.history)]
    assert spans(chain.beyond) == [(1003, 2, 151, 200)]


def test_max_lsn_stops_the_walk() -> None:
    segs = [seg(1, H1, 1, 100), seg(2, H1, 101, 200)]
    chain = select_chain(0, H1.history, segs, max_lsn=50)
    assert spans(chain.links) == [(1, 1, 1, 100)]


def test_damaged_and_empty_segments_are_not_used() -> None:
    segs = [seg(1, H1, 1, 100, damage="bad"), seg(2, H1, 101, 100)]
    chain = select_chain(0, H1.history, segs)
    assert chain.links == [] and chain.end_lsn == 0


def test_coverage_holes_and_overlaps_per_history() -> None:
    h2 = child(2, H1, 150)
    segs = [
        seg(1, H1, 1, 100),
        seg(3, H1, 201, 300),
        seg(4, H1, 250, 400),
        seg(1005, h2, 151, 160),
        seg(1006, h2, 161, 170),
    ]
    holes = coverage_holes(segs)
    assert [(h.first_lsn, h.last_lsn, h.history, h.missing_ids) for h in holes] == [
        (101, 200, H1.history, (2, 2))
    ]
    assert [(a.segment_id, b.segment_id) for a, b in overlaps(segs)] == [(3, 4)]


def test_two_headers_disagreeing_on_a_lineage_are_refused() -> None:
    forged = Lineage(H1.history, hid(7), 5, 2)
    with pytest.raises(BackupMismatch, match="different lineage"):
        select_chain(0, H1.history, [seg(1, H1, 1, 10), seg(2, forged, 11, 20)])


def test_history_choice_must_match_exactly_one() -> None:
    segs = [seg(1, H1, 1, 10)]
    with pytest.raises(BadTarget, match="no history matches"):
        select_chain(0, H1.history, segs, "ffff")
