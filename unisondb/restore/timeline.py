"""Timeline rules: which segments, in which order, continue a snapshot's history. Pure.

Every restore starts a new *timeline* (a history id stored in the checkpoint and in the
header of every segment written afterwards). The LSNs of a new timeline continue from
the restored point, so after a restore two histories share LSN numbers: the abandoned
one (old timeline) and the new one. There are no history files; the rules below decide
from segment headers alone:

1. The chain starts at ``snapshot.applied_lsn + 1`` on the snapshot's timeline.
2. At each expected LSN the chain continues with the segment of its *current* timeline
   that covers that LSN (if two copies of one timeline overlap — possible only after a
   manual restore that kept the timeline — the higher segment id, i.e. the newer, wins).
3. A *higher* timeline is entered only at its start: the first LSN of its lowest
   available segment (a restore's first new segment begins right after the restored
   point). If that start lies inside the current segment, the higher timeline takes over
   there and the rest of the lower segment is abandoned history. A higher timeline whose
   start lies *before* the chain's position branched off earlier: its records differ
   from what the chain already holds, so it is never entered. When several higher
   timelines start at the same LSN the highest wins. The timeline never decreases.
4. ``--timeline N`` ignores every segment on a timeline above N.
5. The chain ends at the first LSN nothing covers. Beyond that, the segments that could
   still continue the history are followed to name every missing range (``holes``).

Limitation (documented in docs/RESTORE.md): without history files, a timeline that
starts after the chain's position is assumed to descend from the chain's timeline. Two
sibling restores that both branched after the snapshot are therefore chained in timeline
order; ``--timeline`` selects one explicitly, and the plan prints every switch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from unisondb.restore.inventory import SegmentMeta


@dataclass(frozen=True, slots=True)
class Link:
    """Records ``from_lsn..to_lsn`` (inclusive) of one segment, in chain order."""

    segment: SegmentMeta
    from_lsn: int
    to_lsn: int

    @property
    def timeline(self) -> int:
        return self.segment.timeline

    @property
    def records(self) -> int:
        return self.to_lsn - self.from_lsn + 1


@dataclass(frozen=True, slots=True)
class Hole:
    """LSNs ``first..last`` (inclusive) that no usable segment holds."""

    first_lsn: int
    last_lsn: int
    timeline: int
    #: Segments that hold these LSNs but cannot be used (wrong timeline), for the message.
    unusable: tuple[SegmentMeta, ...] = ()
    #: Segment ids probably missing (ids between the neighbours on the same timeline).
    missing_ids: tuple[int, int] | None = None

    def describe(self) -> str:
        text = f"LSNs {self.first_lsn}..{self.last_lsn} (timeline {self.timeline})"
        if self.missing_ids is not None:
            a, b = self.missing_ids
            names = f"{a:09d}.wal" if a == b else f"{a:09d}.wal..{b:09d}.wal"
            text += f", probably segment{'s' if a != b else ''} {names}"
        if self.unusable:
            parts = ", ".join(f"{s.name} (timeline {s.timeline})" for s in self.unusable[:3])
            text += f"; present only in {parts}, another history"
        return text


@dataclass(frozen=True, slots=True)
class Switch:
    at_lsn: int
    from_timeline: int
    to_timeline: int
    segment_id: int


@dataclass(slots=True)
class Chain:
    start_lsn: int  # first LSN after the snapshot
    start_timeline: int
    links: list[Link] = field(default_factory=list)
    #: Links past the first hole: the WAL continues there, but a restore cannot reach it.
    beyond: list[Link] = field(default_factory=list)
    holes: list[Hole] = field(default_factory=list)
    switches: list[Switch] = field(default_factory=list)

    @property
    def end_lsn(self) -> int:
        """Last LSN reachable without a hole (the snapshot's LSN if no WAL applies)."""
        return self.links[-1].to_lsn if self.links else self.start_lsn - 1

    @property
    def end_timeline(self) -> int:
        return self.links[-1].timeline if self.links else self.start_timeline

    @property
    def last_known_lsn(self) -> int:
        """Last LSN any followed segment holds, holes or not."""
        if self.beyond:
            return self.beyond[-1].to_lsn
        return self.end_lsn


def usable_segments(segments: Sequence[SegmentMeta], timeline_cap: int | None) -> list[SegmentMeta]:
    return [s for s in segments if s.count > 0 and s.damage is None
            and (timeline_cap is None or s.timeline <= timeline_cap)]


def timeline_starts(segments: Sequence[SegmentMeta]) -> dict[int, SegmentMeta]:
    """The lowest-id segment with records of each timeline (where that timeline begins)."""
    starts: dict[int, SegmentMeta] = {}
    for s in segments:
        cur = starts.get(s.timeline)
        if cur is None or (s.first_lsn, s.segment_id) < (cur.first_lsn, cur.segment_id):
            starts[s.timeline] = s
    return starts


def select_chain(after_lsn: int, timeline: int, segments: Sequence[SegmentMeta],
                 timeline_cap: int | None = None, *, max_lsn: int | None = None) -> Chain:
    """Follow the history that continues a snapshot at ``after_lsn`` on ``timeline``.

    ``segments`` should be one entry per segment id (``WalInventory.segments``); empty and
    damaged segments are ignored here (the caller reports damage). ``max_lsn`` stops the
    walk once that LSN is covered (an LSN target needs nothing after it).
    """
    segs = usable_segments(segments, timeline_cap)
    starts = {tl: s.first_lsn for tl, s in timeline_starts(segs).items()}
    chain = Chain(after_lsn + 1, timeline)
    expected, tl = after_lsn + 1, timeline
    links = chain.links
    while max_lsn is None or expected <= max_lsn:
        nxt = _next_link(segs, starts, expected, tl)
        if nxt is None:
            resume = _resume_point(segs, starts, expected, tl)
            if resume is None:
                break
            first = resume[0]
            chain.holes.append(_hole(segs, expected, first - 1, tl))
            links = chain.beyond
            expected = first
            continue
        seg, new_tl = nxt
        if new_tl != tl:
            chain.switches.append(Switch(expected, tl, new_tl, seg.segment_id))
            tl = new_tl
        takeover = [st for t, st in starts.items() if t > tl and expected < st <= seg.last_lsn]
        to = min(takeover) - 1 if takeover else seg.last_lsn
        links.append(Link(seg, expected, to))
        expected = to + 1
    return chain


def _next_link(segs: list[SegmentMeta], starts: dict[int, int], expected: int,
               tl: int) -> tuple[SegmentMeta, int] | None:
    entering = [s for s in segs if s.timeline > tl and s.first_lsn == expected
                and starts[s.timeline] == expected]
    if entering:
        best = max(entering, key=lambda s: (s.timeline, s.segment_id))
        return best, best.timeline
    current = [s for s in segs if s.timeline == tl and s.first_lsn <= expected <= s.last_lsn]
    if current:
        return max(current, key=lambda s: s.segment_id), tl
    return None


def _resume_point(segs: list[SegmentMeta], starts: dict[int, int], expected: int,
                  tl: int) -> tuple[int, int] | None:
    """Where the history visibly continues after a hole at ``expected`` (first LSN, timeline)."""
    options = [(s.first_lsn, s.timeline) for s in segs
               if s.timeline == tl and s.first_lsn > expected]
    options += [(st, t) for t, st in starts.items() if t > tl and st > expected]
    return min(options) if options else None


def _hole(segs: list[SegmentMeta], first: int, last: int, tl: int) -> Hole:
    unusable = tuple(s for s in segs if s.timeline != tl and s.first_lsn <= last
                     and s.last_lsn >= first)
    before = [s for s in segs if s.timeline == tl and s.last_lsn < first]
    after = [s for s in segs if s.timeline == tl and s.first_lsn > last]
    missing = None
    if before and after:
        lo = max(s.segment_id for s in before) + 1
        hi = min(s.segment_id for s in after) - 1
        if lo <= hi:
            missing = (lo, hi)
    return Hole(first, last, tl, unusable, missing)


def coverage_holes(segments: Sequence[SegmentMeta]) -> list[Hole]:
    """Missing ranges and overlaps *within* each timeline (for backup list/verify)."""
    holes: list[Hole] = []
    by_tl: dict[int, list[SegmentMeta]] = {}
    for s in segments:
        if s.count > 0:
            by_tl.setdefault(s.timeline, []).append(s)
    for tl, segs in sorted(by_tl.items()):
        segs.sort(key=lambda s: (s.first_lsn, s.segment_id))
        for prev, cur in zip(segs, segs[1:], strict=False):
            if cur.first_lsn > prev.last_lsn + 1:
                missing = None
                if cur.segment_id - prev.segment_id > 1:
                    missing = (prev.segment_id + 1, cur.segment_id - 1)
                holes.append(Hole(prev.last_lsn + 1, cur.first_lsn - 1, tl, (), missing))
    return holes


def overlaps(segments: Sequence[SegmentMeta]) -> list[tuple[SegmentMeta, SegmentMeta]]:
    """Pairs of segments on the same timeline whose LSN ranges overlap."""
    found = []
    by_tl: dict[int, list[SegmentMeta]] = {}
    for s in segments:
        if s.count > 0:
            by_tl.setdefault(s.timeline, []).append(s)
    for segs in by_tl.values():
        segs.sort(key=lambda s: (s.first_lsn, s.segment_id))
        for prev, cur in zip(segs, segs[1:], strict=False):
            if cur.first_lsn <= prev.last_lsn:
                found.append((prev, cur))
    return found
