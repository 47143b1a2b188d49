"""Configuration: frozen dataclasses built once at the edge (CLI flags over a TOML file).

Nothing else in UnisonDB reads ``os.environ`` or config files. Values that tests need to
shrink (segment size, rotation age, map size) are fields, not constants.

TOML file (every key optional; flags given on the command line win)::

    data_dir = "./data"
    http_addr = "127.0.0.1:8080"
    namespaces = ["default", "users"]
    max_body_bytes = 1048576
    shutdown_timeout = "30s"     # SIGTERM → exit within this (docs/OPERATIONS.md)
    disk_full_retry = "1s"       # while the disk is full: retry pending work this often
    disk_full_hold = "2s"        # a durable-but-unapplied write waits this long for a retry
    backup_rate_limit = "0"      # hard cap on backup I/O, bytes/s (e.g. "50MiB"); 0 = none

    [wal]
    segment_size = "16MiB"
    segment_max_age = "1h"
    retention = "24h"
    preallocate = "2MiB"         # zero-filled ahead of the writer (cheaper fdatasync); 0 = off
    group_commit_window = "250us"  # with other writers in flight, wait up to this for more
    ack = "wal"                  # "lmdb": also wait for the LMDB commit (two fsyncs per write)
    memtable_size = "8MiB"       # ack = "wal": acknowledged records not yet in LMDB, at most
    memtable_max_lag = 100000    # ... and at most this many records; then writes wait

    [btree]
    map_size = "1GiB"

    [http]                       # limits; see docs/OPERATIONS.md "HTTP limits"
    max_header_bytes = "64KiB"   # request line + headers → 431
    max_headers = 100            # header fields → 431
    max_request_line = "8KiB"    # request target (URL) → 414
    idle_timeout = "30s"         # keep-alive idle, slow reader of a response
    header_timeout = "10s"       # whole request head, from its first byte → 408
    body_timeout = "30s"         # whole request body, from the end of the head → 408
    max_connections = 1024       # beyond it: 503 + Retry-After
    lean = true                  # hot KV routes and /health answered in the protocol (api/lean.py)

    [auth]
    token_file = "/etc/unisondb/tokens"   # "<token> <role>" per line; unset = no auth
    metrics = "token"                     # "token" or "none" (/metrics without a token)
    insecure_no_auth = false              # allow a non-loopback http_addr without tokens

    [tls]
    cert = "server.crt"
    key = "server.key"
    client_ca = "clients-ca.crt"          # optional: require client certificates
    client_roles = "client-roles"         # optional: "cn:NAME role" / "sha256:HEX role" per line

    [archive]                             # continuous archiving (docs/ARCHIVE.md); off unless url
    url = "s3://bucket/prefix"
    endpoint = "http://127.0.0.1:8333"    # S3-compatible server; unset = AWS
    path_style = false                    # path-style addressing (most self-hosted servers)
    key_file = "/etc/unisondb/archive.key"  # AES-256-GCM key; unset = not encrypted
    interval = "1s"                       # seal the active segment this long after new writes
    snapshot_interval = "24h"             # a snapshot to the archive this often (0 = never)
    retention_snapshots = 0               # keep the newest N snapshots (0 and age 0 = keep all)
    retention_age = "0"                   # keep every point of the last D restorable (e.g. "7d")
    retention_interval = "1h"             # how often retention prunes the archive
    rate_limit = "0"                      # upload bandwidth, bytes/s (e.g. "20MiB"); 0 = unlimited
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unisondb.errors import InvalidRequest
from unisondb.storage.layout import validate_namespace
from unisondb.storage.options import EngineConfig as EngineConfig  # re-exported: lives in storage

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(us|ms|s|m|h|d)?\s*$")
_SIZE_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_DURATION_UNITS = {"": 1.0, "us": 1e-6, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


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
    """'90s', '15m', '24h', '7d', '250ms', '300us' or a number of seconds."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
        return float(value)
    m = _DURATION_RE.match(value) if isinstance(value, str) else None
    if not m:
        raise InvalidRequest(f"invalid duration {value!r}: use e.g. 30s, 15m, 24h or 7d")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2) or ""]


def parse_addr(value: str) -> tuple[str, int]:
    """'HOST:PORT' (IPv6 as '[::1]:8080') → (host, port)."""
    if not isinstance(value, str):
        raise InvalidRequest(f'invalid http_addr {value!r}: expected a "HOST:PORT" string')
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
class HttpLimits:
    """What one HTTP client may cost (enforced by ``api/protocol.py``; see docs/OPERATIONS.md)."""

    #: Request line plus headers, in bytes; more → 431 and the connection is closed.
    max_header_bytes: int = 64 << 10
    #: Number of header fields; more → 431.
    max_headers: int = 100
    #: Length of the request target (path and query); longer → 414.
    max_request_line: int = 8 << 10
    #: A keep-alive connection with no request in flight is closed after this long; so is a
    #: connection whose client stops reading a response.
    idle_timeout: float = 30.0
    #: The whole request head must arrive within this many seconds of its first byte → 408.
    header_timeout: float = 10.0
    #: The whole request body must arrive within this many seconds of the head → 408.
    body_timeout: float = 30.0
    #: Open connections served at once; the ones beyond get 503 with ``Retry-After``.
    max_connections: int = 1024
    #: GET/PUT/DELETE of a key and GET /health answered by the protocol (``api/lean.py``).
    lean: bool = True


@dataclass(frozen=True, slots=True)
class SecurityConfig:
    """Bearer tokens and TLS; every path is as given (checked when the server starts)."""

    token_file: Path | None = None
    #: ``"token"``: /metrics needs a read token like every other route; ``"none"``: open.
    metrics_auth: str = "token"
    insecure_no_auth: bool = False
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    #: Client certificate (CN or SHA-256) -> role, as tokens have (``api/clientcert.py``).
    tls_client_roles: Path | None = None


@dataclass(frozen=True, slots=True)
class ArchiveConfig:
    """Continuous archiving to S3-compatible storage; ``url`` None means off.

    Credentials are never configured here: boto3 reads the standard AWS environment
    variables and files (docs/ARCHIVE.md)."""

    url: str | None = None
    endpoint: str | None = None
    path_style: bool = False
    key_file: Path | None = None
    #: A non-empty active segment is sealed (and so archived) this many seconds after it
    #: received its first write: the archive's RPO under steady load.
    interval: float = 1.0
    #: A snapshot is published to the archive this often (0 = only on demand).
    snapshot_interval: float = 24 * 3600.0
    #: Retention (archive/retention.py): keep the newest N complete snapshots, and every
    #: point of the last ``retention_age`` seconds; both 0 (the default) = never delete.
    retention_snapshots: int = 0
    retention_age: float = 0.0
    #: How often retention lists and prunes each namespace (it never runs per upload).
    retention_interval: float = 3600.0
    #: Upload bandwidth bound in bytes per second for the whole server (0 = unlimited).
    rate_limit: int = 0

    @property
    def enabled(self) -> bool:
        return self.url is not None


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
    http: HttpLimits = field(default_factory=HttpLimits)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    archive: ArchiveConfig = field(default_factory=ArchiveConfig)
    #: SIGTERM → exit within this many seconds (in-flight writes finish, backups still
    #: running near the deadline are cancelled). See docs/OPERATIONS.md.
    shutdown_timeout: float = 30.0
    #: Hard cap on backup I/O in bytes per second, all backups together (0 = none; they
    #: are paced by the WAL's fsync latency either way: backup/pacing.py).
    backup_rate_limit: int = 0


def load_config(
    config_file: Path | None = None,
    *,
    data_dir: Path | None = None,
    http_addr: str | None = None,
    namespaces: tuple[str, ...] = (),
    overrides: dict[str, Any] | None = None,
    http_overrides: dict[str, Any] | None = None,
    auth_overrides: dict[str, Any] | None = None,
    tls_overrides: dict[str, Any] | None = None,
    archive_overrides: dict[str, Any] | None = None,
) -> ServerConfig:
    """Merge a TOML file (if any) with command-line values; flags win.

    ``overrides`` are ``[wal]`` keys plus ``shutdown_timeout``, ``disk_full_retry`` and
    ``disk_full_hold`` (top-level keys); ``http_overrides``, ``auth_overrides`` and
    ``tls_overrides`` are keys of the ``[http]``, ``[auth]`` and ``[tls]`` tables. A value
    of None means "not given on the command line".
    """
    raw: dict[str, Any] = {}
    if config_file is not None:
        try:
            raw = tomllib.loads(config_file.read_text())
        except OSError as exc:
            raise InvalidRequest(f"cannot read config file {config_file}: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise InvalidRequest(f"invalid TOML in {config_file}: {exc}") from exc
    known = {
        "data_dir",
        "http_addr",
        "namespaces",
        "max_body_bytes",
        "wal",
        "btree",
        "log_format",
        "http",
        "auth",
        "tls",
        "archive",
        "shutdown_timeout",
        "disk_full_retry",
        "disk_full_hold",
        "backup_rate_limit",
    }
    _check_keys(raw, known, "", config_file)
    for table, keys in (
        (
            "wal",
            {
                "segment_size",
                "segment_max_age",
                "retention",
                "preallocate",
                "group_commit_window",
                "ack",
                "memtable_size",
                "memtable_max_lag",
            },
        ),
        ("btree", {"map_size"}),
        ("http", {*_HTTP_KEYS, "lean"}),
        ("auth", {"token_file", "metrics", "insecure_no_auth"}),
        ("tls", {"cert", "key", "client_ca", "client_roles"}),
        ("archive", set(_ARCHIVE_KEYS)),
    ):
        if not isinstance(raw.get(table, {}), dict):
            raise InvalidRequest(f"invalid config in {config_file}: [{table}] must be a table")
        _check_keys(raw.get(table, {}), keys, f"{table}.", config_file)
    for key in ("data_dir", "http_addr", "log_format"):
        if key in raw and not isinstance(raw[key], str):
            raise InvalidRequest(f"invalid config in {config_file}: {key} must be a string")
    if "namespaces" in raw and not (
        isinstance(raw["namespaces"], list) and all(isinstance(n, str) for n in raw["namespaces"])
    ):
        raise InvalidRequest(
            f"invalid config in {config_file}: namespaces must be a list of strings, "
            'e.g. namespaces = ["default", "users"]'
        )
    if raw.get("log_format", "console") not in ("console", "json"):
        raise InvalidRequest(f'invalid config in {config_file}: log_format must be "console" or "json"')
    default = EngineConfig()
    top_keys = ("shutdown_timeout", "disk_full_retry", "disk_full_hold", "backup_rate_limit")
    wal = dict(raw.get("wal", {}))
    wal.update({k: v for k, v in (overrides or {}).items() if v is not None and k not in top_keys})
    top = {k: v for k, v in raw.items() if k in top_keys}
    top.update({k: v for k, v in (overrides or {}).items() if v is not None and k in top_keys})
    engine = EngineConfig(
        segment_size=parse_size(wal.get("segment_size", default.segment_size)),
        segment_max_age=parse_duration(wal.get("segment_max_age", default.segment_max_age)),
        retention=parse_duration(wal.get("retention", default.retention)),
        map_size=parse_size(raw.get("btree", {}).get("map_size", default.map_size)),
        disk_full_retry=parse_duration(top.get("disk_full_retry", default.disk_full_retry)),
        disk_full_hold=parse_duration(top.get("disk_full_hold", default.disk_full_hold)),
        wal_preallocate=parse_size(wal.get("preallocate", default.wal_preallocate)),
        group_commit_window=parse_duration(wal.get("group_commit_window", default.group_commit_window)),
        ack=str(wal.get("ack", default.ack)),
        memtable_bytes=parse_size(wal.get("memtable_size", default.memtable_bytes)),
        memtable_max_lag=int(wal.get("memtable_max_lag", default.memtable_max_lag)),
    )
    if engine.ack not in ("lmdb", "wal"):
        raise InvalidRequest(f'invalid wal ack {engine.ack!r}: use "lmdb" or "wal"')
    if engine.memtable_bytes < 64 << 10 or engine.memtable_max_lag < 1:
        raise InvalidRequest("wal memtable_size must be at least 64KiB and memtable_max_lag at least 1")
    if not 0 <= engine.group_commit_window <= 0.1:
        raise InvalidRequest("wal group_commit_window must be between 0 and 100ms")
    if engine.disk_full_retry < 0.01:
        raise InvalidRequest("disk_full_retry must be at least 10ms")
    backup_rate_limit = _rate(top.get("backup_rate_limit", 0), "backup rate limit")
    if backup_rate_limit and backup_rate_limit < 1 << 20:
        raise InvalidRequest(
            f"backup rate limit must be 0 (none) or at least 1MiB/s, got {backup_rate_limit} bytes/s"
        )
    shutdown_timeout = parse_duration(top.get("shutdown_timeout", 30.0))
    if shutdown_timeout < 1:
        raise InvalidRequest("shutdown_timeout must be at least 1s")
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
        host=host,
        port=port,
        namespaces=tuple(dict.fromkeys(ns)),
        max_body_bytes=max_body_bytes,
        engine=engine,
        log_format=str(raw.get("log_format", "console")),
        http=_http_limits(_merged(raw, "http", http_overrides), config_file),
        security=_security(
            _merged(raw, "auth", auth_overrides), _merged(raw, "tls", tls_overrides), config_file
        ),
        archive=_archive(_merged(raw, "archive", archive_overrides), config_file),
        shutdown_timeout=shutdown_timeout,
        backup_rate_limit=backup_rate_limit,
    )


#: ``[archive]`` keys and the type each must have in the TOML file.
_ARCHIVE_KEYS: dict[str, type] = {
    "url": str,
    "endpoint": str,
    "path_style": bool,
    "key_file": str,
    "interval": object,
    "snapshot_interval": object,
    "retention_snapshots": object,
    "retention_age": object,
    "retention_interval": object,
    "rate_limit": object,
}


def _archive(values: dict[str, Any], config_file: Path | None) -> ArchiveConfig:
    for key, value in values.items():
        want = _ARCHIVE_KEYS[key]
        if want is not object and not isinstance(value, want) and not isinstance(value, Path):
            raise InvalidRequest(
                f"invalid config in {config_file}: archive.{key} must be a "
                f"{'boolean' if want is bool else 'string'}"
            )
    default = ArchiveConfig()
    url = values.get("url") or None
    if url is not None:
        from unisondb.archive.store import parse_url

        parse_url(str(url))  # one clear error now, not a traceback from the archiver later
    cfg = ArchiveConfig(
        url=url,
        endpoint=values.get("endpoint") or None,
        path_style=bool(values.get("path_style", False)),
        key_file=Path(values["key_file"]) if values.get("key_file") else None,
        interval=parse_duration(values.get("interval", default.interval)),
        snapshot_interval=parse_duration(values.get("snapshot_interval", default.snapshot_interval)),
        retention_snapshots=_count("retention_snapshots", values.get("retention_snapshots", 0)),
        retention_age=parse_duration(values.get("retention_age", default.retention_age)),
        retention_interval=parse_duration(values.get("retention_interval", default.retention_interval)),
        rate_limit=_rate(values.get("rate_limit", default.rate_limit)),
    )
    if cfg.retention_interval < 1.0:
        raise InvalidRequest(
            f"archive retention interval must be at least 1s, got {cfg.retention_interval:g}s"
        )
    if cfg.rate_limit and cfg.rate_limit < 64 * 1024:
        raise InvalidRequest(
            f"archive rate limit must be 0 (unlimited) or at least 64KiB/s, got {cfg.rate_limit} bytes/s"
        )
    if cfg.interval < 0.05:
        raise InvalidRequest(f"archive interval must be at least 50ms, got {cfg.interval:g}s")
    if url is None and (
        cfg.endpoint
        or cfg.key_file
        or cfg.path_style
        or cfg.retention_snapshots
        or cfg.retention_age
        or cfg.rate_limit
    ):
        raise InvalidRequest(
            "--archive-endpoint, --archive-path-style, --archive-key-file, --archive-retention-* "
            "and --archive-rate-limit need --archive-url s3://bucket/prefix"
        )
    return cfg


def _count(name: str, value: object) -> int:
    """A non-negative integer flag or TOML value ('7' from the command line, 7 from a file)."""
    try:
        count = int(str(value)) if not isinstance(value, bool) else -1
    except ValueError:
        count = -1
    if count < 0:
        raise InvalidRequest(
            f"invalid archive {name.replace('_', ' ')} {value!r}: expected a count such as 7"
        )
    return count


def _rate(value: object, what: str = "archive rate limit") -> int:
    """'20MiB/s', '20MiB' or a number of bytes per second."""
    if isinstance(value, str) and value.endswith("/s"):
        value = value[:-2]
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        raise InvalidRequest(f"invalid {what} {value!r}: use e.g. 20MiB/s or a byte count")
    try:
        return parse_size(value)
    except InvalidRequest:
        raise InvalidRequest(f"invalid {what} {value!r}: use e.g. 20MiB/s or a byte count") from None


#: ``[http]`` keys and how each is parsed.
_HTTP_KEYS: dict[str, Any] = {
    "max_header_bytes": parse_size,
    "max_headers": parse_size,
    "max_request_line": parse_size,
    "idle_timeout": parse_duration,
    "header_timeout": parse_duration,
    "body_timeout": parse_duration,
    "max_connections": parse_size,
}
#: Smallest sane value of each ``[http]`` key: below it ordinary requests would fail.
_HTTP_MIN: dict[str, float] = {
    "max_header_bytes": 1024,
    "max_headers": 8,
    "max_request_line": 256,
    "idle_timeout": 0.05,
    "header_timeout": 0.05,
    "body_timeout": 0.05,
    "max_connections": 1,
}


def _merged(raw: dict[str, Any], table: str, flags: dict[str, Any] | None) -> dict[str, Any]:
    merged = dict(raw.get(table, {}))
    merged.update({k: v for k, v in (flags or {}).items() if v is not None})
    return merged


def _on_off(name: str, value: object) -> bool:
    """``on``/``off`` from a flag, or a TOML boolean."""
    if isinstance(value, bool):
        return value
    if value in ("on", "off"):
        return value == "on"
    raise InvalidRequest(f"invalid {name} {value!r}: expected on or off")


def _http_limits(values: dict[str, Any], config_file: Path | None) -> HttpLimits:
    default = HttpLimits()
    parsed: dict[str, Any] = {"lean": _on_off("http lean", values.get("lean", default.lean))}
    for key, parse in _HTTP_KEYS.items():
        value = parse(values[key]) if key in values else getattr(default, key)
        if value < _HTTP_MIN[key]:
            raise InvalidRequest(f"http {key} must be at least {_HTTP_MIN[key]:g}, got {value:g}")
        parsed[key] = value
    return HttpLimits(**parsed)


def _security(auth: dict[str, Any], tls: dict[str, Any], config_file: Path | None) -> SecurityConfig:
    for table, values in (("auth", auth), ("tls", tls)):
        for key, value in values.items():
            want = bool if key == "insecure_no_auth" else str
            if not isinstance(value, want) and not isinstance(value, Path):
                raise InvalidRequest(
                    f"invalid config in {config_file}: {table}.{key} must be a "
                    f"{'boolean' if want is bool else 'string'}"
                )
    metrics = str(auth.get("metrics", "token"))
    if metrics not in ("token", "none"):
        raise InvalidRequest(f'invalid metrics auth {metrics!r}: use "token" or "none"')

    def path(values: dict[str, Any], key: str) -> Path | None:
        return Path(values[key]) if values.get(key) else None

    sec = SecurityConfig(
        token_file=path(auth, "token_file"),
        metrics_auth=metrics,
        insecure_no_auth=bool(auth.get("insecure_no_auth", False)),
        tls_cert=path(tls, "cert"),
        tls_key=path(tls, "key"),
        tls_client_ca=path(tls, "client_ca"),
        tls_client_roles=path(tls, "client_roles"),
    )
    if (sec.tls_cert is None) != (sec.tls_key is None):
        raise InvalidRequest("TLS needs both --tls-cert and --tls-key (got only one of them)")
    if sec.tls_client_ca is not None and sec.tls_cert is None:
        raise InvalidRequest("--tls-client-ca needs TLS: give --tls-cert and --tls-key too")
    if sec.tls_client_roles is not None and sec.tls_client_ca is None:
        raise InvalidRequest(
            "--tls-client-roles needs --tls-client-ca: only verified client certificates get a role"
        )
    return sec


def _check_keys(table: dict[str, Any], known: set[str], prefix: str, config_file: Path | None) -> None:
    unknown = set(table) - known
    if unknown:
        names = ", ".join(prefix + k for k in sorted(unknown))
        raise InvalidRequest(f"unknown config keys in {config_file}: {names}")
