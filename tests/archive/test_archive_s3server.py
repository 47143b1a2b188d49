"""The S3 server the archive tests rely on is real: it enforces signatures and conditional writes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from botocore.exceptions import ClientError
from s3server import S3Server


def _status(exc: ClientError) -> int:
    return int(exc.response["ResponseMetadata"]["HTTPStatusCode"])


def test_wrong_secret_is_refused(s3_server: S3Server, bucket: str) -> None:
    with pytest.raises(ClientError) as info:
        s3_server.client(secret_key="0" * 40).put_object(Bucket=bucket, Key="k", Body=b"x")
    assert _status(info.value) == 403


def test_conditional_writes_are_enforced(s3_server: S3Server, bucket: str) -> None:
    client = s3_server.client()
    first = client.put_object(Bucket=bucket, Key="k", Body=b"one", IfNoneMatch="*")["ETag"]
    with pytest.raises(ClientError) as info:
        client.put_object(Bucket=bucket, Key="k", Body=b"two", IfNoneMatch="*")
    assert _status(info.value) == 412
    second = client.put_object(Bucket=bucket, Key="k", Body=b"two", IfMatch=first)["ETag"]
    with pytest.raises(ClientError) as info:
        client.put_object(Bucket=bucket, Key="k", Body=b"three", IfMatch=first)
    assert _status(info.value) == 412
    assert client.get_object(Bucket=bucket, Key="k")["Body"].read() == b"two"
    assert second != first


def _listening_addresses(pid: int) -> list[str]:
    """Local addresses of the TCP sockets process ``pid`` listens on (from /proc, Linux)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        target = os.readlink(fd)
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A = LISTEN
                found.append(fields[1].split(":")[0])
    return found


def test_listens_on_loopback_only(s3_server: S3Server) -> None:
    addresses = _listening_addresses(s3_server.proc.pid)
    assert len(addresses) >= 5  # s3, master, volume, filer (+ their gRPC ports)
    assert set(addresses) == {"0100007F"}, addresses  # 127.0.0.1 in /proc's little-endian hex
