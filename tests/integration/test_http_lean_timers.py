"""The connection deadlines as the lean path runs them (``api/protocol.py``).

The protocol keeps one idle timer per connection that re-checks when the connection last
went idle (not a timer armed after every response), and arms a lean PUT's body deadline
only when the body did not come in the head's read. These cases pin what that must not
change: a connection kept busy outlives the idle timeout and is closed one idle timeout
after its last response; a head alone, or a head pipelined half-sent behind a lean GET,
still gets its 408. A real server with short timeouts; the sleeps pace the client, the
assertions allow the generous margins of a loaded machine.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
from serverproc import start_server

KV = b"/api/v1/default/kv/"


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    server = start_server(
        tmp_path_factory.mktemp("lean-timers") / "data",
        ("default",),
        extra_args=[
            "--http-header-timeout",
            "0.5s",
            "--http-body-timeout",
            "0.5s",
            "--http-idle-timeout",
            "0.6s",
            "--http-lean",
            "on",
        ],
    )
    yield server
    server.stop()
    assert "request.bug" not in server.log(), server.log()


def _connect(srv: Any) -> socket.socket:
    return socket.create_connection(("127.0.0.1", srv.port), timeout=10)


def _response(s: socket.socket, buf: bytes = b"") -> tuple[int, bytes, bytes]:
    """(status, body, what followed it) of the next response on ``s``."""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(65536)
        assert chunk, f"closed before a response: {buf!r}"
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    fields = dict(line.lower().split(b": ", 1) for line in head.split(b"\r\n")[1:])
    length = int(fields[b"content-length"])
    while len(rest) < length:
        chunk = s.recv(65536)
        assert chunk, "closed mid-body"
        rest += chunk
    return int(head.split(b" ", 2)[1]), rest[:length], rest[length:]


def _requests(srv: Any, route: str, status: int) -> float:
    text = httpx.get(srv.url + "/metrics").text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("unisondb_http_requests_total{")
        and f'route="{route}"' in line
        and f'status="{status}"' in line
    )


def test_a_busy_connection_outlives_the_idle_timeout_then_closes_one_timeout_after_its_last_answer(
    srv: Any,
) -> None:
    s = _connect(srv)
    started = time.monotonic()
    for i in range(8):  # 8 × 0.15 s: twice the idle timeout, never idle for one
        s.sendall(b"GET " + KV + b"busy%d HTTP/1.1\r\nHost: x\r\n\r\n" % i)
        status, body, rest = _response(s)
        assert (status, rest) == (200, b""), body
        time.sleep(0.15)
    assert time.monotonic() - started > 1.0
    last = time.monotonic() - 0.15
    assert s.recv(100) == b""  # closed by the server, with no response
    assert 0.4 < time.monotonic() - last < 3.0
    s.close()


def test_a_lean_put_head_without_its_body_gets_408_after_the_body_timeout(srv: Any) -> None:
    before = _requests(srv, "put_kv", 408)
    s = _connect(srv)
    started = time.monotonic()
    s.sendall(b"PUT " + KV + b"nobody HTTP/1.1\r\nHost: x\r\nContent-Length: 16\r\n\r\n")
    status, body, _ = _response(s)
    s.close()
    assert status == 408 and 0.4 < time.monotonic() - started < 3.0
    assert orjson.loads(body)["error"].startswith("request body not received within 0.5 s")
    deadline = time.monotonic() + 5
    while _requests(srv, "put_kv", 408) != before + 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_a_lean_put_body_in_a_later_read_within_the_timeout_is_written(srv: Any) -> None:
    s = _connect(srv)
    s.sendall(b"PUT " + KV + b"later HTTP/1.1\r\nHost: x\r\nContent-Length: 16\r\n\r\n")
    time.sleep(0.2)
    s.sendall(b'{"value":"aGk="}')
    status, body, rest = _response(s)
    s.close()
    assert (status, orjson.loads(body), rest) == (200, {"success": True}, b"")
    assert httpx.get(srv.url + "/api/v1/default/kv/later").json() == {"value": "aGk=", "found": True}


def test_a_half_head_pipelined_behind_a_lean_get_gets_408(srv: Any) -> None:
    s = _connect(srv)
    started = time.monotonic()
    s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\nGET /health HTTP/1.1\r\nHost: x\r\n")
    status, _, rest = _response(s)
    assert status == 200
    status, body, _ = _response(s, rest)
    s.close()
    assert status == 408 and time.monotonic() - started < 3.0
    assert orjson.loads(body)["error"].startswith("request head not received within 0.5 s")
