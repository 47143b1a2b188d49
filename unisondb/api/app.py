"""``build_app``: the single route table of the HTTP API."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.convertors import PathConvertor, register_url_convertor
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from unisondb.api import kv
from unisondb.api.auth import BearerAuth, TokenTable
from unisondb.api.errors import (
    EXCEPTION_HANDLERS,
    TIMED_OUT_SCOPE_KEY,
    disconnect_status,
    error_body,
    error_status,
)
from unisondb.api.lean import LeanRoutes
from unisondb.api.openapi import build_openapi
from unisondb.api.parsing import decode_key_segment, put_value, read_body_from
from unisondb.errors import InvalidRequest
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


def health_body(engines: Mapping[str, Engine], archive: Any) -> bytes:
    """The body of ``GET /health``: the routed app's and the lean path's."""
    body: dict[str, Any] = {"status": "ok", "namespaces": sorted(engines)}
    if archive is not None:
        body["archive"] = archive.health()
    return kv.json_bytes(body)


async def health(request: Request) -> Response:
    return Response(
        health_body(request.app.state.engines, request.app.state.archive), media_type="application/json"
    )


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
        self.lean: LeanRoutes | None = None  # set by build_app

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
            self.record(getattr(endpoint, "__name__", "unmatched"), scope["method"], status, started)

    def record(self, route: str, method: str, status: int, started: float) -> None:
        """Count one request and time it since ``started`` (``perf_counter``); the lean
        path (``api/lean.py``) records into the same ``metrics.requests`` directly."""
        self.metrics.requests.record(route, method, status, time.perf_counter() - started)


class KvFastPath:
    """``GET`` and ``PUT /api/v1/{ns}/kv/{key}`` without Starlette's router and middleware.

    These are the hottest routes, and most of their cost is per-request framework overhead
    (the LMDB lookup is ~2 % of a GET). This takes only a served namespace and a valid key
    (anything else is the full app's); the body is read, parsed and refused by the same
    functions as the full app's (``parsing.read_body_from``, ``parsing.put_value``,
    ``errors.error_status``), so both answer every case alike. With ``--http-lean on`` the
    protocol answers most of these before ASGI (``api/lean.py``); this still serves the
    rest (pipelined requests, chunked bodies, ``Expect``, HTTP/1.0).
    """

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
                        await _send(send, 200, body)
                        return
                    scope["endpoint"] = kv.put_kv
                    await self._put(engine, key, scope, receive, send)
                    return
        await self.app(scope, receive, send)

    async def _put(self, engine: Engine, key: bytes, scope: Scope, receive: Receive, send: Send) -> None:
        declared = None
        for name, raw in scope["headers"]:
            if name == b"content-length":  # the first one, as Starlette's headers.get
                declared = raw.decode("latin-1")
                break
        try:
            value = put_value(await read_body_from(receive, declared, self.max_body_bytes))
            await asyncio.wrap_future(engine.submit([Entry(EntryKind.PUT, key, value)]))
        except ClientDisconnect:
            status, message = disconnect_status(bool(scope.get(TIMED_OUT_SCOPE_KEY)), "PUT", scope["path"])
        except Exception as exc:
            status, message = error_status(exc, scope["path"])
        else:
            await _send(send, 200, _SUCCESS)
            return
        await _send(send, status, error_body(message))


_SUCCESS = kv.json_bytes({"success": True})


async def _send(send: Send, status: int, body: bytes) -> None:
    """A JSON response with the full app's headers, in its order (Starlette's ``Response``)."""
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-length", b"%d" % len(body)), (b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _fast_key(segment: bytes) -> bytes:
    try:
        return decode_key_segment(segment)
    except InvalidRequest:
        return b""  # the full app answers with the precise error


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
) -> RequestMetrics:
    """The ASGI app: metrics around (auth around (fast path, else the routed app)).

    Auth sits in front of the fast path so both answer every token case identically; with
    no token file it is not in the chain at all. ``.lean`` is the lean path over the same
    engines, guard and metrics, for the protocol (``--http-lean on``).
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
    auth = None
    if tokens is not None or client_certs:  # client_certs: the protocol sets the scope key
        inner = auth = BearerAuth(inner, tokens, metrics_open=metrics_open, client_certs=client_certs)
    outer = RequestMetrics(inner, metrics)
    outer.lean = LeanRoutes(
        engines,
        metrics.requests.record,
        max_body_bytes,
        auth.check if auth is not None else None,
        lambda: health_body(engines, archive),
    )
    return outer
