"""The one place where errors become HTTP responses: ``{"error": "<message>"}``.

UnisonDB errors carry their own ``http_status``. Starlette's own HTTP exceptions (unknown
route → 404, wrong method → 405) get the same JSON envelope. Anything else is a bug: it
is logged with its traceback and answered with 500, and the connection stays usable.
"""

from __future__ import annotations

import orjson
import structlog
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Match

from unisondb.api.protocol import TIMED_OUT_SCOPE_KEY
from unisondb.errors import UnisonDBError

log = structlog.get_logger(__name__)


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return Response(
        orjson.dumps({"error": message}) + b"\n",
        status_code=status,
        media_type="application/json",
        headers=headers,
    )


async def handle_unisondb_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, UnisonDBError)
    if exc.http_status >= 500:
        log.error("request.failed", path=request.url.path, error=str(exc))
    return error_response(exc.http_status, exc.message)


async def handle_http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        message = f"not found: {request.method} {request.url.path}"
    elif exc.status_code == 405:
        message = f"method {request.method} not allowed on {request.url.path}"
    else:
        message = str(exc.detail)
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        headers["Allow"] = ", ".join(_allowed_methods(request))
    return error_response(exc.status_code, message, headers)


def _allowed_methods(request: Request) -> list[str]:
    """Every method some route serves on this path.

    Starlette's own 405 names only the methods of the first route whose path matched;
    GET/PUT/DELETE of a key are three routes, so that ``Allow`` header would be wrong.
    """
    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches(request.scope)
        if match is not Match.NONE:
            methods |= getattr(route, "methods", None) or set()
    return sorted(methods)


async def handle_client_disconnect(request: Request, exc: Exception) -> Response:
    """The client hung up (or the server timed its body out): not a bug, not a 5xx.

    Counted as 499 (nginx's "client closed request") or 408 in the request metrics; the
    response goes nowhere, the connection is gone.
    """
    if request.scope.get(TIMED_OUT_SCOPE_KEY):
        log.info("request.body_timeout", method=request.method, path=request.url.path)
        return error_response(408, "request body not received in time")
    log.info("request.client_disconnected", method=request.method, path=request.url.path)
    return error_response(499, "client closed the connection before the request was read")


async def handle_unexpected(request: Request, exc: Exception) -> Response:
    log.exception("request.bug", path=request.url.path, error=repr(exc))
    return error_response(500, f"internal error: {type(exc).__name__}")


EXCEPTION_HANDLERS = {
    UnisonDBError: handle_unisondb_error,
    HTTPException: handle_http_exception,
    ClientDisconnect: handle_client_disconnect,
    Exception: handle_unexpected,
}
