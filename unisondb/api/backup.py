"""Backup endpoints, exactly as the Backup and Restore document shows them.

``POST /api/v1/{ns}/wal/backup  {"afterSegmentId": N|null?, "backupDir": "rel/dir", "rotate": bool?}``
    → 200 ``{"backups": [{"segmentId", "path", "bytes", "sha256", "copied"}, ...]}`` ascending.
``POST /api/v1/{ns}/btree/backup  {"path": "rel/file"}``
    → 200 ``{"path", "bytes", "lsn", "sha256", "timeline", "segmentId", "copied"}``.

Each handler: parse the body (400 on bad input), validate the path against the file system
in a worker thread (400), then run the backup in a worker thread. Validation errors are the
client's mistake and are not counted as backup failures; everything after validation —
success, 409, 500, 507 — is recorded by ``_recorded`` (inside the worker thread, so a
client that disconnects mid-snapshot still gets its backup counted).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio.to_thread
import structlog
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from unisondb import lifecycle, memory
from unisondb.api.kv import engine_for, json_response
from unisondb.api.parsing import read_json_object
from unisondb.backup import paths, phases
from unisondb.backup.snapshot import Snapshot, take_snapshot
from unisondb.backup.wal_backup import WalCopy, backup_wal
from unisondb.errors import BackupGap, Conflict, InvalidRequest, Unavailable, UnisonDBError
from unisondb.lifecycle import Shutdown
from unisondb.metrics import Metrics
from unisondb.storage import layout
from unisondb.storage.engine import Engine

log = structlog.get_logger(__name__)
T = TypeVar("T")


def routes(prefix: str) -> list[Route]:
    return [
        Route(f"{prefix}/wal/backup", wal_backup, methods=["POST"]),
        Route(f"{prefix}/btree/backup", btree_backup, methods=["POST"]),
        Route(f"{prefix}/backups", list_backups_endpoint, methods=["GET"]),
    ]


async def list_backups_endpoint(request: Request) -> Response:
    """What ``backups/<ns>/`` can restore to: ``unisondb backup list --json`` of it."""
    from unisondb.restore.catalog import list_backups

    engine = engine_for(request)
    root = layout.backup_root(engine.data_dir, engine.namespace)
    return json_response(await anyio.to_thread.run_sync(list_backups, root))


@dataclass(frozen=True, slots=True)
class WalParams:
    after_segment_id: int
    backup_dir: tuple[str, ...]
    rotate: bool


def parse_wal_params(body: dict[str, Any]) -> WalParams:
    """Body of a WAL backup request; unknown fields are ignored."""
    after = body.get("afterSegmentId")
    if isinstance(after, float) and after.is_integer():
        # JSON has one number type: 42.0 is the integer 42 (JSON Schema agrees), and a
        # script that computes the id with jq or awk may well print it that way.
        after = int(after)
    if after is None:
        after = 0
    elif isinstance(after, bool) or not isinstance(after, int):
        raise InvalidRequest(f"afterSegmentId must be an integer >= 0 or null, got {_show(after)}")
    elif after < 0:
        raise InvalidRequest(f"afterSegmentId must be >= 0, got {after}")
    rotate = body.get("rotate")
    if rotate is None:
        rotate = False
    elif not isinstance(rotate, bool):
        raise InvalidRequest(f"rotate must be true or false, got {_show(rotate)}")
    if "backupDir" not in body:
        raise InvalidRequest("missing field 'backupDir': a relative path inside backups/<namespace>/")
    parts = paths.parse_relative(body["backupDir"], "backupDir", is_file=False)
    return WalParams(after, parts, rotate)


def parse_btree_params(body: dict[str, Any]) -> tuple[str, ...]:
    if "path" not in body:
        raise InvalidRequest(
            "missing field 'path': a relative file path inside "
            "backups/<namespace>/, e.g. 'snapshots/users.db'"
        )
    return paths.parse_relative(body["path"], "path", is_file=True)


def resolve_target(engine: Engine, parts: tuple[str, ...], field: str, is_file: bool) -> paths.Resolved:
    root = layout.backup_root(engine.data_dir, engine.namespace)
    return paths.resolve(root, parts, field, is_file=is_file)


async def wal_backup(request: Request) -> Response:
    engine = engine_for(request)
    params = parse_wal_params(await read_json_object(request))
    target = await anyio.to_thread.run_sync(resolve_target, engine, params.backup_dir, "backupDir", False)
    metrics: Metrics = request.app.state.metrics

    def run() -> list[WalCopy]:
        return backup_wal(engine, target, params.after_segment_id, params.rotate)

    copies = await _raced(
        target,
        _cancellable(
            request,
            "WAL backup",
            lambda: _recorded(
                metrics, engine.namespace, "wal", run, lambda cs: sum(c.bytes_written for c in cs)
            ),
        ),
    )
    return json_response(
        {
            "backups": [
                {
                    "segmentId": c.segment_id,
                    "path": str(c.path),
                    "bytes": c.size,
                    "sha256": c.sha256,
                    "copied": c.copied,
                }
                for c in copies
            ]
        }
    )


async def btree_backup(request: Request) -> Response:
    engine = engine_for(request)
    parts = parse_btree_params(await read_json_object(request))
    target = await anyio.to_thread.run_sync(resolve_target, engine, parts, "path", True)
    metrics: Metrics = request.app.state.metrics

    def run() -> Snapshot:
        return take_snapshot(engine, target)

    snap = await _raced(
        target,
        _cancellable(
            request,
            "snapshot",
            lambda: _recorded(metrics, engine.namespace, "btree", run, lambda s: s.bytes_written),
        ),
    )
    cp = snap.checkpoint
    return json_response(
        {
            "path": str(snap.path),
            "bytes": snap.size,
            "lsn": cp.applied_lsn,
            "sha256": snap.sha256,
            "timeline": cp.timeline,
            "segmentId": cp.segment_id,
            "copied": snap.copied,
        }
    )


async def _cancellable(request: Request, what: str, fn: Callable[[], T]) -> T:
    """Run one backup in a worker thread that a shutdown can cancel (``lifecycle``).

    Once the shutdown's cancel point passes, the client gets a JSON 503 at once; the
    thread can no longer publish anything, and its ``.tmp`` is removed (an LMDB copy
    cannot be interrupted, so the thread itself is abandoned, not stopped).
    """
    shutdown: Shutdown | None = request.app.state.shutdown
    if shutdown is None:
        return await anyio.to_thread.run_sync(fn)
    job = shutdown.start_job(what)

    def in_job() -> T:
        token = lifecycle.current_job.set(job)
        try:
            return fn()
        finally:
            lifecycle.current_job.reset(token)
            shutdown.finish(job)

    task = asyncio.ensure_future(anyio.to_thread.run_sync(in_job, abandon_on_cancel=True))
    while True:
        done, _ = await asyncio.wait({task}, timeout=_CANCEL_POLL_SECONDS)
        if done:
            return task.result()
        if shutdown.backups_due() and job.cancel():
            task.cancel()
            log.warning("backup.cancelled_by_shutdown", what=what)
            raise Unavailable(
                f"the server is shutting down: the {what} was cancelled before it finished; "
                "nothing was published for it",
                hint="retry once the server is back",
            )


#: How often a running backup's request checks whether a shutdown cancels it.
_CANCEL_POLL_SECONDS = 0.05


async def _raced(target: paths.Resolved, work: Awaitable[T]) -> T:
    """A file or directory that vanished under a running backup is a race (409), not a bug.

    The backup modules translate the OSErrors they expect; this catches the ones a
    concurrent rename or symlink swap can still raise from deeper down.
    """
    try:
        return await work
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise Conflict(
            f"{exc.filename or target.path} disappeared or changed while the backup "
            f"ran ({exc.strerror}); nothing was published for it, retry"
        ) from exc


def _recorded(
    metrics: Metrics, namespace: str, kind: str, fn: Callable[[], T], nbytes: Callable[[T], int]
) -> T:
    """Run one backup, recording success or failure, bytes and duration."""
    started = time.perf_counter()
    with phases.collecting() as spent:
        try:
            result = fn()
        except BaseException as exc:
            memory.release_free_heap()
            seconds = time.perf_counter() - started
            metrics.record_backup(namespace, kind, False, 0, seconds, spent)
            if isinstance(exc, BackupGap):
                metrics.backup_wal_gap.labels(namespace).inc()
            message = exc.message if isinstance(exc, UnisonDBError) else repr(exc)
            log.warning(
                "backup.failed", namespace=namespace, kind=kind, error=message, seconds=round(seconds, 3)
            )
            raise
    # The backup's big buffers are free now: hand them back (unisondb/memory.py).
    memory.release_free_heap()
    seconds = time.perf_counter() - started
    written = nbytes(result)
    metrics.record_backup(namespace, kind, True, written, seconds, spent)
    log.info(
        "backup.done",
        namespace=namespace,
        kind=kind,
        bytes_written=written,
        seconds=round(seconds, 3),
        phases={k: round(v, 3) for k, v in spent.items()},
    )
    return result


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, float):
        return f"a non-integer number ({value!r})"
    if isinstance(value, str):
        return f"a string ({value!r})"
    return type(value).__name__
