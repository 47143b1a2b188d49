"""``/openapi.json`` is kept true to the routes the app serves.

The set of (path, method) operations in the served spec must equal the set of routes in
``unisondb.api.app.routes()``: a route added without documentation, or documentation
for a route that is not served, fails here. The documented statuses are checked
against what a real server answers.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from serverproc import start_server

from unisondb.api import app as api_app
from unisondb.api.openapi import build_openapi

METHODS = {"get", "put", "post", "delete", "patch", "head", "options"}


def route_pairs() -> set[tuple[str, str]]:
    pairs = set()
    for route in api_app.routes():
        path = re.sub(r"\{(\w+):\w+\}", r"{\1}", route.path)  # {key:path} → {key}
        for method in route.methods or ():
            if method != "HEAD":  # Starlette adds HEAD to every GET route
                pairs.add((path, method.lower()))
    # The {key} routes also serve the key named "batch"; the spec lists those operations
    # under /kv/batch too, so a 405's Allow header there matches the document.
    for method in ("get", "put", "delete"):
        pairs.add(("/api/v1/{namespace}/kv/batch", method))
    return pairs


def spec_pairs(spec: dict[str, Any]) -> set[tuple[str, str]]:
    return {(path, m) for path, ops in spec["paths"].items() for m in ops if m in METHODS}


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    server = start_server(tmp_path_factory.mktemp("openapi") / "data", ("default",))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def http(srv: Any) -> Iterator[httpx.Client]:
    with srv.client() as client:
        yield client


@pytest.fixture(scope="module")
def spec(http: httpx.Client) -> dict[str, Any]:
    resp = http.get("/openapi.json")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("application/json")
    body: dict[str, Any] = resp.json()
    return body


def test_route_introspection_sees_the_kv_api() -> None:
    pairs = route_pairs()
    assert ("/api/v1/{namespace}/kv/{key}", "get") in pairs
    assert ("/api/v1/{namespace}/kv/batch", "post") in pairs
    assert ("/healthz", "get") in pairs


def test_spec_operations_equal_the_served_routes(spec: dict[str, Any]) -> None:
    served, documented = route_pairs(), spec_pairs(spec)
    assert documented - served == set(), "documented but not served"
    assert served - documented == set(), "served but not documented"


def test_spec_does_not_depend_on_the_body_limit_except_its_text() -> None:
    assert spec_pairs(build_openapi(1 << 20)) == spec_pairs(build_openapi(4096)) == route_pairs()
    assert "4096 bytes" in build_openapi(4096)["info"]["description"]


def test_spec_is_openapi_3_1_with_the_error_schema(spec: dict[str, Any]) -> None:
    assert spec["openapi"] == "3.1.0"
    assert spec["info"]["title"] and spec["info"]["version"]
    assert "1048576 bytes" in spec["info"]["description"]
    error = spec["components"]["schemas"]["Error"]
    assert error["required"] == ["error"]
    assert error["properties"] == {"error": {"type": "string"}}


def test_every_operation_is_well_formed(spec: dict[str, Any]) -> None:
    for path, ops in spec["paths"].items():
        in_path = set(re.findall(r"\{(\w+)\}", path))
        for method, op in ops.items():
            where = f"{method.upper()} {path}"
            assert op.get("summary"), where
            assert "200" in op["responses"], where
            declared = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
            assert declared == in_path, where
            assert all(p["required"] for p in op.get("parameters", []) if p["in"] == "path")
            for code, resp in op["responses"].items():
                if code.startswith(("4", "5")):
                    schema = resp["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/Error"}, (where, code)
            if "requestBody" in op:
                assert {"400", "413"} <= op["responses"].keys(), where
            if "{namespace}" in path:
                assert "404" in op["responses"], where


def _example_path(path: str, ns: str) -> str:
    return path.replace("{namespace}", ns).replace("{key}", "some-key")


def test_documented_statuses_are_what_the_server_answers(spec: dict[str, Any], http: httpx.Client) -> None:
    """Unknown namespace → 404; broken JSON → 400; oversized body → 413, for every
    operation that documents them; and success is 200."""
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            where = f"{method.upper()} {path}"
            if "{namespace}" in path:
                resp = http.request(method.upper(), _example_path(path, "no-such-ns"), content=b"{}")
                assert resp.status_code == 404, where
                assert resp.json() == {"error": "namespace not found: no-such-ns"}, where
            if "requestBody" in op:
                url = _example_path(path, "default")
                resp = http.request(method.upper(), url, content=b"{not json")
                assert resp.status_code == 400, where
                assert list(resp.json()) == ["error"], where
                resp = http.request(method.upper(), url, content=b" " * ((1 << 20) + 1))
                assert resp.status_code == 413, where
                assert list(resp.json()) == ["error"], where
            if method == "get":
                resp = http.get(_example_path(path, "default"))
                assert resp.status_code == 200, where


def test_openapi_is_stable_across_requests(http: httpx.Client, spec: dict[str, Any]) -> None:
    assert http.get("/openapi.json").json() == spec


def test_allow_header_on_batch_matches_the_spec(spec: dict[str, Any], http: httpx.Client) -> None:
    resp = http.request("PATCH", "/api/v1/default/kv/batch")
    assert resp.status_code == 405
    allowed = {m.strip().lower() for m in resp.headers["allow"].split(",")} - {"head"}
    assert allowed == set(spec["paths"]["/api/v1/{namespace}/kv/batch"]) & METHODS


def test_served_spec_is_the_built_one(spec: dict[str, Any]) -> None:
    """The served document is ``build_openapi`` for this server, so the unit tests of its
    patterns against the validators (tests/unit/api/test_spec_agreement.py) cover what is
    served; this server serves "default", so that is the namespace enum."""
    assert spec == build_openapi(1 << 20, namespaces=["default"])
    ns = spec["paths"]["/api/v1/{namespace}/stats"]["get"]["parameters"][0]
    assert ns["schema"] == {"type": "string", "enum": ["default"]}
    assert "security" not in spec and "securitySchemes" not in spec["components"]
    batch = spec["paths"]["/api/v1/{namespace}/kv/batch"]["post"]["requestBody"]["content"][
        "application/json"
    ]["schema"]["oneOf"]
    assert all(
        "operation" in alt["required"] and alt["properties"][list(alt["required"])[1]]["minItems"] == 1
        for alt in batch
    )
