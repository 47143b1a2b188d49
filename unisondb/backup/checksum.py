"""``<file>.sha256`` sidecars, written beside every backup file.

Content is one line in GNU ``sha256sum`` format, ``<64 hex>  <basename>\\n``, so
``cd <dir> && sha256sum -c <file>.sha256`` checks the file. The name is the bare basename:
the sidecar stays valid when the directory is moved, tarred or synced elsewhere. (Names with
newlines cannot occur: the path rules reject control characters.)

A sidecar is written like any backup file (``.tmp`` → fsync → rename → directory fsync), or
as part of a ``files.Batch`` (then renamed with the batch, after the file it is for).
An existing sidecar that says the same thing is left alone; one that says something else is
a ``Conflict``: we never silently overwrite a checksum somebody may rely on.
"""

from __future__ import annotations

from unisondb import sha256sum
from unisondb.backup import files
from unisondb.backup.files import Batch, TargetDir
from unisondb.errors import Conflict

SUFFIX = ".sha256"


def sidecar_name(name: str) -> str:
    return name + SUFFIX


def sidecar_line(hexdigest: str, name: str) -> str:
    return sha256sum.line(hexdigest, name)


def parse_sidecar(text: str) -> tuple[str, str] | None:
    """(hex digest, file name) of a one-entry sha256sum file naming a file, else None.

    The format rules are ``unisondb/sha256sum.py``'s (the one parser restore uses too).
    """
    entries = sha256sum.parse(text)
    if entries is None or len(entries) != 1 or entries[0].name is None:
        return None
    return entries[0].digest, entries[0].name


def ensure_sidecar(tdir: TargetDir, name: str, hexdigest: str, batch: Batch | None = None) -> bool:
    """Make ``<name>.sha256`` say ``hexdigest``; return True if it had to be written.

    With ``batch`` a missing sidecar is staged in it (published by ``batch.publish()``)."""
    side = sidecar_name(name)
    want = sidecar_line(hexdigest, name)
    if tdir.require_regular(side) is not None:
        have = tdir.read_small(side).decode("utf-8", errors="replace")
        if have == want:
            return False
        parsed = parse_sidecar(have)
        if parsed != (hexdigest, name):
            raise Conflict(
                f"{tdir.path / side} already exists and records a different checksum "
                f"({parsed[0] if parsed else 'unreadable'}) than {tdir.path / name} "
                f"({hexdigest}); refusing to overwrite it: move the old files away or choose "
                "another backup path"
            )
        return False  # same digest and name, only formatted differently (e.g. '*' mode)
    data = want.encode()
    if batch is not None:
        batch.add([(side, lambda fd: files.write_all(fd, data))])
    else:
        tdir.publish(side, lambda fd: files.write_all(fd, data))
    return True


def complete_publish(tdir: TargetDir, name: str, hexdigest: str) -> None:
    """Write the sidecar of a file this request just published, or withdraw the file.

    A backup file and its integrity record become visible together: if the sidecar
    cannot be written (ENOSPC, EACCES, a conflicting old sidecar), ``name`` is removed
    again before the error propagates, so nothing is left half published and a retry
    starts from scratch. (A kill -9 between the two is completed at the next start by
    ``backup.repair``.)
    """
    try:
        ensure_sidecar(tdir, name, hexdigest)
    except BaseException:
        try:
            tdir.unlink(name)
        except Exception:  # the sidecar error is the one to report
            pass
        raise
