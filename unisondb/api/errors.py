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

from unisondb.errors import UnisonDBError

log = structlog.get_logger(__name__)

#: Set to True in a request's ASGI scope when the server timed its body out
#: (``api/protocol.py``), so the request is counted as 408, not as a disconnect.
TIMED_OUT_SCOPE_KEY = "unisondb.timed_out"


def error_body(message: str) -> bytes:
    """The body of every error response: ``{"error": "<message>"}`` and a newline."""
    return orjson.dumps({"error": message}) + b"\n"


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return Response(error_body(message), status_code=status, media_type="application/json", headers=headers)


def error_status(exc: BaseException, path: str) -> tuple[int, str]:
    """(status, message) of an exception a handler raised, logged as it deserves.

    The one mapping for the routed app, the ASGI fast path and the lean path
    (``api/lean.py``): a UnisonDB error says its own status (5xx are logged), anything
    else is a bug (logged with its traceback, 500).
    """
    if isinstance(exc, UnisonDBError):
        if exc.http_status >= 500:
            log.error("request.failed", path=path, error=str(exc))
        return exc.http_status, exc.message
    log.exception("request.bug", path=path, error=repr(exc), exc_info=exc)
    return 500, f"internal error: {type(exc).__name__}"


async def handle_unisondb_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, UnisonDBError)
    return error_response(*error_status(exc, request.url.path))


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
    timed_out = bool(request.scope.get(TIMED_OUT_SCOPE_KEY))
    return error_response(*disconnect_status(timed_out, request.method, request.url.path))


def disconnect_status(timed_out: bool, method: str, path: str) -> tuple[int, str]:
    """(status, message) of a request whose body never arrived, logged; every path's."""
    if timed_out:
        log.info("request.body_timeout", method=method, path=path)
        return 408, "request body not received in time"
    log.info("request.client_disconnected", method=method, path=path)
    return 499, "client closed the connection before the request was read"


async def handle_unexpected(request: Request, exc: Exception) -> Response:
    return error_response(*error_status(exc, request.url.path))


EXCEPTION_HANDLERS = {
    UnisonDBError: handle_unisondb_error,
    HTTPException: handle_http_exception,
    ClientDisconnect: handle_client_disconnect,
    Exception: handle_unexpected,
}
