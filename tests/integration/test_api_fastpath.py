"""The KV fast path (``api/app.py`` ``KvFastPath``) answers exactly like the full app.

GET and PUT of a key skip Starlette when the request is plain; anything else is handed to
the full app with the body replayed. These tests drive both paths of one real server with
the same inputs and compare, so the fast path can never drift from the documented API.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from serverproc import ServerProcess, start_server


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = start_server(tmp_path_factory.mktemp("fast") / "data", ("users",))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def users(srv: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=srv.url + "/api/v1/users", timeout=30) as client:
        yield client


def requests_by_route(srv: ServerProcess) -> dict[tuple[str, str, str], float]:
    out: dict[tuple[str, str, str], float] = {}
    for fam in text_string_to_metric_families(httpx.get(srv.url + "/metrics").text):
        for s in fam.samples:
            if s.name == "unisondb_http_requests_total":
                out[(s.labels["route"], s.labels["method"], s.labels["status"])] = s.value
    return out


def test_fast_get_and_put_are_counted_like_the_full_app(srv: ServerProcess, users: httpx.Client) -> None:
    before = requests_by_route(srv)
    assert users.put("/kv/fast", json={"value": base64.b64encode(b"v").decode()}).json() == {"success": True}
    assert users.get("/kv/fast").json() == {"value": "dg==", "found": True}
    assert users.get("/kv/absent").json() == {"value": "", "found": False}
    after = requests_by_route(srv)
    assert after[("put_kv", "PUT", "200")] - before.get(("put_kv", "PUT", "200"), 0) == 1
    assert after[("get_kv", "GET", "200")] - before.get(("get_kv", "GET", "200"), 0) == 2


@pytest.mark.parametrize(
    "body, status, message",
    [
        (b'{"value": "not base64!"}', 400, "invalid base64 value"),
        (b'{"valu": "dg=="}', 400, "missing field 'value'"),
        (b'["value"]', 400, "expected a JSON object"),
        (b'{"value": 5}', 400, "invalid base64 value: expected a string"),
        (b"[" * 5000, 400, "malformed JSON"),
        (b"", 400, "empty body"),
    ],
)
def test_malformed_put_bodies_get_the_full_apps_errors(
    users: httpx.Client, body: bytes, status: int, message: str
) -> None:
    resp = users.put("/kv/bad", content=body)
    assert resp.status_code == status and message in resp.json()["error"], resp.text
    assert users.get("/kv/bad").json()["found"] is False


def test_chunked_put_without_content_length_works_and_is_replayed(users: httpx.Client) -> None:
    def chunks(parts: list[bytes]) -> Iterator[bytes]:
        yield from parts

    ok = users.put("/kv/chunked", content=chunks([b'{"value":', b' "aGk="}']))
    assert ok.status_code == 200 and users.get("/kv/chunked").json()["value"] == "aGk="
    bad = users.put("/kv/chunked", content=chunks([b'{"value":', b" oops}"]))
    assert bad.status_code == 400 and "malformed JSON" in bad.json()["error"]
    assert users.get("/kv/chunked").json()["value"] == "aGk="


def test_unknown_namespace_and_bad_keys_take_the_full_app(srv: ServerProcess) -> None:
    with srv.client() as c:
        assert c.get("/api/v1/nope/kv/k").json() == {"error": "namespace not found: nope"}
        r: Any = c.put("/api/v1/users/kv/%FF", json={"value": "dg=="})
        assert r.status_code == 400 and "UTF-8" in r.json()["error"]
        r = c.get("/api/v1/users/kv/" + "k" * 600)
        assert r.status_code == 400 and "maximum is 511 bytes" in r.json()["error"]
