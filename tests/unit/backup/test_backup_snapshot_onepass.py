"""A snapshot is written in one pass: the copy's bytes are hashed as they are written and
the file is never read back — so it can be written to a descriptor that cannot be read.

Both copy modes: the plain copy (``BTree.copy_plain_to`` through ``_Sink.write``) and the
compacting copy (LMDB writes into the ``_Sink``'s pipe). Real engine, real files; a full
disk is the real ``/dev/full``.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from unisondb.backup import snapshot
from unisondb.backup.snapshot import write_snapshot
from unisondb.config import EngineConfig
from unisondb.errors import NoSpace
from unisondb.restore import inventory
from unisondb.storage import snapfile
from unisondb.storage.engine import Engine


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    eng = Engine.open(tmp_path / "data", "onepass", EngineConfig(segment_size=1 << 20))
    for i in range(200):
        eng.put(b"k%04d" % i, os.urandom(20_000))  # ~4 MiB: several chunks, overflow pages
    for i in range(0, 200, 3):
        eng.delete(b"k%04d" % i)  # some free pages
    yield eng
    eng.close()


@pytest.mark.parametrize("compact", [False, True], ids=["plain", "compacting"])
def test_written_once_to_a_write_only_descriptor(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, compact: bool
) -> None:
    monkeypatch.setattr(snapshot, "COMPACT_FREE_FRACTION", -1.0 if compact else 2.0)
    out = tmp_path / "s.db"
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # reading it back: EBADF
    try:
        cp, size, digest = write_snapshot(engine, fd, out)
    finally:
        os.close(fd)
    raw = out.read_bytes()
    assert len(raw) == size and hashlib.sha256(raw).hexdigest() == digest  # the sidecar's digest
    trailer = snapfile.read_trailer(out)
    assert trailer is not None and hashlib.sha256(raw[: trailer.data_len]).digest() == trailer.data_sha256
    assert cp.applied_lsn == engine.last_lsn
    info = inventory.inspect_snapshot(out)  # LMDB structure, trailer, content
    assert info.checkpoint == cp
    inventory.check_snapshot_content(info)
    full = (Path(engine.data_file).stat().st_size // 4096) * 4096
    if compact:
        assert trailer.data_len < full  # free pages left out
    else:
        assert trailer.data_len > 0.5 * full  # every page up to the last used one


@pytest.mark.parametrize("compact", [False, True], ids=["plain", "compacting"])
def test_a_full_disk_is_a_clear_error_in_both_modes(
    engine: Engine, monkeypatch: pytest.MonkeyPatch, compact: bool
) -> None:
    monkeypatch.setattr(snapshot, "COMPACT_FREE_FRACTION", -1.0 if compact else 2.0)
    fd = os.open("/dev/full", os.O_WRONLY)
    try:
        with pytest.raises(NoSpace, match="no space left on device: .*s.db"):
            write_snapshot(engine, fd, Path("/backups/s.db"))
    finally:
        os.close(fd)
    engine.put(b"still", b"serving")  # the engine is unaffected
