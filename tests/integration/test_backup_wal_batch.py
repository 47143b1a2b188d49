"""kill -9 at each step of a batched WAL-backup publish (issue 10 item 2), on a real server.

A batch writes every segment and sidecar to its ``.tmp``, fsyncs them, renames them all
and fsyncs the directory once (``backup/files.py`` ``Batch``). The server is stopped with
SIGKILL at each step through the ``UNISONDB_TEST_HOLD`` seam (the exact moment, not a
timer). Afterwards only whole, verifiable files may be visible — every segment
byte-identical to its source, every sidecar beside its file and true of it — and
re-running the same request completes the backup.
"""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from serverproc import wait_hold_reached
from test_backup_helpers import NS, Server, backup_root, fill_segments, sha256sum_check, tmp_files, wal_backup


def kill_at(srv: Server, fifo: Path, body: dict[str, object]) -> None:
    def request() -> None:
        try:
            httpx.post(f"{srv.url}/api/v1/{NS}/wal/backup", json=body, timeout=60)
        except httpx.TransportError:
            pass  # killed under it: expected

    t = threading.Thread(target=request)
    t.start()
    wait_hold_reached(fifo, srv, timeout=60)
    srv.kill9()
    t.join()


def assert_only_whole_files(out: Path, sources: dict[str, bytes]) -> list[str]:
    names = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    for name in names:
        if name.endswith(".sha256"):
            assert name[: -len(".sha256")] in names, f"{name} is visible without its file"
        elif not name.endswith(".tmp"):
            assert (out / name).read_bytes() == sources[name], f"{name} is not whole"
    if any(n.endswith(".sha256") for n in names):
        r = subprocess.run(
            ["sha256sum", "-c", *[n for n in names if n.endswith(".sha256")]],
            cwd=out,
            capture_output=True,
            text=True,
        )
        assert r.returncode == 0, r.stdout + r.stderr
    return names


@pytest.mark.parametrize(
    ("point", "visible"),
    [
        ("wal-batch-synced", "nothing"),  # all fsynced, nothing renamed
        ("wal-batch-renamed-one", "first segment without its sidecar"),
        ("wal-batch-renamed", "everything, before the directory fsync"),
    ],
)
def test_kill9_at_each_step_of_a_batch_leaves_whole_files_and_a_rerun_completes(
    server_factory: Callable[..., Server],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    point: str,
    visible: str,
) -> None:
    data = tmp_path / "data"
    fifo = tmp_path / f"hold-{point}"
    os.mkfifo(fifo)
    monkeypatch.setenv("UNISONDB_TEST_HOLD", f"{point}:{fifo}")
    srv = server_factory(data, NS, extra_args=["--wal-segment-size", "64KiB"])
    with srv.client() as c:
        fill_segments(c, 250_000, "w")
    wal = data / NS / "wal"
    sealed = sorted(wal.glob("*.wal"))[:-1]  # the newest is the active one
    assert len(sealed) >= 3
    sources = {p.name: p.read_bytes() for p in sealed}
    kill_at(srv, fifo, {"backupDir": "k"})
    out = backup_root(data) / "k"
    names = [n for n in assert_only_whole_files(out, sources) if not n.endswith(".tmp")]
    if visible == "nothing":
        assert names == []
    elif visible.startswith("first"):
        assert names == [sealed[0].name]
    else:
        assert names == sorted(n for p in sealed for n in (p.name, p.name + ".sha256"))

    monkeypatch.delenv("UNISONDB_TEST_HOLD")
    srv = server_factory(data, NS, extra_args=["--wal-segment-size", "64KiB"])
    assert tmp_files(backup_root(data)) == []  # the start removed what the batch left
    with srv.client() as c:
        r = wal_backup(c, {"backupDir": "k"})
        assert r.status_code == 200, r.text
        got = {b["segmentId"]: b["copied"] for b in r.json()["backups"]}
    for p in sealed:
        assert got[int(p.stem)] == (p.name not in names)  # what was whole is kept, not rewritten
    # The restart sealed the segment that was active at the kill: it is backed up too.
    now_sealed = {p.name: p.read_bytes() for p in sorted(wal.glob("*.wal"))[:-1]}
    assert set(now_sealed) > set(sources)
    assert sorted(assert_only_whole_files(out, now_sealed)) == sorted(
        n for name in now_sealed for n in (name, name + ".sha256")
    )
    sha256sum_check(out)
