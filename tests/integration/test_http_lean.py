"""The lean HTTP path (``--http-lean on``, ``api/lean.py``) answers byte for byte like the full app.

Two real server processes on loopback, identical but for ``--http-lean on|off``, get the
same table of raw requests in the same order (so their data stays identical); every
response — status line, headers except ``date``, body — must be the same bytes, and so
must the request metrics afterwards. The table holds every status the key routes give and
the hostile cases: bad keys, bad bodies, huge or missing lengths, chunked bodies,
pipelining, half-sent requests, over-limit heads. A second pair runs with bearer tokens.

(411 is not in the table: neither path ever asks for a length — a PUT without one has an
empty body, which is a 400. 507 needs a full disk: ``test_disk_full.py`` drives it through
the server with the lean path on, the default.)
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from serverproc import ServerProcess, start_server

NS = "/api/v1/users/kv"
BODY_LIMIT = 2048
READ = "lean-read-token-0123456789abcdef"
WRITE = "lean-write-token-0123456789abcdef"


def _req(method: str, target: str, body: bytes | None = None, *headers: str, version: str = "1.1") -> bytes:
    lines = [f"{method} {target} HTTP/{version}", "Host: 127.0.0.1", *headers]
    if body is not None and not any(
        h.lower().startswith(("content-length", "transfer-encoding")) for h in headers
    ):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


def _chunked(*parts: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"


PUT_OK = b'{"value": "aGVsbG8="}'


@dataclass(frozen=True)
class Case:
    name: str
    data: bytes
    #: Responses to read; then the connection must stay open (None: read until closed).
    responses: int | None = 1
    #: Sent after ``data`` once the server has had a moment to read it, i.e. almost
    #: always in a later read (a body after its head; if the two ever share a read the
    #: case still holds, it just covers less).
    late: bytes = b""


CASES = [
    Case("health", _req("GET", "/health")),
    Case("healthz", _req("GET", "/healthz")),
    Case("health-with-query", _req("GET", "/health?x=1")),
    Case("put-200", _req("PUT", f"{NS}/k1", PUT_OK)),
    Case("get-found", _req("GET", f"{NS}/k1")),
    Case("get-missing", _req("GET", f"{NS}/nope")),
    Case("get-query", _req("GET", f"{NS}/k1?x=1")),
    Case("head", _req("HEAD", f"{NS}/k1")),
    Case("delete-200", _req("DELETE", f"{NS}/k1")),
    Case("get-deleted", _req("GET", f"{NS}/k1")),
    Case("delete-missing", _req("DELETE", f"{NS}/never")),
    Case("put-bad-base64", _req("PUT", f"{NS}/k2", b'{"value": "not base64!"}')),
    Case("put-missing-value", _req("PUT", f"{NS}/k2", b'{"valu": "aGk="}')),
    Case("put-array", _req("PUT", f"{NS}/k2", b'["value"]')),
    Case("put-number", _req("PUT", f"{NS}/k2", b'{"value": 5}')),
    Case("put-malformed", _req("PUT", f"{NS}/k2", b"{oops")),
    Case("put-deep", _req("PUT", f"{NS}/k2", b"[" * 1500)),
    Case("put-empty", _req("PUT", f"{NS}/k2", b"")),
    Case("put-whitespace", _req("PUT", f"{NS}/k2", b" \r\n\t ")),
    Case("put-no-length", _req("PUT", f"{NS}/k2")),
    Case("put-bad-utf8-json", _req("PUT", f"{NS}/k2", b'{"value": "\xff"}')),
    Case("put-extra-fields", _req("PUT", f"{NS}/k3", b'{"value": "aGk=", "x": 1}')),
    Case(
        "put-chunked",
        _req("PUT", f"{NS}/k4", _chunked(b'{"value":', b' "aGk="}'), "Transfer-Encoding: chunked"),
    ),
    Case(
        "put-chunked-bad",
        _req("PUT", f"{NS}/k4", _chunked(b'{"value":', b" x}"), "Transfer-Encoding: chunked"),
    ),
    Case(
        "put-chunked-413",
        _req("PUT", f"{NS}/k4", _chunked(b"x" * BODY_LIMIT, b"y" * 10), "Transfer-Encoding: chunked"),
    ),
    Case("put-413-declared", _req("PUT", f"{NS}/k5", b"", f"Content-Length: {BODY_LIMIT + 1}"), None),
    Case("put-huge-length", _req("PUT", f"{NS}/k5", b"", "Content-Length: 99999999999999999999"), None),
    Case("put-at-limit", _req("PUT", f"{NS}/k6", b'{"value": "' + b"A" * (BODY_LIMIT - 13) + b'"}')),
    Case("put-expect", _req("PUT", f"{NS}/k7", PUT_OK, "Expect: 100-continue"), 2),
    Case("put-http10", _req("PUT", f"{NS}/k8", PUT_OK, version="1.0"), None),
    Case("get-http10", _req("GET", f"{NS}/k8", version="1.0"), None),
    Case("get-connection-close", _req("GET", f"{NS}/k8", None, "Connection: close"), None),
    Case("get-with-body", _req("GET", f"{NS}/k8", b"hello")),
    Case("delete-with-body", _req("DELETE", f"{NS}/k8", b"hello")),
    Case("post-405", _req("POST", f"{NS}/k8", PUT_OK)),
    Case("patch-405", _req("PATCH", f"{NS}/k8", PUT_OK)),
    Case("unknown-namespace", _req("GET", "/api/v1/nope/kv/k")),
    Case("put-unknown-namespace", _req("PUT", "/api/v1/nope/kv/k", PUT_OK)),
    Case("encoded-namespace", _req("GET", "/api/v1/us%65rs/kv/k8")),
    Case("empty-key", _req("GET", f"{NS}/")),
    Case("put-empty-key", _req("PUT", f"{NS}/", PUT_OK)),
    Case("two-segment-key", _req("GET", f"{NS}/a/b")),
    Case("key-too-long", _req("GET", f"{NS}/" + "k" * 600)),
    Case("put-key-too-long", _req("PUT", f"{NS}/" + "k" * 600, PUT_OK)),
    Case("key-at-limit", _req("PUT", f"{NS}/" + "k" * 511, PUT_OK)),
    Case("put-encoded-slash", _req("PUT", f"{NS}/a%2Fb", PUT_OK)),
    Case("get-encoded-slash", _req("GET", f"{NS}/a%2Fb")),
    Case("get-encoded-slash-lower", _req("GET", f"{NS}/a%2fb")),
    Case("put-nul-key", _req("PUT", f"{NS}/n%00l", PUT_OK)),
    Case("get-nul-key", _req("GET", f"{NS}/n%00l")),
    Case("raw-nul-in-target", _req("GET", f"{NS}/n\x00l"), None),
    Case("non-utf8-key", _req("GET", f"{NS}/%FF%FE")),
    Case("put-non-utf8-key", _req("PUT", f"{NS}/%C3", PUT_OK)),
    Case("raw-non-ascii-key", _req("GET", f"{NS}/caf\xe9"), None),
    Case("bad-percent", _req("GET", f"{NS}/%zz")),
    Case("utf8-key", _req("PUT", f"{NS}/%E2%9C%93", PUT_OK)),
    Case("key-named-batch", _req("GET", f"{NS}/batch")),
    Case("delete-batch-key", _req("DELETE", f"{NS}/batch")),
    Case("absolute-form", _req("GET", f"http://127.0.0.1{NS}/k6")),
    Case("double-slash", _req("GET", "/api//v1/users/kv/k6")),
    Case("trailing-slash-health", _req("GET", "/health/")),
    Case(
        "duplicate-length", _req("PUT", f"{NS}/k9", PUT_OK, "Content-Length: 21", "Content-Length: 21"), None
    ),
    Case(
        "length-and-chunked",
        _req("PUT", f"{NS}/k9", _chunked(PUT_OK), "Content-Length: 5", "Transfer-Encoding: chunked"),
        None,
    ),
    Case("bad-length", _req("PUT", f"{NS}/k9", b"", "Content-Length: abc"), None),
    Case("lowercase-method", _req("get", f"{NS}/k6"), None),
    Case("head-too-large", _req("GET", f"{NS}/k6", None, "X-Big: " + "a" * 5000), None),
    Case("too-many-headers", _req("GET", f"{NS}/k6", None, *(f"X-H{i}: v" for i in range(40))), None),
    Case("target-too-long", _req("GET", f"{NS}/" + "k" * 3000), None),
    Case(
        "pipelined-put-get-get",
        _req("PUT", f"{NS}/p1", PUT_OK) + _req("GET", f"{NS}/p1") + _req("GET", f"{NS}/nope"),
        3,
    ),
    Case("pipelined-gets", _req("GET", f"{NS}/p1") * 5, 5),
    Case(
        "pipelined-mixed",
        _req("DELETE", f"{NS}/p1")
        + _req("PUT", f"{NS}/p2", b"{bad")
        + _req("GET", "/health")
        + _req("GET", f"{NS}/p1"),
        4,
    ),
    Case(
        "pipelined-then-close",
        _req("GET", f"{NS}/p2") + _req("GET", f"{NS}/k6", None, "Connection: close"),
        None,
    ),
    # Targets the lean matcher splits on "/kv/": each must go where the full app sends it.
    Case("key-contains-kv", _req("GET", f"{NS}/kv/x")),
    Case("put-key-contains-kv", _req("PUT", f"{NS}/kv/x", PUT_OK)),
    Case("key-named-kv", _req("PUT", f"{NS}/kv", PUT_OK)),
    Case("get-key-named-kv", _req("GET", f"{NS}/kv")),
    Case("empty-namespace", _req("GET", "/api/v1//kv/k6")),
    Case("namespace-named-kv", _req("GET", "/api/v1/kv/kv/k6")),
    Case("kvx-route", _req("GET", "/api/v1/users/kvx/k6")),
    Case("empty-query", _req("GET", f"{NS}/k6?")),
    Case("fragment", _req("GET", f"{NS}/k6#frag")),
    Case("encoded-question-mark", _req("PUT", f"{NS}/k%3Fx", PUT_OK)),
    Case("get-encoded-question-mark", _req("GET", f"{NS}/k%3Fx")),
    Case("encoded-percent", _req("PUT", f"{NS}/100%25", PUT_OK)),
    Case("get-encoded-percent", _req("GET", f"{NS}/100%25")),
    Case("get-key-at-limit", _req("GET", f"{NS}/" + "k" * 511)),
    Case("key-one-over-limit", _req("PUT", f"{NS}/" + "k" * 512, PUT_OK)),
    Case("encoded-key-at-limit", _req("PUT", f"{NS}/%41" + "k" * 510, PUT_OK)),
    Case("encoded-key-over-limit", _req("GET", f"{NS}/%41" + "k" * 511)),
    Case("uppercase-length-header", _req("PUT", f"{NS}/k10", PUT_OK, f"CONTENT-LENGTH: {len(PUT_OK)}")),
    Case("get-zero-length", _req("GET", f"{NS}/k10", None, "Content-Length: 0")),
    Case("get-chunked", _req("GET", f"{NS}/k10", _chunked(b"x"), "Transfer-Encoding: chunked")),
    # A PUT head and its body in separate reads (the body deadline is armed only then).
    Case("put-body-late", _req("PUT", f"{NS}/k11", b"", f"Content-Length: {len(PUT_OK)}"), late=PUT_OK),
    Case(
        "put-body-late-bad",
        _req("PUT", f"{NS}/k11", b"", "Content-Length: 7"),
        late=b"{oops}}",
    ),
    Case("get-after-late-body", _req("GET", f"{NS}/k11")),
    Case(
        "pipelined-put-late-body-then-get",
        _req("PUT", f"{NS}/k12", b"", f"Content-Length: {len(PUT_OK)}"),
        2,
        late=PUT_OK + _req("GET", f"{NS}/k12"),
    ),
    Case(
        "pipelined-get-then-half-head",
        _req("GET", f"{NS}/k6") + b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n",
        None,
    ),
    Case(
        "pipelined-put-then-half-body",
        _req("PUT", f"{NS}/p3", PUT_OK) + _req("PUT", f"{NS}/p4", b"", "Content-Length: 100") + b'{"va',
        None,
    ),
    Case(
        "pipelined-lean-then-full",
        _req("GET", f"{NS}/k6") + _req("GET", "/health?full=app") + _req("GET", f"{NS}/k6"),
        3,
    ),
    # Keep-alive, version and upgrade come from llhttp's flags, which only Connection and
    # Proxy-Connection set (the lean matcher asks for the version only when one is there).
    Case(
        "get-http10-keep-alive", _req("GET", f"{NS}/k6", None, "Connection: keep-alive", version="1.0"), None
    ),
    Case(
        "get-http10-proxy-keep-alive",
        _req("GET", f"{NS}/k6", None, "Proxy-Connection: keep-alive", version="1.0"),
        None,
    ),
    Case(
        "put-http10-keep-alive",
        _req("PUT", f"{NS}/k13", PUT_OK, "Connection: keep-alive", version="1.0"),
        None,
    ),
    Case("get-http20", _req("GET", f"{NS}/k6", version="2.0"), None),
    Case("get-http09", _req("GET", f"{NS}/k6", version="0.9"), None),
    Case("get-keep-alive", _req("GET", f"{NS}/k6", None, "Connection: keep-alive")),
    Case("put-keep-alive", _req("PUT", f"{NS}/k13", PUT_OK, "Connection: Keep-Alive")),
    Case("get-proxy-connection-close", _req("GET", f"{NS}/k6", None, "Proxy-Connection: close"), None),
    Case("get-connection-close-uppercase", _req("GET", f"{NS}/k6", None, "CONNECTION: CLOSE"), None),
    Case("get-connection-list", _req("GET", f"{NS}/k6", None, "Connection: keep-alive, close"), None),
    Case("get-upgrade-no-connection", _req("GET", f"{NS}/k6", None, "Upgrade: websocket")),
    Case("get-upgrade", _req("GET", f"{NS}/k6", None, "Connection: Upgrade", "Upgrade: websocket"), None),
    Case(
        "get-proxy-upgrade",
        _req("GET", f"{NS}/k6", None, "Proxy-Connection: upgrade", "Upgrade: h2c"),
    ),
    # Base64 values the decoder refuses (or accepts) alike on both paths.
    Case("put-b64-non-ascii", _req("PUT", f"{NS}/k14", '{"value": "aGVs\u00e9bG8="}'.encode())),
    Case("put-b64-space", _req("PUT", f"{NS}/k14", b'{"value": "aGVs bG8="}')),
    Case("put-b64-newline", _req("PUT", f"{NS}/k14", b'{"value": "aGVs\nbG8="}')),
    Case("put-b64-no-padding", _req("PUT", f"{NS}/k14", b'{"value": "aGVsbG8"}')),
    Case("put-b64-extra-padding", _req("PUT", f"{NS}/k14", b'{"value": "aGVsbG8=="}')),
    Case("put-b64-only-padding", _req("PUT", f"{NS}/k14", b'{"value": "===="}')),
    Case("put-b64-urlsafe", _req("PUT", f"{NS}/k14", b'{"value": "-_-_"}')),
    Case("put-b64-nul", _req("PUT", f"{NS}/k14", rb'{"value": "aGk=\u0000"}')),
    Case("put-b64-surrogate", _req("PUT", f"{NS}/k14", rb'{"value": "\ud800"}')),
    Case("put-b64-empty", _req("PUT", f"{NS}/k15", b'{"value": ""}')),
    Case("get-b64-empty", _req("GET", f"{NS}/k15")),
    Case("put-b64-binary", _req("PUT", f"{NS}/k16", b'{"value": "AP/+AQ=="}')),
    Case("get-b64-binary", _req("GET", f"{NS}/k16")),
    Case("half-sent-body", _req("PUT", f"{NS}/h1", b"", "Content-Length: 100") + b'{"value":', None),
    Case("half-sent-head", b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n", None),
    Case("get-after-half-sent", _req("GET", f"{NS}/h1")),
]

AUTH_CASES = [
    Case("auth-health", _req("GET", "/health")),
    Case("auth-get-no-token", _req("GET", f"{NS}/k")),
    Case("auth-put-no-token", _req("PUT", f"{NS}/k", PUT_OK)),
    Case("auth-bad-token", _req("GET", f"{NS}/k", None, "Authorization: Bearer wrong-token-0123456789")),
    Case("auth-read-put", _req("PUT", f"{NS}/k", PUT_OK, f"Authorization: Bearer {READ}")),
    Case("auth-read-delete", _req("DELETE", f"{NS}/k", None, f"Authorization: Bearer {READ}")),
    Case("auth-write-put", _req("PUT", f"{NS}/k", PUT_OK, f"Authorization: Bearer {WRITE}")),
    Case("auth-read-get", _req("GET", f"{NS}/k", None, f"Authorization: Bearer {READ}")),
    Case("auth-lowercase-scheme", _req("GET", f"{NS}/k", None, f"authorization: bearer {READ}")),
    Case("auth-basic-scheme", _req("GET", f"{NS}/k", None, "Authorization: Basic dXNlcjpwYXNz")),
    Case("auth-unknown-ns", _req("GET", "/api/v1/nope/kv/k", None, f"Authorization: Bearer {READ}")),
    Case("auth-write-delete", _req("DELETE", f"{NS}/k", None, f"Authorization: Bearer {WRITE}")),
    Case(
        "auth-pipelined-refusal",
        _req("PUT", f"{NS}/k", PUT_OK) + _req("GET", f"{NS}/k", None, f"Authorization: Bearer {READ}"),
        2,
    ),
]

_DATE = re.compile(rb"\r\ndate: [^\r]*", re.I)


def exchange(port: int, case: Case) -> list[bytes]:
    """Send the case's bytes on a fresh connection; its responses, ``date`` removed.

    With ``responses=None`` everything until the server closes is one item; otherwise
    exactly that many responses are read and the connection must then still be open.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(case.data)
        if case.late:
            time.sleep(0.05)  # not a timing assertion: only so the server reads the parts apart
            s.sendall(case.late)
        buf = b""
        if case.responses is None:
            try:
                while chunk := s.recv(65536):
                    buf += chunk
            except ConnectionResetError:
                pass
            return [_DATE.sub(b"", buf)]
        out = []
        while len(out) < case.responses:
            while b"\r\n\r\n" not in buf:
                chunk = s.recv(65536)
                assert chunk, f"{case.name}: closed after {len(out)} responses: {out}"
                buf += chunk
            head, _, rest = buf.partition(b"\r\n\r\n")
            m = re.search(rb"\r\ncontent-length: (\d+)", head, re.I)
            length = int(m.group(1)) if m and not case.data.startswith(b"HEAD") else 0
            while len(rest) < length:
                chunk = s.recv(65536)
                assert chunk, f"{case.name}: closed mid-body"
                rest += chunk
            out.append(_DATE.sub(b"", head + b"\r\n\r\n" + rest[:length]))
            buf = rest[length:]
        assert buf == b"", f"{case.name}: unexpected bytes {buf!r}"
        return out


def request_counts(srv: ServerProcess, token: str | None = None) -> dict[tuple[str, str, str], float]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    text = httpx.get(srv.url + "/metrics", headers=headers).text
    out: dict[tuple[str, str, str], float] = {}
    for m in re.finditer(r"^unisondb_http_requests_total\{(.*)\} (\S+)$", text, re.M):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        out[(labels["route"], labels["method"], labels["status"])] = float(m.group(2))
    return out


def _pair(root: Path, extra: list[str]) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    config = root / "server.toml"
    config.write_text(f"max_body_bytes = {BODY_LIMIT}\n")
    common = [
        "--config",
        str(config),
        "--http-max-header-bytes",
        "4KiB",
        "--http-max-headers",
        "32",
        "--http-max-request-line",
        "2KiB",
        "--http-header-timeout",
        "0.3s",
        "--http-body-timeout",
        "0.3s",
        *extra,
    ]
    lean = start_server(root / "lean", ("users",), extra_args=[*common, "--http-lean", "on"])
    try:
        full = start_server(root / "full", ("users",), extra_args=[*common, "--http-lean", "off"])
    except BaseException:
        lean.stop()
        raise
    try:
        yield lean, full
    finally:
        lean.stop()
        full.stop()
    for srv in (lean, full):
        assert "request.bug" not in srv.log(), srv.log()


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    yield from _pair(tmp_path_factory.mktemp("lean"), [])


@pytest.fixture(scope="module")
def auth_pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    root = tmp_path_factory.mktemp("lean-auth")
    tokens = root / "tokens"
    tokens.write_text(f"{READ} read\n{WRITE} write\n")
    tokens.chmod(0o600)
    yield from _pair(root, ["--auth-token-file", str(tokens)])


def _run_table(lean: ServerProcess, full: ServerProcess, cases: list[Case], token: str | None) -> set[int]:
    """Run the table on both; the statuses seen (the table is worth what it covers)."""
    before = request_counts(lean, token), request_counts(full, token)
    mismatches = []
    statuses = set()
    for case in cases:
        got, want = exchange(lean.port, case), exchange(full.port, case)
        if got != want:
            mismatches.append(f"{case.name}:\n  lean: {got!r}\n  full: {want!r}")
        statuses |= {int(m) for m in re.findall(rb"HTTP/1.1 (\d{3})", b"".join(want))}
    assert not mismatches, "\n".join(mismatches)
    after = request_counts(lean, token), request_counts(full, token)

    def delta(
        b: dict[tuple[str, str, str], float], a: dict[tuple[str, str, str], float]
    ) -> dict[object, float]:
        return {k: v - b.get(k, 0) for k, v in a.items() if v != b.get(k, 0)}

    assert delta(before[0], after[0]) == delta(before[1], after[1])
    return statuses


def test_every_case_answers_byte_for_byte_like_the_full_app(
    pair: tuple[ServerProcess, ServerProcess],
) -> None:
    statuses = _run_table(*pair, CASES, None)
    assert {200, 400, 404, 405, 408, 413, 414, 431} <= statuses, statuses


def test_every_token_case_answers_like_the_full_app(auth_pair: tuple[ServerProcess, ServerProcess]) -> None:
    statuses = _run_table(*auth_pair, AUTH_CASES, WRITE)
    assert {200, 401, 403, 404} <= statuses, statuses
