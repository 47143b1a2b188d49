"""Bearer tokens with roles, TLS and client certificates, against a real server process.

Keys and certificates are generated at run time with ``cryptography`` (never committed).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from serverproc import ServerProcess, free_port, start_server

TOKENS = {
    "read": "r" * 8 + "-read-token-0123",
    "write": "w" * 8 + "-write-token-0123",
    "admin": "a" * 8 + "-admin-token-0123",
}
CASES = {
    "none": None,
    "garbage": "Bearer not-a-known-token-at-all",
    "basic": "Basic dXNlcjpwdw==",
    "empty": "Bearer",
    **{role: f"Bearer {tok}" for role, tok in TOKENS.items()},
}


def write_tokens(path: Path, text: str | None = None) -> Path:
    path.write_text(
        text
        if text is not None
        else "# role per token\n\n" + "".join(f"{t} {r}\n" for r, t in TOKENS.items())
    )
    path.chmod(0o600)
    return path


def headers(case: str) -> dict[str, str]:
    value = CASES[case]
    return {} if value is None else {"Authorization": value}


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("auth")
    token_file = write_tokens(tmp / "tokens")
    server = start_server(tmp / "data", ("default",), extra_args=["--auth-token-file", str(token_file)])
    yield server
    server.stop()


def call(srv: ServerProcess, method: str, path: str, case: str, **kw: Any) -> httpx.Response:
    return httpx.request(method, srv.url + path, headers=headers(case), timeout=30, **kw)


def test_health_needs_no_token_but_everything_else_does(srv: ServerProcess) -> None:
    for path in ("/health", "/healthz"):
        assert call(srv, "GET", path, "none").status_code == 200
    for method, path in [
        ("GET", "/metrics"),
        ("GET", "/openapi.json"),
        ("GET", "/api/v1/default/stats"),
        ("GET", "/no/such/route"),
        ("GET", "/api/v1/nope/kv/k"),
        ("PATCH", "/api/v1/default/kv/k"),
    ]:
        r = call(srv, method, path, "none")
        assert r.status_code == 401, (method, path, r.text)
        assert r.headers["www-authenticate"] == 'Bearer realm="unisondb"'
        assert r.json() == {"error": "authentication required: send 'Authorization: Bearer <token>'"}
        assert r.content.endswith(b"\n")


ROUTES = [  # (method, path, body, least role)
    ("GET", "/api/v1/default/kv/k", None, "read"),
    ("GET", "/api/v1/default/stats", None, "read"),
    ("GET", "/metrics", None, "read"),
    ("PUT", "/api/v1/default/kv/k", {"value": "dg=="}, "write"),
    ("DELETE", "/api/v1/default/kv/k", None, "write"),
    (
        "POST",
        "/api/v1/default/kv/batch",
        {"operation": "put", "items": [{"key": "b", "value": "dg=="}]},
        "write",
    ),
    ("POST", "/api/v1/default/btree/backup", {"path": "snap/s.db"}, "admin"),
    ("POST", "/api/v1/default/wal/backup", {"backupDir": "wal", "rotate": True}, "admin"),
]
RANK = {"read": 1, "write": 2, "admin": 3}


@pytest.mark.parametrize("method,path,body,need", ROUTES)
def test_every_token_case_on_every_route(
    srv: ServerProcess, method: str, path: str, body: Any, need: str
) -> None:
    for case in CASES:
        r = call(srv, method, path, case, json=body)
        if case not in TOKENS:
            want = 401
            challenge = 'Bearer realm="unisondb"' + (
                ', error="invalid_token"' if case in ("garbage",) else ""
            )
        elif RANK[case] < RANK[need]:
            want, challenge = 403, 'Bearer realm="unisondb", error="insufficient_scope"'
            assert r.json() == {"error": f"token role '{case}' may not do this; it needs role '{need}'"}
        else:
            assert r.status_code == 200, (case, r.text)
            continue
        assert (r.status_code, r.headers.get("www-authenticate")) == (want, challenge), (case, r.text)
        assert list(r.json()) == ["error"]


def test_fast_path_and_full_app_answer_every_token_case_identically(srv: ServerProcess) -> None:
    """PUT of a key takes the fast path; DELETE goes through the router: same role, same answers.

    GET of a key (fast path) against GET of stats (router) for the refusals, too.
    """
    for case in CASES:
        fast = call(srv, "PUT", "/api/v1/default/kv/same", case, json={"value": "dg=="})
        full = call(srv, "DELETE", "/api/v1/default/kv/same", case)
        assert (fast.status_code, fast.content, fast.headers.get("www-authenticate")) == (
            full.status_code,
            full.content,
            full.headers.get("www-authenticate"),
        ), case
        fast = call(srv, "GET", "/api/v1/default/kv/same", case)
        full = call(srv, "GET", "/api/v1/default/stats", case)
        assert fast.status_code == full.status_code, case
        if fast.status_code != 200:
            assert (fast.content, fast.headers["www-authenticate"]) == (
                full.content,
                full.headers["www-authenticate"],
            ), case
    text = call(srv, "GET", "/metrics", "read").text
    assert 'route="auth_refused"' in text


def test_metrics_can_be_left_open(tmp_path: Path) -> None:
    srv = start_server(
        tmp_path / "data",
        extra_args=["--auth-token-file", str(write_tokens(tmp_path / "tokens")), "--metrics-auth", "none"],
    )
    try:
        assert httpx.get(srv.url + "/metrics").status_code == 200
        assert httpx.get(srv.url + "/api/v1/default/stats").status_code == 401
    finally:
        srv.stop()


def run_cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "unisondb", "--data-dir", str(tmp_path / "d"), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_non_loopback_address_without_tokens_is_refused(tmp_path: Path) -> None:
    res = run_cli(tmp_path, "--http-addr", f"0.0.0.0:{free_port()}")
    assert res.returncode == 2, res
    assert res.stderr.startswith("error: refusing to serve on 0.0.0.0:"), res.stderr
    assert "--auth-token-file" in res.stderr and "--insecure-no-auth" in res.stderr
    assert not (tmp_path / "d").exists(), "nothing may be created before the refusal"


@pytest.mark.parametrize(
    "text,mode,pattern",
    [
        (None, 0o644, r"is readable by other users \(mode 0644\) \(hint: chmod 600 "),
        ("tok-0123456789abcdef superuser\n", 0o600, r"line 1: unknown role 'superuser'"),
        ("short read\n", 0o600, r"line 1: a token must be 16 to 512 characters"),
        ("tok-0123456789abcdef\n", 0o600, r"line 1: expected '<token> <role>', got 1 field"),
        ("# nothing\n", 0o600, r"holds no token"),
        ("tok-0123456789abcdef read\ntok-0123456789abcdef admin\n", 0o600, r"line 2: .*listed twice"),
    ],
)
def test_bad_token_file_is_one_clear_error(tmp_path: Path, text: str | None, mode: int, pattern: str) -> None:
    path = write_tokens(tmp_path / "tokens", text)
    path.chmod(mode)
    res = run_cli(tmp_path, "--http-addr", f"127.0.0.1:{free_port()}", "--auth-token-file", str(path))
    assert res.returncode == 2, res
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: auth token file {path}"), res.stderr
    import re

    assert re.search(pattern, lines[0]), lines[0]


# --- TLS ---------------------------------------------------------------------------------


def _certs(tmp: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def save(key: ec.EllipticCurvePrivateKey, cert: x509.Certificate, stem: str) -> None:
        (tmp / f"{stem}.key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        os.chmod(tmp / f"{stem}.key", 0o600)
        (tmp / f"{stem}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("test CA"))
        .issuer_name(name("test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    save(ca_key, ca, "ca")
    for stem, usage, san in (
        (
            "server",
            ExtendedKeyUsageOID.SERVER_AUTH,
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
        ),
        (
            "client",
            ExtendedKeyUsageOID.CLIENT_AUTH,
            x509.SubjectAlternativeName([x509.DNSName("backup-client")]),
        ),
    ):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name(stem))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(san, critical=False)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        save(key, cert, stem)
    return {p.stem + p.suffix: p for p in tmp.iterdir()}


def _wait_tls(srv: ServerProcess, verify: ssl.SSLContext) -> None:
    deadline = time.monotonic() + 30
    url = f"https://127.0.0.1:{srv.port}/health"
    while True:
        assert srv.proc.poll() is None, srv.log()
        try:
            if httpx.get(url, verify=verify, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, srv.log()
        time.sleep(0.05)


def test_tls_with_tokens_and_client_certificates(tmp_path: Path) -> None:
    c = _certs(tmp_path)
    ctx = ssl.create_default_context(cafile=str(c["ca.crt"]))
    srv = start_server(
        tmp_path / "data",
        wait=False,
        extra_args=[
            "--tls-cert",
            str(c["server.crt"]),
            "--tls-key",
            str(c["server.key"]),
            "--auth-token-file",
            str(write_tokens(tmp_path / "tokens")),
        ],
    )
    try:
        _wait_tls(srv, ctx)
        base = f"https://127.0.0.1:{srv.port}/api/v1/default/kv/t"
        assert httpx.put(base, json={"value": "dg=="}, verify=ctx, headers=headers("write")).json() == {
            "success": True
        }
        assert httpx.get(base, verify=ctx).status_code == 401
        assert httpx.get(base, verify=ctx, headers=headers("read")).json()["found"] is True
        with pytest.raises(httpx.TransportError):  # plain HTTP to a TLS port
            httpx.get(f"http://127.0.0.1:{srv.port}/health", timeout=5)
        assert "https://127.0.0.1:" in srv.log()
    finally:
        srv.stop()

    srv = start_server(
        tmp_path / "data2",
        wait=False,
        extra_args=[
            "--tls-cert",
            str(c["server.crt"]),
            "--tls-key",
            str(c["server.key"]),
            "--tls-client-ca",
            str(c["ca.crt"]),
        ],
    )
    try:
        with_cert = ssl.create_default_context(cafile=str(c["ca.crt"]))
        with_cert.load_cert_chain(str(c["client.crt"]), str(c["client.key"]))
        _wait_tls(srv, with_cert)
        with pytest.raises(httpx.TransportError):  # no client certificate: handshake refused
            httpx.get(f"https://127.0.0.1:{srv.port}/health", verify=ctx, timeout=5)
    finally:
        srv.stop()


def test_bad_tls_files_are_one_clear_error(tmp_path: Path) -> None:
    c = _certs(tmp_path)
    port = f"127.0.0.1:{free_port()}"
    res = run_cli(tmp_path, "--http-addr", port, "--tls-cert", str(c["server.crt"]))
    assert res.returncode == 2 and "needs both --tls-cert and --tls-key" in res.stderr, res
    res = run_cli(
        tmp_path, "--http-addr", port, "--tls-cert", str(c["server.crt"]), "--tls-key", str(c["client.key"])
    )
    assert res.returncode == 2, res
    assert res.stderr.startswith(f"error: cannot use TLS certificate {c['server.crt']}"), res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    res = run_cli(
        tmp_path,
        "--http-addr",
        port,
        "--tls-cert",
        str(tmp_path / "missing.crt"),
        "--tls-key",
        str(c["server.key"]),
    )
    assert res.returncode == 2 and "cannot read TLS file" in res.stderr, res
