"""The peers UnisonDB is compared with — etcd 3.4 and Redis 7 from Debian — started on
127.0.0.1 with free ports, and stopped by the PID this module started (never by name).

``ensure_installed()`` installs the Debian packages the benchmark drives (only the ones
whose binaries are missing). Every process started here is tracked in ``STARTED`` so the
caller's ``finally: stop_all()`` leaves nothing running, whatever failed.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import httpx
from lib import COMMANDS, BenchError, b64, die_with_parent, free_port, proc_status, run

#: binary → Debian package that provides it.
BINARIES = {
    "etcd": "etcd-server",
    "etcdctl": "etcd-client",
    "redis-server": "redis-server",
    "redis-benchmark": "redis-tools",
    "redis-cli": "redis-tools",
    "wrk": "wrk",
    "hey": "hey",
}
#: Used when present (a context row), never required.
OPTIONAL = frozenset({"wrk"})
DEBS = ("etcd-server", "etcd-client", "redis-server", "redis-tools", "wrk", "hey")


def ensure_installed() -> list[str]:
    """apt-get install the packages whose binaries are missing; return what was installed."""
    need = sorted({pkg for b, pkg in BINARIES.items() if shutil.which(b) is None})
    if not need:
        return []
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    run([*sudo, "apt-get", "update", "-qq"], 300, env=env)
    run([*sudo, "apt-get", "install", "-y", "-qq", "--no-install-recommends", *need], 600, env=env)
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if missing:
        raise BenchError(f"still missing after apt-get install: {missing}")
    return need


class Managed:
    """A child process with its output in a log file, stopped by its own PID."""

    def __init__(self, name: str, cmd: Sequence[str], log_path: Path) -> None:
        self.name = name
        self.cmd = list(cmd)
        self.log_path = log_path
        COMMANDS.add(shlex.join(self.cmd) + " &")
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent,
            )
        STARTED.append(self)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def vmhwm_kib(self) -> int:
        return proc_status(self.pid).get("VmHWM", 0)

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM, wait, then SIGKILL — always this process's PID only."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        if self in STARTED:
            STARTED.remove(self)
        return self.proc.returncode

    def wait_until(self, ready: object, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise BenchError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if ready():  # type: ignore[operator]
                    return
            except (httpx.TransportError, OSError, subprocess.SubprocessError):
                pass
            time.sleep(0.1)
        self.stop()
        raise BenchError(f"{self.name} not ready ({what}) after {timeout:.0f}s:\n{self.log_tail()}")


STARTED: list[Managed] = []


def stop_all() -> None:
    for m in list(reversed(STARTED)):
        try:
            m.stop()
        except Exception as exc:  # keep stopping the others
            print(f"warning: could not stop {m.name} (pid {m.pid}): {exc}")


class Etcd(Managed):
    """A single-member etcd 3.4 on loopback. ``url`` is the client URL (v3 JSON gateway)."""

    def __init__(
        self, data_dir: Path, log_path: Path, *, name: str = "bench", quota_bytes: int = 8 << 30
    ) -> None:
        self.data_dir = data_dir
        self.client_port, self.peer_port, self.metrics_port = (free_port(), free_port(), free_port())
        self.url = f"http://127.0.0.1:{self.client_port}"
        self.endpoint = f"127.0.0.1:{self.client_port}"
        peer = f"http://127.0.0.1:{self.peer_port}"
        cmd = [
            "etcd",
            "--name",
            name,
            "--data-dir",
            str(data_dir),
            "--listen-client-urls",
            self.url,
            "--advertise-client-urls",
            self.url,
            "--listen-peer-urls",
            peer,
            "--initial-advertise-peer-urls",
            peer,
            "--initial-cluster",
            f"{name}={peer}",
            "--listen-metrics-urls",
            f"http://127.0.0.1:{self.metrics_port}",
            "--quota-backend-bytes",
            str(quota_bytes),
            # big transactions for loading the snapshot data set quickly
            "--max-txn-ops",
            "2000",
            "--max-request-bytes",
            str(8 << 20),
        ]
        super().__init__("etcd", cmd, log_path)
        self.wait_until(
            lambda: httpx.get(self.url + "/health", timeout=1).json().get("health") == "true",
            60,
            "GET /health",
        )

    def put_many(self, client: httpx.Client, items: Sequence[tuple[bytes, bytes]]) -> None:
        """One v3 transaction of puts through the JSON gateway (POST /v3/kv/txn)."""
        body = {"success": [{"requestPut": {"key": b64(k), "value": b64(v)}} for k, v in items]}
        r = client.post(self.url + "/v3/kv/txn", json=body)
        if r.status_code != 200 or "error" in r.json():
            raise BenchError(f"etcd txn failed: {r.status_code} {r.text[:500]}")

    def count(self) -> int:
        # range over the whole key space, count only (key "\0", range_end "\0")
        r = httpx.post(
            self.url + "/v3/kv/range",
            json={"key": b64(b"\0"), "range_end": b64(b"\0"), "count_only": True},
            timeout=60,
        )
        return int(r.json().get("count", 0))


class Redis(Managed):
    """redis-server on loopback with AOF ``appendfsync always`` (every write fsynced)."""

    def __init__(self, data_dir: Path, log_path: Path, *, appendfsync: str = "always") -> None:
        self.port = free_port()
        data_dir.mkdir(parents=True, exist_ok=True)
        cmd = [
            "redis-server",
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dir",
            str(data_dir),
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            appendfsync,
            "--daemonize",
            "no",
            "--protected-mode",
            "yes",
        ]
        super().__init__("redis", cmd, log_path)
        self.wait_until(lambda: self.cli("ping", log=False, check=False) == "PONG", 30, "PING")

    def cli(self, *args: str, log: bool = True, check: bool = True) -> str:
        return run(
            ["redis-cli", "-h", "127.0.0.1", "-p", str(self.port), *args], 30, log=log, check=check
        ).stdout.strip()
