"""Formatting and parsing for the offline tools: RFC 3339 timestamps with nanosecond
precision (record times are integer nanoseconds), byte sizes and LSN ranges."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from unisondb.errors import InvalidRequest

_RFC3339 = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?"
    r"(Z|z|[+-]\d{2}:\d{2})$"
)


def parse_rfc3339(text: str) -> int:
    """'2025-01-08T14:30:00Z' or '2025-01-08T14:30:00.123456789+01:00' → ns since the epoch.

    A time zone (``Z`` or ``±HH:MM``) is required: a restore target must not depend on the
    machine's local time zone.
    """
    m = _RFC3339.match(text.strip())
    if not m:
        raise InvalidRequest(
            f"invalid time {text!r}: use RFC 3339 with a time zone, e.g. 2025-01-08T14:30:00Z "
            "or 2025-01-08T14:30:00.250+01:00"
        )
    year, month, day, hour, minute, second = (int(m.group(i)) for i in range(1, 7))
    frac = (m.group(7) or "").ljust(9, "0")
    zone = m.group(8)
    try:
        dt = datetime(year, month, day, hour, minute, second, tzinfo=UTC)
    except ValueError as exc:
        raise InvalidRequest(f"invalid time {text!r}: {exc}") from None
    if zone not in ("Z", "z"):
        sign = 1 if zone[0] == "+" else -1
        dt -= sign * timedelta(hours=int(zone[1:3]), minutes=int(zone[4:6]))
    seconds = int((dt - datetime(1970, 1, 1, tzinfo=UTC)).total_seconds())
    return seconds * 1_000_000_000 + int(frac)


def format_ns(ns: int) -> str:
    """ns since the epoch → '2025-01-08T14:30:00.123456789Z' (always 9 fraction digits)."""
    seconds, frac = divmod(ns, 1_000_000_000)
    dt = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(seconds=seconds)
    return dt.strftime("%Y-%m-%dT%H:%M:%S") + f".{frac:09d}Z"


def format_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover


def format_lsn_range(first: int, last: int) -> str:
    """``first..last``; an empty range (a segment with no records stores ``last = first - 1``)
    as ``first.. (empty)``, never as the backwards ``402..401``."""
    return f"{first}.. (empty)" if last < first else f"{first}..{last}"
