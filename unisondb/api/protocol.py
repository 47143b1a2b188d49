"""uvicorn's httptools protocol with the limits it lacks, so one client costs bounded memory.

What uvicorn 0.5x + httptools enforce by themselves (read from their source): nothing on
the request head — llhttp has no header size or count limit and httptools keeps appending
a header's bytes to a Python ``bytes`` (quadratic copying: a 256 MiB header took 524 MiB
of RSS and stalled every other client for seconds) — no timeout before the first request
of a connection nor while a head or body trickles in (``timeout_keep_alive`` only runs
*between* requests), and ``limit_concurrency`` answers a plain-text 503 only after
reading the whole head. The request body is already bounded: uvicorn stops reading above
64 KiB that the app has not consumed, and the app refuses more than ``max_body_bytes``.

``limited_protocol(limits)`` returns a subclass that adds, per connection:

- head bytes (request line + headers) over ``max_header_bytes`` → 431, counted *before*
  the bytes reach the parser (a read is split at the limit), so the parser never holds
  more than the limit; more than ``max_headers`` fields → 431; a request target over
  ``max_request_line`` → 414;
- an idle timeout from the moment the connection is accepted (uvicorn arms its keep-alive
  timer only after a first response), a head deadline from the head's first byte, a body
  deadline from the end of the head (→ 408), and a write deadline while the client does
  not read what we send;
- beyond ``max_connections`` open connections: 503 ``Retry-After: 1`` at once, without
  reading the request and without reaching the app.

Every refusal is the API's JSON envelope ``{"error": "..."}`` with ``Connection: close``.
After it the connection is half-closed and whatever the client still sends is read and
dropped for at most ``_LINGER`` seconds and ``max_header_bytes`` bytes — closing with
unread data would make the kernel send a reset, and the client would then often never see
the response; a client still sending after that is reset.

A body deadline that fires while the app is reading marks the scope
(``TIMED_OUT_SCOPE_KEY``) so the app counts the request as 408, not as a disconnect.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from unisondb.api.errors import TIMED_OUT_SCOPE_KEY, error_body
from unisondb.config import HttpLimits

if TYPE_CHECKING:
    from unisondb.api.lean import LeanCycle, LeanRoutes

#: Seconds a refused connection is drained before it is closed.
_LINGER = 1.0
_REASONS = {
    408: "Request Timeout",
    414: "URI Too Long",
    431: "Request Header Fields Too Large",
    400: "Bad Request",
    503: "Service Unavailable",
}


class _Refused(Exception):
    """Raised inside a parser callback to stop parsing; ``self._refusal`` says why."""


def error_bytes(status: int, message: str, extra: tuple[tuple[str, str], ...] = ()) -> bytes:
    """A complete HTTP/1.1 error response in the API's envelope, closing the connection."""
    body = error_body(message)
    head = [
        f"HTTP/1.1 {status} {_REASONS.get(status, '')}".rstrip(),
        "content-type: application/json",
        f"content-length: {len(body)}",
        "connection: close",
        *(f"{k}: {v}" for k, v in extra),
    ]
    return ("\r\n".join(head) + "\r\n\r\n").encode("ascii") + body


def limited_protocol(limits: HttpLimits, lean: LeanRoutes | None = None) -> type[asyncio.Protocol]:
    """The protocol class for ``uvicorn.Config(http=...)``, bound to ``limits``; with
    ``lean``, the hot routes are answered by ``api/lean.py`` without the ASGI app."""

    class LimitedHttpToolsProtocol(_LimitedProtocol):
        pass

    LimitedHttpToolsProtocol.limits = limits
    LimitedHttpToolsProtocol.lean_routes = lean
    # Read on every request: plain class attributes, not ``self.limits.x`` lookups.
    LimitedHttpToolsProtocol._max_headers = limits.max_headers
    LimitedHttpToolsProtocol._max_request_line = limits.max_request_line
    LimitedHttpToolsProtocol._max_header_bytes = limits.max_header_bytes
    LimitedHttpToolsProtocol._idle_timeout = limits.idle_timeout
    return LimitedHttpToolsProtocol


class _LimitedProtocol(HttpToolsProtocol):
    limits: HttpLimits
    lean_routes: LeanRoutes | None = None
    _max_headers: int
    _max_request_line: int
    _max_header_bytes: int
    _idle_timeout: float
    #: uvicorn's ``RequestResponseCycle``, or this connection's ``LeanCycle`` standing in for it.
    cycle: Any
    #: uvicorn's scope, built by ``_build_scope`` only for a request that goes to the ASGI
    #: app (or the auth guard); None while a head is read and for lean requests.
    scope: Any

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # The idle timeout replaces uvicorn's keep-alive timer (never armed here): one timer
        # per connection that re-checks ``_idle_since`` when it fires, instead of a timer
        # armed after every response and cancelled by the next request's first byte.
        self.timeout_keep_alive = self.limits.idle_timeout  # type: ignore[assignment]
        self._idle = False  # no request in flight and none being read
        self._idle_since = 0.0
        self._idle_timer: asyncio.TimerHandle | None = None
        self._body_pending = False  # a lean PUT's body is still to come (deadline not armed yet)
        self._begun = False  # a request head has begun (the parser called on_message_begin)
        self._in_head = True  # between two requests' heads' ends, i.e. reading a head
        self._head_bytes = 0
        self._header_count = 0
        self._refusal: tuple[int, str] | None = None
        self._refusing = False
        self._drained = 0
        self._deadline: asyncio.TimerHandle | None = None  # head or body deadline
        self._write_deadline: asyncio.TimerHandle | None = None
        self._lean: LeanCycle | None = None
        if self.lean_routes is not None:
            from unisondb.api.lean import LeanCycle

            self._lean = LeanCycle(self.lean_routes, self)

    # --- connection ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            # Not one of ours: uvicorn's graceful shutdown need not wait for it.
            self.connections.discard(self)
            self._refuse(
                503,
                f"too many connections (limit {self.limits.max_connections}); retry later",
                (("retry-after", "1"),),
            )
            return
        # Idle before the first request too.
        self._become_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._lean is not None and self.cycle is self._lean:
            self._lean.on_connection_lost()
        self._cancel_deadline()
        self._idle = False
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        if self._write_deadline is not None:
            self._write_deadline.cancel()
            self._write_deadline = None
        super().connection_lost(exc)

    # --- reading ------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self._idle = False
        if self._refusing:
            # Drained and dropped; a client that keeps flooding is cut off (reset) once it
            # has sent another head's worth, so draining costs bounded time as well.
            self._drained += len(data)
            if self._drained > self._max_header_bytes:
                self.transport.abort()
            return
        limit = self._max_header_bytes
        if not self._in_head:
            self._feed(data)  # body bytes (see below)
        elif self._head_bytes + len(data) <= limit:
            # The common case, a whole head (and maybe its body) in one read: no copy, and
            # no head deadline unless the head is still incomplete after this read (armed
            # now or at its first byte makes no difference: no time passed in between).
            self._head_bytes += len(data)
            try:  # _feed, inline: one Python call less per request
                self.parser.feed_data(data)
            except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
                self._feed_failed(exc)
            if (
                self._in_head
                and self._deadline is None
                and not self._refusing
                and (self._head_bytes or self._begun)
            ):
                self._arm(self.limits.header_timeout, self._head_timed_out)
        else:
            self._feed_split(data, limit)
        if self._body_pending and self._deadline is None and not self._refusing:
            # A lean PUT whose body did not come with its head: from the end of the head
            # (this read) the body deadline runs.
            self._arm(self.limits.body_timeout, self._body_timed_out)

    def _feed_split(self, data: bytes, limit: int) -> None:
        view = memoryview(data)
        while view and not self._refusing:
            if not self._in_head:
                # Body bytes (and, for pipelined requests, possibly the start of the next
                # head: at most one read is counted late).
                self._feed(bytes(view))
                return
            if self._deadline is None:
                self._arm(self.limits.header_timeout, self._head_timed_out)
            room = limit - self._head_bytes + 1  # one byte over the limit is enough to know
            part, view = view[:room], view[room:]
            self._head_bytes += len(part)
            self._feed(bytes(part))
            if self._in_head and self._head_bytes > limit and not self._refusing:
                self._refuse(431, f"request head too large: over {limit} bytes of request line and headers")

    def _feed(self, data: bytes) -> None:
        """uvicorn's ``data_received`` without its keep-alive timer (see ``__init__``)."""
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            self._feed_failed(exc)

    def _feed_failed(self, exc: Exception) -> None:
        if isinstance(exc, httptools.HttpParserUpgrade):
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        msg = "Invalid HTTP request received."
        self.logger.warning(msg)
        self.send_400_response(msg)

    def on_message_begin(self) -> None:
        # uvicorn's, less the scope: most requests are lean and never need one.
        self._idle = False  # a pipelined request, parsed from a read that began idle
        self._begun = True
        self.url = b""
        self.expect_100_continue = False
        self.headers = []
        self.scope = None

    def _build_scope(self) -> Any:
        """uvicorn's request scope for the head just read (its ``on_message_begin``, after
        the fact), for a request that goes to the ASGI app or the auth guard."""
        url, headers, expect = self.url, self.headers, self.expect_100_continue
        HttpToolsProtocol.on_message_begin(self)
        self.url, self.headers, self.expect_100_continue = url, headers, expect
        self.scope["headers"] = headers
        return self.scope

    def on_url(self, url: bytes) -> None:
        url = self.url + url
        self.url = url
        if len(url) > self._max_request_line:
            self._refusal = (414, f"request target too long: over {self._max_request_line} bytes")
            raise _Refused

    def on_header(self, name: bytes, value: bytes) -> None:
        # uvicorn's, with the count limit, in one call.
        count = self._header_count + 1
        self._header_count = count
        if count > self._max_headers:
            self._refusal = (431, f"too many header fields: over {self._max_headers}")
            raise _Refused
        name = name.lower()
        if name == b"expect" and value.lower() == b"100-continue":
            self.expect_100_continue = True
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._begun = False
        self._head_bytes = 0
        self._header_count = 0
        if self._deadline is not None:
            self._cancel_deadline()
        lean = self._lean
        if lean is not None and lean.start():
            # The body deadline is armed only if the body does not come in this read.
            self._body_pending = lean.reading_body()
            return
        if self.scope is None:
            self._build_scope()
        queued = len(self.pipeline)
        super().on_headers_complete()
        # A pipelined request waits (reading paused) until the one before it is answered;
        # its body deadline starts when it does (see on_response_complete).
        if len(self.pipeline) == queued and self.cycle is not None:
            self._arm(self.limits.body_timeout, self._body_timed_out)

    def on_body(self, body: bytes) -> None:
        lean = self._lean
        if lean is not None and self.cycle is lean:
            if lean.reading:
                lean.on_body(body)
        else:
            super().on_body(body)

    def on_message_complete(self) -> None:
        lean = self._lean
        if lean is not None and self.cycle is lean and lean.reading:
            self._in_head = True
            self._body_pending = False
            if self._deadline is not None:
                self._cancel_deadline()
            lean.on_message_complete()
            return
        super().on_message_complete()
        self._in_head = True
        self._cancel_deadline()
        cycle = self.cycle
        if cycle is not None and cycle.response_complete and not self.pipeline:
            self._become_idle()  # answered before its body was read: idle from now

    def on_response_complete(self) -> None:
        # uvicorn's, with the idle timeout of ``_become_idle`` for its keep-alive timer.
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        flow = self.flow
        if flow.read_paused:
            flow.resume_reading()
        if self.pipeline:
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
            if not self.pipeline and cycle.more_body:
                self._arm(self.limits.body_timeout, self._body_timed_out)
        elif self._in_head and not self._head_bytes:
            # Nothing of a next request read yet (pipelined bytes would be parsed already).
            self._become_idle()

    def _become_idle(self) -> None:
        self._idle = True
        self._idle_since = self.loop.time()
        if self._idle_timer is None:
            self._idle_timer = self.loop.call_later(self._idle_timeout, self._idle_check)

    def _idle_check(self) -> None:
        self._idle_timer = None
        if not self._idle or self.transport.is_closing():
            return  # a request came since: the next response re-arms
        left = self._idle_since + self._idle_timeout - self.loop.time()
        if left > 0.001:  # the loop's clock has millisecond steps: no re-arm for less
            self._idle_timer = self.loop.call_later(left, self._idle_check)
        else:
            self.transport.close()  # uvicorn's timeout_keep_alive_handler

    def send_400_response(self, msg: str) -> None:
        """Parser errors (and our own ``_Refused``) get the JSON envelope, not plain text."""
        status, message = self._refusal or (400, "invalid HTTP request")
        self._refuse(status, message)

    # --- writing ------------------------------------------------------------------------

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._write_deadline is None:
            # The client stopped reading our response: give it the idle timeout, then drop it.
            # abort, not close: close would wait for the very buffer that does not drain.
            self._write_deadline = self.loop.call_later(self.limits.idle_timeout, self.transport.abort)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._write_deadline is not None:
            self._write_deadline.cancel()
            self._write_deadline = None

    # --- deadlines and refusals ---------------------------------------------------------

    def _arm(self, seconds: float, callback: Any) -> None:
        self._cancel_deadline()
        self._deadline = self.loop.call_later(seconds, callback)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _head_timed_out(self) -> None:
        self._deadline = None
        self._refuse(408, f"request head not received within {self.limits.header_timeout:g} s")

    def _body_timed_out(self) -> None:
        self._deadline = None
        cycle = self.cycle
        if self._lean is not None and cycle is self._lean:
            if not self._lean.reading:
                self.transport.close()
                return
            self._lean.on_body_timeout()
            self._refuse(408, f"request body not received within {self.limits.body_timeout:g} s")
            return
        if cycle is None or cycle.response_started:
            self.transport.close()  # already answering: nothing more to say on this connection
            return
        cycle.scope[TIMED_OUT_SCOPE_KEY] = True
        # The app, waiting for more body, sees a disconnect and answers nobody.
        cycle.disconnected = True
        cycle.message_event.set()
        self._refuse(408, f"request body not received within {self.limits.body_timeout:g} s")

    def _refuse(self, status: int, message: str, extra: tuple[tuple[str, str], ...] = ()) -> None:
        """Answer ``status`` (once), half-close, drain for a moment, then close."""
        if self._refusing or self.transport.is_closing():
            return
        self._refusing = True
        self._cancel_deadline()
        self._idle = False
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        self.transport.write(error_bytes(status, message, extra))
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(_LINGER, self.transport.close)
