"""Configuration: frozen dataclasses built once at the edge (CLI flags over a TOML file).

Nothing else in UnisonDB reads ``os.environ`` or config files. Values that tests need to
shrink (segment size, rotation age, map size) are fields, not constants.

TOML file (every key optional; flags given on the command line win)::

    data_dir = "./data"
    http_addr = "127.0.0.1:8080"
    namespaces = ["default", "users"]
    max_body_bytes = 1048576

    [wal]
    segment_size = "16MiB"
    segment_max_age = "1h"
    retention = "24h"

    [btree]
    map_size = "1GiB"
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unisondb.errors import InvalidRequest
from unisondb.storage.layout import validate_namespace

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_SIZE_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_DURATION_UNITS = {"": 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_size(value: str | int) -> int:
    """'16MiB', '16MB', '16M' and 16777216 all mean 16 MiB (units are binary)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    m = _SIZE_RE.match(value) if isinstance(value, str) else None
    if not m:
        raise InvalidRequest(f"invalid size {value!r}: use e.g. 16MiB, 512KiB or a byte count")
    unit = (m.group(2) or "").upper()[:1]
    return int(m.group(1)) * _SIZE_UNITS[unit]


def parse_duration(value: str | int | float) -> float:
    """'90s', '15m', '24h', '7d', '250ms' or a number of seconds."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
        return float(value)
    m = _DURATION_RE.match(value) if isinstance(value, str) else None
    if not m:
        raise InvalidRequest(f"invalid duration {value!r}: use e.g. 30s, 15m, 24h or 7d")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2) or ""]


def parse_addr(value: str) -> tuple[str, int]:
    """'HOST:PORT' (IPv6 as '[::1]:8080') → (host, port)."""
    if not isinstance(value, str):
        raise InvalidRequest(f"invalid http_addr {value!r}: expected a \"HOST:PORT\" string")
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise InvalidRequest(f"invalid --http-addr {value!r}: expected HOST:PORT, e.g. 127.0.0.1:8080")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    p = int(port)
    if not 0 <= p <= 65535:
        raise InvalidRequest(f"invalid port {p} in --http-addr {value!r}")
    return host, p


@dataclass(frozen=True, slots=True)
class EngineConfig:
    #: A segment is sealed once the next record would push it past this size.
    segment_size: int = 16 << 20
    #: A non-empty active segment older than this is sealed (0 disables).
    segment_max_age: float = 3600.0
    #: Sealed segments are deleted only when the checkpoint is durably past them AND they
    #: are older than this many seconds (so hourly backup loops never meet a hole).
    retention: float = 24 * 3600.0
    #: Initial LMDB map size; it doubles automatically when full.
    map_size: int = 1 << 30
    #: Most bytes of records one group commit writes before it fsyncs.
    max_group_bytes: int = 8 << 20


@dataclass(frozen=True, slots=True)
class ServerConfig:
    data_dir: Path = Path("./data")
    host: str = "127.0.0.1"
    port: int = 8080
    namespaces: tuple[str, ...] = ("default",)
    #: Largest request body accepted; larger → 413.
    max_body_bytes: int = 1 << 20
    engine: EngineConfig = field(default_factory=EngineConfig)
    log_format: str = "console"


def load_config(
    config_file: Path | None = None, *, data_dir: Path | None = None, http_addr: str | None = None,
    namespaces: tuple[str, ...] = (), overrides: dict[str, Any] | None = None,
) -> ServerConfig:
    """Merge a TOML file (if any) with command-line values; flags win."""
    raw: dict[str, Any] = {}
    if config_file is not None:
        try:
            raw = tomllib.loads(config_file.read_text())
        except OSError as exc:
            raise InvalidRequest(f"cannot read config file {config_file}: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise InvalidRequest(f"invalid TOML in {config_file}: {exc}") from exc
    known = {"data_dir", "http_addr", "namespaces", "max_body_bytes", "wal", "btree", "log_format"}
    _check_keys(raw, known, "", config_file)
    for table, keys in (("wal", {"segment_size", "segment_max_age", "retention"}),
                        ("btree", {"map_size"})):
        if not isinstance(raw.get(table, {}), dict):
            raise InvalidRequest(f"invalid config in {config_file}: [{table}] must be a table")
        _check_keys(raw.get(table, {}), keys, f"{table}.", config_file)
    for key in ("data_dir", "http_addr", "log_format"):
        if key in raw and not isinstance(raw[key], str):
            raise InvalidRequest(f"invalid config in {config_file}: {key} must be a string")
    if "namespaces" in raw and not (isinstance(raw["namespaces"], list)
                                    and all(isinstance(n, str) for n in raw["namespaces"])):
        raise InvalidRequest(
            f"invalid config in {config_file}: namespaces must be a list of strings, "
            'e.g. namespaces = ["default", "users"]')
    if raw.get("log_format", "console") not in ("console", "json"):
        raise InvalidRequest(
            f"invalid config in {config_file}: log_format must be \"console\" or \"json\"")
    default = EngineConfig()
    wal = dict(raw.get("wal", {}))
    wal.update({k: v for k, v in (overrides or {}).items() if v is not None})
    engine = EngineConfig(
        segment_size=parse_size(wal.get("segment_size", default.segment_size)),
        segment_max_age=parse_duration(wal.get("segment_max_age", default.segment_max_age)),
        retention=parse_duration(wal.get("retention", default.retention)),
        map_size=parse_size(raw.get("btree", {}).get("map_size", default.map_size)),
    )
    if engine.segment_size < 4096:
        raise InvalidRequest("wal segment_size must be at least 4KiB")
    host, port = parse_addr(http_addr or raw.get("http_addr", "127.0.0.1:8080"))
    ns = namespaces or tuple(raw.get("namespaces", ())) or ("default",)
    for name in ns:
        validate_namespace(name)
    max_body_bytes = parse_size(raw.get("max_body_bytes", 1 << 20))
    if max_body_bytes < 1024:
        raise InvalidRequest("max_body_bytes must be at least 1KiB")
    return ServerConfig(
        data_dir=Path(data_dir or raw.get("data_dir", "./data")),
        host=host, port=port, namespaces=tuple(dict.fromkeys(ns)),
        max_body_bytes=max_body_bytes,
        engine=engine, log_format=str(raw.get("log_format", "console")),
    )


def _check_keys(table: dict[str, Any], known: set[str], prefix: str,
                config_file: Path | None) -> None:
    unknown = set(table) - known
    if unknown:
        names = ", ".join(prefix + k for k in sorted(unknown))
        raise InvalidRequest(f"unknown config keys in {config_file}: {names}")
