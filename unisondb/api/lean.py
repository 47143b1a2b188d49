"""The lean HTTP path: the hot routes answered inside the HTTP protocol, without ASGI.

``GET``/``PUT``/``DELETE /api/v1/{ns}/kv/{key}`` and ``GET /health`` (``/healthz``). Through
uvicorn and the ASGI app each request costs a task, an ``asyncio.Event``, a cycle object,
four ASGI messages and two ``transport.write`` calls before and after the handler; here
the protocol's parser callbacks (``api/protocol.py``) call ``LeanCycle`` directly and the
response is one ``transport.write`` of head and body. Behind ``--http-lean on|off``.

A request is taken only when it can be answered exactly as the full app would answer it
(same status, headers and body: ``tests/integration/test_http_lean.py`` compares them byte
for byte); every other request goes to the full app before any of its body is read:

- the target is exactly ``/api/v1/<served namespace>/kv/<one valid key segment>`` (ASCII,
  no query), or ``/health``/``/healthz`` for GET;
- HTTP/1.1 with keep-alive, no ``Expect``, no upgrade, no earlier response of the same
  connection still outstanding (pipelining), the connection's write buffer not full;
- PUT: exactly one Content-Length, within ``max_body_bytes``, and no Transfer-Encoding;
  GET and DELETE: no body at all;
- with authentication on, the one guard (``api/auth.py`` ``BearerAuth.check``) admits it;
  a refusal is the full app's to give;
- for GET, the lookup succeeded (an engine error is raised again, and shaped, by the full app).

After that, errors are shaped by the functions the full app uses: a malformed PUT body by
``parsing.put_value``, a refused write (507 disk full, 503 closing) by
``errors.error_status``. Every request is counted in the same metrics with the same labels
(``RequestMetrics.record``). The limits of ``api/protocol.py`` (head size, header count,
request line, idle/head/body/write deadlines, connection count) run before and around
this, exactly as for the full app.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from typing import Any, Protocol
from urllib.parse import unquote

from uvicorn.protocols.http.httptools_impl import STATUS_LINE

from unisondb.api import kv
from unisondb.api.errors import disconnect_status, error_body, error_status
from unisondb.api.parsing import decode_key_segment, put_value
from unisondb.errors import InvalidRequest
from unisondb.storage.engine import Engine
from unisondb.storage.record import MAX_KEY, Entry, EntryKind

GET, PUT, DELETE, HEALTH = 1, 2, 3, 4
#: (metrics route label, method) of each kind: the full app's endpoint names.
_LABELS = {
    GET: ("get_kv", "GET"),
    PUT: ("put_kv", "PUT"),
    DELETE: ("delete_kv", "DELETE"),
    HEALTH: ("health", "GET"),
}
_KINDS = {b"GET": GET, b"PUT": PUT, b"DELETE": DELETE}
_HEALTH_PATHS = frozenset({b"/health", b"/healthz"})
#: ``/api/v1/<ns>/kv/<segment>``: a served namespace (none holds a "/", "?" or "%", and the
#: engines dict decides), then exactly one non-empty ASCII path segment, no query or
#: fragment. ``_PLAIN_KV``: a segment that is the key as it stands (no "%", at most
#: MAX_KEY bytes); anything else of ``_KV`` is percent-decoded and checked. One regex
#: instead of ``b"/" in segment`` and the like: each such test on ``bytes`` first tries
#: the operand as an int and clears a TypeError (0.14 µs apiece; the five were 1.5 µs
#: of the old matcher, the two regexes take 0.65).
_PLAIN_KV = re.compile(rb"/api/v1/([^/]+)/kv/([^/?#%%\x80-\xff]{1,%d})" % MAX_KEY).fullmatch
_KV = re.compile(rb"/api/v1/([^/]+)/kv/([^/?#\x80-\xff]+)").fullmatch
_SUCCESS = kv.json_bytes({"success": True})
#: What follows the date in every response head, in the full app's order (Starlette's
#: ``Response`` puts content-length before content-type).
_RESPONSE = b"%s%scontent-length: %d\r\ncontent-type: application/json\r\n%s\r\n%s"
_CLOSE = b"connection: close\r\n"

#: (route label, method, status, seconds since the head was read) → counted and timed
#: (``metrics.RequestStats.record``, which the full app's ``RequestMetrics`` calls too).
Recorder = Callable[[str, str, int, float], None]
#: The scope → None (admitted) or a refusal; ``BearerAuth.check``.
AuthCheck = Callable[[Any], object]


class Host(Protocol):
    """What ``LeanCycle`` needs of the protocol (``api/protocol.py`` ``_LimitedProtocol``)."""

    transport: asyncio.Transport
    loop: asyncio.AbstractEventLoop
    parser: Any
    url: bytes
    headers: list[tuple[bytes, bytes]]
    cycle: Any
    flow: Any
    expect_100_continue: bool
    server_state: Any

    def on_response_complete(self) -> None: ...

    def _build_scope(self) -> Any:
        """The ASGI scope of the head just read (built only when needed)."""


class LeanRoutes:
    """The server-wide part: which requests are lean, and what they need to be answered."""

    def __init__(
        self,
        engines: dict[str, Engine],
        record: Recorder,
        max_body_bytes: int,
        auth: AuthCheck | None,
        health_body: Callable[[], bytes],
    ) -> None:
        self.engines = {name.encode("ascii"): eng for name, eng in engines.items()}
        self.record = record
        self.max_body_bytes = max_body_bytes
        self.auth = auth
        self.health_body = health_body
        self._date_of: object = None  # uvicorn's default_headers list the bytes below are of
        self._date = b""

    def match(
        self, method: bytes, url: bytes, headers: list[tuple[bytes, bytes]], host: Host
    ) -> tuple[int, Engine | None, bytes] | None:
        """(kind, engine, key) if this request is the lean path's to answer, else None."""
        kind = _KINDS.get(method)
        if kind is None:
            return None
        engine: Engine | None = None
        key = b""
        target = _PLAIN_KV(url)
        if target is not None:
            ns, key = target.groups()  # decode_key_segment would return the segment as is
        elif (target := _KV(url)) is not None:
            ns, segment = target.groups()
            try:
                key = decode_key_segment(segment)
            except InvalidRequest:
                return None  # the full app words the error
        elif kind == GET and url in _HEALTH_PATHS:
            kind = HEALTH
        else:
            return None
        if target is not None:
            engine = self.engines.get(ns)
            if engine is None:
                return None
        length: bytes | None = None
        connection = False
        for name, value in headers:
            if name == b"content-length":
                if length is not None:
                    return None
                length = value
            elif name == b"transfer-encoding":
                return None
            elif name == b"connection" or name == b"proxy-connection":
                connection = True
        if kind == PUT:
            if length is None or not length.isdigit() or int(length) > self.max_body_bytes:
                return None  # chunked, missing or too large: the full app reads or refuses it
        elif length is not None and length != b"0":
            return None
        if connection:
            # Only HTTP/1.1 with keep-alive and no upgrade is lean (``LeanCycle.start``
            # checked keep-alive). llhttp sets its keep-alive and upgrade flags only from
            # Connection and Proxy-Connection (and CONNECT, never lean): without either
            # header, keep-alive means HTTP/1.1 (it accepts 0.9, 1.0, 1.1 and 2.0 only)
            # and no upgrade. So the version, a new ``str`` per call (0.33 µs), is asked
            # only here (tests/integration/test_http_lean.py has each case).
            parser = host.parser
            if parser.get_http_version() != "1.1" or parser.should_upgrade():
                return None
        if self.auth is not None and kind != HEALTH:
            scope = host._build_scope()
            scope["method"] = method.decode("ascii")
            scope["raw_path"] = url
            if self.auth(scope) is not None:
                return None
        return kind, engine, key

    def response(self, host: Host, status: int, body: bytes, close: bool) -> bytes:
        """Status line, uvicorn's default headers (the date), content-length, content-type,
        body: the whole response as one ``bytes``, built in one allocation."""
        defaults = host.server_state.default_headers
        if defaults is not self._date_of:  # uvicorn replaces the list once a second
            self._date = b"".join(b"%s: %s\r\n" % (name, value) for name, value in defaults)
            self._date_of = defaults
        return _RESPONSE % (STATUS_LINE[status], self._date, len(body), _CLOSE if close else b"", body)


class _NoEvent:
    """uvicorn's ``connection_lost`` sets the current cycle's ``message_event``."""

    @staticmethod
    def set() -> None:
        pass


_NO_EVENT = _NoEvent()


class LeanCycle:
    """One per connection, reused: stands in for uvicorn's ``RequestResponseCycle`` in
    ``protocol.cycle`` while a lean request is read and answered, so uvicorn's pipelining,
    shutdown and disconnect logic sees an ordinary outstanding response."""

    __slots__ = (
        "routes",
        "host",
        "kind",
        "engine",
        "key",
        "url",
        "body",
        "response",
        "started",
        "reading",
        "response_complete",
        "response_started",
        "disconnected",
        "keep_alive",
        "more_body",
        "message_event",
        "scope",
    )

    def __init__(self, routes: LeanRoutes, host: Host) -> None:
        self.routes = routes
        self.host = host
        self.kind = 0
        self.engine: Engine | None = None
        self.key = b""
        self.url = b""
        self.body: bytes | bytearray = b""
        self.response = b""
        self.started = 0.0
        self.reading = False
        self.response_complete = True
        self.response_started = False
        self.disconnected = False
        self.keep_alive = True
        self.more_body = False
        self.message_event = _NO_EVENT
        self.scope: Any = None

    # --- called by the protocol ------------------------------------------------------------

    def start(self) -> bool:
        """At the end of a request head: True if this request is now the lean path's."""
        host = self.host
        cycle = host.cycle
        if (
            (cycle is not None and not cycle.response_complete)
            or host.expect_100_continue
            or host.flow.write_paused
        ):
            return False
        parser = host.parser
        if not parser.should_keep_alive():  # (version and upgrade: see LeanRoutes.match)
            return False
        routes = self.routes
        url = host.url
        matched = routes.match(parser.get_method(), url, host.headers, host)
        if matched is None:
            return False
        started = time.perf_counter()
        kind, engine, key = matched
        if kind == GET:
            try:
                assert engine is not None
                self.response = kv.get_body(engine.get(key))
            except Exception:  # the full app does it again and shapes the error
                return False
        elif kind == HEALTH:
            try:
                self.response = routes.health_body()
            except Exception:
                return False
        else:
            self.body = b""
        self.kind, self.engine, self.key, self.url, self.started = kind, engine, key, url, started
        self.reading = True
        self.response_complete = self.response_started = self.disconnected = False
        self.keep_alive = True
        host.cycle = self
        return True

    def reading_body(self) -> bool:
        """A body is still to come (the protocol arms the body deadline)."""
        return self.reading and self.kind == PUT

    def on_body(self, chunk: bytes) -> None:
        # Bounded: the Content-Length was checked against max_body_bytes, and the parser
        # delivers no more than it says.
        if not self.body:
            self.body = chunk
        elif isinstance(self.body, bytearray):
            self.body += chunk
        else:
            self.body = bytearray(self.body) + chunk

    def on_message_complete(self) -> None:
        self.reading = False
        kind = self.kind
        if kind == GET or kind == HEALTH:
            self.respond(200, self.response)
            return
        if kind == PUT:
            try:
                value = put_value(bytes(self.body) if isinstance(self.body, bytearray) else self.body)
            except InvalidRequest as exc:
                self.respond(exc.http_status, error_body(exc.message))
                return
            self.body = b""
            entry = Entry(EntryKind.PUT, self.key, value)
        else:
            entry = Entry(EntryKind.DELETE, self.key)
        assert self.engine is not None
        try:
            # Answered on this loop, one wake-up per group commit (Engine.submit_async).
            future = self.engine.submit_async([entry], self.host.loop)
        except Exception as exc:
            self._failed(exc)
            return
        future.add_done_callback(self._written)

    def on_body_timeout(self) -> None:
        """The body did not arrive in time: counted as the full app counts it (the protocol
        sends the 408 itself)."""
        self._gone(timed_out=True)

    def on_connection_lost(self) -> None:
        if self.reading:
            self._gone(timed_out=False)

    # --- answering -------------------------------------------------------------------------

    def respond(self, status: int, body: bytes) -> None:
        host = self.host
        self.response_complete = True
        transport = host.transport
        if not transport.is_closing():
            close = not self.keep_alive  # a graceful shutdown began while the write was out
            transport.write(self.routes.response(host, status, body, close))
            if close:
                transport.close()
        route, method = _LABELS[self.kind]
        self.routes.record(route, method, status, time.perf_counter() - self.started)
        host.on_response_complete()

    def _written(self, future: asyncio.Future[int]) -> None:
        exc = future.exception()
        if exc is not None:
            self._failed(exc)
        else:
            self.respond(200, _SUCCESS)

    def _failed(self, exc: BaseException) -> None:
        status, message = error_status(exc, self._path())
        self.respond(status, error_body(message))

    def _gone(self, timed_out: bool) -> None:
        self.reading = False
        self.response_complete = True
        route, method = _LABELS[self.kind]
        status, _ = disconnect_status(timed_out, method, self._path())
        self.routes.record(route, method, status, time.perf_counter() - self.started)

    def _path(self) -> str:
        """The request path as the full app logs it (uvicorn's ``scope["path"]``)."""
        return unquote(self.url.decode("ascii"))
