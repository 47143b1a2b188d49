"""RFC 3339 parsing with nanoseconds and time zones."""

from __future__ import annotations

import pytest

from unisondb.errors import InvalidRequest
from unisondb.restore.timefmt import format_ns, parse_rfc3339

BASE = 1736346600 * 10**9  # 2025-01-08T14:30:00Z


@pytest.mark.parametrize(
    ("text", "ns"),
    [
        ("2025-01-08T14:30:00Z", BASE),
        ("2025-01-08t14:30:00z", BASE),
        ("2025-01-08 14:30:00Z", BASE),
        ("2025-01-08T14:30:00.5Z", BASE + 500_000_000),
        ("2025-01-08T14:30:00.000000001Z", BASE + 1),
        ("2025-01-08T15:30:00+01:00", BASE),
        ("2025-01-08T09:00:00-05:30", BASE),
    ],
)
def test_parse(text: str, ns: int) -> None:
    assert parse_rfc3339(text) == ns


@pytest.mark.parametrize(
    "text",
    [
        "2025-01-08T14:30:00",
        "2025-01-08",
        "yesterday",
        "2025-13-08T14:30:00Z",
        "2025-01-08T14:30:00.1234567891Z",
    ],
)
def test_reject(text: str) -> None:
    with pytest.raises(InvalidRequest):
        parse_rfc3339(text)


def test_round_trip() -> None:
    for ns in (0, BASE, BASE + 123456789, 1795511693242192941):
        assert parse_rfc3339(format_ns(ns)) == ns
