"""History rules: which segments, in which order, continue a snapshot's state. Pure.

A record is identified by (history id, LSN) (``storage/history.py``). Every segment header
carries its history's lineage step — history id, parent history, fork LSN, timeline — so a
set of segment files describes its own history graph; no history files are needed and no
guess is ever made from LSN numbers or timeline counters.

1. A snapshot belongs to history ``S`` at LSN ``s``. A history ``T`` *continues* it when
   following parents from ``T`` reaches ``S`` — ``T → P₁ → … → S`` — and every fork on the
   way happened at or after ``s`` (``fork_lsn(first step) ≥ s``, and fork LSNs never
   decrease along the path). A history that forked from ``S`` before ``s`` does not hold
   the records the snapshot already has, so it is never a continuation.
2. The chain takes ``S``'s records ``s+1 .. f₁``, then ``P``'s ``f₁+1 .. f₂`` … and ``T``'s
   from its fork to the end of what is present. Records of any other history — a sibling
   fork, an abandoned tail, another server's namespace of the same name — are never used.
3. Which ``T``: the one the operator names (``--history`` prefix or ``--timeline N``), or
   by default the continuation whose newest segment was created last. The plan says
   which it chose and names the others.
4. The chain ends at the first LSN nothing of the path covers. Beyond that, the path's
   later segments are still followed to name every missing range (``holes``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from unisondb.restore.errors import BackupMismatch, BadTarget
from unisondb.restore.inventory import SegmentMeta
from unisondb.storage import history as hist
from unisondb.storage.history import NO_HISTORY, Lineage


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
    def history(self) -> bytes:
        return self.segment.history

    @property
    def records(self) -> int:
        return self.to_lsn - self.from_lsn + 1


@dataclass(frozen=True, slots=True)
class Hole:
    """LSNs ``first..last`` (inclusive) of one history that no usable segment holds."""

    first_lsn: int
    last_lsn: int
    timeline: int
    history: bytes = NO_HISTORY
    #: Segments that hold these LSNs but cannot be used (another history), for the message.
    unusable: tuple[SegmentMeta, ...] = ()
    #: Segment ids probably missing (ids between the neighbours of the same history).
    missing_ids: tuple[int, int] | None = None

    def describe(self) -> str:
        text = f"LSNs {self.first_lsn}..{self.last_lsn} (history {hist.short(self.history)})"
        if self.missing_ids is not None:
            a, b = self.missing_ids
            names = f"{a:09d}.wal" if a == b else f"{a:09d}.wal..{b:09d}.wal"
            text += f", probably segment{'s' if a != b else ''} {names}"
        if self.unusable:
            parts = ", ".join(f"{s.name} (history {hist.short(s.history)})" for s in self.unusable[:3])
            text += f"; present only in {parts}, another history"
        return text


@dataclass(frozen=True, slots=True)
class Switch:
    """Where the chain moves from a parent history into a child (its fork point + 1)."""

    at_lsn: int
    from_timeline: int
    to_timeline: int
    segment_id: int
    from_history: bytes = NO_HISTORY
    to_history: bytes = NO_HISTORY


@dataclass(slots=True)
class Chain:
    start_lsn: int  # first LSN after the snapshot
    start_timeline: int
    start_history: bytes = NO_HISTORY
    #: The history the chain ends on (the restore's parent).
    target: bytes = NO_HISTORY
    #: Other continuations of the snapshot that were not chosen (for the plan).
    alternatives: list[Lineage] = field(default_factory=list)
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
    def end_history(self) -> bytes:
        return self.links[-1].history if self.links else self.start_history

    @property
    def last_known_lsn(self) -> int:
        """Last LSN any followed segment holds, holes or not."""
        if self.beyond:
            return self.beyond[-1].to_lsn
        return self.end_lsn


def usable_segments(segments: Sequence[SegmentMeta]) -> list[SegmentMeta]:
    return [s for s in segments if s.count > 0 and s.damage is None]


def lineages(segments: Sequence[SegmentMeta]) -> dict[bytes, Lineage]:
    """The lineage step of every history present; two disagreeing headers are refused."""
    found: dict[bytes, tuple[Lineage, SegmentMeta]] = {}
    for s in segments:
        if s.damage is not None:
            continue
        cur = found.get(s.history)
        if cur is None:
            found[s.history] = (s.lineage, s)
        elif cur[0] != s.lineage:
            raise BackupMismatch(
                f"{cur[1].path} and {s.path} claim history {hist.short(s.history)} with "
                f"different lineage ({cur[0].describe()} vs {s.lineage.describe()})",
                hint="one of them was altered; compare them with their .sha256 files",
            )
    return {h: v[0] for h, v in found.items()}


def path_to(
    target: bytes, start: bytes, start_lsn: int, known: dict[bytes, Lineage]
) -> list[tuple[bytes, int | None]] | None:
    """[(history, last LSN taken from it or None for the end)] from ``start`` to ``target``.

    None if ``target`` does not continue the state (``start``, ``start_lsn``): rule 1."""
    steps = [target]
    cur = target
    while cur != start:
        lin = known.get(cur)
        if lin is None or lin.parent == NO_HISTORY or len(steps) > len(known) + 1:
            return None
        cur = lin.parent
        steps.append(cur)
    steps.reverse()
    out: list[tuple[bytes, int | None]] = []
    floor = start_lsn
    for here, child in zip(steps, steps[1:], strict=False):
        fork = known[child].fork_lsn
        if fork < floor:
            return None
        out.append((here, fork))
        floor = fork
    out.append((steps[-1], None))
    return out


def continuations(
    start: bytes, start_lsn: int, segments: Sequence[SegmentMeta]
) -> dict[bytes, list[tuple[bytes, int | None]]]:
    """Every history present (or ``start`` itself) that continues the snapshot's state."""
    known = lineages(segments)
    out = {}
    for h in {start, *known}:
        p = path_to(h, start, start_lsn, known)
        if p is not None:
            out[h] = p
    return out


def choose_target(
    start: bytes, start_lsn: int, segments: Sequence[SegmentMeta], choice: str | None
) -> tuple[bytes, list[tuple[bytes, int | None]], list[bytes]]:
    """(target history, its path, the other continuations) — rule 3."""
    conts = continuations(start, start_lsn, segments)
    known = lineages(segments)
    if choice is not None:
        picked = _match_choice(choice, known, start)
        if picked not in conts:
            lin = known.get(picked)
            why = f"{lin.describe()}" if lin else "no segment of it is present"
            raise BadTarget(
                f"history {hist.short(picked)} does not continue the snapshot (history "
                f"{hist.short(start)} at LSN {start_lsn}): {why}",
                hint="'unisondb backup list' shows which histories each snapshot can reach",
            )
        return picked, conts[picked], [h for h in conts if h != picked]
    newest: dict[bytes, int] = {}
    for s in segments:
        if s.history in conts:
            newest[s.history] = max(newest.get(s.history, 0), s.created_ns)
    best = max(conts, key=lambda h: (newest.get(h, -1), len(conts[h])))
    return best, conts[best], [h for h in conts if h != best]


def _match_choice(choice: str, known: dict[bytes, Lineage], start: bytes) -> bytes:
    everything = {start, *known}
    if choice.startswith("timeline:"):
        number = int(choice.split(":", 1)[1])
        hits = [h for h in everything if (known[h].timeline if h in known else -1) == number]
    else:
        want = choice.lower()
        hits = [h for h in everything if h.hex().startswith(want)]
    if len(hits) == 1:
        return hits[0]
    what = choice.replace("timeline:", "timeline ")
    if not hits:
        raise BadTarget(
            f"no history matches {what!r} in these backups",
            hint="'unisondb backup list' shows every history id and timeline",
        )
    raise BadTarget(
        f"{what!r} matches {len(hits)} histories: {', '.join(hist.short(h) for h in hits)}",
        hint="give more digits of the history id with --history",
    )


def select_chain(
    after_lsn: int,
    start: bytes,
    segments: Sequence[SegmentMeta],
    choice: str | None = None,
    *,
    max_lsn: int | None = None,
    start_timeline: int = 1,
) -> Chain:
    """Follow the history that continues a snapshot at ``after_lsn`` of history ``start``.

    ``segments`` should be one entry per segment id (``WalInventory.segments``); empty and
    damaged segments are ignored here (the caller reports damage). ``max_lsn`` stops the
    walk once that LSN is covered (an LSN target needs nothing after it).
    """
    segs = usable_segments(segments)
    target, steps, others = choose_target(start, after_lsn, segs, choice)
    known = lineages(segs)
    chain = Chain(
        after_lsn + 1, start_timeline, start, target, alternatives=[known[h] for h in others if h in known]
    )
    expected = after_lsn + 1
    links = chain.links
    prev_history, prev_timeline = start, start_timeline
    for h, upto in steps:
        mine = sorted((s for s in segs if s.history == h), key=lambda s: (s.first_lsn, s.segment_id))
        if h != start and mine:
            chain.switches.append(
                Switch(expected, prev_timeline, mine[0].timeline, mine[0].segment_id, prev_history, h)
            )
        while (upto is None or expected <= upto) and (max_lsn is None or expected <= max_lsn):
            covering = [s for s in mine if s.first_lsn <= expected <= s.last_lsn]
            if covering:
                seg = max(covering, key=lambda s: s.last_lsn)
                to = seg.last_lsn if upto is None else min(seg.last_lsn, upto)
                links.append(Link(seg, expected, to))
                expected = to + 1
                continue
            later = [
                s.first_lsn for s in mine if s.first_lsn > expected and (upto is None or s.first_lsn <= upto)
            ]
            if later:
                resume = min(later)
            elif upto is not None:
                resume = upto + 1  # this history's share ends in a hole; the next continues
            else:
                break
            chain.holes.append(_hole(segs, mine, expected, resume - 1, h))
            links = chain.beyond
            expected = resume
        if mine:
            prev_history, prev_timeline = h, mine[-1].timeline
    return chain


def _hole(segs: list[SegmentMeta], mine: list[SegmentMeta], first: int, last: int, h: bytes) -> Hole:
    unusable = tuple(s for s in segs if s.history != h and s.first_lsn <= last and s.last_lsn >= first)
    before = [s for s in mine if s.last_lsn < first]
    after = [s for s in mine if s.first_lsn > last]
    missing = None
    if before and after:
        lo = max(s.segment_id for s in before) + 1
        hi = min(s.segment_id for s in after) - 1
        if lo <= hi:
            missing = (lo, hi)
    timeline = mine[0].timeline if mine else 0
    return Hole(first, last, timeline, h, unusable, missing)


def related_histories(start: Lineage, segments: Sequence[SegmentMeta]) -> set[bytes]:
    """Histories that share an ancestor with ``start`` (through the headers present).

    Anything else — another server's namespace of the same name, a different installation
    — has no record in common with the snapshot's state and never belongs in its backups.
    """
    known = lineages(segments)
    family = {start.history}
    if start.parent != NO_HISTORY:
        family.add(start.parent)
    for h in known:
        chain: list[bytes] = []
        cur: bytes | None = h
        while cur is not None and cur not in chain:
            chain.append(cur)
            lin = known.get(cur)
            cur = lin.parent if lin is not None and lin.parent != NO_HISTORY else None
        if family & set(chain):
            family |= set(chain)
    return family


def unlinked_after(
    start: Lineage, start_lsn: int, segments: Sequence[SegmentMeta]
) -> tuple[list[SegmentMeta], list[SegmentMeta]]:
    """(segments holding records after ``start_lsn``, those of them whose history the
    headers present do not link to ``start``'s). Segments ending at or before the LSN
    cannot continue the state, and may be ancestors that no header present links to."""
    later = [s for s in segments if s.count and s.damage is None and s.last_lsn > start_lsn]
    family = related_histories(start, segments)
    return later, [s for s in later if s.history not in family]


def by_history(segments: Sequence[SegmentMeta]) -> dict[bytes, list[SegmentMeta]]:
    out: dict[bytes, list[SegmentMeta]] = {}
    for s in segments:
        if s.count > 0:
            out.setdefault(s.history, []).append(s)
    for segs in out.values():
        segs.sort(key=lambda s: (s.first_lsn, s.segment_id))
    return out


def coverage_holes(segments: Sequence[SegmentMeta]) -> list[Hole]:
    """Missing ranges *within* each history (for backup list/verify)."""
    holes: list[Hole] = []
    for h, segs in by_history(segments).items():
        for prev, cur in zip(segs, segs[1:], strict=False):
            if cur.first_lsn > prev.last_lsn + 1:
                missing = None
                if cur.segment_id - prev.segment_id > 1:
                    missing = (prev.segment_id + 1, cur.segment_id - 1)
                holes.append(Hole(prev.last_lsn + 1, cur.first_lsn - 1, cur.timeline, h, (), missing))
    return holes


def overlaps(segments: Sequence[SegmentMeta]) -> list[tuple[SegmentMeta, SegmentMeta]]:
    """Pairs of segments of one history whose LSN ranges overlap.

    Within one history an LSN names one record, so two segments overlapping means one of
    them was altered or the history was continued twice: ``verify`` treats it as an error.
    """
    found = []
    for segs in by_history(segments).values():
        for prev, cur in zip(segs, segs[1:], strict=False):
            if cur.first_lsn <= prev.last_lsn:
                found.append((prev, cur))
    return found
