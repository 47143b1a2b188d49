"""Process lifecycle: open every namespace (recovering it), serve HTTP, shut down cleanly.

Shutdown on SIGTERM/SIGINT (uvicorn's handlers): stop accepting connections, let
in-flight requests finish (their writes complete their group commit), then close each
engine: the writer drains its queue, the WAL is fsynced, LMDB is synced and closed, and
the namespace LOCK is released.
"""

from __future__ import annotations

import signal
import socket

import structlog
import uvicorn

from unisondb import logging as ulog
from unisondb.api.app import build_app
from unisondb.config import ServerConfig
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
                    log.info("server.listening", url=f"http://{host}:{port}")


def serve(cfg: ServerConfig) -> int:
    ulog.configure(cfg.log_format)
    try:
        cfg.data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise from_os_error(exc, cfg.data_dir) from exc
    engines = open_engines(cfg)
    metrics = Metrics()
    metrics.watch_engines(lambda: list(engines.values()))
    for ns in engines:
        metrics.init_namespace(ns)
    fsutil.fsync_observer = metrics.fsync_seconds.observe
    app = build_app(engines, metrics, data_dir=str(cfg.data_dir.resolve()),
                    max_body_bytes=cfg.max_body_bytes)
    uv = uvicorn.Config(
        app, host=cfg.host, port=cfg.port, loop="uvloop", http="httptools", lifespan="off",
        access_log=False, log_level="warning", timeout_graceful_shutdown=30,
        server_header=False,
        # We sit behind no proxy by default; X-Forwarded-* parsing costs every request.
        proxy_headers=False,
    )
    server = _Server(uv)
    log.info("server.starting", data_dir=str(cfg.data_dir), namespaces=sorted(engines))
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
