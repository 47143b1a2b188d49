"""The archive wired into a real server process, against a real SeaweedFS (issue 9).

* the headline: a namespace started with ``--archive-url`` survives the loss of its whole data
  directory — writes, archive, SIGKILL, ``rm -rf`` data, ``unisondb restore --from s3://…`` — with
  every write the archive had confirmed (older than the archive interval) restored, to the latest
  point and to an earlier LSN, plain and encrypted;
* S3 stopped under write load: writes go on, no local segment is deleted before the archive has it
  (``--wal-retention 0s``), and after S3 returns the archive catches up in order with no hole;
* ``POST /api/v1/{ns}/archive/snapshot``, ``/health`` archive state, the lag metrics.

Waiting is polling a condition the server reports (``/health``) with a deadline, not sleeping.
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from s3server import S3Server
from serverproc import ServerProcess

from unisondb.archive import naming
from unisondb.archive.naming import NameKind
from unisondb.archive.objectfmt import generate_key_file
from unisondb.archive.store import ObjectStore

NS = "users"
INTERVAL = "0.2s"


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """The server and the CLI read credentials the standard way: AWS_* in their environment."""
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    return s3_server


def archive_args(s3: S3Server, bucket: str, key_file: Path | None = None, *extra: str) -> list[str]:
    args = [
        "--archive-url",
        f"s3://{bucket}/arch",
        "--archive-endpoint",
        s3.endpoint,
        "--archive-path-style",
        "--archive-interval",
        INTERVAL,
    ]
    if key_file is not None:
        args += ["--archive-key-file", str(key_file)]
    return args + list(extra)


def put(srv: ServerProcess, key: str, value: bytes) -> int:
    with srv.client() as c:
        r = c.put(f"/api/v1/{NS}/kv/{key}", json={"value": base64.b64encode(value).decode()})
        assert r.status_code == 200, r.text
        # One writer in the test: the namespace's last LSN is this write's.
        return int(c.get(f"/api/v1/{NS}/stats").json()["lastLsn"])


def get_all(srv: ServerProcess, keys: list[str]) -> dict[str, bytes]:
    out = {}
    with srv.client() as c:
        for k in keys:
            body = c.get(f"/api/v1/{NS}/kv/{k}").json()
            if body["found"]:
                out[k] = base64.b64decode(body["value"])
    return out


def archive_health(srv: ServerProcess) -> dict[str, Any]:
    with srv.client() as c:
        body = c.get("/health").json()
    return dict(body["archive"]["namespaces"][NS])


def wait_for(
    srv: ServerProcess, cond: Callable[[dict[str, Any]], bool], what: str, timeout: float = 30.0
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    state = archive_health(srv)
    while not cond(state):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}: {state}\n{srv.log()[-3000:]}")
        time.sleep(0.05)
        state = archive_health(srv)
    return state


def restore_from(s3: S3Server, bucket: str, data_dir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "unisondb",
            "restore",
            "--from",
            f"s3://{bucket}/arch",
            "--archive-endpoint",
            s3.endpoint,
            "--archive-path-style",
            "--namespace",
            NS,
            "--data-dir",
            str(data_dir),
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


def publish_snapshot_now(srv: ServerProcess, timeout: float = 30.0) -> None:
    """POST …/archive/snapshot, retrying while the archiver is still taking its lease (503)."""
    deadline = time.monotonic() + timeout
    with srv.client() as c:
        while True:
            r = c.post(f"/api/v1/{NS}/archive/snapshot")
            if r.status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    assert r.status_code == 200, r.text


def object_names(s3: S3Server, bucket: str) -> list[naming.ArchiveName]:
    store = ObjectStore(bucket, client=s3.client())
    names = [naming.parse_key("arch", o.key) for o in store.list("arch/")]
    return [n for n in names if n is not None]


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
def test_namespace_survives_loss_of_its_data_directory(
    s3_env: S3Server, bucket: str, tmp_path: Path, server_factory: Any, encrypted: bool
) -> None:
    key_file = None
    if encrypted:
        key_file = tmp_path / "archive.key"
        generate_key_file(key_file)
    data = tmp_path / "data"
    srv: ServerProcess = server_factory(data, NS, extra_args=archive_args(s3_env, bucket, key_file))
    # The start-up snapshot is asynchronous and may land after some of the writes below;
    # an explicit one now makes sure a snapshot at or before the earlier target exists.
    publish_snapshot_now(srv)
    keys = [f"k{i:03d}" for i in range(60)]
    model: dict[str, bytes] = {}
    models: dict[int, dict[str, bytes]] = {}
    for i, k in enumerate(keys[:40]):
        model[k] = f"first-{i}".encode() * 5
        models[put(srv, k, model[k])] = dict(model)
    early_lsn = max(models) - 25
    for k in keys[:20]:  # overwrite half: an earlier target must see the old values
        model[k] = b"second-" + k.encode()
        models[put(srv, k, model[k])] = dict(model)
    acked = max(models)
    # The archive confirms every write within about the interval; no rotate call, no stop.
    state = wait_for(
        srv,
        lambda s: s["archivedLsn"] >= acked and s["lagLsns"] == 0 and s["lastSnapshotLsn"] is not None,
        "the archive to catch up",
    )
    assert state["state"] == "ok" and state["lagSeconds"] == 0
    # Writes after that, not waited for: lost with the machine or not, never half-restored.
    late = {f"late{i}": b"late" for i in range(3)}
    for k, v in late.items():
        put(srv, k, v)
    srv.kill9()  # the machine is gone ...
    shutil.rmtree(data)  # ... and its disk with it
    assert not data.exists()

    extra = ["--archive-key-file", str(key_file)] if key_file else []
    res = restore_from(s3_env, bucket, data, *extra)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "fetched from s3://" in res.stderr
    srv2: ServerProcess = server_factory(data, NS)  # archiving off: a restored copy
    restored = get_all(srv2, keys + list(late))
    late_seen = {k for k in late if k in restored}
    assert {k: v for k, v in restored.items() if k not in late} == model
    assert all(restored[k] == late[k] for k in late_seen)
    srv2.stop()

    # An earlier point, from the same archive, into a fresh directory.
    earlier = tmp_path / "earlier"
    res = restore_from(s3_env, bucket, earlier, "--target-lsn", str(early_lsn), *extra)
    assert res.returncode == 0, res.stdout + res.stderr
    srv3: ServerProcess = server_factory(earlier, NS)
    assert get_all(srv3, keys) == models[early_lsn]
    srv3.stop()

    if encrypted:  # without the key: a clear one-line error, nothing created
        nokey = tmp_path / "nokey"
        res = restore_from(s3_env, bucket, nokey)
        assert res.returncode != 0
        assert "is encrypted" in res.stderr and "--archive-key-file" in res.stderr, res.stderr
        assert not (nokey / NS).exists()


def test_s3_down_under_write_load_then_catch_up_in_order(
    s3_env: S3Server, bucket: str, tmp_path: Path, server_factory: Any
) -> None:
    data = tmp_path / "data"
    srv: ServerProcess = server_factory(
        data,
        NS,
        extra_args=archive_args(s3_env, bucket, None, "--wal-segment-size", "4KiB", "--wal-retention", "0s"),
    )
    wal = data / NS / "wal"
    for i in range(20):
        put(srv, f"a{i}", b"x" * 300)
    wait_for(srv, lambda s: s["lagLsns"] == 0, "the first segments to be archived")
    s3_env.stop()
    try:
        seen: set[str] = set()
        last = 0
        for i in range(200):  # ~20 segments of 4 KiB, all sealed while S3 is down
            last = put(srv, f"b{i}", b"y" * 300)
            if i % 20 == 0:
                seen |= {p.name for p in wal.glob("*.wal")}
        state = wait_for(srv, lambda s: s["state"] == "retrying", "the archiver to notice")
        assert state["lagLsns"] > 0 and state["lastError"]
        # Retention (0 s!) ran during the outage, yet every segment sealed meanwhile is still here.
        now = {p.name for p in wal.glob("*.wal")}
        assert seen <= now, f"deleted while the archive was down: {sorted(seen - now)}"
        assert len(now) > 15
        with srv.client() as c:
            metrics = c.get("/metrics").text
        assert f'unisondb_archive_up{{namespace="{NS}"}} 0.0' in metrics
        assert f'unisondb_archive_lag_lsns{{namespace="{NS}"}}' in metrics
    finally:
        s3_env.restart()
    state = wait_for(
        srv,
        lambda s: s["state"] == "ok" and s["archivedLsn"] >= last and s["lagLsns"] == 0,
        "catch-up",
        timeout=90,
    )
    # No hole: the archived segments cover 1..last contiguously, each once.
    segs = sorted(
        (n.first_lsn, n.last_lsn, n.segment_id)
        for n in object_names(s3_env, bucket)
        if n.kind is NameKind.SEGMENT
    )
    assert segs[0][0] == 1 and segs[-1][1] >= last
    for (_, prev_last, _), (first, _, _) in zip(segs, segs[1:], strict=False):
        assert first == prev_last + 1, segs
    ids = [s[2] for s in segs]
    assert len(ids) == len(set(ids))
    # Every segment kept through the outage is in the archive now.
    assert {int(n[:9]) for n in seen} - {max(int(n[:9]) for n in now)} <= set(ids)
    # And now that the archive has them, retention frees the disk.
    deadline = time.monotonic() + 30
    while len(list(wal.glob("*.wal"))) > 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(list(wal.glob("*.wal"))) <= 3, sorted(p.name for p in wal.glob("*.wal"))


def test_snapshot_on_demand_and_archiving_off(
    s3_env: S3Server, bucket: str, tmp_path: Path, server_factory: Any
) -> None:
    srv: ServerProcess = server_factory(
        tmp_path / "data",
        NS,
        extra_args=archive_args(s3_env, bucket, None, "--archive-snapshot-interval", "0"),
    )
    lsn = put(srv, "k", b"v")
    wait_for(srv, lambda s: s["state"] == "ok", "the lease")
    assert archive_health(srv)["lastSnapshotLsn"] is None  # interval 0: none scheduled
    with srv.client() as c:
        r = c.post(f"/api/v1/{NS}/archive/snapshot")
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["lsn"] == lsn and body["key"].endswith(".snapshot.zst")
        metrics = c.get("/metrics").text
    assert f'unisondb_archive_uploads_total{{kind="snapshot",namespace="{NS}"}} 1.0' in metrics
    kinds = {n.kind for n in object_names(s3_env, bucket) if n.first_lsn == lsn}
    assert {NameKind.SNAPSHOT, NameKind.MANIFEST, NameKind.MANIFEST_COPY} <= kinds
    assert archive_health(srv)["lastSnapshotLsn"] == lsn
    writer = (tmp_path / "data" / "archive-writer-id").read_text().strip()
    assert len(writer) == 32

    plain: ServerProcess = server_factory(tmp_path / "plain", NS)
    with plain.client() as c:
        r = c.post(f"/api/v1/{NS}/archive/snapshot")
        assert r.status_code == 409 and "--archive-url" in r.json()["error"]
        assert "archive" not in c.get("/health").json()


def test_bad_archive_flags_are_one_line_errors(tmp_path: Path) -> None:
    cases = [
        (["--archive-url", "http://x"], "invalid archive URL"),
        (["--archive-endpoint", "http://127.0.0.1:1"], "need --archive-url"),
        (["--archive-url", "s3://bkt/p", "--archive-interval", "0"], "at least 50ms"),
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
        assert len(lines) == 1 and message in lines[0], res.stderr
