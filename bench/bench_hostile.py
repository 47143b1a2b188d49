"""Hostile clients against one server: its memory and another client's latency meanwhile.

Run by hand (about a minute):

    .venv/bin/python bench/bench_hostile.py [--seconds 12]

One server on a scratch data dir on 127.0.0.1 with the default HTTP limits (docs/OPERATIONS.md).
For each attack below, a well-behaved client does GETs of one key back to back on its own
keep-alive connection the whole time, and the server's VmRSS is read from /proc every
10 ms. Attacks (raw sockets, as in tests/integration/test_http_limits.py):

* ``baseline``: no attack;
* ``huge headers``: 3 rounds of 4 clients at once, each sending a 256 MiB header;
* ``slow heads``: 50 connections trickling a request head, one byte every 0.5 s (the
  issue's 50 slow connections); the header timeout (10 s) ends them with 408;
* ``slow bodies``: 50 PUTs declaring a 1 MiB body, sending one byte every 0.5 s; the body
  timeout (30 s) is longer than the run, so they are still open at its end;
* ``500 connections``: 500 connections opened at once and left idle (the issue's 500
  concurrent connections; the idle timeout, 30 s, outlasts the run);
* ``pipelined flood``: 8 clients each writing 2,000 pipelined GETs without reading the
  answers until the end.

Prints one Markdown table: GETs done, their p50 / p99 / max, failures, and the server's
RSS before and at its peak during the attack.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import lib
from serverproc import ServerProcess, start_server

KEY = "/api/v1/default/kv/k"


def rss_kib(pid: int) -> int:
    return lib.proc_status(pid).get("VmRSS", 0)


def _connect(srv: ServerProcess) -> socket.socket:
    return socket.create_connection(("127.0.0.1", srv.port), timeout=60)


def huge_headers(srv: ServerProcess, stop: threading.Event) -> None:
    def one() -> None:
        s = _connect(srv)
        try:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: ")
            chunk = b"a" * (1 << 20)
            for _ in range(256):
                s.sendall(chunk)
        except OSError:
            pass  # the server answered 431 and closed: expected
        finally:
            s.close()

    for _ in range(3):
        threads = [threading.Thread(target=one) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()


def _trickle(srv: ServerProcess, stop: threading.Event, head: bytes, rest: bytes, n: int) -> None:
    socks = []
    for _ in range(n):
        s = _connect(srv)
        s.sendall(head)
        socks.append(s)
    i = 0
    while not stop.wait(0.5):
        for s in list(socks):
            try:
                s.sendall(rest[i % len(rest) : i % len(rest) + 1])
            except OSError:
                socks.remove(s)  # timed out by the server
        i += 1
    for s in socks:
        s.close()


def slow_heads(srv: ServerProcess, stop: threading.Event) -> None:
    _trickle(srv, stop, b"G", b"ET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200, 50)


def slow_bodies(srv: ServerProcess, stop: threading.Event) -> None:
    head = (
        b"PUT /api/v1/default/kv/slow HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1048576\r\n\r\n"
    )
    _trickle(srv, stop, head, b"a", 50)


def many_connections(srv: ServerProcess, stop: threading.Event) -> None:
    socks = [_connect(srv) for _ in range(500)]
    stop.wait()
    for s in socks:
        s.close()


def pipelined_flood(srv: ServerProcess, stop: threading.Event) -> None:
    def one() -> None:
        s = _connect(srv)
        try:
            s.sendall(b"GET /api/v1/default/kv/k HTTP/1.1\r\nHost: x\r\n\r\n" * 2000)
            s.shutdown(socket.SHUT_WR)
            while s.recv(1 << 16):
                pass
        except OSError:
            pass
        finally:
            s.close()

    threads = [threading.Thread(target=one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


ATTACKS: dict[str, Callable[[ServerProcess, threading.Event], None] | None] = {
    "baseline (no attack)": None,
    "huge headers (12 × 256 MiB, 4 at a time)": huge_headers,
    "50 slow heads (1 byte / 0.5 s)": slow_heads,
    "50 slow bodies (1 byte / 0.5 s of 1 MiB)": slow_bodies,
    "500 idle connections": many_connections,
    "pipelined flood (8 × 2,000 GETs)": pipelined_flood,
}


SELF_ENDING = (huge_headers, pipelined_flood)


def measure(
    srv: ServerProcess, attack: Callable[[ServerProcess, threading.Event], None] | None, seconds: float
) -> str:
    base = rss_kib(srv.proc.pid)
    peak = base
    stop = threading.Event()
    lat: list[float] = []
    failures = 0

    def sample() -> None:
        nonlocal peak
        while not stop.wait(0.01):
            peak = max(peak, rss_kib(srv.proc.pid))

    def client() -> None:
        nonlocal failures
        with httpx.Client(base_url=srv.url, timeout=10) as c:
            while not stop.is_set():
                t = time.perf_counter()
                try:
                    ok = c.get(KEY).status_code == 200
                except httpx.HTTPError:
                    ok = False
                lat.append(time.perf_counter() - t)
                failures += not ok

    helpers = [threading.Thread(target=sample), threading.Thread(target=client)]
    attacker = threading.Thread(target=attack, args=(srv, stop)) if attack else None
    for t in helpers:
        t.start()
    if attacker:
        attacker.start()
    time.sleep(seconds)
    if attacker and attack in SELF_ENDING:
        attacker.join()  # measure until the whole attack has been sent
    stop.set()
    for t in helpers:
        t.join()
    if attacker:
        attacker.join()
    lat.sort()
    p99 = statistics.quantiles(lat, n=100)[98] if len(lat) >= 100 else lat[-1]
    return (
        f"| {len(lat)} | {statistics.median(lat) * 1000:.1f} | {p99 * 1000:.1f} | {lat[-1] * 1000:.0f} "
        f"| {failures} | {base / 1024:.0f} → {peak / 1024:.0f} (+{(peak - base) / 1024:.1f}) |"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seconds", type=float, default=12, help="per attack")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-hostile-") as tmp:
        srv = start_server(Path(tmp) / "data", ("default",))
        try:
            with httpx.Client(base_url=srv.url) as c:
                assert c.put(KEY, json={"value": lib.b64(b"v" * 100)}).status_code == 200
                for _ in range(200):  # warm the allocator and the routes before the baseline
                    c.get(KEY)
            print(
                f"each attack {args.seconds:g} s; the other client: GET {KEY} back to back, one connection\n"
            )
            print(
                "| attack | other client's GETs | p50 ms | p99 ms | max ms | failed "
                "| server VmRSS MiB before → peak |"
            )
            print("|---|---:|---:|---:|---:|---:|---|")
            for name, attack in ATTACKS.items():
                row = measure(srv, attack, args.seconds)
                print(f"| {name} {row}", flush=True)
                time.sleep(1)  # let closed connections go before the next baseline
            assert srv.proc.poll() is None, "the server died"
            print(
                "\nserver peak VmHWM over the whole run: "
                f"{lib.proc_status(srv.proc.pid)['VmHWM'] / 1024:.0f} MiB"
            )
        finally:
            srv.stop()


if __name__ == "__main__":
    main()
