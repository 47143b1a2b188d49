"""Bearer-token authentication: the token file, roles, and the ASGI guard in front of every route.

(Client certificates can carry the same roles: ``api/clientcert.py``; the guard below
checks both.)

Token file (``--auth-token-file``; mode 0600 or stricter, owned by the server's user)::

    # comments and blank lines are ignored
    <token> <role>
    3q2+7w...base64url-or-hex...  read
    Zx81...                       write
    Kp0d...                       admin

One token per line, then whitespace, then its role. A token is 16 to 512 characters of
``A-Z a-z 0-9 - . _ ~ + / =`` (RFC 6750's b64token), e.g. ``openssl rand -hex 32``.
Roles are ordered: ``read`` (GET of keys, offset, stats, checkpoint, /openapi.json and —
unless ``--metrics-auth none`` — /metrics) < ``write`` (also PUT, DELETE, batch) <
``admin`` (also the backup endpoints; ``backup`` is accepted as another name for it).

``/health`` and ``/healthz`` never need a token (load balancers and the restore drill
probe them). Everything else does, unknown routes included (401 comes before 404, so an
anonymous client learns nothing about what exists). Refusals use the API's envelope:
401 ``{"error": ...}`` with ``WWW-Authenticate: Bearer`` for a missing or unknown token,
403 when the token's role is too low.

A presented token is compared with *every* configured token with ``hmac.compare_digest``
(no early exit), so the time taken tells nothing about which bytes matched; only a
length difference is visible, as Python documents. (Hashing both sides first would hide
the length too, but SHA-256 of a short string costs ~2 µs here — ~5 % of a GET.)
"""

from __future__ import annotations

import hmac
import os
import re
import stat
from collections.abc import Awaitable, Iterator, Mapping
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

from starlette.types import ASGIApp, Receive, Scope, Send

from unisondb.api.errors import error_body
from unisondb.errors import InvalidRequest


class Role(IntEnum):
    READ = 1
    WRITE = 2
    ADMIN = 3


ROLE_NAMES: Mapping[str, Role] = {
    "read": Role.READ,
    "write": Role.WRITE,
    "admin": Role.ADMIN,
    "backup": Role.ADMIN,
}
_TOKEN_RE = re.compile(r"^[A-Za-z0-9\-._~+/]+=*$")
_PUBLIC = frozenset({b"/health", b"/healthz"})
_REALM = 'Bearer realm="unisondb"'
_compare_digest = hmac.compare_digest  # a global, not a module attribute, on the hot path
#: ASGI scope key of the connection's verified client certificate (``api/clientcert.py``).
CLIENT_CERT_SCOPE_KEY = "unisondb.client_cert"


@dataclass(frozen=True, slots=True)
class TokenTable:
    """(token, role) of every configured token."""

    entries: tuple[tuple[bytes, Role], ...]

    def role_of(self, token: bytes) -> Role | None:
        found: Role | None = None
        for known, role in self.entries:  # no early exit: same work whichever one matches
            if _compare_digest(token, known):
                found = role
        return found


def read_config_lines(path: Path, label: str, forbidden_mode: int, hint: str) -> Iterator[tuple[str, str]]:
    """The meaningful lines of a small credentials file (``label`` names it in messages), as
    (``"<label> <path> line N"``, stripped line), skipping blanks and ``#`` comments. The file
    must be UTF-8 and have none of the ``forbidden_mode`` bits; each problem is one
    ``InvalidRequest``. Shared by the token file and the TLS client roles file."""
    try:
        st = os.stat(path)
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidRequest(f"cannot read {label} {path}: {exc.strerror}") from exc
    except UnicodeDecodeError:
        raise InvalidRequest(f"{label} {path} is not UTF-8 text") from None
    if st.st_mode & forbidden_mode:
        who = "readable" if forbidden_mode & (stat.S_IRGRP | stat.S_IROTH) else "writable"
        raise InvalidRequest(
            f"{label} {path} is {who} by other users (mode {stat.S_IMODE(st.st_mode):04o})",
            hint=hint,
        )
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if line and not line.startswith("#"):
            yield f"{label} {path} line {lineno}", line


def load_tokens(path: Path) -> TokenTable:
    """Read and check a token file; every problem is one ``InvalidRequest`` naming the line."""
    entries: list[tuple[bytes, Role]] = []
    seen: set[str] = set()
    lines = read_config_lines(path, "auth token file", stat.S_IRWXG | stat.S_IRWXO, f"chmod 600 {path}")
    for where, line in lines:
        fields = line.split()
        if len(fields) != 2:
            raise InvalidRequest(f"{where}: expected '<token> <role>', got {len(fields)} field(s)")
        token, role_name = fields
        role = ROLE_NAMES.get(role_name.lower())
        if role is None:
            raise InvalidRequest(f"{where}: unknown role {role_name!r} (use read, write or admin)")
        if not 16 <= len(token) <= 512 or not _TOKEN_RE.match(token):
            raise InvalidRequest(
                f"{where}: a token must be 16 to 512 characters of A-Z a-z 0-9 - . _ ~ + / =",
                hint="generate one with: openssl rand -hex 32",
            )
        if token in seen:
            raise InvalidRequest(f"{where}: this token is listed twice")
        seen.add(token)
        entries.append((token.encode("ascii"), role))
    if not entries:
        raise InvalidRequest(
            f"auth token file {path} holds no token",
            hint="add a line '<token> <role>', e.g. from: openssl rand -hex 32",
        )
    return TokenTable(tuple(entries))


#: Module constants: an enum member looked up as ``Role.X`` costs ~0.1 µs on Python 3.11.
_READ, _WRITE, _ADMIN = Role.READ, Role.WRITE, Role.ADMIN
_ADMIN_SUFFIXES = (b"/backup", b"/backups", b"/archive/snapshot")


def required_role(method: str, raw_path: bytes, metrics_open: bool) -> Role | None:
    """The least role a request needs; None: no token needed."""
    if raw_path in _PUBLIC or (metrics_open and raw_path == b"/metrics"):
        return None
    if raw_path.endswith(_ADMIN_SUFFIXES):  # one call for every other path; split only then
        parts = raw_path.split(b"/")
        if raw_path.endswith(b"/backup"):
            # [b"", b"api", b"v1", ns, b"wal"|b"btree", b"backup"]
            if len(parts) == 6 and parts[4] in (b"wal", b"btree"):
                return _ADMIN
        elif raw_path.endswith(b"/backups"):
            if len(parts) == 5:
                return _ADMIN  # GET /api/v1/<ns>/backups: the backup catalog
        else:
            return _ADMIN  # .../archive/snapshot uploads a whole snapshot: a backup route
    if method == "GET" or method == "HEAD":
        return _READ
    return _WRITE


def _refusal(status: int, message: str, challenge: str) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
    body = error_body(message)
    return (
        status,
        body,
        [
            (b"content-type", b"application/json"),
            (b"content-length", b"%d" % len(body)),
            (b"www-authenticate", challenge.encode("ascii")),
        ],
    )


class BearerAuth:
    """ASGI middleware in front of the fast path and the full app alike: one check for both.

    ``tokens``: the token table (None: bearer tokens are off, an Authorization header is
    ignored). ``client_certs``: the protocol puts each connection's ``CertIdentity`` into
    the scope (``api/clientcert.py``). A request's role is its token's when it sends one
    (an unknown token is 401 even with a good certificate), else its certificate's.
    """

    def __init__(
        self, app: ASGIApp, tokens: TokenTable | None, *, metrics_open: bool, client_certs: bool = False
    ) -> None:
        self.app = app
        self.tokens = tokens
        self.metrics_open = metrics_open
        self.client_certs = client_certs

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        # Not a coroutine itself: an admitted request gets the inner app's own awaitable,
        # so the guard adds no coroutine frame (~1 µs, a few % of a fast-path GET).
        if scope["type"] == "http":
            refusal = self.check(scope)
            if refusal is not None:
                return self._refuse(scope, send, refusal)
        return self.app(scope, receive, send)

    @staticmethod
    async def _refuse(
        scope: Scope, send: Send, refusal: tuple[int, bytes, list[tuple[bytes, bytes]]]
    ) -> None:
        status, body, headers = refusal
        scope["endpoint"] = auth_refused  # the metrics label of these responses
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def check(self, scope: Scope) -> tuple[int, bytes, list[tuple[bytes, bytes]]] | None:
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode()  # no query in it
        need = required_role(scope["method"], raw_path, self.metrics_open)
        if need is None:
            return None
        tokens = self.tokens
        presented = b""
        if tokens is not None:
            for name, value in scope["headers"]:
                if name == b"authorization":
                    scheme, _, rest = value.strip().partition(b" ")
                    if scheme.lower() == b"bearer":
                        presented = rest.strip()
                    break
        if presented:
            assert tokens is not None
            role = tokens.role_of(presented)
            if role is None:
                return _refusal(401, "invalid bearer token", _REALM + ', error="invalid_token"')
            if role >= need:
                return None  # the common case: no more work
            who = "token"
        else:
            cert = scope.get(CLIENT_CERT_SCOPE_KEY) if self.client_certs else None
            if cert is None:
                return _refusal(401, "authentication required: send 'Authorization: Bearer <token>'", _REALM)
            role, who = cert.role, cert.describe()
            if role is None:
                hint = "; send a bearer token" if self.tokens is not None else ""
                return _refusal(
                    403,
                    f"{who} has no role: add 'cn:{cert.cn}' or 'sha256:{cert.sha256}' to the "
                    f"--tls-client-roles file{hint}",
                    _REALM + ', error="insufficient_scope"',
                )
        if role < need:
            return _refusal(
                403,
                f"{who} role '{role.name.lower()}' may not do this; it needs role '{need.name.lower()}'",
                _REALM + ', error="insufficient_scope"',
            )
        return None


async def auth_refused() -> None:
    """Named only so refused requests get ``route="auth_refused"`` in the metrics."""
