"""Hostile HTTP clients against a real server: bounded memory, timeouts, connection limit.

Raw sockets on loopback; timeouts are shrunk by flags so no test sleeps for long. Memory
is read from ``/proc/<pid>/status`` (VmRSS) of the server process while the attack runs,
and another client's requests are timed meanwhile.
"""

from __future__ import annotations

import re
import socket
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from serverproc import start_server


def rss_kib(pid: int) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    m = re.search(r"^VmRSS:\s+(\d+) kB", text, re.M)
    assert m, text
    return int(m.group(1))


def connect(srv: Any, timeout: float = 10.0) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", srv.port), timeout=timeout)
    return s


def read_response(s: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Read until the server closes; parse one response."""
    data = b""
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    except (ConnectionResetError, TimeoutError):
        pass
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0].startswith("HTTP/1.1 "), data[:200]
    headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def assert_envelope(body: bytes, pattern: str) -> None:
    assert body.endswith(b"\n"), body
    obj = orjson.loads(body)
    assert list(obj) == ["error"] and re.search(pattern, obj["error"]), obj


def metric(srv: Any, route: str, status: int) -> float:
    text = httpx.get(srv.url + "/metrics").text
    total = 0.0
    for line in text.splitlines():
        if (
            line.startswith("unisondb_http_requests_total{")
            and f'route="{route}"' in line
            and f'status="{status}"' in line
        ):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    server = start_server(
        tmp_path_factory.mktemp("limits") / "data",
        ("default",),
        extra_args=[
            "--http-header-timeout",
            "0.5s",
            "--http-body-timeout",
            "0.5s",
            "--http-idle-timeout",
            "0.6s",
        ],
    )
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def _server_survives(srv: Any) -> Iterator[None]:
    yield
    assert srv.proc.poll() is None, f"server died:\n{srv.log()}"
    assert httpx.get(srv.url + "/health").status_code == 200
    assert "request.bug" not in srv.log(), srv.log()


def test_a_256_mib_header_is_refused_early_with_bounded_memory(srv: Any) -> None:
    """The issue's attack: one 256 MiB header. RSS must not follow it; others keep answering."""
    with httpx.Client(base_url=srv.url, timeout=10) as warm:
        for _ in range(50):  # warm the allocator and the routes before the baseline
            warm.get("/health")
            warm.put("/api/v1/default/kv/k", json={"value": "dg=="})
    base = rss_kib(srv.proc.pid)
    peak = base
    stop = threading.Event()
    latencies: list[float] = []
    failures: list[str] = []

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, rss_kib(srv.proc.pid))
            time.sleep(0.005)

    def other_client() -> None:
        with httpx.Client(base_url=srv.url, timeout=5) as c:
            while not stop.is_set():
                t = time.perf_counter()
                try:
                    r = c.get("/api/v1/default/kv/k")
                    if r.status_code != 200:
                        failures.append(f"{r.status_code} {r.text}")
                except httpx.HTTPError as exc:
                    failures.append(repr(exc))
                latencies.append(time.perf_counter() - t)

    threads = [threading.Thread(target=sample), threading.Thread(target=other_client)]
    sent: list[int] = []

    def attack() -> None:
        n = 0
        s = connect(srv)
        chunk = b"a" * (1 << 20)
        try:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: ")
            for _ in range(256):
                s.sendall(chunk)
                n += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        finally:
            s.close()
            sent.append(n)

    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while not latencies and time.monotonic() < deadline:  # the other client is answering first
        time.sleep(0.01)
    for _ in range(3):  # three rounds of four attackers at once
        attackers = [threading.Thread(target=attack) for _ in range(4)]
        for t in attackers:
            t.start()
        for t in attackers:
            t.join()
    time.sleep(0.2)
    stop.set()
    for t in threads:
        t.join()
    grown_mib = (peak - base) / 1024
    p99 = statistics.quantiles(latencies, n=100)[98] if len(latencies) >= 100 else max(latencies)
    print(
        f"\n12 x 256 MiB header: at most {max(sent) >> 20} MiB sent before the cut; "
        f"RSS {base // 1024} "
        f"-> peak {peak // 1024} MiB (+{grown_mib:.1f}); other client: {len(latencies)} GETs, "
        f"p99 {p99 * 1000:.1f} ms, max {max(latencies) * 1000:.1f} ms"
    )
    assert max(sent) < 64 << 20, "the server kept reading the header"
    assert grown_mib < 16, f"RSS grew by {grown_mib:.1f} MiB"
    assert not failures, failures[:5]
    assert max(latencies) < 1.0


def test_oversized_head_gets_431_in_the_json_envelope(srv: Any) -> None:
    s = connect(srv)
    s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (70 << 10) + b"\r\n\r\n")
    status, headers, body = read_response(s)
    s.close()
    assert (status, headers["connection"]) == (431, "close")
    assert_envelope(body, r"^request head too large: over 65536 bytes")


def test_too_many_headers_gets_431(srv: Any) -> None:
    s = connect(srv)
    fields = b"".join(b"X-H%d: v\r\n" % i for i in range(101))
    s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n" + fields + b"\r\n")
    status, _, body = read_response(s)
    s.close()
    assert status == 431
    assert_envelope(body, r"^too many header fields: over 100")


def test_long_request_target_gets_414(srv: Any) -> None:
    s = connect(srv)
    s.sendall(b"GET /api/v1/default/kv/" + b"k" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    status, _, body = read_response(s)
    s.close()
    assert status == 414
    assert_envelope(body, r"^request target too long: over 8192 bytes")


def test_malformed_request_gets_400_json_not_plain_text(srv: Any) -> None:
    s = connect(srv)
    s.sendall(b"NOT A REQUEST\r\n\r\n")
    status, _, body = read_response(s)
    s.close()
    assert status == 400
    assert_envelope(body, r"^invalid HTTP request")


def test_idle_connection_is_closed(srv: Any) -> None:
    s = connect(srv)
    t = time.monotonic()
    assert s.recv(100) == b""  # closed by the server, no response
    assert 0.4 < time.monotonic() - t < 3.0
    s.close()


def test_keep_alive_connection_is_closed_after_idle_timeout(srv: Any) -> None:
    s = connect(srv)
    s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    got = b""
    while not got.endswith(b"}\n"):  # head and body may come in two reads
        got += s.recv(65536)
    assert got.startswith(b"HTTP/1.1 200 ")
    t = time.monotonic()
    assert s.recv(100) == b""
    assert 0.4 < time.monotonic() - t < 3.0
    s.close()


def test_slow_head_gets_408(srv: Any) -> None:
    s = connect(srv)
    t = time.monotonic()
    s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
    status, _, body = read_response(s)
    s.close()
    assert status == 408 and time.monotonic() - t < 3.0
    assert_envelope(body, r"^request head not received within 0.5 s")


def test_trickled_head_is_timed_out_from_its_first_byte(srv: Any) -> None:
    """One byte every 0.2 s keeps resetting no timer: the head deadline is absolute."""
    s = connect(srv)
    t = time.monotonic()
    got = b""
    s.settimeout(0.2)
    for byte in b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100:
        try:
            s.send(bytes([byte]))
            got = s.recv(65536)
        except TimeoutError:
            continue
        except (BrokenPipeError, ConnectionResetError):
            break
        if got:
            break
    s.close()
    assert got.startswith(b"HTTP/1.1 408 "), got
    assert time.monotonic() - t < 2.0


@pytest.mark.parametrize("target", ["/api/v1/default/kv/slow", "/api/v1/default/kv/batch"])
def test_slow_body_gets_408_and_is_counted_as_408(srv: Any, target: str) -> None:
    method = b"POST" if target.endswith("batch") else b"PUT"
    route = "batch_kv" if method == b"POST" else "put_kv"
    before = metric(srv, route, 408)
    s = connect(srv)
    s.sendall(
        method + b" " + target.encode() + b' HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"value":'
    )
    status, _, body = read_response(s)
    s.close()
    assert status == 408
    assert_envelope(body, r"^request body not received within 0.5 s")
    deadline = time.monotonic() + 5
    while metric(srv, route, 408) != before + 1:
        assert time.monotonic() < deadline, httpx.get(srv.url + "/metrics").text
        time.sleep(0.05)
    assert "request.bug" not in srv.log()


@pytest.mark.parametrize(
    "target", ["/api/v1/default/kv/gone", "/api/v1/default/kv/batch", "/api/v1/default/btree/backup"]
)
def test_client_that_hangs_up_mid_body_is_499_not_a_bug(srv: Any, target: str) -> None:
    method = b"PUT" if target.endswith("gone") else b"POST"
    route = {"gone": "put_kv", "batch": "batch_kv", "backup": "btree_backup"}[target.rsplit("/")[-1]]
    before = metric(srv, route, 499)
    s = connect(srv)
    s.sendall(
        method + b" " + target.encode() + b' HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{"value":'
    )
    time.sleep(0.05)
    s.close()
    deadline = time.monotonic() + 5
    while metric(srv, route, 499) != before + 1:
        assert time.monotonic() < deadline, httpx.get(srv.url + "/metrics").text
        time.sleep(0.05)
    log = srv.log()
    assert "request.client_disconnected" in log
    assert "request.bug" not in log and metric(srv, route, 500) == 0


def test_connection_limit_answers_503_with_retry_after(tmp_path: Path) -> None:
    srv = start_server(tmp_path / "data", extra_args=["--http-max-connections", "3"])
    held: list[socket.socket] = []
    try:
        # wait_healthy's connection may still be closing: retry until 3 are served.
        for _ in range(3):
            s = connect(srv)
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            got = b""
            while not got.endswith(b"}\n"):
                got += s.recv(65536)
            assert got.startswith(b"HTTP/1.1 200 "), got
            held.append(s)
        extra = connect(srv)
        extra.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        status, headers, body = read_response(extra)
        extra.close()
        assert (status, headers["retry-after"], headers["connection"]) == (503, "1", "close")
        assert_envelope(body, r"^too many connections \(limit 3\); retry later")
        held.pop().close()
        deadline = time.monotonic() + 5
        while True:  # the server sees the close a moment later
            r = httpx.get(srv.url + "/health")
            if r.status_code == 200:
                break
            assert r.status_code == 503 and time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        for s in held:
            s.close()
        srv.stop()
