"""The archive's S3 layers against a real SeaweedFS: client, names, publishing, lease, manifests."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from s3server import S3Server
from serverproc import free_port

from unisondb.archive import naming
from unisondb.archive.lease import Lease
from unisondb.archive.manifest import publish_snapshot, read_manifest
from unisondb.archive.naming import NameKind
from unisondb.archive.objectfmt import ArchiveKey, Identity, Kind, decode
from unisondb.archive.publish import publish_file
from unisondb.archive.store import ObjectStore, parse_url
from unisondb.errors import (
    ArchiveConflict,
    ArchiveUnavailable,
    CorruptArchive,
    InvalidRequest,
    LeaseHeld,
    NotFound,
    ObjectChanged,
    ObjectExists,
    PermissionDenied,
)

HISTORY = bytes.fromhex("00112233445566778899aabbccddeeff")
KEY = ArchiveKey.from_bytes(os.urandom(32))


def _store(s3: S3Server, bucket: str, secret: str | None = None) -> ObjectStore:
    return ObjectStore(bucket, client=s3.client(secret_key=secret))


def test_store_through_the_standard_credential_chain(
    s3_server: S3Server, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No client passed: boto3 finds the credentials in the AWS environment variables."""
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    store = ObjectStore(bucket, endpoint_url=s3_server.endpoint, path_style=True)
    etag = store.put_if_absent("a/b", b"hello")
    assert store.get("a/b") == (b"hello", etag)
    assert store.get("a/b", length=2)[0] == b"he"
    info = store.head("a/b")
    assert info is not None and (info.size, info.etag) == (5, etag)


def test_store_operations_and_errors(s3_server: S3Server, bucket: str) -> None:
    store = _store(s3_server, bucket)
    first = store.put_if_absent("p/x", b"1")
    with pytest.raises(ObjectExists, match=f"s3://{bucket}/p/x"):
        store.put_if_absent("p/x", b"2")
    second = store.put_if_match("p/x", b"2", first)
    with pytest.raises(ObjectChanged):
        store.put_if_match("p/x", b"3", first)
    assert store.get("p/x") == (b"2", second)
    store.put_if_absent("p/y", io.BytesIO(b"from a file object"))
    assert [o.key for o in store.list("p/")] == ["p/x", "p/y"]
    store.delete("p/x")
    store.delete("p/x")  # idempotent
    assert store.head("p/x") is None
    with pytest.raises(NotFound, match="not in the archive"):
        store.get("p/x")
    with pytest.raises(NotFound, match="create the bucket"):
        ObjectStore("no-such-bucket-here", client=s3_server.client()).get("k")
    with pytest.raises(PermissionDenied, match="refused access"):
        _store(s3_server, bucket, secret="0" * 40).put_if_absent("p/z", b"x")


def test_unreachable_store_is_unavailable(s3_server: S3Server) -> None:
    import boto3
    from botocore.config import Config

    port = free_port()  # nothing listens there
    client = boto3.client(
        "s3",
        endpoint_url=f"http://127.0.0.1:{port}",
        region_name="us-east-1",
        aws_access_key_id="a",
        aws_secret_access_key="b",
        config=Config(retries={"max_attempts": 1}, connect_timeout=1),
    )
    with pytest.raises(ArchiveUnavailable, match="unreachable"):
        ObjectStore("bkt", client=client).put_if_absent("k", b"x")


def test_parse_url() -> None:
    assert parse_url("s3://my-bucket/a/b/") == parse_url("s3://my-bucket/a/b")
    assert str(parse_url("s3://my-bucket")) == "s3://my-bucket"
    for bad in ("http://x/y", "s3://A/b", "s3://ab", "s3://bkt/a//b", "s3://bkt/../x"):
        with pytest.raises(InvalidRequest, match="invalid archive URL"):
            parse_url(bad)


def test_names_sort_in_log_order_and_parse_back() -> None:
    keys = [
        naming.segment_key("arch/prod", "users", HISTORY, first, first + 9, seg, True)
        for seg, first in ((12, 110), (2, 10), (10, 90))
    ]
    assert keys[1] == (
        "arch/prod/users/00112233445566778899aabbccddeeff/wal/"
        "00000000000000000010-00000000000000000019-000000002.wal.zst.enc"
    )
    assert sorted(keys) == [keys[1], keys[2], keys[0]]
    parsed = naming.parse_key("arch/prod", keys[0])
    assert parsed == naming.ArchiveName(NameKind.SEGMENT, "users", HISTORY, 110, 119, 12, True)
    snap = naming.snapshot_key("", "users", HISTORY, 7, False, NameKind.MANIFEST_COPY)
    assert snap == "users/00112233445566778899aabbccddeeff/snapshots/00000000000000000007.manifest.copy.zst"
    assert naming.parse_key("", snap) == naming.ArchiveName(
        NameKind.MANIFEST_COPY, "users", HISTORY, 7, 7, None, False
    )
    assert naming.parse_key("arch/prod", naming.lease_key("arch/prod")) is None
    assert naming.parse_key("arch/prod", "arch/prod/users/notahistory/wal/x") is None


def _segment(tmp_path: Path, size: int = 300_000) -> Path:
    path = tmp_path / "000000003.wal"
    path.write_bytes(os.urandom(size))
    return path


@pytest.mark.parametrize("archive_key", [None, KEY], ids=["plain", "encrypted"])
def test_publish_is_idempotent_and_never_overwrites(
    s3_server: S3Server, bucket: str, tmp_path: Path, archive_key: ArchiveKey | None
) -> None:
    store = _store(s3_server, bucket)
    path = _segment(tmp_path)
    key = naming.segment_key("arch", "users", HISTORY, 1, 50, 3, archive_key is not None)

    def publish() -> object:
        return publish_file(
            store, key, path, Identity(Kind.SEGMENT, "users", HISTORY, 1, 50), archive_key=archive_key
        )

    first = publish()
    assert not first.already and first.size > 0  # type: ignore[attr-defined]
    etag = store.head(key)
    again = publish()  # e.g. a retry after a lost response, or a restart after SIGKILL
    assert again.already  # type: ignore[attr-defined]
    assert store.head(key) == etag  # not rewritten
    out = io.BytesIO()
    decode(store.open(key), out, archive_key, store.where(key))
    assert out.getvalue() == path.read_bytes()

    path.write_bytes(os.urandom(1000))  # different content under the same name
    with pytest.raises(ArchiveConflict, match="already exists with different content.*never overwritten"):
        publish()
    assert store.head(key) == etag


def test_lease_one_writer_per_prefix(s3_server: S3Server, bucket: str) -> None:
    now = [1000.0]
    store = _store(s3_server, bucket)
    first = Lease(store, "arch", "server-a", ttl_seconds=30, clock=lambda: now[0], host="h1", pid=11)
    first.acquire()
    second = Lease(store, "arch", "server-b", ttl_seconds=30, clock=lambda: now[0], host="h2", pid=22)
    with pytest.raises(LeaseHeld, match="held by writer server-a .*host h1, pid 11"):
        second.acquire()
    now[0] += 20
    first.renew()  # the first keeps going
    now[0] += 20  # 20 s after the renewal: still inside the TTL
    with pytest.raises(LeaseHeld):
        second.acquire()
    first.renew()
    record = first.read()
    assert record is not None and record.writer_id == "server-a" and record.generation == 1

    now[0] += 31  # the first stops renewing (hung, partitioned): the lease expires
    second.acquire()
    assert second.read().writer_id == "server-b"  # type: ignore[union-attr]
    with pytest.raises(LeaseHeld, match="lost the writer lease"):
        first.renew()
    assert not first.held
    second.renew()


def test_lease_release_and_restart_after_crash(s3_server: S3Server, bucket: str) -> None:
    now = [0.0]
    store = _store(s3_server, bucket)
    a = Lease(store, "", "server-a", clock=lambda: now[0], host="h1", pid=11, pid_alive=lambda p: p == 11)
    a.acquire()
    a.release()
    b = Lease(store, "", "server-b", clock=lambda: now[0], host="h2", pid=22)
    b.acquire()  # released: no need to wait for the TTL
    assert b.read().generation == 2  # type: ignore[union-attr]

    # The same server restarting after a crash takes its own lease back at once...
    crashed = Lease(
        store, "", "server-b", clock=lambda: now[0], host="h2", pid=33, pid_alive=lambda p: p != 22
    )
    crashed.acquire()
    # ...but not while the old process still runs (a copy of the data directory, started twice).
    twin = Lease(store, "", "server-b", clock=lambda: now[0], host="h2", pid=44, pid_alive=lambda p: True)
    with pytest.raises(LeaseHeld):
        twin.acquire()
    with pytest.raises(LeaseHeld, match="lost"):
        b.renew()


def test_damaged_lease_is_a_clear_error(s3_server: S3Server, bucket: str) -> None:
    store = _store(s3_server, bucket)
    store.put_if_absent(naming.lease_key("arch"), b"not json")
    with pytest.raises(CorruptArchive, match="unreadable writer lease.*delete this object"):
        Lease(store, "arch", "w").acquire()


@pytest.mark.parametrize("archive_key", [None, KEY], ids=["plain", "encrypted"])
def test_snapshot_manifest_and_copy(
    s3_server: S3Server, bucket: str, tmp_path: Path, archive_key: ArchiveKey | None
) -> None:
    store = _store(s3_server, bucket)
    snap = tmp_path / "data.mdb"
    snap.write_bytes(os.urandom(100_000))
    fingerprint = os.urandom(32)
    made = publish_snapshot(
        store,
        "arch",
        snap,
        namespace="users",
        history_id=HISTORY,
        lsn=77,
        fingerprint=fingerprint,
        writer_id="w",
        archive_key=archive_key,
        created_at=5.0,
    )
    assert read_manifest(store, "arch", "users", HISTORY, 77, archive_key) == made
    assert made.fingerprint == fingerprint.hex() and made.snapshot_plain_size == 100_000
    names = sorted(
        naming.parse_key("arch", o.key).kind.value  # type: ignore[union-attr]
        for o in store.list(naming.namespace_prefix("arch", "users"))
    )
    assert names == ["manifest", "manifest.copy", "snapshot"]
    enc = archive_key is not None
    # The first manifest lost: the copy still proves the snapshot complete.
    store.delete(naming.snapshot_key("arch", "users", HISTORY, 77, enc, NameKind.MANIFEST))
    assert read_manifest(store, "arch", "users", HISTORY, 77, archive_key) == made
    # Re-publishing the same snapshot (a retry) is idempotent and rewrites the missing manifest.
    # (a later created_at, as after a restart, keeps the manifest that is there)
    assert (
        publish_snapshot(
            store,
            "arch",
            snap,
            namespace="users",
            history_id=HISTORY,
            lsn=77,
            fingerprint=fingerprint,
            writer_id="w",
            archive_key=archive_key,
            created_at=99.0,
        )
        == made
    )
    store.delete(naming.snapshot_key("arch", "users", HISTORY, 77, enc, NameKind.MANIFEST_COPY))
    assert (
        publish_snapshot(
            store,
            "arch",
            snap,
            namespace="users",
            history_id=HISTORY,
            lsn=77,
            fingerprint=fingerprint,
            writer_id="w",
            archive_key=archive_key,
            created_at=123.0,
        )
        == made
    )
    for kind in (NameKind.MANIFEST, NameKind.MANIFEST_COPY):
        store.delete(naming.snapshot_key("arch", "users", HISTORY, 77, enc, kind))
    with pytest.raises(CorruptArchive, match="no usable manifest.*unfinished upload is not a backup"):
        read_manifest(store, "arch", "users", HISTORY, 77, archive_key)


@pytest.mark.parametrize("archive_key", [None, KEY], ids=["plain", "encrypted"])
def test_second_snapshot_of_the_same_state_is_the_first(
    s3_server: S3Server, bucket: str, tmp_path: Path, archive_key: ArchiveKey | None
) -> None:
    """Two snapshots at one LSN of an idle namespace differ in bytes (the checkpoint's time), not
    in state: the second publish confirms the first (its manifest names the first's SHA-256);
    a different state under the same name is still a conflict."""
    store = _store(s3_server, bucket)
    fingerprint = os.urandom(32)
    first_file, second_file = tmp_path / "a.mdb", tmp_path / "b.mdb"
    first_file.write_bytes(os.urandom(50_000))
    second_file.write_bytes(os.urandom(50_000))

    def publish(path: Path, fp: bytes) -> object:
        return publish_snapshot(
            store,
            "arch",
            path,
            namespace="users",
            history_id=HISTORY,
            lsn=0,
            fingerprint=fp,
            writer_id="w",
            archive_key=archive_key,
        )

    first = publish(first_file, fingerprint)
    assert publish(second_file, fingerprint) == first
    with pytest.raises(ArchiveConflict, match="already exists with different content"):
        publish(second_file, os.urandom(32))
    assert read_manifest(store, "arch", "users", HISTORY, 0, archive_key) == first
