"""History identity: which line of writes a record belongs to.

A record is identified by **(history id, LSN)**, never by LSN alone. A *history* is one
unbroken sequence of LSNs written by one server from one starting state. It begins

* when a namespace is created (no parent), or
* at a **fork**: a restore (``unisondb restore``), or a server that starts on a
  ``data.mdb`` that is not the continuation of the WAL beside it (a snapshot copied in by
  the document's manual procedure, a WAL whose checkpoint segment is missing). The new
  history's parent is the history of the state it started from, and ``fork_lsn`` is the
  last LSN it shares with that parent; its own records start at ``fork_lsn + 1``.

A history id is 16 random bytes (``os.urandom``): two servers that each created namespace
``users``, or two restores of one snapshot, never pick the same one (2**-64 chance of a
clash among 2**32 histories). ``timeline`` is only a human-friendly counter (parent's + 1)
and is never used to decide whether two records belong together.

Every segment header carries the full lineage step (history, parent, fork LSN, timeline),
so any set of segment files describes its own history graph without history files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

ID_BYTES = 16
NO_HISTORY = bytes(ID_BYTES)


def new_history_id() -> bytes:
    return os.urandom(ID_BYTES)


def show(history: bytes) -> str:
    """How a history id is shown to people (and accepted by ``--history``): 32 hex digits."""
    return history.hex()


def short(history: bytes) -> str:
    return history.hex()[:12]


@dataclass(frozen=True, slots=True)
class Lineage:
    """One step of the history graph: this history, where it came from, where it forked."""

    history: bytes = NO_HISTORY
    parent: bytes = NO_HISTORY
    #: Last LSN shared with ``parent`` (0 for a history that began with an empty state).
    fork_lsn: int = 0
    timeline: int = 1

    @property
    def is_set(self) -> bool:
        return self.history != NO_HISTORY

    def fork(self, at_lsn: int) -> Lineage:
        """A new history that continues this one's state as of ``at_lsn``."""
        return Lineage(new_history_id(), self.history, at_lsn, self.timeline + 1)

    @staticmethod
    def create() -> Lineage:
        return Lineage(new_history_id(), NO_HISTORY, 0, 1)

    def describe(self) -> str:
        text = f"history {short(self.history)} (timeline {self.timeline})"
        if self.parent != NO_HISTORY:
            text += f", forked from {short(self.parent)} after LSN {self.fork_lsn}"
        return text


#: How far above the snapshot's own segment a fork starts its ids when nothing visible
#: says how far the old history went. The old history may have sealed segments this
#: server cannot see (uploaded elsewhere, then pruned locally); the gap leaves room for
#: them so no segment file name is reused for different bytes.
FORK_SEGMENT_GAP = 1000


def fork_segment_id(highest_seen: int, state_segment: int) -> int:
    """First segment id of a forked history.

    ``highest_seen`` is the highest id visible anywhere (local WAL, backups, the WAL
    directories of a restore), ``state_segment`` the segment the forked-from state was in
    (the checkpoint's). If something visible lies beyond that state, it tells how far the
    old history went: start right above it. If nothing does, the old history may have gone
    on unseen: leave ``FORK_SEGMENT_GAP`` ids of room.
    """
    if highest_seen > state_segment:
        return highest_seen + 1
    return state_segment + FORK_SEGMENT_GAP
