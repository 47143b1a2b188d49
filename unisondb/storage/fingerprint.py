"""The state fingerprint: an order-independent hash of a whole keyspace.

Definition. For a live pair (key, value)::

    h(key, value) = SHAKE-256("unisondb-fp-1" || u16le(len(key)) || key || value), 256 bytes
                    read as a little-endian 2048-bit integer
    F(state)      = sum of h(k, v) over every live pair, modulo 2**2048

A put of ``k`` from ``old`` to ``new`` is ``F - h(k, old) + h(k, new)``; a delete is
``F - h(k, old)``. Because addition is commutative and invertible, the fingerprint of a
state does not depend on the order or batching of the writes that built it: a restore that
replays records into a snapshot, a server that applied them one by one, and a full scan of
the keys all arrive at the same value exactly when they hold the same pairs. The length
prefix makes (key, value) unambiguous, so ``("ab", "c")`` and ``("a", "bc")`` differ.

This is AdHash (Bellare–Micciancio 1997) with a 2048-bit modulus — the construction behind
Facebook's LtHash, which uses 1024 lanes of 16 bits instead of one big integer.
Collision argument: for accidental damage (a flipped byte, a spliced record, a missing
or duplicated write) the difference of two fingerprints is a sum of a few independent
pseudo-random 2048-bit values, which is 0 with probability 2**-2048. Against an adversary
who chooses keys and values, finding two different sets with one fingerprint is a
modular subset-sum problem; the best generic attack (Wagner's k-tree algorithm) costs about
2**(2*sqrt(2048)) ≈ 2**90 hash evaluations. (With a 256-bit modulus it would be about
2**32, which is why the state is 2048 bits wide.) Note that adding a pair twice is not the
same as adding it once, so a duplicated write is caught as well.

Where it lives: the full 256-byte state is in the B-tree checkpoint (updated in the same
LMDB transaction as the data, so it is always exact for the data beside it). Everything
else records the 32-byte *digest* ``BLAKE2b-256(state)``: segment headers (state before
the first record), segment footers (state after the last), snapshots and the HTTP API.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable

STATE_BYTES = 256
DIGEST_BYTES = 32
_MOD = 1 << (STATE_BYTES * 8)
_MASK = _MOD - 1
_PREFIX = b"unisondb-fp-1"
_KEYLEN = struct.Struct("<H")
#: Digest of the empty keyspace (state 0).
EMPTY_STATE = bytes(STATE_BYTES)


def item_hash(key: bytes, value: bytes) -> int:
    h = hashlib.shake_256(_PREFIX)
    h.update(_KEYLEN.pack(len(key)))
    h.update(key)
    h.update(value)
    return int.from_bytes(h.digest(STATE_BYTES), "little")


class Fingerprint:
    """A mutable fingerprint state (one 2048-bit integer)."""

    __slots__ = ("_value",)

    def __init__(self, state: bytes | int = 0) -> None:
        self._value = int.from_bytes(state, "little") if isinstance(state, bytes) else state

    @classmethod
    def of_items(cls, items: Iterable[tuple[bytes, bytes]]) -> Fingerprint:
        """Fingerprint of a whole keyspace, from a scan of its pairs."""
        total = 0
        for key, value in items:
            total += item_hash(bytes(key), bytes(value))
        return cls(total & _MASK)

    def add(self, key: bytes, value: bytes) -> None:
        self._value = (self._value + item_hash(key, value)) & _MASK

    def remove(self, key: bytes, value: bytes) -> None:
        self._value = (self._value - item_hash(key, value)) & _MASK

    def state(self) -> bytes:
        return self._value.to_bytes(STATE_BYTES, "little")

    def digest(self) -> bytes:
        return state_digest(self.state())

    def copy(self) -> Fingerprint:
        return Fingerprint(self._value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Fingerprint) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


def state_digest(state: bytes) -> bytes:
    """The 32-byte digest recorded wherever the full state is too big to carry."""
    return hashlib.blake2b(state, digest_size=DIGEST_BYTES).digest()


#: Digest of the empty keyspace.
EMPTY_DIGEST = state_digest(EMPTY_STATE)


def short(digest: bytes) -> str:
    """How a digest is shown to people: the first 16 hex digits (64 bits)."""
    return digest.hex()[:16]
