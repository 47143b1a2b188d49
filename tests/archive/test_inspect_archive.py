"""``unisondb backup list|verify --from s3://…``, ``restore --from`` progress and refusals (issue 9).

The archive is written by a real server process with ``--archive-url`` (encrypted) against a real
SeaweedFS, once per module, and stopped cleanly so every write is archived. The CLI runs as a
subprocess with the standard AWS variables, as an operator runs it. Tests that damage the archive
(a deleted segment, an unfinished snapshot, a flipped byte) work on a server-side copy in a bucket
of their own; the damage is done with boto3 directly on the bucket, the way it would really happen.
"""

from __future__ import annotations

import hashlib
import json
import os
import pty
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from s3server import S3Server
from serverproc import ServerProcess, start_server
from test_archive_server import NS, archive_args, publish_snapshot_now, put, wait_for

from unisondb.archive import naming
from unisondb.archive.naming import NameKind
from unisondb.archive.objectfmt import generate_key_file

PREFIX = "arch"


@dataclass(frozen=True)
class Archive:
    s3: S3Server
    bucket: str
    key_file: Path
    last_lsn: int
    snapshot_lsns: list[int]
    model: dict[str, bytes]

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{PREFIX}"

    def names(self, bucket: str | None = None) -> list[tuple[str, naming.ArchiveName]]:
        client = self.s3.client()
        out = []
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket or self.bucket):
            for item in page.get("Contents", []):
                parsed = naming.parse_key(PREFIX, item["Key"])
                if parsed is not None:
                    out.append((item["Key"], parsed))
        return out

    def copy(self) -> str:
        """A server-side copy of the whole bucket, to damage."""
        client = self.s3.client()
        target = self.s3.create_bucket(f"c-{uuid.uuid4().hex[:20]}")
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket):
            for item in page.get("Contents", []):
                client.copy_object(
                    Bucket=target, Key=item["Key"], CopySource={"Bucket": self.bucket, "Key": item["Key"]}
                )
        return target


@pytest.fixture(scope="module")
def archive(s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Archive]:
    root = tmp_path_factory.mktemp("inspect")
    bucket = s3_server.create_bucket(f"i-{uuid.uuid4().hex[:20]}")
    key_file = root / "archive.key"
    generate_key_file(key_file)
    with pytest.MonkeyPatch.context() as mp:
        for name, value in s3_server.env().items():
            mp.setenv(name, value)
        srv = start_server(root / "data", (NS,), archive_args(s3_server, bucket, key_file))
        try:
            model: dict[str, bytes] = {}
            last = 0
            # Two snapshots at one LSN conflict (their bytes differ): wait for the start-up one.
            wait_for(srv, lambda s: s["lastSnapshotLsn"] is not None, "the start-up snapshot")
            for i in range(30):
                model[f"a{i}"] = f"one-{i}".encode()
                put(srv, f"a{i}", model[f"a{i}"])
            wait_for(srv, lambda s: s["lagLsns"] == 0, "the first writes to be archived")
            publish_snapshot_now(srv)
            for i in range(30):
                model[f"b{i}"] = f"two-{i}".encode()
                last = put(srv, f"b{i}", model[f"b{i}"])
            wait_for(srv, lambda s: s["archivedLsn"] >= last and s["lagLsns"] == 0, "the archive")
            assert srv.stop() == 0
        finally:
            srv.kill9()
    arc = Archive(s3_server, bucket, key_file, last, [], model)
    snaps = sorted(n.first_lsn for _, n in arc.names() if n.kind is NameKind.SNAPSHOT)
    yield Archive(s3_server, bucket, key_file, last, snaps, model)


def cli(
    arc: Archive, *args: str, env: dict[str, str] | None = None, key: bool = True
) -> subprocess.CompletedProcess[str]:
    extra = ["--archive-key-file", str(arc.key_file)] if key else []
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "unisondb",
            *args,
            "--archive-endpoint",
            arc.s3.endpoint,
            "--archive-path-style",
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, **arc.s3.env(), **(env or {})},
    )


def one_line_error(res: subprocess.CompletedProcess[str]) -> str:
    assert res.returncode != 0, res.stdout
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    return lines[0]


def test_list_from_archive_shows_snapshots_windows_and_objects(archive: Archive) -> None:
    res = cli(archive, "backup", "list", "--from", archive.url, "--namespace", NS, "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)  # --json: stdout is the JSON and nothing else
    assert out["backupDir"] == f"{archive.url}/{NS}/"
    assert out["problems"] == [] and out["archive"]["unfinishedSnapshots"] == []
    assert len(out["snapshots"]) == len(archive.snapshot_lsns) >= 2
    for snap in out["snapshots"]:
        # The report names objects, never the scratch files they were decoded into.
        assert snap["path"].startswith(f"{archive.url}/{NS}/") and snap["path"].endswith(".snapshot.zst.enc")
        assert snap["manifest"]["writer"] and snap["restorableTo"]["lsn"] == archive.last_lsn
    assert sorted(s["lsn"] for s in out["snapshots"]) == archive.snapshot_lsns
    (history,) = out["wal"]["histories"]
    assert history["holes"] == [] and history["latestLsn"] == archive.last_lsn
    assert history["window"]["earliestLsn"] == archive.snapshot_lsns[0]
    assert history["window"]["latestLsn"] == archive.last_lsn
    assert "unisondb-archive-" not in res.stdout

    text = cli(archive, "backup", "list", "--from", archive.url, "--namespace", NS)
    assert text.returncode == 0, text.stderr
    assert f"Backups in {archive.url}/{NS}/" in text.stdout
    assert f"restorable: LSN {archive.snapshot_lsns[0]}..{archive.last_lsn}" in text.stdout
    assert "Archive: " in text.stdout and "decoded and checked" in text.stdout


def test_verify_from_archive_with_replay_drill(archive: Archive) -> None:
    res = cli(archive, "backup", "verify", "--from", archive.url, "--namespace", NS, "--replay", "--json")
    assert res.returncode == 0, res.stdout + res.stderr
    out = json.loads(res.stdout)
    assert out["ok"] and out["problems"] == []
    assert out["snapshot"]["path"].startswith(f"{archive.url}/{NS}/")
    assert out["snapshot"]["lsn"] == archive.snapshot_lsns[-1]  # the newest complete one
    # The content's SHA-256 comes from each object's verified header: no "no .sha256" warnings.
    assert out["snapshot"]["sidecar"] == "ok" and out["snapshot"]["checked"] == "the object header"
    assert out["warnings"] == []
    assert out["restorable"]["toLsn"] == archive.last_lsn
    assert out["replay"]["lsn"] == archive.last_lsn and out["replay"]["keys"] == len(archive.model)
    assert out["replay"]["server"]["mismatchedKeys"] == []
    assert all(s["path"].startswith("s3://") for s in out["segments"])


def test_hole_and_unfinished_snapshot_are_reported(archive: Archive) -> None:
    bucket = archive.copy()
    client = archive.s3.client()
    names = archive.names(bucket)
    segs = sorted((n.first_lsn, n.last_lsn, k) for k, n in names if n.kind is NameKind.SEGMENT)
    assert len(segs) >= 3
    first, last, gone = segs[len(segs) // 2]
    client.delete_object(Bucket=bucket, Key=gone)
    newest = archive.snapshot_lsns[-1]
    for k, n in names:  # the newest snapshot loses its manifests: an unfinished upload
        if n.first_lsn == newest and n.kind in (NameKind.MANIFEST, NameKind.MANIFEST_COPY):
            client.delete_object(Bucket=bucket, Key=k)
    url = f"s3://{bucket}/{PREFIX}"

    res = cli(archive, "backup", "list", "--from", url, "--namespace", NS, "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    (history,) = out["wal"]["histories"]
    assert [(h["firstLsn"], h["lastLsn"]) for h in history["holes"]] == [(first, last)]
    (unfinished,) = out["archive"]["unfinishedSnapshots"]
    assert f"{newest:020d}.snapshot" in unfinished and "unfinished upload" in unfinished
    assert [s["lsn"] for s in out["snapshots"]] == archive.snapshot_lsns[:-1]
    assert history["window"]["latestLsn"] == first - 1

    res = cli(archive, "backup", "verify", "--from", url, "--namespace", NS)
    assert res.returncode != 0
    assert f"hole      missing LSN {first}..{last}" in res.stdout or f"{first}..{last}" in res.stdout, (
        res.stdout
    )
    assert "FAILED" in res.stdout and "unfinished upload" in res.stdout


def test_bad_url_missing_bucket_wrong_credentials_wrong_key(archive: Archive, tmp_path: Path) -> None:
    base = ["backup", "list", "--namespace", NS, "--from"]
    usage = one_line_error(cli(archive, "backup", "verify", "--from", archive.url))
    assert "--from needs --namespace NS" in usage
    both = one_line_error(cli(archive, *base, archive.url, "--backup-dir", str(tmp_path)))
    assert "give --backup-dir DIR or --from" in both
    assert "invalid archive URL" in one_line_error(cli(archive, *base, "http://x/y"))
    missing = one_line_error(cli(archive, *base, f"s3://no-such-{uuid.uuid4().hex[:12]}/p"))
    assert "not in the archive" in missing and "create the bucket or fix" in missing
    denied = one_line_error(cli(archive, *base, archive.url, env={"AWS_SECRET_ACCESS_KEY": "wrong" * 8}))
    assert "refused access" in denied and "credentials" in denied
    nothing = one_line_error(cli(archive, "backup", "list", "--namespace", "other", "--from", archive.url))
    assert "holds no objects of namespace other" in nothing
    assert "is encrypted" in one_line_error(cli(archive, *base, archive.url, key=False))
    other = tmp_path / "other.key"
    generate_key_file(other)
    for cmd in (base, ["backup", "verify", "--namespace", NS, "--from"]):
        res = subprocess.run(
            [
                sys.executable,
                "-m",
                "unisondb",
                *cmd,
                archive.url,
                "--archive-endpoint",
                archive.s3.endpoint,
                "--archive-path-style",
                "--archive-key-file",
                str(other),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, **archive.s3.env()},
        )
        line = one_line_error(res)
        assert "encrypted with key id" in line and "the given key has id" in line


def restore(
    arc: Archive,
    data: Path,
    *extra: str,
    url: str | None = None,
    key_file: Path | None = None,
    tty: bool = False,
) -> subprocess.CompletedProcess[str]:
    args = [
        sys.executable,
        "-m",
        "unisondb",
        "restore",
        "--from",
        url or arc.url,
        "--archive-endpoint",
        arc.s3.endpoint,
        "--archive-path-style",
        "--archive-key-file",
        str(key_file or arc.key_file),
        "--namespace",
        NS,
        "--data-dir",
        str(data),
        *extra,
    ]
    env = {**os.environ, **arc.s3.env(), "COLUMNS": "100"}
    if not tty:
        return subprocess.run(args, capture_output=True, text=True, timeout=180, env=env)
    # stderr on a pseudo-terminal (the bar appears only there), stdout a pipe.
    main_fd, sub_fd = pty.openpty()
    try:
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=sub_fd, env=env)
        os.close(sub_fd)
        chunks = []
        while True:
            try:
                data_ = os.read(main_fd, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data_:
                break
            chunks.append(data_)
        stdout = proc.stdout.read().decode() if proc.stdout else ""
        proc.wait(180)
    finally:
        os.close(main_fd)
    return subprocess.CompletedProcess(
        args, proc.returncode, stdout, b"".join(chunks).decode(errors="replace")
    )


def test_restore_progress_bar_on_a_terminal_only(archive: Archive, tmp_path: Path) -> None:
    res = restore(archive, tmp_path / "a", tty=True)
    assert res.returncode == 0, res.stderr
    assert "download" in res.stderr and "fetched from s3://" in res.stderr
    res = restore(archive, tmp_path / "b", "--json", tty=True)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["summary"]["lsn"] == archive.last_lsn
    assert "download" not in res.stderr  # --json: no bar, no chatter
    res = restore(archive, tmp_path / "c")  # not a terminal: no bar either
    assert res.returncode == 0 and "download" not in res.stderr, res.stderr


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_tampered_object_or_wrong_key_fails_restore_target_untouched(
    archive: Archive, tmp_path: Path, server_factory: Any
) -> None:
    data = tmp_path / "data"
    res = restore(archive, data)
    assert res.returncode == 0, res.stderr
    before = tree_digest(data)
    assert before

    bucket = archive.copy()
    client = archive.s3.client()
    segs = sorted((n.first_lsn, k) for k, n in archive.names(bucket) if n.kind is NameKind.SEGMENT)
    victim = segs[-1][1]  # a segment every restore from the newest snapshot needs
    body = bytearray(client.get_object(Bucket=bucket, Key=victim)["Body"].read())
    body[len(body) // 2] ^= 0x01  # one bit, in the middle of an encrypted chunk
    client.put_object(Bucket=bucket, Key=victim, Body=bytes(body))
    url = f"s3://{bucket}/{PREFIX}"

    for extra in ([], ["--force"]):
        line = one_line_error(restore(archive, data, *extra, url=url))
        assert victim in line and "fails authentication" in line, line
        assert tree_digest(data) == before
    fresh = tmp_path / "fresh"
    one_line_error(restore(archive, fresh, url=url))
    assert not (fresh / NS).exists()

    wrong = tmp_path / "wrong.key"
    generate_key_file(wrong)
    line = one_line_error(restore(archive, data, "--force", key_file=wrong))
    assert "encrypted with key id" in line and "the given key has id" in line
    assert tree_digest(data) == before

    # And the untouched target still serves what the archive held.
    srv: ServerProcess = server_factory(data, NS)
    with srv.client() as c:
        assert int(c.get(f"/api/v1/{NS}/stats").json()["lastLsn"]) == archive.last_lsn
