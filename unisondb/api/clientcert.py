"""Client-certificate roles: the roles file, and the connection's certificate in each request.

With ``--tls-client-ca`` every connection presents a certificate the CA signed (the TLS
handshake fails otherwise). ``--tls-client-roles FILE`` gives those certificates the roles
bearer tokens have (``api/auth.py``), so a certificate alone can authenticate a client.

Roles file (not writable by other users: it grants access)::

    # <selector> <role>; the role is the last word, the selector everything before it
    cn:backup-client                  admin
    cn:Reporting Job                  read
    sha256:5F:0B:...:9A               write

``cn:<name>`` matches the subject's common name exactly (case-sensitive).
``sha256:<hex>`` matches the SHA-256 of the certificate's DER bytes — 64 hex digits,
colons and case as ``openssl x509 -noout -fingerprint -sha256`` prints them or not. A
fingerprint names one certificate and wins over a CN; a CN survives re-issuing. Roles are
``read``, ``write``, ``admin`` (``backup`` = ``admin``), as for tokens.

The certificate is looked up once per connection, when the handshake has finished
(``with_client_certs`` wraps the HTTP protocol class), and the result is put into every
request's ASGI scope under ``CLIENT_CERT_SCOPE_KEY`` for the guard in ``api/auth.py``.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unisondb.api.auth import CLIENT_CERT_SCOPE_KEY, ROLE_NAMES, Role, read_config_lines
from unisondb.errors import InvalidRequest

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True, slots=True)
class CertIdentity:
    """Who a verified client certificate is, and its role (None: not in the roles file)."""

    cn: str
    sha256: str
    role: Role | None

    def describe(self) -> str:
        return f"client certificate CN={self.cn!r} (sha256 {self.sha256[:16]}...)"


@dataclass(frozen=True, slots=True)
class ClientRoles:
    by_sha256: Mapping[str, Role]
    by_cn: Mapping[str, Role]

    def identify(self, der: bytes, cn: str) -> CertIdentity:
        fp = hashlib.sha256(der).hexdigest()
        role = self.by_sha256.get(fp)
        if role is None:
            role = self.by_cn.get(cn)
        return CertIdentity(cn, fp, role)


def load_client_roles(path: Path) -> ClientRoles:
    """Read and check a roles file; every problem is one ``InvalidRequest`` naming the line."""
    by_sha256: dict[str, Role] = {}
    by_cn: dict[str, Role] = {}
    lines = read_config_lines(path, "TLS client roles file", stat.S_IWGRP | stat.S_IWOTH, f"chmod 644 {path}")
    for where, line in lines:
        fields = line.rsplit(None, 1)
        if len(fields) != 2:
            raise InvalidRequest(f"{where}: expected '<cn:NAME | sha256:HEX> <role>'")
        selector, role_name = fields
        role = ROLE_NAMES.get(role_name.lower())
        if role is None:
            raise InvalidRequest(f"{where}: unknown role {role_name!r} (use read, write or admin)")
        kind, _, value = selector.partition(":")
        kind = kind.lower()
        if kind == "sha256":
            value = value.replace(":", "").lower()
            if not _HEX64.match(value):
                raise InvalidRequest(
                    f"{where}: a sha256 fingerprint is 64 hex digits (colons allowed)",
                    hint="print one with: openssl x509 -noout -fingerprint -sha256 -in client.crt",
                )
            table = by_sha256
        elif kind == "cn" and value.strip():
            value = value.strip()
            table = by_cn
        else:
            raise InvalidRequest(f"{where}: the selector must be cn:NAME or sha256:HEX, got {selector!r}")
        if value in table:
            raise InvalidRequest(f"{where}: {kind}:{value} is listed twice")
        table[value] = role
    if not by_sha256 and not by_cn:
        raise InvalidRequest(
            f"TLS client roles file {path} holds no certificate",
            hint="add a line 'cn:NAME <role>' or 'sha256:HEX <role>'",
        )
    return ClientRoles(by_sha256, by_cn)


def _common_name(cert: Mapping[str, Any]) -> str:
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return ""


def with_client_certs(protocol: type[asyncio.Protocol], roles: ClientRoles) -> type[asyncio.Protocol]:
    """``protocol`` (a class of ``api/protocol.py`` ``limited_protocol``) plus the scope key above."""

    class ClientCertProtocol(protocol):  # type: ignore[valid-type, misc]
        _client_cert: CertIdentity | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:
            # asyncio and uvloop call this once the handshake is done: the peer is known.
            ssl_object = transport.get_extra_info("ssl_object")
            if ssl_object is not None:
                der = ssl_object.getpeercert(binary_form=True)
                if der:
                    self._client_cert = roles.identify(der, _common_name(ssl_object.getpeercert() or {}))
            super().connection_made(transport)

        def _build_scope(self) -> Any:
            scope = super()._build_scope()
            scope[CLIENT_CERT_SCOPE_KEY] = self._client_cert
            return scope

    ClientCertProtocol.__name__ = f"ClientCert{protocol.__name__}"
    return ClientCertProtocol
