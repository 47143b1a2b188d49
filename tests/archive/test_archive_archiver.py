"""The archiver against a real SeaweedFS: in-order upload, no LIST, outage + catch-up, one writer."""

from __future__ import annotations

import io
import os
import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from s3server import S3Server, start_s3_server

from unisondb.archive import naming
from unisondb.archive.archiver import ArchiveMetrics, Archiver, Backoff, SegmentInfo
from unisondb.archive.lease import Lease
from unisondb.archive.objectfmt import ArchiveKey, Identity, Kind, decode
from unisondb.archive.publish import publish_file
from unisondb.archive.store import ObjectStore
from unisondb.errors import ArchiveConflict

HISTORY = bytes.fromhex("0123456789abcdef0123456789abcdef")
RECORDS_PER_SEGMENT = 100


class LocalWal:
    """Stand-in for the engine's narrow interface: sealed segment files in a directory.
    The files are real; their contents are random bytes because the archiver never parses them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.ids: list[int] = []

    def seal(self) -> int:
        sid = len(self.ids) + 1
        (self.root / f"{sid:09d}.wal").write_bytes(os.urandom(20_000))
        self.ids.append(sid)
        return sid

    def list_sealed(self) -> list[tuple[int, Path]]:
        return [(sid, self.root / f"{sid:09d}.wal") for sid in self.ids]

    @staticmethod
    def describe(segment_id: int, path: Path) -> SegmentInfo:
        first = (segment_id - 1) * RECORDS_PER_SEGMENT + 1
        return SegmentInfo(first, first + RECORDS_PER_SEGMENT - 1, HISTORY, bytes(32))


def _archiver(
    store: ObjectStore,
    wal: LocalWal,
    writer: str,
    *,
    now: list[float] | None = None,
    key: ArchiveKey | None = None,
    metrics: ArchiveMetrics | None = None,
    pid: int = 1000,
    spool_dir: Path | None = None,
) -> Archiver:
    clock = (lambda: now[0]) if now is not None else time.time
    lease = Lease(
        store,
        "arch",
        writer,
        ttl_seconds=30,
        clock=clock,
        host="test-host",
        pid=pid,
        pid_alive=lambda p: False,
    )
    return Archiver(
        store,
        "arch",
        "users",
        lease,
        wal.list_sealed,
        wal.describe,
        archive_key=key,
        metrics=metrics,
        clock=clock,
        backoff=Backoff(rng=random.Random(7)),
        spool_dir=spool_dir,
    )


def _segment_keys(store: ObjectStore) -> list[str]:
    return [o.key for o in store.list("arch/users/") if "/wal/" in o.key]


def _count_lists(client: object) -> list[int]:
    """Count ListObjects calls through botocore's own event hooks (the real client, not a fake)."""
    calls = [0]

    def hook(**_: object) -> None:
        calls[0] += 1

    for op in ("ListObjectsV2", "ListObjects"):
        client.meta.events.register(f"before-call.s3.{op}", hook)  # type: ignore[attr-defined]
    return calls


@pytest.mark.parametrize("key", [None, ArchiveKey.from_bytes(os.urandom(32))], ids=["plain", "encrypted"])
def test_uploads_sealed_segments_in_order_without_listing(
    s3_server: S3Server, bucket: str, tmp_path: Path, key: ArchiveKey | None
) -> None:
    client = s3_server.client()
    lists = _count_lists(client)
    store = ObjectStore(bucket, client=client)
    wal = LocalWal(tmp_path / "wal")
    for _ in range(3):
        wal.seal()
    registry = CollectorRegistry()
    archiver = _archiver(store, wal, "a", key=key, metrics=ArchiveMetrics(registry))
    assert archiver.run_once() == 3
    assert archiver.run_once() == 0  # nothing new: no request but the lease check
    wal.seal()
    assert archiver.run_once() == 1
    assert lists[0] == 0
    assert all(archiver.is_archived(s) for s in wal.ids) and archiver.archived_lsn == 400
    keys = _segment_keys(store)
    assert keys == sorted(keys) and len(keys) == 4
    assert keys[0].endswith(
        "00000000000000000001-00000000000000000100-000000001.wal.zst" + (".enc" if key else "")
    )
    for (sid, path), object_key in zip(wal.list_sealed(), keys, strict=True):
        out = io.BytesIO()
        header = decode(store.open(object_key), out, key, object_key)
        assert out.getvalue() == path.read_bytes() and header.first_lsn == (sid - 1) * 100 + 1
    sample = registry.get_sample_value
    assert sample("unisondb_archive_uploads_total", {"namespace": "users", "kind": "segment"}) == 4
    assert sample("unisondb_archive_archived_lsn", {"namespace": "users"}) == 400
    assert sample("unisondb_archive_pending_segments", {"namespace": "users"}) == 0


def test_a_failure_mid_pass_confirms_what_came_before_and_leaks_no_spool(
    s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    """The next segment is encoded while one uploads: a conflict on segment 2 must still confirm
    segment 1 only, upload nothing after 2 (no hole hidden by a later object), and leave no
    encoded spool file behind (the one encoded ahead is dropped)."""
    store = ObjectStore(bucket, client=s3_server.client())
    wal = LocalWal(tmp_path / "wal")
    for _ in range(4):
        wal.seal()
    spool = tmp_path / "spool"
    spool.mkdir()
    archiver = _archiver(store, wal, "a", spool_dir=spool)
    second = naming.segment_key("arch", "users", HISTORY, 101, 200, 2, False)
    other = tmp_path / "other.wal"
    other.write_bytes(os.urandom(1000))
    publish_file(store, second, other, Identity(Kind.SEGMENT, "users", HISTORY, 101, 200))  # another writer's
    with pytest.raises(ArchiveConflict):
        archiver.run_once()
    assert archiver.is_archived(1) and not any(archiver.is_archived(s) for s in (2, 3, 4))
    assert len(_segment_keys(store)) == 2  # segment 1 and the foreign object
    assert list(spool.iterdir()) == [] and _open_files_under(spool) == []


def _open_files_under(root: Path) -> list[str]:
    """This process's open files under ``root`` (a spool file is unlinked at once, so only its
    descriptor shows it was not closed)."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(root)):
            found.append(target)
    return found


def test_restart_after_crash_resumes_without_duplicates(
    s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    store = ObjectStore(bucket, client=s3_server.client())
    wal = LocalWal(tmp_path / "wal")
    for _ in range(3):
        wal.seal()
    first = _archiver(store, wal, "server-a", pid=1000)
    first.run_once()
    before = {o.key: o.etag for o in store.list("arch/users/")}
    # SIGKILL-like: the first archiver vanishes without releasing; the same server restarts.
    wal.seal()
    registry = CollectorRegistry()
    again = _archiver(store, wal, "server-a", pid=2000, metrics=ArchiveMetrics(registry))
    assert again.run_once() == 4  # confirms the 3 already there (no re-upload) and uploads 1
    after = {o.key: o.etag for o in store.list("arch/users/")}
    assert {k: after[k] for k in before} == before and len(after) == 4
    assert (
        registry.get_sample_value("unisondb_archive_uploads_total", {"namespace": "users", "kind": "segment"})
        == 1
    )


def test_second_server_on_the_prefix_is_refused_and_the_first_keeps_going(
    s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    now = [100.0]
    store = ObjectStore(bucket, client=s3_server.client())
    wal_a, wal_b = LocalWal(tmp_path / "a"), LocalWal(tmp_path / "b")
    wal_a.seal()
    wal_b.seal()
    a = _archiver(store, wal_a, "server-a", now=now)
    b = _archiver(store, wal_b, "server-b", now=now)
    assert a.step() == a.interval and a.state == "ok"
    assert b.step() == pytest.approx(30.5) and b.state == "lease-lost"  # retried when it expires
    assert b.last_error is not None and "held by writer server-a" in b.last_error
    assert not b.is_archived(1)
    for _ in range(3):
        now[0] += 11  # past the renewal interval (ttl/3): the first renews and uploads
        wal_a.seal()
        assert a.step() == a.interval and a.state == "ok"
    assert len(_segment_keys(store)) == 4


def test_backoff_grows_with_full_jitter_and_is_capped() -> None:
    backoff = Backoff(base=0.5, cap=30.0, rng=random.Random(1))
    delays = [[backoff.delay(n) for _ in range(200)] for n in range(12)]
    assert all(0 <= d <= min(30.0, 0.5 * 2**n) for n, ds in enumerate(delays) for d in ds)
    assert max(delays[0]) < 0.5 < max(delays[3])  # grows
    assert max(delays[11]) > 20 and len({round(d, 3) for d in delays[11]}) > 100  # capped, jittered


@pytest.fixture
def own_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A server of this test's own, because the test stops it."""
    server = start_s3_server(tmp_path_factory.mktemp("s3own"))
    yield server
    server.stop()


def test_outage_then_catch_up_in_order(own_s3: S3Server, tmp_path: Path) -> None:
    bucket = own_s3.create_bucket("outage")
    import boto3
    from botocore.config import Config

    client = boto3.client(
        "s3",
        endpoint_url=own_s3.endpoint,
        region_name="us-east-1",
        aws_access_key_id=own_s3.access_key,
        aws_secret_access_key=own_s3.secret_key,
        config=Config(
            s3={"addressing_style": "path"}, retries={"max_attempts": 1}, connect_timeout=1, read_timeout=5
        ),
    )
    store = ObjectStore(bucket, client=client)
    wal = LocalWal(tmp_path / "wal")
    wal.seal()
    registry = CollectorRegistry()
    archiver = _archiver(store, wal, "a", metrics=ArchiveMetrics(registry))
    assert archiver.step() == archiver.interval

    own_s3.stop()  # the object store goes away while writes go on locally
    for _ in range(3):
        wal.seal()
    delays = [archiver.step() for _ in range(3)]
    assert archiver.state == "retrying" and archiver.failures_in_a_row == 3
    assert all(0 <= d <= 0.5 * 2**n for n, d in enumerate(delays))
    assert not any(archiver.is_archived(s) for s in (2, 3, 4))  # retention must keep these
    assert (
        registry.get_sample_value(
            "unisondb_archive_failures_total", {"namespace": "users", "reason": "unavailable"}
        )
        == 3
    )
    assert registry.get_sample_value("unisondb_archive_pending_segments", {"namespace": "users"}) == 3

    own_s3.restart()
    assert archiver.step() == archiver.interval and archiver.state == "ok"
    assert archiver.failures_in_a_row == 0 and all(archiver.is_archived(s) for s in wal.ids)
    keys = _segment_keys(store)
    assert [naming.parse_key("arch", k).segment_id for k in keys] == [1, 2, 3, 4]  # type: ignore[union-attr]


def test_thread_uploads_on_wake_and_releases_the_lease_on_stop(
    s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    store = ObjectStore(bucket, client=s3_server.client())
    wal = LocalWal(tmp_path / "wal")
    archiver = _archiver(store, wal, "a")
    archiver.interval = 60.0  # only wake() should make it run again
    archiver.start()
    try:
        wal.seal()
        archiver.wake()
        deadline = time.monotonic() + 20
        while not archiver.is_archived(1) and time.monotonic() < deadline:
            time.sleep(0.05)  # waiting on a real thread and a real S3 PUT, not standing in for time
        assert archiver.is_archived(1)
    finally:
        archiver.stop()
    record = archiver.lease.read()
    assert record is not None and record.released
