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
    return LimitedHttpToolsProtocol


class _LimitedProtocol(HttpToolsProtocol):
    limits: HttpLimits
    lean_routes: LeanRoutes | None = None
    #: uvicorn's ``RequestResponseCycle``, or this connection's ``LeanCycle`` standing in for it.
    cycle: Any

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # uvicorn's keep-alive timer, armed after each response, is our idle timeout.
        self.timeout_keep_alive = self.limits.idle_timeout  # type: ignore[assignment]
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
        # Idle before the first request too; uvicorn cancels it on the first byte.
        self.timeout_keep_alive_task = self.loop.call_later(
            self.limits.idle_timeout, self.timeout_keep_alive_handler
        )

    def connection_lost(self, exc: Exception | None) -> None:
        if self._lean is not None and self.cycle is self._lean:
            self._lean.on_connection_lost()
        self._cancel_deadline()
        if self._write_deadline is not None:
            self._write_deadline.cancel()
            self._write_deadline = None
        super().connection_lost(exc)

    # --- reading ------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._refusing:
            # Drained and dropped; a client that keeps flooding is cut off (reset) once it
            # has sent another head's worth, so draining costs bounded time as well.
            self._drained += len(data)
            if self._drained > self.limits.max_header_bytes:
                self.transport.abort()
            return
        limit = self.limits.max_header_bytes
        if not self._in_head:
            super().data_received(data)  # body bytes (see below)
            return
        if self._head_bytes + len(data) <= limit:
            # The common case, a whole head (and maybe its body) in one read: no copy, and
            # no head deadline unless the head is still incomplete after this read (armed
            # now or at its first byte makes no difference: no time passed in between).
            self._head_bytes += len(data)
            super().data_received(data)
            if self._in_head and self._deadline is None and not self._refusing and self._head_bytes:
                self._arm(self.limits.header_timeout, self._head_timed_out)
            return
        view = memoryview(data)
        while view and not self._refusing:
            if not self._in_head:
                # Body bytes (and, for pipelined requests, possibly the start of the next
                # head: at most one read is counted late).
                super().data_received(bytes(view))
                return
            if self._deadline is None:
                self._arm(self.limits.header_timeout, self._head_timed_out)
            room = limit - self._head_bytes + 1  # one byte over the limit is enough to know
            part, view = view[:room], view[room:]
            self._head_bytes += len(part)
            super().data_received(bytes(part))
            if self._in_head and self._head_bytes > limit and not self._refusing:
                self._refuse(431, f"request head too large: over {limit} bytes of request line and headers")

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        if len(self.url) > self.limits.max_request_line:
            self._refusal = (414, f"request target too long: over {self.limits.max_request_line} bytes")
            raise _Refused

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        if self._header_count > self.limits.max_headers:
            self._refusal = (431, f"too many header fields: over {self.limits.max_headers}")
            raise _Refused
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_bytes = 0
        self._header_count = 0
        self._cancel_deadline()
        if self._lean is not None and self._lean.start():
            if self._lean.reading_body():
                self._arm(self.limits.body_timeout, self._body_timed_out)
            return
        queued = len(self.pipeline)
        super().on_headers_complete()
        # A pipelined request waits (reading paused) until the one before it is answered;
        # its body deadline starts when it does (see on_response_complete).
        if len(self.pipeline) == queued and self.cycle is not None:
            self._arm(self.limits.body_timeout, self._body_timed_out)

    def on_body(self, body: bytes) -> None:
        if self._lean is not None and self.cycle is self._lean:
            if self._lean.reading:
                self._lean.on_body(body)
        else:
            super().on_body(body)

    def on_message_complete(self) -> None:
        lean = self._lean is not None and self.cycle is self._lean and self._lean.reading
        if not lean:
            super().on_message_complete()
        self._in_head = True
        self._cancel_deadline()
        if lean:
            assert self._lean is not None
            self._lean.on_message_complete()

    def on_response_complete(self) -> None:
        had_queued = bool(self.pipeline)
        super().on_response_complete()
        if had_queued and not self.pipeline and self.cycle is not None and self.cycle.more_body:
            self._arm(self.limits.body_timeout, self._body_timed_out)

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
        self._unset_keepalive_if_required()
        self.transport.write(error_bytes(status, message, extra))
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(_LINGER, self.transport.close)
