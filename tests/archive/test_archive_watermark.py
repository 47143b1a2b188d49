"""After a restart the archiver knows what is archived from its persisted watermark: no LIST, no
re-encoding, no re-upload — and it does not trust the watermark when the WAL or the archive changed.

Requests are counted through botocore's own event hooks on the real client (SeaweedFS behind it).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from s3server import S3Server
from test_archive_archiver import HISTORY, LocalWal, _segment_keys

from unisondb.archive import naming
from unisondb.archive.archiver import Archiver, SegmentInfo
from unisondb.archive.lease import Lease
from unisondb.archive.publish import Spooled
from unisondb.archive.store import ObjectStore

URL = "s3://bucket/arch"


class Calls:
    def __init__(self, client: object) -> None:
        self.counts: dict[str, int] = {}
        for op in ("ListObjectsV2", "ListObjects", "PutObject", "GetObject", "HeadObject"):
            client.meta.events.register(f"before-call.s3.{op}", self._hook(op))  # type: ignore[attr-defined]

    def _hook(self, op: str) -> object:
        def hook(**_: object) -> None:
            self.counts[op] = self.counts.get(op, 0) + 1

        return hook

    def reset(self) -> None:
        self.counts.clear()


def _archiver(
    store: ObjectStore,
    wal: LocalWal,
    state: Path,
    *,
    pid: int,
    url: str = URL,
    describe: Callable[[int, Path], SegmentInfo] | None = None,
) -> Archiver:
    """One server's archiver (writer "server-a"); a new pid is a restart of the same server."""
    lease = Lease(store, "arch", "server-a", host="test-host", pid=pid, pid_alive=lambda p: False)
    return Archiver(
        store,
        "arch",
        "users",
        lease,
        wal.list_sealed,
        describe or wal.describe,
        state_path=state,
        archive_url=url,
    )


def test_restart_trusts_the_watermark_without_list_or_reupload(
    s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    client = s3_server.client()
    calls = Calls(client)
    store = ObjectStore(bucket, client=client)
    wal = LocalWal(tmp_path / "wal")
    state = tmp_path / "archive-segments.json"
    for _ in range(3):
        wal.seal()
    first = _archiver(store, wal, state, pid=1000)
    assert first.run_once() == 3
    saved = json.loads(state.read_text())
    assert saved["segment"] == 3 and saved["last_lsn"] == 300 and saved["url"] == URL
    # SIGKILL-like restart of the same server: a new archiver, the same data directory.
    wal.seal()
    calls.reset()
    again = _archiver(store, wal, state, pid=2000)
    encoded: list[int] = []
    original = again._encode

    def encode(segment_id: int, path: Path) -> tuple[SegmentInfo, Spooled]:
        encoded.append(segment_id)
        return original(segment_id, path)

    again._encode = encode  # type: ignore[method-assign]
    assert again.run_once() == 1
    assert encoded == [4]  # segments 1..3 were neither re-encoded nor re-uploaded
    assert calls.counts.get("ListObjectsV2", 0) + calls.counts.get("ListObjects", 0) == 0
    assert calls.counts["HeadObject"] == 1  # the watermark's object, once
    assert all(again.is_archived(s) for s in wal.ids) and again.archived_lsn == 400
    assert json.loads(state.read_text())["segment"] == 4
    assert len(_segment_keys(store)) == 4


def test_watermark_is_not_trusted_when_the_archive_lost_the_object(
    s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    store = ObjectStore(bucket, client=s3_server.client())
    wal = LocalWal(tmp_path / "wal")
    state = tmp_path / "archive-segments.json"
    for _ in range(2):
        wal.seal()
    _archiver(store, wal, state, pid=1000).run_once()
    for key in _segment_keys(store):
        store.delete(key)  # the bucket was emptied behind the server's back
    again = _archiver(store, wal, state, pid=2000)
    assert again.run_once() == 2  # published again: the archive has no hole
    assert len(_segment_keys(store)) == 2


def test_watermark_is_not_trusted_for_another_wal_or_another_archive(
    s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    store = ObjectStore(bucket, client=s3_server.client())
    wal = LocalWal(tmp_path / "wal")
    state = tmp_path / "archive-segments.json"
    for _ in range(2):
        wal.seal()
    _archiver(store, wal, state, pid=1000).run_once()

    other_history = bytes(reversed(HISTORY))

    def describe_other(segment_id: int, path: Path) -> SegmentInfo:
        first = (segment_id - 1) * 100 + 1
        return SegmentInfo(first, first + 99, other_history, bytes(32))

    # The same segment ids, but a WAL of another history (a restored data directory).
    replaced = _archiver(store, wal, state, pid=2000, describe=describe_other)
    assert replaced.run_once() == 2
    assert len([k for k in _segment_keys(store) if other_history.hex() in k]) == 2

    # Another archive URL: the watermark says nothing about it.
    moved = _archiver(store, wal, state, pid=3000, url="s3://elsewhere/x")
    assert not moved.is_archived(1)
    assert moved.run_once() == 2  # recognised as identical by their headers, but not trusted blindly


def test_segments_retention_pruned_are_not_resurrected(
    s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    """The watermark's own object may be pruned by retention; the retention record explains it."""
    store = ObjectStore(bucket, client=s3_server.client())
    wal = LocalWal(tmp_path / "wal")
    state = tmp_path / "archive-segments.json"
    for _ in range(2):
        wal.seal()
    _archiver(store, wal, state, pid=1000).run_once()
    for key in _segment_keys(store):
        store.delete(key)
    record = {"format": 1, "namespace": "users", "oldest_lsn": 200}
    store.put_if_absent(naming.retention_key("arch", "users"), json.dumps(record).encode())
    again = _archiver(store, wal, state, pid=2000)
    assert again.run_once() == 0
    assert _segment_keys(store) == [] and again.is_archived(1) and again.is_archived(2)
