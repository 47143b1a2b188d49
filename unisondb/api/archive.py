"""Archive endpoint (``--archive-url``; docs/ARCHIVE.md).

``POST /api/v1/{ns}/archive/snapshot`` (no body) → 200
``{"key", "lsn", "history", "sha256", "fingerprint", "bytes", "objectBytes"}`` once the snapshot
object, its manifest and the manifest copy are in the archive. 409 when archiving is off; 503
while the archive is unreachable or this server does not hold the writer lease yet.
"""

from __future__ import annotations

import anyio.to_thread
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from unisondb.api.kv import engine_for, json_response
from unisondb.errors import Conflict


def routes(prefix: str) -> list[Route]:
    return [Route(f"{prefix}/archive/snapshot", archive_snapshot, methods=["POST"])]


async def archive_snapshot(request: Request) -> Response:
    engine = engine_for(request)
    service = request.app.state.archive
    if service is None:
        raise Conflict(
            "archiving is off: this server was started without --archive-url",
            hint="use POST .../btree/backup for a local snapshot",
        )
    manifest = await anyio.to_thread.run_sync(service.snapshot, engine.namespace)
    return json_response(
        {
            "key": manifest.snapshot_key,
            "lsn": manifest.lsn,
            "history": manifest.history_id,
            "sha256": manifest.snapshot_sha256,
            "fingerprint": manifest.fingerprint,
            "bytes": manifest.snapshot_plain_size,
            "objectBytes": manifest.snapshot_object_size,
        }
    )
