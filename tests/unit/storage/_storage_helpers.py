"""Plain helpers shared by the storage unit tests (fixtures live in conftest.py)."""

from __future__ import annotations

NS = "default"
#: Base of the deterministic record times written by ``build_wal``.
T0 = 1_700_000_000_000_000_000


def key_for(lsn: int) -> bytes:
    return b"key-%06d" % lsn


def value_for(lsn: int, size: int = 16) -> bytes:
    return (b"value-%06d-" % lsn * (size // 12 + 1))[:size]


def time_for(lsn: int) -> int:
    return T0 + lsn * 1000
