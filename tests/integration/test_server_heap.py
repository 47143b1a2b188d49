"""The server's heap does not grow with every backup (``unisondb/memory.py``).

Each backup runs on one of the server's pooled worker threads and allocates 1 MiB chunks
there; with glibc's default arenas (one per thread, up to 8 per core) every pooled thread
that ever ran a backup kept ~10 MiB of freed chunks: RssAnon rose by 15-20 MiB over six
snapshots of a 30 MiB database and stayed there. With the arenas capped and the free heap
trimmed after each backup it stays within a few MiB of what the first snapshot left.
Real server process, real LMDB file, RssAnon read from /proc.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from tests.serverproc import ServerProcess
from unisondb.storage.engine import Engine
from unisondb.storage.options import EngineConfig
from unisondb.storage.record import Entry, EntryKind

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/<pid>/status")

#: Growth of RssAnon allowed between the first and the last snapshot.
SLACK_KIB = 8 << 10


def rss_anon_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    raise AssertionError(f"no RssAnon in /proc/{pid}/status")


def test_repeated_snapshots_leave_no_heap_behind(tmp_path: Path, server_factory) -> None:  # type: ignore[no-untyped-def]
    data = tmp_path / "data"
    eng = Engine.open(data, "default", EngineConfig(segment_size=8 << 20))
    try:
        for i in range(32):  # ~40 MiB of data.mdb: 40 chunks per plain copy
            eng.write([Entry(EntryKind.PUT, b"k%05d-%04d" % (i, j), os.urandom(1000)) for j in range(1000)])
    finally:
        eng.close()
    srv: ServerProcess = server_factory(data, "default")
    after: list[int] = []
    with srv.client(timeout=120) as c:
        for i in range(6):
            r = c.post("/api/v1/default/btree/backup", json={"path": f"heap-{i}.db"})
            assert r.status_code == 200, r.text
            after.append(rss_anon_kib(srv.proc.pid))
            for f in (data / "backups" / "default").glob(f"heap-{i}.db*"):
                f.unlink()
    growth = after[-1] - after[0]
    assert growth < SLACK_KIB, f"RssAnon after each snapshot (KiB): {after}"
