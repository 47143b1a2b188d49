"""Archive faults through real server processes and a real SeaweedFS (issue 9).

* SIGKILL of the server in the middle of a segment upload, then a restart: the archive stays
  consistent (every object decodes, each segment once, LSNs contiguous), nothing conflicts, and
  archiving resumes to the last acknowledged write;
* two servers on one prefix: the second is refused with a clear error that ``/health`` shows,
  the first keeps archiving, the archive stays one history;
* the lease gap: a server restored from the archive and started within the lease TTL of the dead
  old one is refused at first, retries when the old lease expires, then archives its new history
  (time driven through the lease's clock seam, no sleeps).

To catch an upload *in flight*, the server reaches SeaweedFS through ``SlowLink``, a loopback TCP
relay that can throttle the upload direction, reports when a segment PUT has sent part of its
body, and can reset its connections (what the network sees when a machine dies). It stands for a
slow network, a fault no real part here can produce on demand; the bytes it relays are untouched.
"""

from __future__ import annotations

import json
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from s3server import S3Server
from serverproc import ServerProcess
from test_archive_archiver import LocalWal, _archiver
from test_archive_server import NS, archive_args, archive_health, publish_snapshot_now, put, wait_for

from unisondb.archive import naming
from unisondb.archive.archiver import SegmentInfo
from unisondb.archive.naming import NameKind
from unisondb.archive.store import ObjectStore

_REQUEST = re.compile(rb"(?:GET|PUT|HEAD|POST|DELETE) /[^ ]* HTTP/1\.1")
_SEGMENT_PUT = re.compile(rb"PUT /[^/ ]+/(?P<key>[^ ?]*/wal/[^ ?]*\.wal\.zst)[^ ]* HTTP/1\.1")


class SlowLink:
    """A loopback TCP relay to ``upstream``; ``rate`` (bytes/s) throttles client-to-server bytes;
    ``segment_put`` is set once a segment PUT has sent ``after`` bytes through it."""

    def __init__(self, upstream: str, after: int = 32 << 10) -> None:
        host, port = upstream.removeprefix("http://").split(":")
        self.upstream = (host, int(port))
        self.after = after
        self.rate: float | None = None
        self.segment_put = threading.Event()
        self.in_flight: str | None = None  # the key of that PUT
        self.armed = False  # only PUTs that start after arm() count
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._open: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.upstream)
            self._open += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, upload: bool) -> None:
        # Per connection (keep-alive carries many requests): the segment PUT being sent, if the
        # latest request line is one, and how many bytes followed that line.
        tail, current, counted = b"", None, 0
        try:
            while data := src.recv(16 << 10):
                if upload:
                    window = tail + data
                    fresh = [m for m in _REQUEST.finditer(window) if m.end() > len(tail)]
                    if fresh:
                        m = fresh[-1]
                        seg = _SEGMENT_PUT.fullmatch(m[0])
                        current = seg["key"].decode() if seg and self.armed else None
                        counted = len(window) - m.end()
                    elif current is not None:
                        counted += len(data)
                    tail = window[-512:]
                    if current is not None and counted >= self.after and not self.segment_put.is_set():
                        self.in_flight = current
                        self.segment_put.set()
                    if self.rate:
                        time.sleep(len(data) / self.rate)  # the link's bandwidth, not a test wait
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def arm(self) -> None:
        """Watch for the next segment PUT that starts from now on."""
        self.segment_put.clear()
        self.in_flight = None
        self.armed = True

    def cut(self) -> None:
        """Reset every open connection, dropping what the relay holds: the network's view of a
        dying machine. (After a bare SIGKILL the kernel still sends what the process had
        written to its socket, and a small upload can complete after its writer died.)"""
        opened, self._open = self._open, []
        for s in opened:
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
            s.close()

    def close(self) -> None:
        self._listener.close()
        self.cut()


class RestoredWal(LocalWal):
    """The restored copy's WAL: a new history (restore forks one), LSNs after the old ones."""

    HISTORY = bytes.fromhex("fedcba9876543210fedcba9876543210")

    def describe(self, segment_id: int, path: Path) -> SegmentInfo:  # type: ignore[override]
        info = LocalWal.describe(segment_id, path)
        return SegmentInfo(info.first_lsn + 1000, info.last_lsn + 1000, self.HISTORY, bytes(32))


def objects(s3: S3Server, bucket: str) -> list[tuple[str, naming.ArchiveName]]:
    store = ObjectStore(bucket, client=s3.client())
    out = []
    for info in store.list("arch/"):
        parsed = naming.parse_key("arch", info.key)
        if parsed is not None:
            out.append((info.key, parsed))
    return out


def assert_one_contiguous_history(s3: S3Server, bucket: str, last: int) -> bytes:
    names = [n for _, n in objects(s3, bucket)]
    histories = {n.history_id for n in names}
    assert len(histories) == 1, f"more than one history in the archive: {histories}"
    segs = sorted((n.first_lsn, n.last_lsn, n.segment_id) for n in names if n.kind is NameKind.SEGMENT)
    ids = [s[2] for s in segs]
    assert len(ids) == len(set(ids)), f"a segment archived twice: {segs}"
    assert segs[0][0] == 1 and segs[-1][1] >= last, segs
    for (_, prev_last, _), (first, _, _) in zip(segs, segs[1:], strict=False):
        assert first == prev_last + 1, f"hole or overlap: {segs}"
    return histories.pop()


def verify_from(s3: S3Server, bucket: str) -> dict[str, Any]:
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "unisondb",
            "backup",
            "verify",
            "--from",
            f"s3://{bucket}/arch",
            "--archive-endpoint",
            s3.endpoint,
            "--archive-path-style",
            "--namespace",
            NS,
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, **s3.env()},
    )
    assert res.returncode == 0, res.stdout + res.stderr
    out: dict[str, Any] = json.loads(res.stdout)
    return out


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    return s3_server


def test_sigkill_mid_upload_then_restart_resumes_without_duplicates(
    s3_env: S3Server, bucket: str, tmp_path: Path, server_factory: Any
) -> None:
    link = SlowLink(s3_env.endpoint)
    try:
        args = archive_args(s3_env, bucket, None, "--wal-segment-size", "1MiB")
        args[args.index(s3_env.endpoint)] = link.endpoint
        data = tmp_path / "data"
        srv: ServerProcess = server_factory(data, NS, extra_args=args)
        second_snapshot(srv, "s")
        wait_for(srv, lambda s: s["state"] == "ok" and s["lagLsns"] == 0, "the start-up uploads")
        link.rate = 256 << 10  # a 1 MiB segment now takes about 4 s to upload
        last = 0
        for i in range(40):  # ~3.8 MiB of incompressible values: three or four sealed segments
            last = put(srv, f"k{i}", os.urandom(96 << 10))
        link.arm()  # the backlog takes seconds to upload: the next segment PUT is mid-way
        assert link.segment_put.wait(60), "no segment upload started"
        srv.kill9()  # ... with a segment PUT half-way through its body
        link.cut()
        link.rate = None
        mid = objects(s3_env, bucket)
        # The PUT cut off by the kill left nothing behind: S3 stores whole objects only.
        assert link.in_flight is not None and link.in_flight not in {k for k, _ in mid}

        srv2: ServerProcess = server_factory(data, NS, extra_args=args)
        state = wait_for(
            srv2,
            lambda s: s["state"] == "ok" and s["archivedLsn"] >= last and s["lagLsns"] == 0,
            "archiving to resume after the restart",
            timeout=90,
        )
        assert state["lastError"] is None
        # What was in the archive at the kill is still there, unchanged (never overwritten).
        client = s3_env.client()
        after = {k for k, _ in objects(s3_env, bucket)}
        assert {k for k, _ in mid} <= after
        assert link.in_flight in after  # ... and the restart uploaded it again, whole
        assert_one_contiguous_history(s3_env, bucket, last)
        # Every object decodes and verifies; the archive restores to the last write.
        report = verify_from(s3_env, bucket)
        assert report["ok"] and report["restorable"]["toLsn"] >= last, report
        # Nothing else under the prefix: the lease and named objects only (no stray partial upload).
        assert client.list_objects_v2(Bucket=bucket, Prefix="arch/")["KeyCount"] == len(after) + 1
        # The restart took its own lease back (same data directory, the old PID dead).
        lease = json.loads(client.get_object(Bucket=bucket, Key="arch/writer.lease")["Body"].read())
        assert lease["writer_id"] == (data / "archive-writer-id").read_text().strip()
        assert lease["pid"] == srv2.proc.pid and lease["generation"] == 2
    finally:
        link.close()


def test_second_server_on_the_prefix_is_refused_and_the_first_keeps_archiving(
    s3_env: S3Server, bucket: str, tmp_path: Path, server_factory: Any
) -> None:
    args = archive_args(s3_env, bucket)
    first: ServerProcess = server_factory(tmp_path / "a", NS, extra_args=args)
    put(first, "a0", b"first")
    wait_for(first, lambda s: s["state"] == "ok" and s["lagLsns"] == 0, "the first server")
    writer_a = (tmp_path / "a" / "archive-writer-id").read_text().strip()

    second: ServerProcess = server_factory(tmp_path / "b", NS, extra_args=args)
    state = wait_for(second, lambda s: s["state"] == "lease-lost", "the second to be refused")
    assert f"held by writer {writer_a}" in state["lastError"]
    assert "two servers must not archive to one prefix" in state["lastError"]
    assert "retries when that lease expires" in state["lastError"]
    for i in range(5):  # the second still serves writes, locally
        put(second, f"b{i}", b"second")
    with second.client() as c:
        r = c.post(f"/api/v1/{NS}/archive/snapshot")
        assert r.status_code == 503 and "not held by this server" in r.json()["error"], r.text
        assert c.get("/health").json()["archive"]["namespaces"][NS]["state"] == "lease-lost"

    last = 0
    for i in range(1, 20):  # the first keeps archiving
        last = put(first, f"a{i}", b"first")
    wait_for(first, lambda s: s["state"] == "ok" and s["archivedLsn"] >= last, "the first to go on")
    assert archive_health(second)["archivedLsn"] == -1

    # A clean stop of the refused server must not release (or touch) the first one's lease.
    assert second.stop() == 0
    lease = json.loads(s3_env.client().get_object(Bucket=bucket, Key="arch/writer.lease")["Body"].read())
    assert lease["writer_id"] == writer_a and lease["generation"] == 1 and not lease["released"]
    last = put(first, "after", b"x")
    wait_for(first, lambda s: s["state"] == "ok" and s["archivedLsn"] >= last, "the first after that")
    assert_one_contiguous_history(s3_env, bucket, last)


def test_lease_gap_a_restored_server_takes_over_once_the_dead_lease_expires(
    s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    """The old server dies holding the lease (no release: SIGKILL, lost machine); its restored
    copy has another data directory, hence another writer id, so only expiry frees the lease."""
    now = [1000.0]
    client = s3_server.client()
    calls = [0]

    def count_call(**_: object) -> None:
        calls[0] += 1

    client.meta.events.register("before-call.s3", count_call)  # every S3 operation
    store = ObjectStore(bucket, client=client)
    old_wal, new_wal = LocalWal(tmp_path / "old"), RestoredWal(tmp_path / "new")
    old = _archiver(store, old_wal, "old-server", now=now)
    old_wal.seal()
    assert old.step() == old.interval and old.state == "ok"
    # ... the old server dies here, its lease renewed at t=1000.

    now[0] += 5  # restored and started 5 s later
    new = _archiver(store, new_wal, "restored-copy", now=now)
    new_wal.seal()
    delay = new.step()
    assert new.state == "lease-lost" and "held by writer old-server" in (new.last_error or "")
    assert delay == pytest.approx(25.5)  # until the old lease expires (30 s TTL), plus a margin
    assert not new._stop.is_set(), "refused at start must not mean stopped for ever"
    # Woken by new segments meanwhile: no request to the store until the old lease can expire.
    before = calls[0]
    for _ in range(10):
        now[0] += 1
        new_wal.seal()
        assert new.step() == pytest.approx(delay - (now[0] - 1005)) and new.state == "lease-lost"
    assert calls[0] == before

    now[0] += 16  # t=1031: the old lease expired at 1030
    assert new.step() == new.interval and new.state == "ok" and new.last_error is None
    assert all(new.is_archived(sid) for sid in new_wal.ids)
    lease = json.loads(client.get_object(Bucket=bucket, Key="arch/writer.lease")["Body"].read())
    assert lease["writer_id"] == "restored-copy" and lease["generation"] == 2
    histories = {n.history_id for _, n in objects(s3_server, bucket) if n.kind is NameKind.SEGMENT}
    assert histories == {old_wal.describe(1, Path()).history_id, RestoredWal.HISTORY}
    # The old server, were it only paused, finds its lease gone and stops for good.
    now[0] += 11
    old_wal.seal()
    assert old.step() == 0.0 and old.state == "lease-lost" and old._stop.is_set()


def test_refused_retry_against_a_live_holder_is_refused_again(
    s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    now = [0.0]
    store = ObjectStore(bucket, client=s3_server.client())
    wal_a, wal_b = LocalWal(tmp_path / "a"), LocalWal(tmp_path / "b")
    a = _archiver(store, wal_a, "server-a", now=now)
    b = _archiver(store, wal_b, "server-b", now=now)
    wal_a.seal()
    wal_b.seal()
    assert a.step() == a.interval
    assert b.step() == pytest.approx(30.5)
    for _ in range(4):  # the holder renews every ttl/3: the retry finds it live each time
        now[0] += 11
        wal_a.seal()
        assert a.step() == a.interval and a.state == "ok"
        b.step()
        assert b.state == "lease-lost" and not b.is_archived(1)
    assert all(a.is_archived(sid) for sid in wal_a.ids)
    segments = [n for _, n in objects(s3_server, bucket) if n.kind is NameKind.SEGMENT]
    assert sorted(n.segment_id for n in segments) == wal_a.ids  # only the holder's uploads


def second_snapshot(srv: ServerProcess, key: str) -> int:
    """A snapshot after a write, once the start-up one is in: two snapshots at one LSN differ in
    bytes (the checkpoint's time) and the second is refused as a conflicting object (409)."""
    wait_for(srv, lambda s: s["lastSnapshotLsn"] is not None, "the start-up snapshot")
    lsn = put(srv, key, b"before the snapshot")
    publish_snapshot_now(srv)
    return lsn


def restore_from_archive(s3: S3Server, bucket: str, data: Path) -> None:
    res = subprocess.run(
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
            str(data),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, **s3.env()},
    )
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.slow  # waits out the real 30 s lease TTL; the clock-seam test above is the fast one
def test_lease_gap_end_to_end_restored_server_archives_its_new_history(
    s3_env: S3Server, bucket: str, tmp_path: Path, server_factory: Any
) -> None:
    args = archive_args(s3_env, bucket)
    old: ServerProcess = server_factory(tmp_path / "old", NS, extra_args=args)
    second_snapshot(old, "s")
    last = 0
    for i in range(10):
        last = put(old, f"k{i}", b"old")
    wait_for(old, lambda s: s["archivedLsn"] >= last and s["lagLsns"] == 0, "the old server's archive")
    old.kill9()  # the lease stays as it was last renewed

    restore_from_archive(s3_env, bucket, tmp_path / "new")
    new: ServerProcess = server_factory(tmp_path / "new", NS, extra_args=args)
    state = wait_for(new, lambda s: s["state"] == "lease-lost", "the restored server to be refused")
    assert "retries when that lease expires" in state["lastError"]
    new_last = put(new, "after-restore", b"new")
    state = wait_for(
        new,
        lambda s: s["state"] == "ok" and s["archivedLsn"] >= new_last and s["lastSnapshotLsn"] is not None,
        "the restored server to take the expired lease over and archive",
        timeout=60,
    )
    histories = {n.history_id for _, n in objects(s3_env, bucket) if n.kind is NameKind.SEGMENT}
    assert len(histories) == 2  # the old history and the restored copy's fork
    # And the archive now restores to the restored server's newest write.
    restore_from_archive(s3_env, bucket, tmp_path / "again")
    again: ServerProcess = server_factory(tmp_path / "again", NS)
    with again.client() as c:
        assert c.get(f"/api/v1/{NS}/kv/after-restore").json()["found"]
        assert int(c.get(f"/api/v1/{NS}/stats").json()["lastLsn"]) >= new_last
