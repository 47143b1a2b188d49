"""Upload mechanics against a real SeaweedFS: the --archive-rate-limit token bucket, multipart uploads.

Time is driven through the bucket's clock and sleep seams (a list the fake sleep advances), never by
sleeping. The multipart threshold is lowered through ``ObjectStore``'s constructor seam to S3's
minimum part size (5 MiB), so a 12 MiB object goes up in three parts.
"""

from __future__ import annotations

import io
import os
import re
from pathlib import Path
from typing import Any

import pytest
from s3server import S3Server
from serverproc import ServerProcess
from test_archive_server import NS, archive_args, put, s3_env, wait_for  # noqa: F401  (s3_env: a fixture)

from unisondb.archive import objectfmt
from unisondb.archive.objectfmt import ArchiveKey, Identity, Kind
from unisondb.archive.publish import publish_file
from unisondb.archive.store import MIN_PART_SIZE, ObjectStore
from unisondb.errors import ObjectExists
from unisondb.ratelimit import TokenBucket

HISTORY = bytes.fromhex("00112233445566778899aabbccddeeff")


class FakeTime:
    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_bucket_bounds_average_bandwidth() -> None:
    t = FakeTime()
    bucket = TokenBucket(1000.0, clock=t.clock, sleep=t.sleep)  # 1000 B/s, 1000 B of burst
    assert bucket.take(1000) == 0.0  # the burst
    sent = 1000
    start = t.now
    for _ in range(20):
        bucket.take(250)
        sent += 250
        # Bytes started by now never exceed burst + rate * elapsed.
        assert sent <= 1000 + 1000 * (t.now - start) + 1e-6
    assert t.now - start == pytest.approx(5.0)  # 5000 B beyond the burst at 1000 B/s
    # Idle time refills the credit, but never beyond the burst.
    t.now += 60
    assert bucket.take(1000) == 0.0
    assert bucket.take(500) == pytest.approx(0.5)


def test_bucket_lets_a_request_larger_than_the_burst_through_and_books_the_debt() -> None:
    t = FakeTime()
    bucket = TokenBucket(100.0, burst=100.0, clock=t.clock, sleep=t.sleep)
    assert bucket.take(1000) == pytest.approx(9.0)  # waits until the 900 B over the credit are paid
    assert bucket.take(100) == pytest.approx(1.0)
    assert bucket.waited == pytest.approx(10.0)


def test_store_uploads_wait_for_the_rate_limit(s3_server: S3Server, bucket: str) -> None:
    t = FakeTime()
    limiter = TokenBucket(100_000.0, clock=t.clock, sleep=t.sleep)
    store = ObjectStore(bucket, client=s3_server.client(), limiter=limiter)
    for i in range(4):
        store.put_if_absent(f"rl/{i}", os.urandom(100_000))
    # 400 kB at 100 kB/s with 100 kB of burst: 3 s of waiting, booked before each PUT.
    assert sum(t.sleeps) == pytest.approx(3.0)
    assert [o.size for o in store.list("rl/")] == [100_000] * 4
    # The lease is never throttled: compare-and-swap writes bypass the bucket.
    etag = store.put_if_absent("rl/lease", b"x")  # small, but counted
    before = limiter.waited
    store.put_if_match("rl/lease", b"y", etag)
    assert limiter.waited == before


def _count_calls(client: object, op: str) -> list[int]:
    calls = [0]

    def hook(**_: object) -> None:
        calls[0] += 1

    client.meta.events.register(f"before-call.s3.{op}", hook)  # type: ignore[attr-defined]
    return calls


def test_large_object_goes_up_in_parts_and_is_still_create_if_absent(
    s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    client = s3_server.client()
    parts = _count_calls(client, "UploadPart")
    puts = _count_calls(client, "PutObject")
    t = FakeTime()
    limiter = TokenBucket(float(MIN_PART_SIZE), clock=t.clock, sleep=t.sleep)
    store = ObjectStore(
        bucket, client=client, limiter=limiter, multipart_threshold=MIN_PART_SIZE, part_size=MIN_PART_SIZE
    )
    data = os.urandom(12 << 20)
    store.put_if_absent("big/a", io.BytesIO(data))
    assert parts[0] == 3 and puts[0] == 0
    assert store.get("big/a")[0] == data
    assert t.sleeps and sum(t.sleeps) == pytest.approx((12 << 20) / MIN_PART_SIZE - 1.0)  # per part
    # The same name again: CompleteMultipartUpload carries If-None-Match, so it is refused and the
    # upload is aborted (nothing half-finished stays in the bucket).
    with pytest.raises(ObjectExists):
        store.put_if_absent("big/a", io.BytesIO(os.urandom(6 << 20)))
    assert store.get("big/a")[0] == data
    assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    # Below the threshold: one PUT.
    store.put_if_absent("big/small", io.BytesIO(b"s" * 1000))
    assert puts[0] == 1 and parts[0] == 5


@pytest.mark.parametrize("key", [None, ArchiveKey.from_bytes(os.urandom(32))], ids=["plain", "encrypted"])
def test_large_segment_published_in_parts_round_trips(
    s3_server: S3Server, bucket: str, tmp_path: Path, key: ArchiveKey | None
) -> None:
    client = s3_server.client()
    parts = _count_calls(client, "UploadPart")
    store = ObjectStore(bucket, client=client, multipart_threshold=MIN_PART_SIZE, part_size=MIN_PART_SIZE)
    path = tmp_path / "000000001.wal"
    path.write_bytes(os.urandom(11 << 20))  # incompressible: the object stays above the threshold
    ident = Identity(Kind.SEGMENT, "users", HISTORY, 1, 9)
    first = publish_file(store, "seg/one", path, ident, archive_key=key, spool_dir=tmp_path)
    assert not first.already and parts[0] == 3
    again = publish_file(store, "seg/one", path, ident, archive_key=key, spool_dir=tmp_path)
    assert again.already  # recognised by its header, not re-uploaded over
    out = io.BytesIO()
    objectfmt.decode(store.open("seg/one"), out, key, "seg/one")
    assert out.getvalue() == path.read_bytes()


def test_server_rate_limit_holds_uploads_back(
    s3_env: S3Server,  # noqa: F811
    bucket: str,
    tmp_path: Path,
    server_factory: Any,
) -> None:
    """The flag reaches the uploads: at 64 KiB/s, ~400 KiB of incompressible WAL waits seconds
    (read from the counter the server exports, not timed by the test)."""
    args = archive_args(
        s3_env, bucket, None, "--archive-snapshot-interval", "0", "--archive-rate-limit", "64KiB/s"
    )
    srv: ServerProcess = server_factory(tmp_path / "data", NS, extra_args=args)
    last = 0
    for i in range(8):
        last = put(srv, f"k{i}", os.urandom(50_000))
    wait_for(srv, lambda s: s["archivedLsn"] >= last, "the archive to catch up", timeout=60)
    with srv.client() as c:
        metrics = c.get("/metrics").text
    waited = re.search(r"^unisondb_archive_rate_limited_seconds_total (\S+)$", metrics, re.M)
    assert waited and float(waited.group(1)) >= 3.0, metrics
