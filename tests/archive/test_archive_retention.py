"""Archive retention: the policy (pure), pruning a real SeaweedFS bucket, a crash at every point of a
prune, and a real server whose retention runs before a restore to the oldest promised point.

The in-process archive holds real archive objects whose contents are random bytes (retention never
reads a segment or a snapshot, only names and manifests). The crash is injected through the
``on_delete`` seam (an exception after the k-th delete), standing in for a SIGKILL at that point.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from s3server import S3Server
from serverproc import ServerProcess
from test_archive_server import (
    NS,
    archive_args,
    archive_health,
    get_all,
    object_names,
    publish_snapshot_now,
    put,
    restore_from,
    s3_env,  # noqa: F401  (a fixture)
    wait_for,
)

from unisondb.archive import naming
from unisondb.archive.manifest import publish_snapshot, read_manifest
from unisondb.archive.naming import ArchiveName, NameKind
from unisondb.archive.objectfmt import ArchiveKey, Identity, Kind
from unisondb.archive.publish import publish_file
from unisondb.archive.retention import Retention, RetentionPolicy, SnapshotEntry, plan, read_record
from unisondb.archive.store import ObjectStore
from unisondb.errors import CorruptArchive, LeaseHeld

H = bytes.fromhex("aa" * 16)
PREFIX = "arch"
SEGMENTS = [(i * 100 + 1, i * 100 + 100) for i in range(10)]  # LSNs 1..1000
SNAPSHOTS = [(0, 1000.0), (250, 2000.0), (500, 3000.0), (750, 4000.0), (950, 5000.0)]  # (LSN, created)


# -- the policy, pure ---------------------------------------------------------------------------


def _entries() -> tuple[list[SnapshotEntry], list[tuple[str, ArchiveName]]]:
    from unisondb.archive.manifest import SnapshotManifest

    snaps = []
    for lsn, created in SNAPSHOTS:
        e = SnapshotEntry(H, lsn)
        for kind in (NameKind.SNAPSHOT, NameKind.MANIFEST, NameKind.MANIFEST_COPY):
            e.keys[kind] = f"s{lsn}.{kind.value}"
        e.manifest = SnapshotManifest(NS, H.hex(), lsn, "k", "0", 1, 1, "0", created, "w")
        snaps.append(e)
    segs = [
        (f"w{first}", ArchiveName(NameKind.SEGMENT, NS, H, first, last, i + 1, False))
        for i, (first, last) in enumerate(SEGMENTS)
    ]
    return snaps, segs


def _kept(policy: RetentionPolicy, now: float = 5600.0) -> tuple[list[int], int | None, list[str]]:
    snaps, segs = _entries()
    p = plan(policy, snaps, segs, now)
    return sorted(e.lsn for e in p.kept), p.window_lsn, p.segments


def test_policy_off_keeps_everything() -> None:
    assert _kept(RetentionPolicy()) == ([0, 250, 500, 750, 950], None, [])


def test_count_keeps_the_newest_and_the_segments_after_the_oldest_kept() -> None:
    kept, window, segments = _kept(RetentionPolicy(keep_snapshots=2))
    assert kept == [750, 950] and window == 750
    assert segments == [f"w{first}" for first, last in SEGMENTS if last <= 750]  # lowest first
    assert "w701" not in segments  # 701..800 holds 751..800, which the snapshot at 750 needs


def test_age_keeps_the_window_and_the_snapshot_its_start_replays_from() -> None:
    # now 5600, age 1500: the window starts at 4100; the snapshot of 4000 (LSN 750) is its base.
    assert _kept(RetentionPolicy(keep_age=1500))[:2] == ([750, 950], 750)
    assert _kept(RetentionPolicy(keep_age=2500))[:2] == ([500, 750, 950], 500)
    # Everything older than the age: the newest is still kept (never an empty archive).
    assert _kept(RetentionPolicy(keep_age=10), now=1e9)[:2] == ([950], 950)


def test_a_snapshot_goes_only_when_both_rules_let_it() -> None:
    assert _kept(RetentionPolicy(keep_snapshots=3, keep_age=100))[0] == [500, 750, 950]
    assert _kept(RetentionPolicy(keep_snapshots=1, keep_age=2500))[0] == [500, 750, 950]


def test_unfinished_snapshots_go_only_below_the_window_and_nothing_without_a_complete_one() -> None:
    snaps, segs = _entries()
    low, high = SnapshotEntry(H, 100), SnapshotEntry(H, 960)  # snapshot objects without manifests
    low.keys[NameKind.SNAPSHOT] = "low"
    high.keys[NameKind.SNAPSHOT] = "high"
    p = plan(RetentionPolicy(keep_snapshots=2), [*snaps, low, high], segs, 5600.0)
    assert [e.lsn for e in p.orphans] == [100]
    assert [e.lsn for e in p.pruned] == [0, 250, 500]  # oldest first
    assert p.pruned[0].delete_order()[0][1] == "manifest"  # the manifest goes before its snapshot
    nothing = plan(RetentionPolicy(keep_snapshots=1), [low, high], segs, 5600.0)
    assert nothing.window_lsn is None and nothing.segments == [] and nothing.orphans == []


# -- against a real bucket ------------------------------------------------------------------------


def _build(store: ObjectStore, tmp: Path) -> None:
    blob = tmp / "blob"
    blob.write_bytes(os.urandom(2000))
    for i, (first, last) in enumerate(SEGMENTS):
        key = naming.segment_key(PREFIX, NS, H, first, last, i + 1, False)
        publish_file(store, key, blob, Identity(Kind.SEGMENT, NS, H, first, last))
    for lsn, created in SNAPSHOTS:
        publish_snapshot(
            store,
            PREFIX,
            blob,
            namespace=NS,
            history_id=H,
            lsn=lsn,
            fingerprint=None,
            writer_id="w",
            created_at=created,
        )


def _names(store: ObjectStore) -> list[ArchiveName]:
    out = [naming.parse_key(PREFIX, o.key) for o in store.list(f"{PREFIX}/{NS}/")]
    return [n for n in out if n is not None]


def assert_consistent(store: ObjectStore) -> list[int]:
    """Every snapshot a manifest offers exists, and the WAL after it is there without a hole."""
    names = _names(store)
    present = {(n.kind, n.first_lsn) for n in names}
    segments = sorted((n.first_lsn, n.last_lsn) for n in names if n.kind is NameKind.SEGMENT)
    offered = []
    for n in names:
        if n.kind is not NameKind.SNAPSHOT:
            continue
        try:
            read_manifest(store, PREFIX, NS, H, n.first_lsn, None)
        except CorruptArchive:
            continue  # an unfinished snapshot: never offered as a backup
        offered.append(n.first_lsn)
        covered = n.first_lsn
        for first, last in segments:
            if last > covered and first <= covered + 1:
                covered = last
        assert covered == 1000, f"snapshot at {n.first_lsn} has a hole after LSN {covered}: {segments}"
    for kind, lsn in present:  # no manifest without its snapshot object
        if kind in (NameKind.MANIFEST, NameKind.MANIFEST_COPY):
            assert (NameKind.SNAPSHOT, lsn) in present
    return sorted(offered)


def _retention(store: ObjectStore, policy: RetentionPolicy, on_delete: Any = None, **kw: Any) -> Retention:
    return Retention(
        store,
        PREFIX,
        NS,
        policy,
        archive_key=None,
        writer_id="w",
        lease_held=lambda: True,
        on_delete=on_delete,
        **kw,
    )


def test_prune_a_real_bucket(s3_server: S3Server, bucket: str, tmp_path: Path) -> None:
    store = ObjectStore(bucket, client=s3_server.client())
    _build(store, tmp_path)
    deleted: list[str] = []
    result = _retention(store, RetentionPolicy(keep_snapshots=2), deleted.append).prune(5600.0)
    assert result.window_lsn == 750 and result.window_time == 4000.0
    assert result.deleted_snapshots == 3 and result.deleted_segments == 7
    assert deleted.count("segment") == 7 and deleted.count("snapshot") == 3 and deleted.count("manifest") == 6
    assert assert_consistent(store) == [750, 950]
    assert sorted(n.first_lsn for n in _names(store) if n.kind is NameKind.SEGMENT) == [701, 801, 901]
    record = read_record(store, PREFIX, NS)
    assert record is not None and record["oldest_lsn"] == 750 and record["oldest_time"] == 4000.0
    # Idempotent: a second run deletes nothing.
    assert _retention(store, RetentionPolicy(keep_snapshots=2)).prune(5600.0).deleted_objects == 0


def test_prune_a_real_bucket_by_age(s3_server: S3Server, bucket: str, tmp_path: Path) -> None:
    store = ObjectStore(bucket, client=s3_server.client())
    _build(store, tmp_path)
    retention = _retention(store, RetentionPolicy(keep_age=2500))
    assert retention.prune(5600.0).window_lsn == 500  # the window starts at 3100: base is 3000's
    assert assert_consistent(store) == [500, 750, 950]
    assert retention.prune(6600.0).window_lsn == 750  # an hour later the window moved on
    assert assert_consistent(store) == [750, 950]


def test_snapshots_of_another_key_keep_their_place_in_the_window(
    s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    """After a key rotation the old snapshots cannot be read, but they are not damaged: retention
    neither fails on them nor deletes them as unfinished; they age out by their LastModified."""
    store = ObjectStore(bucket, client=s3_server.client())
    old, new = ArchiveKey.from_bytes(os.urandom(32)), ArchiveKey.from_bytes(os.urandom(32))
    blob = tmp_path / "blob"
    blob.write_bytes(os.urandom(2000))
    for i, (first, last) in enumerate(SEGMENTS):
        k = old if first < 500 else new
        key = naming.segment_key(PREFIX, NS, H, first, last, i + 1, True)
        publish_file(store, key, blob, Identity(Kind.SEGMENT, NS, H, first, last), archive_key=k)
    stored = time.time()
    for lsn in (0, 250, 500, 750, 950):
        k = old if lsn < 500 else new
        publish_snapshot(
            store, PREFIX, blob, namespace=NS, history_id=H, lsn=lsn, fingerprint=None, writer_id="w",
            archive_key=k, created_at=stored + 3600 + lsn,  # the new key's: after the rotation
        )  # fmt: skip
    retention = Retention(
        store,
        PREFIX,
        NS,
        RetentionPolicy(keep_snapshots=4),
        archive_key=new,
        writer_id="w",
        lease_held=lambda: True,
    )
    result = retention.prune(stored + 7200)
    assert result.window_lsn == 250 and result.deleted_snapshots == 1 and result.deleted_segments == 2
    left = _names(store)
    assert sorted({n.first_lsn for n in left if n.kind is NameKind.SNAPSHOT}) == [250, 500, 750, 950]
    assert read_manifest(store, PREFIX, NS, H, 250, old).lsn == 250  # still a backup, with its key
    assert min(n.first_lsn for n in left if n.kind is NameKind.SEGMENT) == 201


def test_a_lost_lease_or_a_stop_ends_a_prune_between_deletes(
    s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    store = ObjectStore(bucket, client=s3_server.client())
    _build(store, tmp_path)
    deletes = [0]

    def count(kind: str) -> None:
        deletes[0] += 1

    held = lambda: deletes[0] < 4  # noqa: E731  (another server takes the prefix after 4 deletes)
    with pytest.raises(LeaseHeld, match="no longer holds the lease"):
        Retention(
            store, PREFIX, NS, RetentionPolicy(keep_snapshots=2), archive_key=None, writer_id="w",
            lease_held=held, on_delete=count,
        ).prune(5600.0)  # fmt: skip
    assert deletes[0] == 4 and {750, 950} <= set(assert_consistent(store))
    stopped = _retention(store, RetentionPolicy(keep_snapshots=2), count, stopping=lambda: deletes[0] >= 6)
    result = stopped.prune(5600.0)  # stops after the snapshot it is on; no segment deleted
    assert result.deleted_segments == 0 and {750, 950} <= set(assert_consistent(store))
    assert len([n for n in _names(store) if n.kind is NameKind.SEGMENT]) == 10


@pytest.mark.parametrize("crash_after", [0, 1, 2, 5, 9, 10, 13])
def test_a_crash_anywhere_in_a_prune_leaves_only_extra_objects(
    s3_server: S3Server, bucket: str, tmp_path: Path, crash_after: int
) -> None:
    store = ObjectStore(bucket, client=s3_server.client())
    _build(store, tmp_path)
    done = [0]

    class Killed(Exception):
        pass

    def die(kind: str) -> None:
        done[0] += 1
        if done[0] > crash_after:
            raise Killed

    with pytest.raises(Killed):
        _retention(store, RetentionPolicy(keep_snapshots=2), die, batch=3).prune(5600.0)
    # The record of the new window is written before the first delete.
    assert (read_record(store, PREFIX, NS) or {}).get("oldest_lsn") == 750
    offered = assert_consistent(store)
    assert {750, 950} <= set(offered)
    # The next run finishes the job.
    _retention(store, RetentionPolicy(keep_snapshots=2)).prune(5600.0)
    assert assert_consistent(store) == [750, 950]


# -- a real server --------------------------------------------------------------------------------


def test_server_retention_then_restore_to_the_oldest_promised_point(
    s3_env: S3Server,  # noqa: F811
    bucket: str,
    tmp_path: Path,
    server_factory: Any,
) -> None:
    data = tmp_path / "data"
    args = archive_args(
        s3_env,
        bucket,
        None,
        "--archive-snapshot-interval",
        "0",
        "--archive-retention-snapshots",
        "2",
        "--archive-retention-interval",
        "1s",
    )
    srv: ServerProcess = server_factory(data, NS, extra_args=args)
    model: dict[str, bytes] = {}
    models: dict[int, dict[str, bytes]] = {}
    snapshot_lsns = []
    for round_ in range(3):
        for i in range(15):
            k = f"k{i:02d}"
            model[k] = f"r{round_}-{i}".encode()
            models[put(srv, k, model[k])] = dict(model)
        acked = max(models)
        wait_for(
            srv, lambda s, a=acked: s["archivedLsn"] >= a and s["lagLsns"] == 0, "the archive to catch up"
        )
        publish_snapshot_now(srv)
        snapshot_lsns.append(archive_health(srv)["lastSnapshotLsn"])
    for i in range(5):  # after the last snapshot too
        model[f"tail{i}"] = b"tail"
        models[put(srv, f"tail{i}", b"tail")] = dict(model)
    acked = max(models)
    state = wait_for(
        srv,
        lambda s: (
            s["archivedLsn"] >= acked
            and (s.get("retention") or {}).get("windowLsn") == snapshot_lsns[1]
            and s["retention"]["lastRun"] is not None
        ),
        "retention to prune to the two newest snapshots",
    )
    assert state["retention"]["error"] is None
    window = snapshot_lsns[1]
    names = object_names(s3_env, bucket)
    assert sorted(n.first_lsn for n in names if n.kind is NameKind.SNAPSHOT) == snapshot_lsns[1:]
    segments = [n for n in names if n.kind is NameKind.SEGMENT]
    assert segments and all(n.last_lsn > window for n in segments)
    with srv.client() as c:
        metrics = c.get("/metrics").text
    deleted = re.search(
        r'unisondb_archive_retention_deletions_total\{kind="snapshot",namespace="users"\} (\S+)', metrics
    )
    assert deleted and float(deleted.group(1)) == 1.0, metrics
    srv.kill9()
    shutil.rmtree(data)

    # The oldest point the policy promises: the oldest kept snapshot's LSN.
    oldest = tmp_path / "oldest"
    res = restore_from(s3_env, bucket, oldest, "--target-lsn", str(window))
    assert res.returncode == 0, res.stdout + res.stderr
    srv2: ServerProcess = server_factory(oldest, NS)
    keys = sorted(models[acked])
    assert get_all(srv2, keys) == models[window]
    srv2.stop()
    # A point inside the window, replayed from it.
    middle = tmp_path / "middle"
    target = window + 7
    res = restore_from(s3_env, bucket, middle, "--target-lsn", str(target))
    assert res.returncode == 0, res.stdout + res.stderr
    srv3: ServerProcess = server_factory(middle, NS)
    assert get_all(srv3, keys) == models[target]
    srv3.stop()
    # Before the window: refused with one clear error, nothing created.
    before = tmp_path / "before"
    res = restore_from(s3_env, bucket, before, "--target-lsn", str(window - 1))
    assert res.returncode != 0
    assert "no complete snapshot" in res.stderr and "at or before the target" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    assert not (before / NS).exists()


def test_bad_retention_and_rate_limit_flags_are_one_line_errors(tmp_path: Path) -> None:
    url = ["--archive-url", "s3://bkt/p"]
    cases = [
        ([*url, "--archive-retention-snapshots", "many"], "expected a count"),
        ([*url, "--archive-retention-snapshots", "-1"], "expected a count"),
        ([*url, "--archive-retention-age", "a week"], "invalid duration"),
        ([*url, "--archive-retention-interval", "0"], "at least 1s"),
        ([*url, "--archive-rate-limit", "fast"], "invalid archive rate limit"),
        ([*url, "--archive-rate-limit", "1KiB/s"], "at least 64KiB/s"),
        (["--archive-retention-snapshots", "3"], "need --archive-url"),
        (["--archive-rate-limit", "1MiB/s"], "need --archive-url"),
    ]
    for args, message in cases:
        res = subprocess.run(
            [sys.executable, "-m", "unisondb", "--data-dir", str(tmp_path / "d"), *args],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y"},
        )
        assert res.returncode != 0
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (args, res.stderr)
