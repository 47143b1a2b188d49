"""Process lifecycle: open every namespace (recovering it), serve HTTP, shut down cleanly.

Shutdown on SIGTERM/SIGINT (uvicorn's handlers): stop accepting connections, let
in-flight requests finish (their writes complete their group commit), then close each
engine: the writer drains its queue, the WAL is fsynced, LMDB is synced and closed, and
the namespace LOCK is released.
"""

from __future__ import annotations

import ipaddress
import signal
import socket
import ssl
from typing import Any

import structlog
import uvicorn

from unisondb import logging as ulog
from unisondb.api.app import build_app
from unisondb.api.auth import TokenTable, load_tokens
from unisondb.api.protocol import limited_protocol
from unisondb.config import SecurityConfig, ServerConfig
from unisondb.errors import InvalidRequest, from_os_error
from unisondb.metrics import Metrics
from unisondb.storage import fsutil, layout
from unisondb.storage.btree import read_namespace_label
from unisondb.storage.engine import Engine

log = structlog.get_logger(__name__)


def open_engines(cfg: ServerConfig) -> dict[str, Engine]:
    """Open configured namespaces plus any found on disk; on failure close what was opened.

    Namespaces already on disk are opened first, so a failure there (locked by another
    server, a corrupt log) stops startup before a new namespace directory is created.
    """
    _refuse_misplaced_snapshot(cfg)
    on_disk = layout.discover_namespaces(cfg.data_dir)
    names = on_disk + [n for n in cfg.namespaces if n not in on_disk]
    engines: dict[str, Engine] = {}
    try:
        for ns in names:
            engines[ns] = Engine.open(cfg.data_dir, ns, cfg.engine)
    except BaseException:
        close_engines(engines)
        raise
    return engines


def _refuse_misplaced_snapshot(cfg: ServerConfig) -> None:
    """A ``data.mdb`` at ``<data-dir>/db/`` or ``<data-dir>/`` belongs to no namespace.

    The document's restore drill copies a snapshot to ``$TEST_DIR/db/data.mdb``; serving
    an empty namespace instead would make a broken restore look like a working one.
    """
    for misplaced in (cfg.data_dir / "db" / "data.mdb", cfg.data_dir / "data.mdb"):
        if misplaced.exists():
            # The file names its own namespace (meta key ``namespace``): moving a snapshot
            # of 'users' into default/ would only be refused there on the next start.
            ns = read_namespace_label(misplaced) or "<namespace>"
            raise InvalidRequest(
                f"found {misplaced}, which belongs to no namespace: a B-tree snapshot must be "
                f"copied to <data-dir>/<namespace>/db/data.mdb",
                hint=f"move it to {cfg.data_dir / ns / 'db' / 'data.mdb'} (and remove "
                f"{misplaced.parent / 'lock.mdb'} if present), then start again",
            )


def close_engines(engines: dict[str, Engine]) -> None:
    for ns, eng in engines.items():
        try:
            eng.close()
        except Exception as exc:  # keep closing the others; report every failure
            log.error("engine.close_failed", namespace=ns, error=str(exc))


class _Server(uvicorn.Server):
    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            for server in self.servers:
                for sock in server.sockets:
                    host, port = sock.getsockname()[:2]
                    scheme = "https" if self.config.is_ssl else "http"
                    log.info("server.listening", url=f"{scheme}://{host}:{port}")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def check_security(cfg: ServerConfig) -> TokenTable | None:
    """Load the token file and TLS files now, so a mistake is one error line, not a traceback.

    A server reachable beyond loopback without any authentication is refused unless the
    operator says ``--insecure-no-auth``; client certificates (``--tls-client-ca``) count
    as authentication.
    """
    sec = cfg.security
    tokens = load_tokens(sec.token_file) if sec.token_file is not None else None
    if (tokens is None and sec.tls_client_ca is None and not sec.insecure_no_auth
            and not is_loopback(cfg.host)):
        raise InvalidRequest(
            f"refusing to serve on {cfg.host}:{cfg.port} without authentication: anyone who "
            "reaches this address could read, write and delete data and fill the disk",
            hint="give --auth-token-file FILE (see docs/OPERATIONS.md), listen on 127.0.0.1, "
                 "or pass --insecure-no-auth if a firewall or proxy does this job")
    if sec.tls_cert is not None:
        _check_tls(sec)
    return tokens


def _check_tls(sec: SecurityConfig) -> None:
    try:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(sec.tls_cert), str(sec.tls_key))
        if sec.tls_client_ca is not None:
            ctx.load_verify_locations(cafile=str(sec.tls_client_ca))
    except ssl.SSLError as exc:
        raise InvalidRequest(
            f"cannot use TLS certificate {sec.tls_cert} / key {sec.tls_key}"
            + (f" / client CA {sec.tls_client_ca}" if sec.tls_client_ca else "")
            + f": {exc.reason or exc}",
            hint="both must be PEM files and the key must match the certificate") from exc
    except OSError as exc:  # after SSLError, which is an OSError too
        raise InvalidRequest(f"cannot read TLS file {exc.filename or sec.tls_cert}: "
                             f"{exc.strerror}") from exc


def _tls_kwargs(sec: SecurityConfig) -> dict[str, Any]:
    if sec.tls_cert is None:
        return {}
    kwargs: dict[str, Any] = {"ssl_certfile": str(sec.tls_cert), "ssl_keyfile": str(sec.tls_key)}
    if sec.tls_client_ca is not None:
        kwargs.update(ssl_ca_certs=str(sec.tls_client_ca), ssl_cert_reqs=ssl.CERT_REQUIRED)
    return kwargs


def serve(cfg: ServerConfig) -> int:
    ulog.configure(cfg.log_format)
    tokens = check_security(cfg)
    try:
        # Not Path.mkdir: a data dir this start creates must be fsynced into its parent, or a
        # power cut soon after loses the whole tree, acknowledged writes included (everything
        # below is synced, but an unsynced entry of data/ itself takes it all with it).
        fsutil.make_dirs(cfg.data_dir)
    except OSError as exc:
        raise from_os_error(exc, cfg.data_dir) from exc
    engines = open_engines(cfg)
    metrics = Metrics()
    metrics.watch_engines(lambda: list(engines.values()))
    for ns in engines:
        metrics.init_namespace(ns)
    fsutil.fsync_observer = metrics.fsync_seconds.observe
    app = build_app(engines, metrics, data_dir=str(cfg.data_dir.resolve()),
                    max_body_bytes=cfg.max_body_bytes, tokens=tokens,
                    metrics_open=cfg.security.metrics_auth == "none")
    uv = uvicorn.Config(
        app, host=cfg.host, port=cfg.port, loop="uvloop", lifespan="off",
        # httptools parsing with the limits it lacks (api/protocol.py, docs/OPERATIONS.md).
        http=limited_protocol(cfg.http),
        access_log=False, log_level="warning", timeout_graceful_shutdown=30,
        server_header=False,
        # We sit behind no proxy by default; X-Forwarded-* parsing costs every request.
        proxy_headers=False,
        **_tls_kwargs(cfg.security),
    )
    server = _Server(uv)
    log.info("server.starting", data_dir=str(cfg.data_dir), namespaces=sorted(engines),
             auth="tokens" if tokens is not None else "none",
             tls=cfg.security.tls_cert is not None)
    # uvicorn restores the previous handlers after a graceful shutdown and re-raises the
    # signal it caught; with the default SIGTERM handler that would kill the process
    # before the engines are closed. These handlers make that re-raise harmless.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: None)
    try:
        server.run()  # uses the uvloop loop factory from the config
    finally:
        close_engines(engines)
        log.info("server.stopped")
    return 0 if server.started else 1
