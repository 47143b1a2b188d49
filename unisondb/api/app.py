"""``build_app``: the single route table of the HTTP API."""

from __future__ import annotations

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
from unisondb.api.errors import EXCEPTION_HANDLERS
from unisondb.api.openapi import build_openapi
from unisondb.metrics import Metrics
from unisondb.storage.engine import Engine

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
    return kv.json_response({"status": "ok", "namespaces": sorted(engines)})


async def metrics_endpoint(request: Request) -> Response:
    metrics: Metrics = request.app.state.metrics
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)


async def openapi(request: Request) -> Response:
    return Response(orjson.dumps(request.app.state.openapi), media_type="application/json")


def routes() -> list[Route]:
    from unisondb.api import backup

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


def build_app(engines: dict[str, Engine], metrics: Metrics, *, data_dir: str = ".",
              max_body_bytes: int = 1 << 20) -> ASGIApp:
    app = Starlette(routes=routes(), exception_handlers=dict(EXCEPTION_HANDLERS))
    # No 307 "add/remove a trailing slash" redirects: an API client gets a JSON 404.
    app.router.redirect_slashes = False
    app.state.engines = engines
    app.state.metrics = metrics
    app.state.max_body_bytes = max_body_bytes
    app.state.data_dir = data_dir
    app.state.openapi = build_openapi(max_body_bytes)
    return RequestMetrics(app, metrics)
