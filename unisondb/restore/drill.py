"""The restore drill: prove a restored namespace is served, with the right content.

``backup verify --replay`` restores into a scratch directory (``restore``), then this
module starts a **real server process** on that directory, on a free loopback port, and
checks what it serves:

1. ``/health`` answers (measured: the server-start phase of the RTO);
2. ``GET /api/v1/<ns>/checkpoint`` reports the restored LSN and the state fingerprint the
   restore computed — when the restore proved that fingerprint equal to one the original
   server recorded (``Proof.end_proven``), the served state *is* the original state;
3. a sample of keys read over HTTP equals the values in the restored B-tree.

The server is stopped with SIGTERM (SIGKILL after a bound) and only the process this
module started is ever signalled.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unisondb.storage import layout
from unisondb.storage.btree import BTree

#: Keys read back over HTTP (spread evenly over the key space).
SAMPLE_KEYS = 200
START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0


@dataclass(slots=True)
class DrillResult:
    port: int
    start_seconds: float = 0.0
    check_seconds: float = 0.0
    served_lsn: int | None = None
    served_fingerprint: str | None = None
    sampled: int = 0
    mismatched: list[str] = field(default_factory=list)
    skipped_keys: int = 0
    problems: list[str] = field(default_factory=list)
    server_log_tail: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "port": self.port,
            "startSeconds": round(self.start_seconds, 4),
            "checkSeconds": round(self.check_seconds, 4),
            "servedLsn": self.served_lsn,
            "servedFingerprint": self.served_fingerprint,
            "sampledKeys": self.sampled,
            "mismatchedKeys": self.mismatched[:10],
            "skippedKeys": self.skipped_keys,
            "problems": self.problems,
        }


def sample_keys(
    data_dir: Path, namespace: str, n: int = SAMPLE_KEYS
) -> tuple[int, list[tuple[bytes, bytes]]]:
    """(number of keys, up to ``n`` (key, value) pairs spread over the restored key space)."""
    btree = BTree(layout.btree_dir(data_dir, namespace))
    try:
        total = btree.count()
        step = max(1, total // n) if total else 1
        pairs = [(bytes(k), bytes(v)) for i, (k, v) in enumerate(btree.items()) if i % step == 0][:n]
        return total, pairs
    finally:
        btree.close()


def run_drill(
    data_dir: Path,
    namespace: str,
    expect_lsn: int,
    expect_fingerprint: str,
    sample: list[tuple[bytes, bytes]],
) -> DrillResult:
    port = _free_port()
    result = DrillResult(port)
    log_path = data_dir / f"drill-server-{port}.log"
    args = [
        sys.executable,
        "-m",
        "unisondb",
        "--data-dir",
        str(data_dir),
        "--http-addr",
        f"127.0.0.1:{port}",
        "--namespace",
        namespace,
    ]
    started = time.perf_counter()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        if not _wait_healthy(proc, base, START_TIMEOUT):
            result.problems.append(
                f"the restored server did not become healthy within {START_TIMEOUT:.0f} s "
                f"(exit code {proc.poll()})"
            )
            return result
        result.start_seconds = time.perf_counter() - started
        t_check = time.perf_counter()
        cp = _get_json(f"{base}/api/v1/{namespace}/checkpoint")
        result.served_lsn = int(cp["lsn"])
        result.served_fingerprint = str(cp.get("fingerprint"))
        if result.served_lsn != expect_lsn:
            result.problems.append(
                f"the restored server serves LSN {result.served_lsn}, the restore ended at {expect_lsn}"
            )
        if result.served_fingerprint != expect_fingerprint:
            result.problems.append(
                f"the restored server's state fingerprint {result.served_fingerprint[:16]} is "
                f"not the restored one {expect_fingerprint[:16]}"
            )
        for key, value in sample:
            try:
                text = key.decode("utf-8")
            except UnicodeDecodeError:
                result.skipped_keys += 1  # not addressable through the text key API
                continue
            got = _get_json(f"{base}/api/v1/{namespace}/kv/" + urllib.parse.quote(text, safe=""))
            result.sampled += 1
            if not got.get("found") or base64.b64decode(got.get("value", "")) != value:
                result.mismatched.append(text)
        if result.mismatched:
            result.problems.append(
                f"{len(result.mismatched)} of {result.sampled} sampled keys "
                "differ between the restored B-tree and what is served"
            )
        result.check_seconds = time.perf_counter() - t_check
    except (OSError, ValueError, KeyError) as exc:
        result.problems.append(f"drill request failed: {exc}")
    finally:
        _stop(proc)
        try:
            result.server_log_tail = log_path.read_text(errors="replace")[-2000:]
        except OSError:
            pass
        if result.problems and result.server_log_tail:
            last = result.server_log_tail.strip().splitlines()[-1:]
            result.problems += [f"server log: {line}" for line in last]
    return result


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _wait_healthy(proc: subprocess.Popen[bytes], base: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=1.0) as resp:
                if resp.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.05)
    return False


def _get_json(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=10.0) as resp:
        data: dict[str, Any] = json.loads(resp.read())
        return data


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
