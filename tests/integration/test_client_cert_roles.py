"""Client-certificate roles (``--tls-client-roles``): a verified certificate authenticates a
client with the role its CN or SHA-256 fingerprint is given, as a token would.

Real certificates made here with ``cryptography`` (a CA, a server certificate for
127.0.0.1, clients, and a client of another CA), a real server with TLS on loopback, and
real TLS clients: ``httpx`` with an ``ssl`` context, and ``curl --cert``.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import shutil
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from serverproc import ServerProcess, free_port, start_server

REPO = Path(__file__).resolve().parents[2]
WRITE_TOKEN = "cert-test-write-token-0123456789"
KV = "/api/v1/default/kv/k"
SNAPSHOT = "/api/v1/default/btree/backup"


class Pki:
    """A CA and certificates it signed, written as PEM files under ``root``."""

    def __init__(self, root: Path, ca_name: str = "test CA") -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec

        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.now = datetime.datetime.now(datetime.UTC)
        self.ca_key = ec.generate_private_key(ec.SECP256R1())
        self.ca = (
            self._builder(ca_name, self._name(ca_name), self.ca_key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.ca_key, hashes.SHA256())
        )
        self.ca_path = root / "ca.crt"
        self._write_cert(self.ca, self.ca_path)

    @staticmethod
    def _name(cn: str) -> object:
        from cryptography import x509
        from cryptography.x509.oid import NameOID

        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def _builder(self, cn: str, issuer: object, public_key: object) -> object:
        from cryptography import x509

        return (
            x509.CertificateBuilder()
            .subject_name(self._name(cn))
            .issuer_name(issuer)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(self.now - datetime.timedelta(minutes=5))
            .not_valid_after(self.now + datetime.timedelta(days=1))
        )

    @staticmethod
    def _write_cert(cert: object, path: Path) -> None:
        from cryptography.hazmat.primitives import serialization

        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))  # type: ignore[attr-defined]

    def issue(self, stem: str, cn: str, *, server: bool = False) -> tuple[Path, Path, str]:
        """(cert path, key path, SHA-256 of the DER certificate) of a new certificate."""
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID

        key = ec.generate_private_key(ec.SECP256R1())
        b = self._builder(cn, self.ca.subject, key.public_key())
        if server:
            san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
            b = b.add_extension(san, critical=False)  # type: ignore[attr-defined]
            usage = ExtendedKeyUsageOID.SERVER_AUTH
        else:
            usage = ExtendedKeyUsageOID.CLIENT_AUTH
        cert = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False).sign(  # type: ignore[attr-defined]
            self.ca_key, hashes.SHA256()
        )
        crt, pem_key = self.root / f"{stem}.crt", self.root / f"{stem}.key"
        self._write_cert(cert, crt)
        pem_key.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        os.chmod(pem_key, 0o600)
        return crt, pem_key, hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


class Setup:
    def __init__(self, root: Path) -> None:
        self.pki = Pki(root / "pki")
        self.server_crt, self.server_key, _ = self.pki.issue("server", "unisondb", server=True)
        self.clients = {
            name: self.pki.issue(name, cn)
            for name, cn in (
                ("reader", "Reporting Job"),
                ("writer", "app-1"),
                ("admin", "backup-client"),
                ("stranger", "nobody"),
            )
        }
        self.other = Pki(root / "other-pki", "another CA").issue("intruder", "backup-client")
        writer_fp = self.clients["writer"][2]
        # The fingerprint as openssl prints it: upper case with colons.
        pretty = ":".join(writer_fp[i : i + 2] for i in range(0, 64, 2)).upper()
        self.roles = root / "client-roles"
        self.roles.write_text(
            "# selector role\n"
            "cn:Reporting Job  read\n"
            f"sha256:{pretty}  write\n"
            "cn:app-1  read\n"  # the fingerprint line wins for this certificate
            "cn:backup-client  backup\n"
        )
        self.roles.chmod(0o644)
        self.tokens = root / "tokens"
        self.tokens.write_text(f"{WRITE_TOKEN} write\n")
        self.tokens.chmod(0o600)

    def tls_args(self, *, tokens: bool = False) -> list[str]:
        args = [
            "--tls-cert",
            str(self.server_crt),
            "--tls-key",
            str(self.server_key),
            "--tls-client-ca",
            str(self.pki.ca_path),
            "--tls-client-roles",
            str(self.roles),
        ]
        return args + (["--auth-token-file", str(self.tokens)] if tokens else [])

    def context(self, who: str) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.pki.ca_path))
        crt, key, _ = self.other if who == "intruder" else self.clients[who]
        ctx.load_cert_chain(str(crt), str(key))
        return ctx


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    return Setup(tmp_path_factory.mktemp("certs"))


def _start(setup: Setup, data: Path, *, tokens: bool = False) -> ServerProcess:
    srv = start_server(data, wait=False, extra_args=setup.tls_args(tokens=tokens))
    ctx = setup.context("reader")
    deadline = time.monotonic() + 30
    while True:
        assert srv.proc.poll() is None, srv.log()
        try:
            if httpx.get(f"https://127.0.0.1:{srv.port}/health", verify=ctx, timeout=2).status_code == 200:
                return srv
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, srv.log()
        time.sleep(0.05)


@pytest.fixture(scope="module")
def srv(setup: Setup, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    s = _start(setup, tmp_path_factory.mktemp("certsrv") / "data")
    yield s
    s.stop()


def call(srv: ServerProcess, setup: Setup, who: str, method: str, path: str, **kw: object) -> httpx.Response:
    with httpx.Client(base_url=f"https://127.0.0.1:{srv.port}", verify=setup.context(who), timeout=10) as c:
        return c.request(method, path, **kw)  # type: ignore[arg-type]


def test_each_certificate_gets_its_role(srv: ServerProcess, setup: Setup) -> None:
    put = {"json": {"value": "dg=="}}
    # reader (by CN): read only
    assert call(srv, setup, "reader", "GET", KV).status_code == 200
    r = call(srv, setup, "reader", "PUT", KV, **put)
    assert r.status_code == 403, r.text
    assert r.json()["error"].startswith("client certificate CN='Reporting Job' (sha256 ")
    assert "role 'read' may not do this; it needs role 'write'" in r.json()["error"]
    # writer (by fingerprint, which wins over its CN's read line): write, not backups
    assert call(srv, setup, "writer", "PUT", KV, **put).json() == {"success": True}
    assert call(srv, setup, "writer", "POST", SNAPSHOT, json={"path": "w.db"}).status_code == 403
    # admin (by CN, role name "backup"): backups too
    r = call(srv, setup, "admin", "POST", SNAPSHOT, json={"path": "a.db"})
    assert r.status_code == 200, r.text
    # a certificate the CA signed that the roles file does not name: nothing but /health
    r = call(srv, setup, "stranger", "GET", KV)
    assert r.status_code == 403
    fp = setup.clients["stranger"][2]
    assert r.json()["error"] == (
        f"client certificate CN='nobody' (sha256 {fp[:16]}...) has no role: add 'cn:nobody' or "
        f"'sha256:{fp}' to the --tls-client-roles file"
    )
    assert call(srv, setup, "stranger", "GET", "/health").status_code == 200
    # Without tokens configured an Authorization header changes nothing.
    r = call(srv, setup, "stranger", "GET", KV, headers={"Authorization": f"Bearer {WRITE_TOKEN}"})
    assert r.status_code == 403


def test_certificate_of_another_ca_is_refused_in_the_handshake(srv: ServerProcess, setup: Setup) -> None:
    # Same CN as the admin, but not signed by --tls-client-ca: no connection at all.
    with pytest.raises(httpx.TransportError):
        call(srv, setup, "intruder", "GET", "/health")


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_with_a_client_certificate(srv: ServerProcess, setup: Setup) -> None:
    crt, key, _ = setup.clients["writer"]
    base = ["curl", "-sS", "--cacert", str(setup.pki.ca_path), "--cert", str(crt), "--key", str(key)]
    url = f"https://127.0.0.1:{srv.port}{KV}"
    out = subprocess.run(
        [*base, "-X", "PUT", "-H", "content-type: application/json", "-d", '{"value":"Yw=="}', url],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert out.stdout.strip() == '{"success":true}', out
    out = subprocess.run([*base, url], capture_output=True, text=True, timeout=30, check=True)
    assert '"value":"Yw=="' in out.stdout, out


def test_tokens_and_certificate_roles_together(setup: Setup, tmp_path: Path) -> None:
    srv = _start(setup, tmp_path / "data", tokens=True)
    try:
        put = {"json": {"value": "dg=="}}
        bearer = {"Authorization": f"Bearer {WRITE_TOKEN}"}
        # No role for the certificate, but a good token: the token's role.
        assert call(srv, setup, "stranger", "PUT", KV, headers=bearer, **put).status_code == 200
        r = call(srv, setup, "stranger", "GET", KV)
        assert r.status_code == 403 and r.json()["error"].endswith("; send a bearer token"), r.text
        # A token, when sent, decides — also against a certificate with a higher role.
        assert (
            call(srv, setup, "admin", "POST", SNAPSHOT, headers=bearer, json={"path": "x.db"}).status_code
            == 403
        )
        r = call(srv, setup, "admin", "GET", KV, headers={"Authorization": "Bearer not-a-known-token-000"})
        assert r.status_code == 401 and r.json() == {"error": "invalid bearer token"}
        # No token: the certificate's role.
        assert call(srv, setup, "reader", "GET", KV).json()["found"] is True
        assert call(srv, setup, "reader", "PUT", KV, **put).status_code == 403
    finally:
        srv.stop()


def _cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "unisondb", "--data-dir", str(tmp_path / "d"), *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )


@pytest.mark.parametrize(
    "text,mode,pattern",
    [
        ("cn:x superuser\n", 0o644, "line 1: unknown role 'superuser' (use read, write or admin)"),
        ("sha256:abcd read\n", 0o644, "line 1: a sha256 fingerprint is 64 hex digits (colons allowed)"),
        ("# only a comment\nuser:x read\n", 0o644, "line 2: the selector must be cn:NAME or sha256:HEX"),
        ("read\n", 0o644, "line 1: expected '<cn:NAME | sha256:HEX> <role>'"),
        ("cn:a read\ncn:a write\n", 0o644, "line 2: cn:a is listed twice"),
        ("# nothing\n", 0o644, "holds no certificate"),
        ("cn:a read\n", 0o666, "is writable by other users (mode 0666)"),
    ],
)
def test_bad_roles_file_is_one_clear_error(
    setup: Setup, tmp_path: Path, text: str, mode: int, pattern: str
) -> None:
    roles = tmp_path / "roles"
    roles.write_text(text)
    roles.chmod(mode)
    args = setup.tls_args()
    args[args.index("--tls-client-roles") + 1] = str(roles)
    res = _cli(tmp_path, "--http-addr", f"127.0.0.1:{free_port()}", *args)
    assert res.returncode == 2, res
    assert res.stderr.startswith(f"error: TLS client roles file {roles}"), res.stderr
    assert pattern in res.stderr, res.stderr
    assert "Traceback" not in res.stderr


def test_roles_without_a_client_ca_are_refused(setup: Setup, tmp_path: Path) -> None:
    res = _cli(
        tmp_path,
        "--http-addr",
        f"127.0.0.1:{free_port()}",
        "--tls-cert",
        str(setup.server_crt),
        "--tls-key",
        str(setup.server_key),
        "--tls-client-roles",
        str(setup.roles),
    )
    assert res.returncode == 2, res
    assert "--tls-client-roles needs --tls-client-ca" in res.stderr, res.stderr
