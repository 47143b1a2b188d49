"""Every error status of the HTTP API, and hostile keys and bodies, against a real server.

Every error answer must be a JSON object with exactly one string field ``error``; no
request may crash the server or drop the connection. After every test the server
process must still be alive and answering.
"""

from __future__ import annotations

import base64
import re
import socket
from collections.abc import Iterator
from http.client import HTTPConnection
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from serverproc import start_server

LIMIT = 1 << 20  # the default --max-body-bytes (1 MiB)
MAX_KEY = 511


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    server = start_server(tmp_path_factory.mktemp("errors") / "data", ("default", "users"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def http(srv: Any) -> Iterator[httpx.Client]:
    with srv.client() as client:
        yield client


@pytest.fixture(autouse=True)
def _server_survives(srv: Any, http: httpx.Client) -> Iterator[None]:
    yield
    assert srv.proc.poll() is None, f"server died:\n{srv.log()}"
    assert http.get("/health").status_code == 200


@pytest.fixture(scope="module")
def users(srv: Any) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=srv.url + "/api/v1/users", timeout=30) as client:
        yield client


def assert_error(resp: httpx.Response, status: int, pattern: str = "") -> str:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json"), resp.headers
    body = resp.json()
    assert isinstance(body, dict) and list(body) == ["error"], body
    assert isinstance(body["error"], str) and body["error"]
    assert re.search(pattern, body["error"]), (pattern, body["error"])
    return body["error"]


def raw(
    srv: Any, method: str, target: str, body: bytes = b"", headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """Send exactly this request target (no client-side path normalisation)."""
    conn = HTTPConnection("127.0.0.1", srv.port, timeout=30)
    try:
        conn.request(method, target, body=body or None, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


# --- 400 bad input ----------------------------------------------------------------------

BAD_PUT_BODIES = [
    (b"{", r"^invalid request body: malformed JSON"),
    (b'{"value": "eA==",}', r"^invalid request body: malformed JSON"),
    (b"", r"^invalid request body: empty body"),
    (b"   \n", r"^invalid request body: empty body"),
    (b"[]", r"^invalid request body: expected a JSON object, got list"),
    (b'"eA=="', r"^invalid request body: expected a JSON object, got str"),
    (b"null", r"^invalid request body: expected a JSON object"),
    (b"42", r"^invalid request body: expected a JSON object"),
    (b"{}", r"^invalid request body: missing field 'value'"),
    (b'{"val": "eA=="}', r"missing field 'value'"),
    (b'{"value": null}', r"^invalid base64 value: expected a string"),
    (b'{"value": 12}', r"^invalid base64 value: expected a string"),
    (b'{"value": ["eA=="]}', r"^invalid base64 value: expected a string"),
    (b'{"value": "%%%"}', r"^invalid base64 value: "),
    (b'{"value": "eA"}', r"^invalid base64 value: "),  # padding is required
    (b'{"value": "-_8="}', r"^invalid base64 value: "),  # URL-safe alphabet is not base64
    (b'{"value": "eA==\\n"}', r"^invalid base64 value: "),
    (b'{"value": "eA=="} {}', r"^invalid request body: malformed JSON"),
    (b'\xef\xbb\xbf{"value": "eA=="}', r"^invalid request body: malformed JSON"),
    (b'{"value": "\xff"}', r"^invalid request body: malformed JSON"),
    (b'{"value": "eA==\x00"}', r"^invalid request body: malformed JSON"),
    (b"\x00\x00\x00", r"^invalid request body: malformed JSON"),
]


@pytest.mark.parametrize(("body", "pattern"), BAD_PUT_BODIES, ids=[repr(b[0][:20]) for b in BAD_PUT_BODIES])
def test_put_bad_body_is_400(users: httpx.Client, body: bytes, pattern: str) -> None:
    assert_error(users.put("/kv/bad-body", content=body), 400, pattern)
    assert users.get("/kv/bad-body").json() == {"value": "", "found": False}


BAD_BATCHES: list[tuple[Any, str]] = [
    ({"operation": "put", "items": []}, r"^items cannot be empty$"),
    ({"operation": "put"}, r"^items cannot be empty$"),
    ({"operation": "put", "items": None}, r"^items cannot be empty$"),
    ({"operation": "delete", "keys": []}, r"^keys cannot be empty$"),
    ({"operation": "delete"}, r"^keys cannot be empty$"),
    ({"operation": "merge", "keys": ["a"]}, r"^unknown operation: 'merge'"),
    ({"operation": "PUT", "items": [{"key": "a", "value": ""}]}, r"^unknown operation: 'PUT'"),
    ({"keys": ["a"]}, r"^unknown operation"),
    ({"operation": 1, "keys": ["a"]}, r"^unknown operation"),
    (
        {"operation": "put", "items": [{"key": "ok", "value": ""}, {"key": "", "value": ""}]},
        r"^key at index 1 cannot be empty$",
    ),
    ({"operation": "delete", "keys": ["ok", "also-ok", ""]}, r"^key at index 2 cannot be empty$"),
    ({"operation": "delete", "keys": [None]}, r"^key at index 0 must be a string$"),
    ({"operation": "put", "items": [{"key": 7, "value": ""}]}, r"^key at index 0 must be a string$"),
    ({"operation": "put", "items": [{"key": "a", "value": "***"}]}, r"^invalid base64 value at index 0: "),
    ({"operation": "put", "items": [{"key": "a"}]}, r"^invalid base64 value at index 0: "),
    ({"operation": "put", "items": ["a"]}, r"^item at index 0 must be an object"),
    (
        {"operation": "put", "items": [{"key": "k" * (MAX_KEY + 1), "value": ""}]},
        rf"^key at index 0 is {MAX_KEY + 1} bytes; the maximum is {MAX_KEY} bytes$",
    ),
    (
        {"operation": "delete", "keys": ["é" * 256]},
        rf"^key at index 0 is 512 bytes; the maximum is {MAX_KEY} bytes$",
    ),
]


@pytest.mark.parametrize(("body", "pattern"), BAD_BATCHES)
def test_batch_bad_body_is_400_and_writes_nothing(users: httpx.Client, body: Any, pattern: str) -> None:
    users.put("/kv/ok", json={"value": b64(b"kept")})
    before = users.get("/stats").json()["lastLsn"]
    assert_error(users.post("/kv/batch", json=body), 400, pattern)
    assert users.get("/stats").json()["lastLsn"] == before
    assert users.get("/kv/ok").json() == {"value": b64(b"kept"), "found": True}
    assert users.get("/kv/a").json()["found"] is False


@pytest.mark.parametrize("body", [b"", b"{", b"[1,2]", b'"put"'])
def test_batch_malformed_body_is_400(users: httpx.Client, body: bytes) -> None:
    assert_error(users.post("/kv/batch", content=body), 400, r"^invalid request body: ")


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
def test_non_utf8_key_is_400(users: httpx.Client, method: str) -> None:
    resp = users.request(method, "/kv/%FF", json={"value": ""})
    assert_error(resp, 400, r"^key must be valid UTF-8 after percent-decoding$")
    assert_error(users.request(method, "/kv/ok%C3%28", json={"value": ""}), 400, "UTF-8")


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
def test_key_over_511_bytes_is_400(users: httpx.Client, method: str) -> None:
    resp = users.request(method, "/kv/" + "k" * (MAX_KEY + 1), json={"value": ""})
    assert_error(resp, 400, rf"^key is {MAX_KEY + 1} bytes; the maximum is {MAX_KEY} bytes$")
    # Multi-byte characters count in UTF-8 bytes: 171 × 3 = 513.
    assert_error(users.request(method, "/kv/" + "€" * 171, json={"value": ""}), 400, "513 bytes")


# --- 404 --------------------------------------------------------------------------------

NS_ROUTES = [
    ("GET", "/kv/x", None),
    ("PUT", "/kv/x", {"value": "eA=="}),
    ("DELETE", "/kv/x", None),
    ("POST", "/kv/batch", {"operation": "delete", "keys": ["x"]}),
    ("GET", "/kv/batch", None),
    ("GET", "/offset", None),
    ("GET", "/stats", None),
    ("GET", "/checkpoint", None),
]


@pytest.mark.parametrize(("method", "path", "body"), NS_ROUTES)
@pytest.mark.parametrize("ns", ["nope", "backups", "Users", "users.", "ünï"])
def test_unknown_namespace_is_404(http: httpx.Client, ns: str, method: str, path: str, body: Any) -> None:
    resp = http.request(method, f"/api/v1/{ns}{path}", json=body)
    assert resp.status_code == 404
    assert resp.json() == {"error": f"namespace not found: {ns}"}


def test_unknown_namespace_wins_over_a_bad_body(http: httpx.Client) -> None:
    resp = http.put("/api/v1/nope/kv/x", content=b"{{{")
    assert resp.json() == {"error": "namespace not found: nope"}


@pytest.mark.parametrize(
    "path",
    [
        "/",
        "/nope",
        "/api",
        "/api/v1",
        "/api/v1/users",
        "/api/v1/users/kv",
        "/api/v1/users/kv/",
        "/api/v1/users/kv/a/b",
        "/api/v1/users/kv/a/",
        "/api/v2/users/kv/a",
        "/api/v1/users/row/a",
        "/api/v1/users/wal",
        "/health/",
        "/metricsx",
        "/api/v1//kv/a",
    ],
)
def test_unknown_route_is_json_404(http: httpx.Client, path: str) -> None:
    assert_error(http.get(path), 404, r"^not found: GET ")


def test_unknown_route_404_for_writes_too(http: httpx.Client) -> None:
    assert_error(
        http.put("/api/v1/users/kv/a/b", json={"value": ""}), 404, r"^not found: PUT /api/v1/users/kv/a/b$"
    )
    assert_error(http.post("/nope", json={}), 404, r"^not found: POST /nope$")


# --- 405 --------------------------------------------------------------------------------

WRONG_METHODS = [
    ("PATCH", "/api/v1/users/kv/x", {"GET", "HEAD", "PUT", "DELETE"}),
    ("POST", "/api/v1/users/kv/x", {"GET", "HEAD", "PUT", "DELETE"}),
    ("PATCH", "/api/v1/users/kv/batch", {"GET", "HEAD", "PUT", "DELETE", "POST"}),
    ("POST", "/health", {"GET", "HEAD"}),
    ("DELETE", "/healthz", {"GET", "HEAD"}),
    ("PUT", "/metrics", {"GET", "HEAD"}),
    ("POST", "/openapi.json", {"GET", "HEAD"}),
    ("POST", "/api/v1/users/offset", {"GET", "HEAD"}),
    ("PUT", "/api/v1/users/stats", {"GET", "HEAD"}),
    ("DELETE", "/api/v1/users/checkpoint", {"GET", "HEAD"}),
]


@pytest.mark.parametrize(("method", "path", "allowed"), WRONG_METHODS)
def test_wrong_method_is_json_405_with_allow(
    http: httpx.Client, method: str, path: str, allowed: set[str]
) -> None:
    resp = http.request(method, path, content=b"{}")
    assert_error(resp, 405, rf"^method {method} not allowed on {re.escape(path)}$")
    assert {m.strip() for m in resp.headers["allow"].split(",")} == allowed


def test_405_on_unknown_namespace_path_still_405(http: httpx.Client) -> None:
    resp = http.request("PATCH", "/api/v1/nope/kv/x")
    assert_error(resp, 405, "^method PATCH not allowed")


# --- 413 --------------------------------------------------------------------------------


def test_body_at_the_limit_is_accepted(users: httpx.Client) -> None:
    prefix, suffix = b'{"value":"', b'"}'
    room = LIMIT - len(prefix) - len(suffix)
    value = b"\xab" * (room // 4 * 3)
    encoded = b64(value).encode()
    # Pad with JSON whitespace to exactly the limit.
    body = prefix + encoded + b'"' + b" " * (room - len(encoded)) + b"}"
    assert len(body) == LIMIT
    assert users.put("/kv/at-limit", content=body).status_code == 200
    assert base64.b64decode(users.get("/kv/at-limit").json()["value"]) == value


def test_body_over_limit_with_content_length_is_413(users: httpx.Client) -> None:
    body = b'{"value":"' + b"A" * LIMIT + b'"}'
    try:
        resp = users.put("/kv/too-big", content=body)
    except httpx.TransportError:  # the server may answer and close before reading it all
        pytest.fail("the server must answer 413, not drop the connection")
    assert_error(resp, 413, rf"^request body too large: {len(body)} bytes, limit is {LIMIT} bytes$")
    assert users.get("/kv/too-big").json()["found"] is False


def test_declared_content_length_over_limit_is_413_before_the_body(srv: Any) -> None:
    """Refused on the header alone: the client need not send a byte of the body."""
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
        s.sendall(b"PUT /api/v1/users/kv/declared HTTP/1.1\r\nHost: x\r\nContent-Length: 1048577\r\n\r\n")
        data = b""
        while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413 "), data
    assert body == b'{"error":"request body too large: 1048577 bytes, limit is 1048576 bytes"}\n'


def test_chunked_body_over_limit_is_413(users: httpx.Client) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"value":"'
        for _ in range(40):
            yield b"A" * 65536
        yield b'"}'

    resp = users.put("/kv/chunked", content=chunks())
    assert resp.request.headers.get("transfer-encoding") == "chunked"
    assert "content-length" not in resp.request.headers
    assert_error(resp, 413, rf"^request body too large: limit is {LIMIT} bytes$")
    assert users.get("/kv/chunked").json()["found"] is False


def test_chunked_batch_over_limit_is_413(users: httpx.Client) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"operation":"put","items":['
        for i in range(40_000):
            yield b'{"key":"c%d","value":"eA=="},' % i
        yield b'{"key":"end","value":""}]}'

    assert_error(users.post("/kv/batch", content=chunks()), 413, r"^request body too large")
    assert users.get("/kv/c0").json()["found"] is False


def test_small_chunked_body_is_accepted(users: httpx.Client) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"value":'
        yield b'"' + b64(b"chunky").encode() + b'"}'

    assert users.put("/kv/small-chunked", content=chunks()).status_code == 200
    assert users.get("/kv/small-chunked").json()["value"] == b64(b"chunky")


def test_connection_is_reusable_after_errors(srv: Any) -> None:
    """Errors are answers, not dropped connections: one keep-alive connection throughout."""
    with httpx.Client(base_url=srv.url, limits=httpx.Limits(max_connections=1)) as c:
        assert c.put("/api/v1/users/kv/x", content=b"{").status_code == 400
        assert c.get("/api/v1/nope/kv/x").status_code == 404
        assert c.get("/nope").status_code == 404
        assert c.request("PATCH", "/api/v1/users/kv/x").status_code == 405
        assert c.get("/api/v1/users/kv/%FF").status_code == 400
        assert c.put("/api/v1/users/kv/reuse", json={"value": "eA=="}).status_code == 200
        assert c.get("/api/v1/users/kv/reuse").json() == {"value": "eA==", "found": True}


# --- hostile keys -----------------------------------------------------------------------

HOSTILE_KEYS = [
    "ünïcødé-ключ-鍵-🔑",
    "a/b",
    "/leading",
    "trailing/",
    "a//b",
    "with space",
    " ",
    "..",
    ".",
    "../../etc/passwd",
    "batch",
    "kv",
    "%2F",
    "100%",
    "a+b",
    "q?x=1",
    "frag#ment",
    "semi;colon",
    "back\\slash",
    "tab\there",
    "new\nline",
    "nul\x00byte",
    "\x00",
    "\u200b",
    "k" * MAX_KEY,
    "é" * 255 + "k",  # 511 bytes
    "🔑" * 127 + "abc",  # 511 bytes
]


def path_for(key: str) -> str:
    """Percent-encode every byte that could be read as path syntax, dots included (a client
    library would otherwise collapse the segments '.' and '..')."""
    return "/kv/" + quote(key, safe="").replace(".", "%2E")


@pytest.mark.parametrize("key", HOSTILE_KEYS, ids=range(len(HOSTILE_KEYS)))
def test_hostile_key_roundtrip(users: httpx.Client, key: str) -> None:
    value = key.encode("utf-8") + b"\x00\xff"
    assert users.put(path_for(key), json={"value": b64(value)}).json() == {"success": True}
    assert users.get(path_for(key)).json() == {"value": b64(value), "found": True}
    # The same key written through a batch body is the same key.
    resp = users.post(
        "/kv/batch", json={"operation": "put", "items": [{"key": key, "value": b64(b"via batch")}]}
    )
    assert resp.json() == {"success": True, "count": 1}
    assert users.get(path_for(key)).json() == {"value": b64(b"via batch"), "found": True}
    assert users.delete(path_for(key)).json() == {"success": True}
    assert users.get(path_for(key)).json()["found"] is False


def test_slash_inside_a_key_is_not_a_path_separator(users: httpx.Client) -> None:
    users.put("/kv/dir%2Ffile", json={"value": b64(b"encoded")})
    assert users.get("/kv/dir%2ffile").json()["value"] == b64(b"encoded")
    assert_error(users.get("/kv/dir/file"), 404, "^not found")


@pytest.mark.parametrize("target", ["/api/v1/users/kv/..", "/api/v1/users/kv/."])
def test_dot_segments_sent_verbatim_are_keys(srv: Any, http: httpx.Client, target: str) -> None:
    """A client that does not normalise the path reaches the key '..' or '.' itself."""
    key = target.rsplit("/", 1)[1]
    status, _, body = raw(srv, "PUT", target, b'{"value":"ZG90"}')
    assert (status, body) == (200, b'{"success":true}\n')
    assert http.get(path_for(key).replace("/kv/", "/api/v1/users/kv/")).json() == {
        "value": "ZG90",
        "found": True,
    }
    status, _, body = raw(srv, "GET", target)
    assert (status, body) == (200, b'{"value":"ZG90","found":true}\n')


def test_percent_encoded_and_literal_unicode_paths_are_the_same_key(srv: Any, http: httpx.Client) -> None:
    status, _, _ = raw(srv, "PUT", "/api/v1/users/kv/%C3%BC", b'{"value":"dQ=="}')
    assert status == 200
    assert http.get("/api/v1/users/kv/ü").json() == {"value": "dQ==", "found": True}


def test_query_string_is_not_part_of_the_key(users: httpx.Client) -> None:
    users.put("/kv/plain?x=1", json={"value": b64(b"q")})
    assert users.get("/kv/plain").json()["value"] == b64(b"q")


# --- hostile bodies ---------------------------------------------------------------------


def test_one_mib_of_nested_arrays_is_400(users: httpx.Client) -> None:
    assert_error(users.put("/kv/nested", content=b"[" * LIMIT), 400, "malformed JSON")
    body = b'{"value":"eA==","x":' + b"[" * 500_000 + b"]" * 500_000 + b"}"
    assert_error(users.put("/kv/nested", content=body), 400, "malformed JSON")
    assert_error(users.post("/kv/batch", content=b'{"operation":' + b"{" * 400_000), 400, "malformed JSON")
    obj = b'{"a":' * 100_000 + b"1" + b"}" * 100_000
    assert_error(users.post("/kv/batch", content=obj), 400, "malformed JSON")
    assert users.get("/kv/nested").json()["found"] is False


def test_huge_numbers(users: httpx.Client) -> None:
    # Out of double range anywhere in the body: a clear 400, not a crash.
    assert_error(users.put("/kv/num", content=b'{"value":"eA==","n":1e999999}'), 400, "malformed JSON")
    assert_error(
        users.put("/kv/num", content=b'{"value":"eA==","n":' + b"9" * 5000 + b"}"), 400, "malformed JSON"
    )
    assert_error(users.put("/kv/num", content=b'{"value":' + b"9" * 40 + b"}"), 400, "expected a string")
    assert_error(
        users.post("/kv/batch", content=b'{"operation":"delete","keys":[1e308]}'), 400, "must be a string"
    )
    # A large but representable number in an ignored field is ignored.
    assert users.put("/kv/num", content=b'{"value":"eA==","n":' + b"9" * 30 + b"}").status_code == 200


def test_nul_bytes(users: httpx.Client) -> None:
    assert_error(users.put("/kv/nul", content=b'{"value":"eA=="}\x00'), 400, "malformed JSON")
    assert_error(users.put("/kv/nul", content=b'{"va\x00lue":"eA=="}'), 400, "malformed JSON")
    # An escaped NUL in a JSON string is just a character: a key with a NUL in it.
    body = b'{"operation":"put","items":[{"key":"n\\u0000l","value":"eA=="}]}'
    resp = users.post("/kv/batch", content=body)
    assert resp.json() == {"success": True, "count": 1}
    assert users.get("/kv/n%00l").json() == {"value": "eA==", "found": True}
    assert_error(users.put("/kv/nul", content=b'{"value":"\\u0000"}'), 400, "invalid base64 value")


def test_lone_surrogate_is_400(users: httpx.Client) -> None:
    body = b'{"operation":"put","items":[{"key":"\\ud800","value":""}]}'
    assert_error(users.post("/kv/batch", content=body), 400, "malformed JSON")
    assert_error(users.get("/kv/%ED%A0%80"), 400, "UTF-8")


def test_garbage_binary_bodies(users: httpx.Client) -> None:
    for body in (bytes(range(256)), b"\xff" * 1000, b"\x1f\x8b\x08\x00" + b"\x00" * 100):
        assert_error(users.put("/kv/garbage", content=body), 400, "malformed JSON")
        assert_error(users.post("/kv/batch", content=body), 400, "malformed JSON")


def test_server_survived_everything(srv: Any) -> None:
    assert srv.proc.poll() is None
    with httpx.Client(base_url=srv.url + "/api/v1/default") as c:
        assert c.put("/kv/alive", json={"value": b64(b"yes")}).status_code == 200
        assert c.get("/kv/alive").json() == {"value": b64(b"yes"), "found": True}
    assert "Traceback" not in srv.log()
