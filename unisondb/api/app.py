"""``build_app``: the single route table of the HTTP API."""

from __future__ import annotations

import asyncio
import base64
import binascii
import time
from collections.abc import Mapping
from typing import Any

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.convertors import PathConvertor, register_url_convertor
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from unisondb.api import kv
from unisondb.api.auth import BearerAuth, TokenTable
from unisondb.api.errors import EXCEPTION_HANDLERS
from unisondb.api.openapi import build_openapi
from unisondb.api.parsing import decode_key_segment
from unisondb.errors import InvalidRequest, UnisonDBError
from unisondb.lifecycle import Shutdown
from unisondb.metrics import Metrics
from unisondb.storage.engine import Engine
from unisondb.storage.record import Entry, EntryKind

NS = "/api/v1/{namespace}"


class _KeyConvertor(PathConvertor):
    """``{key:key}``: any characters, newlines included (Starlette's ``path`` stops at one).

    The handlers read the key from the raw, still percent-encoded path (so ``%2F`` stays
    inside the key); this only decides that the route matches.
    """

    regex = "(?s:.*)"


register_url_convertor("key", _KeyConvertor())


async def health(request: Request) -> Response:
    engines: Mapping[str, Engine] = request.app.state.engines
    body: dict[str, Any] = {"status": "ok", "namespaces": sorted(engines)}
    if (service := request.app.state.archive) is not None:
        body["archive"] = service.health()
    return kv.json_response(body)


async def metrics_endpoint(request: Request) -> Response:
    metrics: Metrics = request.app.state.metrics
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)


async def openapi(request: Request) -> Response:
    return Response(kv.json_bytes(request.app.state.openapi), media_type="application/json")


def routes() -> list[Route]:
    from unisondb.api import archive, backup

    return [
        Route("/health", health, methods=["GET"]),
        Route("/healthz", health, methods=["GET"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
        # The batch route comes first so POST .../kv/batch is a batch; GET/PUT/DELETE of
        # a key named "batch" still reach the key routes (Starlette keeps looking for a
        # route whose method matches).
        Route(f"{NS}/kv/batch", kv.batch_kv, methods=["POST"]),
        Route(f"{NS}/kv/{{key:key}}", kv.get_kv, methods=["GET"]),
        Route(f"{NS}/kv/{{key:key}}", kv.put_kv, methods=["PUT"]),
        Route(f"{NS}/kv/{{key:key}}", kv.delete_kv, methods=["DELETE"]),
        Route(f"{NS}/offset", kv.get_offset, methods=["GET"]),
        Route(f"{NS}/stats", kv.get_stats, methods=["GET"]),
        Route(f"{NS}/checkpoint", kv.get_checkpoint, methods=["GET"]),
        *backup.routes(NS),
        *archive.routes(NS),
    ]


class RequestMetrics:
    """ASGI middleware: count and time every request by route (endpoint name) and status."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics
        # Bound label children, cached: ``labels()`` is a dict lookup plus locking per call.
        self._counters: dict[tuple[str, str, int], Any] = {}
        self._histograms: dict[str, Any] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            endpoint = scope.get("endpoint")
            route = getattr(endpoint, "__name__", "unmatched")
            key = (route, scope["method"], status)
            counter = self._counters.get(key)
            if counter is None:
                counter = self.metrics.http_requests.labels(route, scope["method"], str(status))
                self._counters[key] = counter
            counter.inc()
            hist = self._histograms.get(route)
            if hist is None:
                hist = self._histograms[route] = self.metrics.http_latency.labels(route)
            hist.observe(time.perf_counter() - started)


class KvFastPath:
    """``GET`` and ``PUT /api/v1/{ns}/kv/{key}`` without Starlette's router and middleware.

    These are the hottest routes, and most of their cost is per-request framework overhead
    (the LMDB lookup is ~2 % of a GET). This answers only the plain success case: a served
    namespace, a valid key and, for PUT, a well-formed body within the limit. Anything else
    is handed to the full app (with the body replayed), so there is still exactly one
    place that shapes input errors. Errors of the write itself (after the engine took it)
    are answered here with the shared error envelope, never retried through the slow path.
    """

    _HEADERS = [(b"content-type", b"application/json")]
    _PUT_OK = kv.json_bytes({"success": True})

    def __init__(self, app: ASGIApp, engines: Mapping[str, Engine], max_body_bytes: int) -> None:
        self.app = app
        self.engines = engines
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        method = scope.get("method")
        if scope["type"] == "http" and method in ("GET", "PUT"):
            parts = (scope.get("raw_path") or scope["path"].encode()).split(b"/")
            # [b"", b"api", b"v1", ns, b"kv", key]
            if (
                len(parts) == 6
                and parts[4] == b"kv"
                and parts[1] == b"api"
                and parts[2] == b"v1"
                and parts[5]
            ):
                engine = self.engines.get(parts[3].decode("latin-1"))
                key = _fast_key(parts[5]) if engine is not None else b""
                if engine is not None and key:
                    if method == "GET":
                        try:
                            body = kv.get_body(engine.get(key))
                        except Exception:  # let the full app raise it again and shape the 500
                            await self.app(scope, receive, send)
                            return
                        scope["endpoint"] = kv.get_kv  # the same metrics label as the slow path
                        await self._send(send, 200, body)
                        return
                    await self._put(engine, key, scope, receive, send)
                    return
        await self.app(scope, receive, send)

    async def _put(self, engine: Engine, key: bytes, scope: Scope, receive: Receive, send: Send) -> None:
        for name, raw in scope["headers"]:
            if name == b"content-length" and (not raw.isdigit() or int(raw) > self.max_body_bytes):
                # Refused on the header alone, before a byte of the body is read.
                await self.app(scope, receive, send)
                return
        body, complete = await _read_body(receive, self.max_body_bytes)
        value = _fast_value(body) if complete else None
        if value is None:
            await self.app(scope, _replay(body, complete, receive), send)
            return
        scope["endpoint"] = kv.put_kv
        try:
            await asyncio.wrap_future(engine.submit([Entry(EntryKind.PUT, key, value)]))
        except UnisonDBError as exc:
            await self._send(send, exc.http_status, kv.json_bytes({"error": exc.message}))
            return
        await self._send(send, 200, self._PUT_OK)

    async def _send(self, send: Send, status: int, body: bytes) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [*self._HEADERS, (b"content-length", b"%d" % len(body))],
            }
        )
        await send({"type": "http.response.body", "body": body})


def _fast_key(segment: bytes) -> bytes:
    try:
        return decode_key_segment(segment)
    except InvalidRequest:
        return b""  # the full app answers with the precise error


def _fast_value(body: bytes) -> bytes | None:
    """The decoded value of a well-formed ``{"value": "<base64>"}`` body, else None."""
    try:
        obj = orjson.loads(body)
        return base64.b64decode(obj["value"], validate=True)
    except (orjson.JSONDecodeError, TypeError, KeyError, ValueError, binascii.Error):
        return None


async def _read_body(receive: Receive, limit: int) -> tuple[bytes, bool]:
    """Read up to ``limit`` bytes; (body so far, True if that is the whole body)."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks), False
        chunk = message.get("body", b"")
        chunks.append(chunk)
        size += len(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks), size <= limit
        if size > limit:
            return b"".join(chunks), False


def _replay(body: bytes, complete: bool, receive: Receive) -> Receive:
    """A ``receive`` that first returns what was already read, then continues the stream."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": not complete}
        return await receive()

    return replay


def build_app(
    engines: dict[str, Engine],
    metrics: Metrics,
    *,
    data_dir: str = ".",
    max_body_bytes: int = 1 << 20,
    tokens: TokenTable | None = None,
    metrics_open: bool = False,
    client_certs: bool = False,
    archive: Any = None,
    shutdown: Shutdown | None = None,
) -> ASGIApp:
    """The ASGI app: metrics around (auth around (fast path, else the routed app)).

    Auth sits in front of the fast path so both answer every token case identically; with
    no token file it is not in the chain at all.
    """
    app = Starlette(routes=routes(), exception_handlers=dict(EXCEPTION_HANDLERS))
    # No 307 "add/remove a trailing slash" redirects: an API client gets a JSON 404.
    app.router.redirect_slashes = False
    app.state.engines = engines
    app.state.metrics = metrics
    app.state.max_body_bytes = max_body_bytes
    app.state.data_dir = data_dir
    app.state.archive = archive  # an ArchiveService, or None when archiving is off
    #: Backups register with it so a shutdown can cancel them (None: never cancelled).
    app.state.shutdown = shutdown
    app.state.openapi = build_openapi(
        max_body_bytes, namespaces=list(engines), auth=tokens is not None, metrics_open=metrics_open
    )
    inner: ASGIApp = KvFastPath(app, engines, max_body_bytes)
    if tokens is not None or client_certs:  # client_certs: the protocol sets the scope key
        inner = BearerAuth(inner, tokens, metrics_open=metrics_open, client_certs=client_certs)
    return RequestMetrics(inner, metrics)
