"""The data-directory layout: the only module that knows where files live.

```
<data_dir>/
  <ns>/db/data.mdb, lock.mdb    LMDB environment (the B-tree)
  <ns>/wal/000000001.wal ...    WAL segments, "%09d.wal"
  <ns>/LOCK                     flock held by the server or an offline tool
  backups/<ns>/                 the only place the backup API writes
```
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from unisondb.errors import InvalidRequest

NAMESPACE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
RESERVED_NAMES = frozenset({"backups"})
SEGMENT_SUFFIX = ".wal"
SEGMENT_RE = re.compile(r"^(\d{9,})\.wal$")


def validate_namespace(name: str) -> str:
    """Return ``name`` if it is a legal namespace, else raise ``InvalidRequest``."""
    if not NAMESPACE_RE.fullmatch(name) or name in RESERVED_NAMES:
        raise InvalidRequest(
            f"invalid namespace name {name!r}: must match [A-Za-z0-9][A-Za-z0-9_.-]{{0,63}} "
            "and must not be 'backups'"
        )
    return name


def is_namespace_name(name: str) -> bool:
    return bool(NAMESPACE_RE.fullmatch(name)) and name not in RESERVED_NAMES


def namespace_dir(data_dir: Path, ns: str) -> Path:
    return data_dir / ns


def btree_dir(data_dir: Path, ns: str) -> Path:
    return data_dir / ns / "db"


def wal_dir(data_dir: Path, ns: str) -> Path:
    return data_dir / ns / "wal"


def lock_path(data_dir: Path, ns: str) -> Path:
    return data_dir / ns / "LOCK"


def backup_root(data_dir: Path, ns: str) -> Path:
    return data_dir / "backups" / ns


def segment_name(segment_id: int) -> str:
    return f"{segment_id:09d}{SEGMENT_SUFFIX}"


#: Any name a copy of a segment goes by in a backup directory (plain, compressed, sidecar).
BACKUP_SEGMENT_RE = re.compile(r"^(\d{9,})\.wal(?:\.gz|\.zst|\.xz|\.bz2)?(?:\.sha256)?$")


def max_backup_segment_id(data_dir: Path, ns: str) -> int:
    """Highest segment id named anywhere under ``backups/<ns>/`` (0 if none).

    A fork starts its segment ids above this, so the document's incremental loop (which
    asks for ids above the last one it copied) never skips or overwrites a segment."""
    root = backup_root(data_dir, ns)
    highest = 0
    for _dirpath, _dirs, names in os.walk(root):
        for name in names:
            m = BACKUP_SEGMENT_RE.match(name)
            if m:
                highest = max(highest, int(m.group(1)))
    return highest


def parse_segment_name(name: str) -> int | None:
    """Segment id of a file name like ``000000042.wal``, or None for anything else."""
    m = SEGMENT_RE.match(name)
    return int(m.group(1)) if m else None


def discover_namespaces(data_dir: Path) -> list[str]:
    """Namespaces that exist on disk: directories with a ``db`` or ``wal`` child."""
    if not data_dir.is_dir():
        return []
    found = []
    for child in sorted(data_dir.iterdir()):
        if child.is_dir() and is_namespace_name(child.name):
            if (child / "db").is_dir() or (child / "wal").is_dir():
                found.append(child.name)
    return found
