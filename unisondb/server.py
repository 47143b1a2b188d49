"""Process lifecycle: open every namespace (recovering it), serve HTTP, shut down cleanly.

Shutdown on SIGTERM/SIGINT, bounded by ``--shutdown-timeout`` (the timeline is in
``lifecycle.py``): stop accepting connections, let in-flight requests finish (their writes
complete their group commit), cancel backups still running at half the timeout (JSON 503,
``.tmp`` removed, nothing published later), then close each engine: the writer drains its
queue, the WAL is fsynced, LMDB is synced and closed once no reader is left, and the
namespace LOCK is released. A snapshot copy still inside LMDB at the deadline is abandoned
and the process exits without closing that environment.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import ssl
import sys
import time
from types import FrameType
from typing import TYPE_CHECKING, Any

import structlog
import uvicorn

from unisondb import lifecycle, memory
from unisondb import logging as ulog
from unisondb.api.app import build_app
from unisondb.api.auth import TokenTable, load_tokens
from unisondb.api.clientcert import ClientRoles, load_client_roles, with_client_certs
from unisondb.api.protocol import limited_protocol
from unisondb.backup import pacing, repair
from unisondb.config import SecurityConfig, ServerConfig
from unisondb.errors import InvalidRequest, from_os_error
from unisondb.lifecycle import Shutdown
from unisondb.metrics import Metrics
from unisondb.storage import fsutil, layout
from unisondb.storage.btree import read_namespace_label
from unisondb.storage.engine import Engine

if TYPE_CHECKING:
    from unisondb.archive.service import ArchiveService

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
            engines[ns] = Engine.open(cfg.data_dir, ns, cfg.engine, on_locked=repair.complete_interrupted)
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


def close_engines(engines: dict[str, Engine], readers_until: float | None = None) -> bool:
    """Close every engine; False if one was left open under a live reader (see
    ``Engine.close``): the process must then exit without running more Python cleanup."""
    clean = True
    for ns, eng in engines.items():
        try:
            clean = eng.close(readers_until) and clean
        except Exception as exc:  # keep closing the others; report every failure
            log.error("engine.close_failed", namespace=ns, error=str(exc))
    return clean


def start_archive(cfg: ServerConfig, engines: dict[str, Engine], metrics: Metrics) -> ArchiveService | None:
    """With ``--archive-url``: one archiver per namespace, started (docs/ARCHIVE.md)."""
    if not cfg.archive.enabled:
        return None
    from unisondb.archive.service import ArchiveService
    from unisondb.metrics import ArchiveMetrics

    service = ArchiveService(cfg.archive, cfg.data_dir, engines, ArchiveMetrics(metrics.registry))
    metrics.registry.register(service.collector())
    service.start()
    return service


class _Server(uvicorn.Server):
    stopping: Shutdown

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.stopping.begin()  # the deadline runs from the first signal
        super().handle_exit(sig, frame)

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


def check_security(cfg: ServerConfig) -> tuple[TokenTable | None, ClientRoles | None]:
    """Load the token file and TLS files now, so a mistake is one error line, not a traceback.

    A server reachable beyond loopback without any authentication is refused unless the
    operator says ``--insecure-no-auth``; client certificates (``--tls-client-ca``) count
    as authentication (with ``--tls-client-roles``, each certificate's role).
    """
    sec = cfg.security
    tokens = load_tokens(sec.token_file) if sec.token_file is not None else None
    if (
        tokens is None
        and sec.tls_client_ca is None
        and not sec.insecure_no_auth
        and not is_loopback(cfg.host)
    ):
        raise InvalidRequest(
            f"refusing to serve on {cfg.host}:{cfg.port} without authentication: anyone who "
            "reaches this address could read, write and delete data and fill the disk",
            hint="give --auth-token-file FILE (see docs/OPERATIONS.md), listen on 127.0.0.1, "
            "or pass --insecure-no-auth if a firewall or proxy does this job",
        )
    roles = load_client_roles(sec.tls_client_roles) if sec.tls_client_roles is not None else None
    if sec.tls_cert is not None:
        _check_tls(sec)
    return tokens, roles


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
            hint="both must be PEM files and the key must match the certificate",
        ) from exc
    except OSError as exc:  # after SSLError, which is an OSError too
        raise InvalidRequest(f"cannot read TLS file {exc.filename or sec.tls_cert}: {exc.strerror}") from exc


def _tls_kwargs(sec: SecurityConfig) -> dict[str, Any]:
    if sec.tls_cert is None:
        return {}
    kwargs: dict[str, Any] = {"ssl_certfile": str(sec.tls_cert), "ssl_keyfile": str(sec.tls_key)}
    if sec.tls_client_ca is not None:
        kwargs.update(ssl_ca_certs=str(sec.tls_client_ca), ssl_cert_reqs=ssl.CERT_REQUIRED)
    return kwargs


def serve(cfg: ServerConfig) -> int:
    ulog.configure(cfg.log_format)
    memory.limit_arenas()  # before the threads below start (unisondb/memory.py)
    tokens, client_roles = check_security(cfg)
    try:
        # Not Path.mkdir: a data dir this start creates must be fsynced into its parent, or a
        # power cut soon after loses the whole tree, acknowledged writes included (everything
        # below is synced, but an unsynced entry of data/ itself takes it all with it).
        fsutil.make_dirs(cfg.data_dir)
    except OSError as exc:
        raise from_os_error(exc, cfg.data_dir) from exc
    engines = open_engines(cfg)
    memory.release_free_heap()  # recovery's and the fingerprint check's buffers
    metrics = Metrics()
    try:
        archive = start_archive(cfg, engines, metrics)
    except BaseException:
        close_engines(engines)
        raise
    metrics.watch_engines(lambda: list(engines.values()))
    # One pacer for every backup of this server (backup/pacing.py): watches every WAL.
    pacing.install(
        pacing.Pacer(
            cfg.backup_rate_limit, wal_latency=lambda: [e.wal_sync_latency() for e in engines.values()]
        )
    )
    for ns in engines:
        metrics.init_namespace(ns)
    fsutil.fsync_observer = metrics.fsync_seconds.observe
    shutdown = Shutdown(cfg.shutdown_timeout)
    app = build_app(
        engines,
        metrics,
        data_dir=str(cfg.data_dir.resolve()),
        max_body_bytes=cfg.max_body_bytes,
        tokens=tokens,
        metrics_open=cfg.security.metrics_auth == "none",
        client_certs=client_roles is not None,
        archive=archive,
        shutdown=shutdown,
    )
    lean = app.lean if cfg.http.lean else None
    uv = uvicorn.Config(
        app,
        host=cfg.host,
        port=cfg.port,
        loop="uvloop",
        lifespan="off",
        # httptools parsing with the limits it lacks (api/protocol.py, docs/OPERATIONS.md),
        # and the lean path of the hot routes (api/lean.py) unless --http-lean off.
        http=limited_protocol(cfg.http, lean)
        if client_roles is None
        else with_client_certs(limited_protocol(cfg.http, lean), client_roles),
        access_log=False,
        log_level="warning",
        timeout_graceful_shutdown=max(1, int(cfg.shutdown_timeout * lifecycle.HTTP_GRACE_AT)),
        server_header=False,
        # We sit behind no proxy by default; X-Forwarded-* parsing costs every request.
        proxy_headers=False,
        **_tls_kwargs(cfg.security),
    )
    server = _Server(uv)
    server.stopping = shutdown
    log.info(
        "server.starting",
        data_dir=str(cfg.data_dir),
        namespaces=sorted(engines),
        auth="tokens" if tokens is not None else "none",
        client_cert_roles=client_roles is not None,
        tls=cfg.security.tls_cert is not None,
        http_lean=cfg.http.lean,
    )
    # uvicorn restores the previous handlers after a graceful shutdown and re-raises the
    # signal it caught; with the default SIGTERM handler that would kill the process
    # before the engines are closed. These handlers make that re-raise harmless.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: None)
    try:
        server.run()  # uses the uvloop loop factory from the config
    finally:
        if archive is not None:
            # Seal what the last writes left in the active segments and upload it before
            # the engines close, so a clean stop leaves the archive complete.
            archive.seal_all()
            archive.stop()
        clean = _stop(engines, shutdown)
        log.info("server.stopped")
    code = 0 if server.started else 1
    if not clean:
        # A thread is still inside LMDB (an uninterruptible snapshot copy) on an open
        # environment: end now, without interpreter cleanup that would wait for it.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _stop(engines: dict[str, Engine], shutdown: Shutdown) -> bool:
    """Wait for backups, cancel what is left, close the engines; all within the deadline."""
    until = shutdown.at(lifecycle.ABANDON_AT)
    shutdown.begin()  # also when the server stopped for another reason: no new backups
    left = shutdown.wait_jobs(until)
    if left:
        cancelled = shutdown.cancel_all()
        log.warning(
            "shutdown.backups_cancelled",
            backups=[j.what for j in cancelled],
            note="their .tmp files were removed; nothing of them is published",
        )
        # Publishing ones finish within moments (a rename, fsyncs, a sidecar).
        shutdown.wait_jobs(max(until, time.monotonic() + 1.0))
    return close_engines(engines, until)
