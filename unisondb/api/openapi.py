"""The OpenAPI 3.1 description served at ``/openapi.json``.

Hand-written (the API is small and its error shapes matter more than generated
schemas), except for the input rules: backup path patterns come from
``backup/paths.py`` and key/value rules from ``api/parsing.py``, the validators the
handlers call. ``tests/integration/test_openapi.py`` checks that it names exactly the
routes the app serves, ``tests/unit/api/test_spec_agreement.py`` that its rules and the
validators agree, ``tests/integration/test_schemathesis.py`` the whole against a server.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from unisondb.api import parsing
from unisondb.backup import paths as backup_paths

#: Operations that never need a token (``api/auth.py``); /metrics joins them with
#: ``--metrics-auth none``.
_PUBLIC_PATHS = ("/health", "/healthz")
_ERROR = {"$ref": "#/components/schemas/Error"}
_NS = {"name": "namespace", "in": "path", "required": True, "schema": {"type": "string"}}
#: A key, as a JSON string and (percent-encoded) as the last path segment: the rules of
#: ``api/parsing.py`` (tests/unit/api/test_spec_agreement.py checks they agree).
_KEY_TEXT = {
    "type": "string",
    "minLength": 1,
    "format": parsing.KEY_FORMAT,
    "description": f"any non-empty text; 'format': {parsing.KEY_FORMAT_RULE}",
}
_KEY = {
    "name": "key",
    "in": "path",
    "required": True,
    "description": "the key, percent-encoded as one path segment ('/' as %2F)",
    "schema": _KEY_TEXT,
}
#: Standard base64 with padding: exactly what ``base64.b64decode(validate=True)`` accepts.
BASE64_PATTERN = r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"
#: Backup paths: the pattern is generated from the validator's own rules
#: (``backup/paths.py`` ``text_pattern``); what no pattern can state (byte limits, a '..'
#: hidden behind percent-encoding) is the ``format``, described in its text. A unit test
#: (tests/unit/api/test_spec_agreement.py) checks pattern and validator agree.
BACKUP_DIR_FORMAT = "unisondb-backup-dir"
BACKUP_FILE_FORMAT = "unisondb-backup-file"


def backup_path_schema(*, is_file: bool, description: str) -> dict[str, Any]:
    return {
        "type": "string",
        "minLength": 1,
        "pattern": backup_paths.text_pattern(is_file=is_file),
        "format": BACKUP_FILE_FORMAT if is_file else BACKUP_DIR_FORMAT,
        "description": f"{description}; rules in docs/OPERATIONS.md 'Path rules'. Beyond the "
        f"pattern ('format'): {backup_paths.FORMAT_RULES}",
    }


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict[str, Any]:
    text = {
        400: "bad input",
        401: "bearer token missing or unknown (when tokens are on)",
        403: "token role too low",
        404: "unknown namespace",
        409: "conflict",
        413: "body too large",
        500: "I/O failure",
        503: "namespace unavailable",
        507: "no space left on device",
    }
    # Authentication is optional but, when on, applies to every operation documented here
    # except /health and /healthz (which call _op with params=[] and no codes).
    return {str(c): {"description": text[c], **_json(_ERROR)} for c in (*codes, 401, 403)}


def _op(
    summary: str,
    ok: dict[str, Any],
    *errs: int,
    body: dict[str, Any] | None = None,
    params: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": summary,
        "parameters": params if params is not None else [_NS],
        "responses": {"200": {"description": "OK", **_json(ok)}, **_errors(*errs)},
    }
    if body is not None:
        op["requestBody"] = {"required": True, **_json(body)}
    return op


def _public(summary: str) -> dict[str, Any]:
    return {
        "summary": summary,
        "parameters": [],
        "responses": {"200": {"description": "OK", **_json({"$ref": "#/components/schemas/Health"})}},
    }


def build_openapi(
    max_body_bytes: int,
    *,
    namespaces: Sequence[str] = (),
    auth: bool = False,
    metrics_open: bool = False,
) -> dict[str, Any]:
    """The document for one server: its body limit, its namespaces, whether tokens are on.

    ``namespaces`` (when given) become the ``enum`` of ``{namespace}``: every other name is a
    404, so a client (or schemathesis) generating from the document reaches the handlers.
    ``auth`` declares the bearer scheme on every operation but /health and /healthz (and
    /metrics when ``metrics_open``).
    """
    obj = "object"
    success = {"type": obj, "properties": {"success": {"type": "boolean"}}}
    b64 = {"type": "string", "contentEncoding": "base64", "pattern": BASE64_PATTERN}
    key_text = _KEY_TEXT
    backup_seg = {
        "type": obj,
        "properties": {
            "segmentId": {"type": "integer"},
            "path": {"type": "string", "description": "absolute"},
            "bytes": {"type": "integer"},
            "sha256": {"type": "string"},
            "copied": {"type": "boolean", "description": "false: an identical file was already there"},
        },
    }
    key_ops: dict[str, Any] = {
        "get": _op(
            "Read a key (missing → found:false)",
            {"type": obj, "properties": {"value": b64, "found": {"type": "boolean"}}},
            400,
            404,
            params=[_NS, _KEY],
        ),
        "put": _op(
            "Write a key (durable when answered)",
            success,
            400,
            404,
            413,
            500,
            503,
            507,
            body={"type": obj, "required": ["value"], "properties": {"value": b64}},
            params=[_NS, _KEY],
        ),
        "delete": _op(
            "Delete a key (logged even if absent)", success, 400, 404, 500, 503, 507, params=[_NS, _KEY]
        ),
    }
    paths: dict[str, Any] = {
        "/health": {"get": _public("Liveness and namespaces (never needs a token)")},
        "/healthz": {"get": _public("Same as /health")},
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics (a read token unless --metrics-auth none)",
                "parameters": [],
                "responses": {"200": {"description": "Prometheus text format"}, **_errors()},
            }
        },
        "/openapi.json": {
            "get": {
                "summary": "This document",
                "parameters": [],
                "responses": {"200": {"description": "OpenAPI 3.1"}, **_errors()},
            }
        },
        "/api/v1/{namespace}/kv/{key}": key_ops,
        "/api/v1/{namespace}/kv/batch": {
            # GET/PUT/DELETE here are the key named "batch" (the {key} routes serve them);
            # listed so that the Allow header of a 405 and this document agree.
            "get": {**key_ops["get"], "summary": "Read the key named 'batch'", "parameters": [_NS]},
            "put": {**key_ops["put"], "summary": "Write the key named 'batch'", "parameters": [_NS]},
            "delete": {**key_ops["delete"], "summary": "Delete the key named 'batch'", "parameters": [_NS]},
            "post": _op(
                "Atomic batch of puts or deletes (one WAL record)",
                {"type": obj, "properties": {"success": {"type": "boolean"}, "count": {"type": "integer"}}},
                400,
                404,
                413,
                500,
                503,
                507,
                body={
                    "oneOf": [
                        {
                            "type": obj,
                            "required": ["operation", "items"],
                            "properties": {
                                "operation": {"const": "put"},
                                "items": {
                                    "type": "array",
                                    "minItems": 1,
                                    "items": {
                                        "type": obj,
                                        "required": ["key", "value"],
                                        "properties": {"key": key_text, "value": b64},
                                    },
                                },
                            },
                        },
                        {
                            "type": obj,
                            "required": ["operation", "keys"],
                            "properties": {
                                "operation": {"const": "delete"},
                                "keys": {"type": "array", "minItems": 1, "items": key_text},
                            },
                        },
                    ]
                },
            ),
        },
        "/api/v1/{namespace}/offset": {
            "get": _op(
                "Position of the last record appended",
                {
                    "type": obj,
                    "properties": {"segmentId": {"type": "integer"}, "offset": {"type": "integer"}},
                },
                404,
            )
        },
        "/api/v1/{namespace}/stats": {"get": _op("Namespace counters", {"type": obj}, 404)},
        "/api/v1/{namespace}/checkpoint": {
            "get": _op(
                "The B-tree checkpoint (last applied WAL record)",
                {
                    "type": obj,
                    "properties": {
                        **{
                            k: {"type": "integer"}
                            for k in ("recordProcessed", "segmentId", "offset", "lsn", "timeline")
                        },
                        "history": {"type": "string", "description": "history id (32 hex digits)"},
                        "fingerprint": {
                            "type": "string",
                            "description": "state fingerprint digest (64 hex digits)",
                        },
                    },
                },
                404,
            )
        },
        "/api/v1/{namespace}/backups": {
            "get": _op(
                "The backup catalog of backups/<ns>/: snapshots, and per history its lineage, WAL "
                "coverage, holes, recorded fingerprints and restorable window (as unisondb "
                "backup list --json)",
                {
                    "type": obj,
                    "properties": {
                        "snapshots": {"type": "array"},
                        "wal": {"type": "object"},
                        "problems": {"type": "array", "items": {"type": "string"}},
                    },
                },
                404,
            )
        },
        "/api/v1/{namespace}/wal/backup": {
            "post": _op(
                "Copy sealed WAL segments with id > afterSegmentId into backups/<ns>/<backupDir> "
                "(each with a .sha256 sidecar); 409 if afterSegmentId points before the oldest "
                "segment still on disk (deleted by retention) or a same-named file differs",
                {"type": obj, "properties": {"backups": {"type": "array", "items": backup_seg}}},
                400,
                404,
                409,
                413,
                500,
                507,
                body={
                    "type": obj,
                    "required": ["backupDir"],
                    "properties": {
                        "afterSegmentId": {
                            "type": ["integer", "null"],
                            "minimum": 0,
                            "description": "null or omitted = 0 = every sealed segment",
                        },
                        "backupDir": backup_path_schema(
                            is_file=False,
                            description="a directory relative to <dataDir>/backups/<namespace>/",
                        ),
                        "rotate": {
                            "type": ["boolean", "null"],
                            "default": False,
                            "description": "seal the active segment first (if non-empty)",
                        },
                    },
                },
            )
        },
        "/api/v1/{namespace}/btree/backup": {
            "post": _op(
                "Consistent B-tree snapshot (one LMDB read transaction, a valid data.mdb) into "
                "backups/<ns>/<path>, with a .sha256 sidecar",
                {
                    "type": obj,
                    "properties": {
                        "path": {"type": "string", "description": "absolute"},
                        "bytes": {"type": "integer"},
                        "lsn": {"type": "integer", "description": "last WAL record the snapshot holds"},
                        "sha256": {"type": "string"},
                        "timeline": {"type": "integer"},
                        "segmentId": {
                            "type": "integer",
                            "description": "WAL segment holding record `lsn` (replay resumes there)",
                        },
                        "copied": {
                            "type": "boolean",
                            "description": "false: an identical file was already there",
                        },
                    },
                },
                400,
                404,
                409,
                413,
                500,
                507,
                body={
                    "type": obj,
                    "required": ["path"],
                    "properties": {
                        "path": backup_path_schema(
                            is_file=True,
                            description="a file path relative to <dataDir>/backups/<namespace>/",
                        )
                    },
                },
            )
        },
        "/api/v1/{namespace}/archive/snapshot": {
            "post": _op(
                "Publish a snapshot to the archive now (--archive-url): the snapshot object, then "
                "its manifest, then the manifest copy (docs/ARCHIVE.md). 409 when archiving is off",
                {
                    "type": obj,
                    "properties": {
                        "key": {"type": "string", "description": "object name of the snapshot"},
                        "lsn": {"type": "integer", "description": "last WAL record the snapshot holds"},
                        "history": {"type": "string", "description": "history id, 32 hex digits"},
                        "sha256": {"type": "string", "description": "of the snapshot file"},
                        "fingerprint": {"type": "string"},
                        "bytes": {"type": "integer", "description": "size of the snapshot file"},
                        "objectBytes": {
                            "type": "integer",
                            "description": "size of the (compressed) archive object",
                        },
                    },
                },
                404,
                409,
                500,
                503,
                507,
            )
        },
    }
    if namespaces:
        ns_param = {**_NS, "schema": {"type": "string", "enum": sorted(namespaces)}}
        for ops in paths.values():
            for op in ops.values():
                op["parameters"] = [ns_param if p is _NS else p for p in op["parameters"]]
    components: dict[str, Any] = {
        "schemas": {
            "Error": {"type": obj, "required": ["error"], "properties": {"error": {"type": "string"}}},
            "Health": {
                "type": obj,
                "properties": {
                    "status": {"type": "string"},
                    "namespaces": {"type": "array", "items": {"type": "string"}},
                },
            },
        }
    }
    spec: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "UnisonDB HTTP API",
            "version": "1",
            "description": f"Request bodies are limited to {max_body_bytes} bytes (413). "
            'Every error is {"error": "<message>"}. With '
            "--auth-token-file every route but /health and /healthz "
            "needs 'Authorization: Bearer <token>' (401/403). "
            "Connection-level limits answer 408, 414, 431 and 503 "
            "(docs/OPERATIONS.md).",
        },
        "paths": paths,
        "components": components,
    }
    if auth:
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        spec["security"] = [{"bearer": []}]
        for path in (*_PUBLIC_PATHS, *(["/metrics"] if metrics_open else [])):
            for op in paths[path].values():
                op["security"] = []  # never needs a token
    return spec
