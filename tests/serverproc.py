"""A real ``unisondb`` server process on a random loopback port, for tests and benchmarks.

``server_factory(data_dir, *namespaces, extra_args=[...])`` starts ``python -m unisondb``
as a subprocess, waits until ``/health`` answers, and returns a ``ServerProcess``.
Every process a test starts is stopped at teardown, by its own PID only.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class ServerProcess:
    data_dir: Path
    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path
    args: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, timeout: float = 30.0) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def kill9(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def start_server(
    data_dir: Path,
    namespaces: tuple[str, ...] = ("default",),
    extra_args: list[str] | None = None,
    wait: bool = True,
    log_path: Path | None = None,
) -> ServerProcess:
    port = free_port()
    args = [sys.executable, "-m", "unisondb", "--data-dir", str(data_dir), "--http-addr", f"127.0.0.1:{port}"]
    for ns in namespaces:
        args += ["--namespace", ns]
    args += extra_args or []
    log_path = log_path or data_dir.parent / f"server-{port}.log"
    log_file = open(log_path, "wb")
    proc = subprocess.Popen(args, stdout=log_file, stderr=subprocess.STDOUT)
    log_file.close()
    srv = ServerProcess(data_dir, port, proc, log_path, args)
    if wait:
        wait_healthy(srv)
    return srv


def wait_healthy(srv: ServerProcess, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    # One client for the whole wait: building an httpx client loads CA files (~80 ms).
    with httpx.Client(timeout=1.0) as client:
        while time.monotonic() < deadline:
            if srv.proc.poll() is not None:
                raise RuntimeError(f"server exited with {srv.proc.returncode}:\n{srv.log()}")
            try:
                if client.get(srv.url + "/health").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
    srv.kill9()
    raise RuntimeError(f"server did not become healthy in {timeout}s:\n{srv.log()}")


def wait_applied(client: httpx.Client, stats_path: str, timeout: float = 30.0) -> int:
    """Wait until LMDB holds every write the server acknowledged before the call, and
    return that LSN. With ``--ack wal`` (the default) a write is answered once its WAL
    record is durable and LMDB follows from the applier thread, so ``/checkpoint`` (LMDB's)
    may trail ``/stats`` ``lastLsn`` by a few records: this reads ``lastLsn`` once, then
    re-reads ``/stats`` until ``appliedLsn`` reaches it (each read is a round trip to the
    server; no sleeping on a guess)."""
    target: int = client.get(stats_path).json()["lastLsn"]
    deadline = time.monotonic() + timeout
    while client.get(stats_path).json()["appliedLsn"] < target:
        assert time.monotonic() < deadline, f"LMDB did not reach LSN {target} in {timeout} s"
    return target


def wait_hold_reached(fifo: Path, srv: ServerProcess | None = None, timeout: float = 30.0) -> Path:
    """Wait until the ``UNISONDB_TEST_HOLD=<point>:<fifo>`` seam (``storage/testseam.py``)
    says the process stopped at its point (it creates ``<fifo>.reached``); return that
    path. With ``srv``, a server that died meanwhile fails at once, with its log."""
    reached = Path(str(fifo) + ".reached")
    deadline = time.monotonic() + timeout
    while not reached.exists():
        alive = srv is None or srv.proc.poll() is None
        assert time.monotonic() < deadline and alive, (
            srv.log() if srv is not None else f"{fifo} never reached"
        )
        time.sleep(0.01)
    return reached
