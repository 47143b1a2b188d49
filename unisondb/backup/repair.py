"""At server start: finish snapshot publications that a kill -9 interrupted.

A snapshot is renamed into place and then gets its ``.sha256`` sidecar
(``snapshot.take_snapshot``). A kill -9 between the two leaves a snapshot without a
sidecar. The file proves itself by its trailer (``storage/snapfile.py``), so
``complete_interrupted`` — run by the server through ``Engine.open(on_locked=...)``, under
the namespace lock, right after the ``.tmp`` cleanup —
verifies every sidecar-less file under the namespace's backup root that has a trailer:

* intact → its sidecar is written, as the request would have done;
* damaged → renamed to ``<name>.corrupt`` (never served, listed or restored by its old
  name) and logged as an error.

Files without a trailer (WAL segments, snapshots from before the trailer existed, an
operator's own files) and files that already have a sidecar are left alone, so a normal
start costs one ``os.walk`` of the backup root and nothing else. A failure here (disk
full, permission) is logged and never stops the server: the file still proves itself.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

import structlog

from unisondb.backup import checksum
from unisondb.backup.files import TargetDir
from unisondb.errors import CorruptSnapshot, UnisonDBError
from unisondb.storage import fsutil, snapfile

log = structlog.get_logger(__name__)

CORRUPT_SUFFIX = ".corrupt"
_SKIP_SUFFIXES = (checksum.SUFFIX, fsutil.TMP_SUFFIX, CORRUPT_SUFFIX)


@dataclass(frozen=True, slots=True)
class Repaired:
    path: Path
    #: "sidecar-written" or "renamed-corrupt" (then ``moved_to`` says where).
    action: str
    moved_to: Path | None = None


def complete_interrupted(backup_root: Path) -> list[Repaired]:
    done: list[Repaired] = []
    if not backup_root.is_dir():
        return done
    for dirpath, _dirs, names in os.walk(backup_root):  # never follows directory links
        present = set(names)
        for name in names:
            if name.endswith(_SKIP_SUFFIXES) or checksum.sidecar_name(name) in present:
                continue
            path = Path(dirpath) / name
            try:
                if not stat.S_ISREG(os.lstat(path).st_mode):
                    continue
                result = _complete(path)
            except (UnisonDBError, OSError) as exc:
                log.warning("startup.backup_repair_failed", path=str(path), error=str(exc))
                continue
            if result is not None:
                done.append(result)
    return done


def _complete(path: Path) -> Repaired | None:
    try:
        if snapfile.read_trailer(path) is None:
            return None
        _trailer, digest = snapfile.verify_and_digest(path)
    except CorruptSnapshot as exc:
        moved = _free_name(path)
        os.rename(path, moved)
        fsutil.fsync_dir(path.parent)
        log.error("startup.snapshot_corrupt", path=str(path), moved_to=str(moved), error=str(exc))
        return Repaired(path, "renamed-corrupt", moved)
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    with TargetDir(fd, path.parent) as tdir:
        checksum.ensure_sidecar(tdir, path.name, digest)
    log.warning(
        "startup.snapshot_sidecar_written",
        path=str(path),
        sha256=digest,
        reason="the server stopped after publishing this snapshot and before its "
        ".sha256; the file verified against its own trailer",
    )
    return Repaired(path, "sidecar-written")


def _free_name(path: Path) -> Path:
    candidate = path.with_name(path.name + CORRUPT_SUFFIX)
    n = 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}{CORRUPT_SUFFIX}.{n}")
    return candidate
