"""The lean path inside the protocol: one write per response, the ASGI app never called.

What a client on a socket cannot see: how many ``transport.write`` calls a response took
and whether the ASGI app ran. So the real protocol class (``api/protocol.py`` with
``api/lean.py``), a real engine on real LMDB files and the real app are driven here through
a transport that records its writes — the one fake, standing in for the socket only.
(Byte-for-byte equivalence with the full app is ``tests/integration/test_http_lean.py``.)
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from uvicorn.server import ServerState

from unisondb.api import kv
from unisondb.api.app import build_app
from unisondb.api.protocol import limited_protocol
from unisondb.config import HttpLimits
from unisondb.metrics import Metrics
from unisondb.storage.engine import Engine


class RecordingTransport(asyncio.Transport):
    """Records every write; the socket's stand-in (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 5000) if name in ("sockname", "peername") else default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def can_write_eof(self) -> bool:
        return False


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    eng = Engine.open(tmp_path / "data", "users")
    yield eng
    eng.close()


def _protocol(engine: Engine, lean: bool, app_calls: list[str]) -> tuple[Any, RecordingTransport]:
    app = build_app({"users": engine}, Metrics())

    async def counting_app(scope: Any, receive: Any, send: Any) -> None:
        app_calls.append(f"{scope['method']} {scope['path']}")
        await app(scope, receive, send)

    config = uvicorn.Config(counting_app, lifespan="off", log_level="warning")
    cls = limited_protocol(HttpLimits(), app.lean if lean else None)
    state = ServerState()
    state.default_headers = [(b"date", b"Tue, 01 Dec 2026 00:00:00 GMT")]
    proto: Any = cls(config=config, server_state=state, app_state={}, _loop=asyncio.get_running_loop())  # type: ignore[call-arg]
    transport = RecordingTransport()
    proto.connection_made(transport)
    return proto, transport


async def _settle(transport: RecordingTransport, writes: int) -> None:
    """Let the loop run until ``writes`` writes happened (the engine answers on its thread)."""
    for _ in range(2000):
        if len(transport.writes) >= writes:
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"only {len(transport.writes)} writes: {transport.writes}")


REQS = [
    b'PUT /api/v1/users/kv/k HTTP/1.1\r\nHost: x\r\nContent-Length: 16\r\n\r\n{"value":"aGk="}',
    b"GET /api/v1/users/kv/k HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n",
    b"PUT /api/v1/users/kv/k HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n{bad}",
    b"DELETE /api/v1/users/kv/k HTTP/1.1\r\nHost: x\r\n\r\n",
]


def test_each_hot_request_is_one_write_and_never_reaches_the_app(engine: Engine) -> None:
    async def run() -> None:
        calls: list[str] = []
        proto, transport = _protocol(engine, True, calls)
        for n, req in enumerate(REQS, 1):
            # The body in a second read, as a slow client sends it.
            head, sep, body = req.partition(b"\r\n\r\n")
            proto.data_received(head + sep)
            if body:
                proto.data_received(body)
            await _settle(transport, n)
            assert len(transport.writes) == n, transport.writes
        assert calls == []
        assert [w.split(b"\r\n", 1)[0] for w in transport.writes] == [
            b"HTTP/1.1 200 OK",
            b"HTTP/1.1 200 OK",
            b"HTTP/1.1 200 OK",
            b"HTTP/1.1 400 Bad Request",
            b"HTTP/1.1 200 OK",
        ]
        assert transport.writes[1].endswith(b'\r\n\r\n{"value":"aGk=","found":true}\n')
        assert not transport.closed

    asyncio.run(run())


def test_with_lean_off_the_same_requests_go_through_the_app(engine: Engine) -> None:
    async def run() -> None:
        calls: list[str] = []
        proto, transport = _protocol(engine, False, calls)
        for req in REQS:
            before = len(transport.writes)
            proto.data_received(req)
            await _settle(transport, before + 2)  # uvicorn: head and body, two writes
        assert len(calls) == len(REQS)

    asyncio.run(run())


def test_a_request_pipelined_behind_a_lean_put_waits_for_it(engine: Engine) -> None:
    """The second request (sent with the first) must not be answered before the first."""

    async def run() -> None:
        calls: list[str] = []
        proto, transport = _protocol(engine, True, calls)
        proto.data_received(REQS[0] + REQS[1] + b"HEAD /api/v1/users/kv/k HTTP/1.1\r\nHost: x\r\n\r\n")
        await _settle(transport, 3)
        first = [w.split(b"\r\n", 1)[0] for w in transport.writes]
        assert transport.writes[0].endswith(b'{"success":true}\n'), first
        assert b'"found":true' in b"".join(transport.writes[1:]), transport.writes
        assert calls  # the queued ones went through the app, in order

    asyncio.run(run())


def test_a_graceful_shutdown_during_a_lean_put_closes_after_its_answer(engine: Engine) -> None:
    async def run() -> None:
        proto, transport = _protocol(engine, True, [])
        proto.data_received(REQS[0])
        proto.shutdown()  # uvicorn's graceful shutdown: the outstanding answer still goes out
        await _settle(transport, 1)
        assert b"\r\nconnection: close\r\n" in transport.writes[0] and transport.closed

    asyncio.run(run())


class TimerCountingLoop:
    """The running loop, with its ``call_later`` calls counted (a spy, not a fake: every
    call goes to the real loop)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.timers = 0

    def call_later(self, delay: float, callback: Any, *args: Any) -> asyncio.TimerHandle:
        self.timers += 1
        return self._loop.call_later(delay, callback, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loop, name)


def test_lean_requests_whole_in_one_read_arm_no_timer_each(engine: Engine) -> None:
    """One idle timer per connection, re-armed only when it fires; no head or body deadline
    for a request whose head and body come in one read (each would be a timer armed and
    cancelled per request)."""

    async def run() -> None:
        proto, transport = _protocol(engine, True, [])
        spy = TimerCountingLoop(asyncio.get_running_loop())
        proto.loop = spy
        for n in range(1, 41):
            proto.data_received(REQS[(n - 1) % len(REQS)])
            await _settle(transport, n)
        assert spy.timers == 0
        # A head alone does arm its deadline, and a body after its head the body deadline.
        proto.data_received(b"GET /health HTTP/1.1\r\n")
        assert spy.timers == 1
        proto.data_received(b"Host: x\r\n\r\n")
        head, sep, body = REQS[0].partition(b"\r\n\r\n")
        proto.data_received(head + sep)
        assert spy.timers == 2
        proto.data_received(body)
        await _settle(transport, 42)
        assert spy.timers == 2 and not transport.closed

    asyncio.run(run())


@pytest.mark.parametrize("value", [b"", b"v", b"\x00\xff" * 50, bytes(range(256)), b"x" * 100_000])
def test_the_get_body_template_is_the_json_the_full_app_would_write(value: bytes) -> None:
    assert kv.get_body(value) == kv.json_bytes({"value": base64.b64encode(value).decode(), "found": True})
    assert kv.get_body(None) == kv.json_bytes({"value": "", "found": False})


_GET = "GET /api/v1/users/kv/k HTTP/{v}\r\nHost: x\r\n{h}\r\n"


@pytest.mark.parametrize(
    ("version", "headers", "lean"),
    [
        ("1.1", "", True),
        ("1.1", "Connection: keep-alive\r\n", True),
        ("1.1", "Proxy-Connection: Keep-Alive\r\n", True),
        ("1.1", "Upgrade: websocket\r\n", True),  # no Connection: upgrade, so no upgrade
        ("1.1", "Connection: close\r\n", False),
        ("1.1", "Proxy-Connection: close\r\n", False),
        # (Connection: upgrade + Upgrade: websocket is uvicorn's WebSocket handshake, which
        # this transport cannot carry: the "get-upgrade" case of test_http_lean.py has it.)
        ("1.1", "Proxy-Connection: upgrade\r\nUpgrade: h2c\r\n", False),
        ("1.0", "", False),
        ("1.0", "Connection: keep-alive\r\n", False),
        ("1.0", "Proxy-Connection: keep-alive\r\n", False),
        ("2.0", "", False),
        ("0.9", "", False),
    ],
)
def test_only_http11_keep_alive_without_upgrade_is_lean(
    engine: Engine, version: str, headers: str, lean: bool
) -> None:
    """The matcher asks llhttp for the version only when a Connection or Proxy-Connection
    header is there (``LeanRoutes.match``): every combination still goes where it must."""

    async def run() -> None:
        calls: list[str] = []
        proto, transport = _protocol(engine, True, calls)
        proto.data_received(_GET.format(v=version, h=headers).encode())
        await _settle(transport, 1)
        for _ in range(20):  # the full app may answer in two writes: let it finish
            await asyncio.sleep(0.005)
        assert (calls == []) is lean, (calls, transport.writes)

    asyncio.run(run())
