"""One writer per archive prefix: a lease object kept with S3 conditional writes.

``PREFIX/writer.lease`` is a small JSON document::

    {"format": 1, "writer_id": "...", "instance": "...", "host": "...", "pid": 123,
     "acquired_at": 1700000000.0, "renewed_at": 1700000010.0, "ttl_seconds": 30.0,
     "generation": 4, "released": false}

* **Acquire**: create it with ``If-None-Match: *``. If it exists, it may be taken over — with
  ``If-Match: <the ETag we read>``, so two contenders cannot both win — only when it was released,
  when it expired (``renewed_at + ttl_seconds`` is past), or when it names this ``writer_id`` on this
  host with a PID that is no longer alive (the same server restarting after a crash). Otherwise
  ``LeaseHeld`` names the holder.
* **Renew** (every ``ttl/3``): rewrite it with ``If-Match: <our last ETag>``. A 412 means someone took
  it over: ``LeaseHeld`` and the archiver stops writing; the other writer keeps going.
* **Release** (clean shutdown): rewrite it as released, with ``If-Match``.
* **Refused, then retried**: an ``acquire`` refused because another writer's lease is live
  remembers when that lease expires (``retry_in``). Until then ``acquire`` raises the same
  ``LeaseHeld`` without asking the store (an archiver woken every second by new segments must not
  GET the lease every second); after it, ``acquire`` reads the lease again and takes it over if
  it was not renewed. This closes the lease gap: a server restored from the archive and started
  within the TTL of the dead old one waits out the TTL, then archives its new history. A lease
  *lost while held* (a 412 on renew: a live writer took it over) is never retried.

Expiry compares ``renewed_at`` (the holder's clock) with the contender's clock, so the TTL must exceed
the clock skew between machines; the clock is a constructor argument so tests drive it.
``writer_id`` is stable for one server's data directory (persisting it is the caller's job);
``instance`` is fresh per process.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

from unisondb.archive import naming
from unisondb.archive.store import ObjectStore
from unisondb.errors import CorruptArchive, LeaseHeld, NotFound, ObjectChanged, ObjectExists

FORMAT = 1
DEFAULT_TTL_S = 30.0
#: Retry a refused acquire this long after the holder's lease expires (by our clock), so the
#: retry finds it expired rather than a moment before (``_may_take_over`` needs ``now > expiry``).
RETRY_MARGIN_S = 0.5


@dataclass(frozen=True)
class LeaseRecord:
    writer_id: str
    instance: str
    host: str
    pid: int
    acquired_at: float
    renewed_at: float
    ttl_seconds: float
    generation: int
    released: bool = False
    format: int = FORMAT

    def encode(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode() + b"\n"

    @classmethod
    def decode(cls, data: bytes, where: str) -> LeaseRecord:
        try:
            raw: dict[str, Any] = json.loads(data)
            if raw.get("format") != FORMAT:
                raise ValueError(f"format {raw.get('format')!r}")
            return cls(**raw)
        except (ValueError, TypeError) as exc:
            raise CorruptArchive(
                f"{where}: unreadable writer lease ({exc})",
                hint="if no server archives here, delete this object",
            ) from exc

    def describe(self, now: float) -> str:
        age = now - self.renewed_at
        return (
            f"writer {self.writer_id} (host {self.host}, pid {self.pid}, renewed {age:.0f} s ago, "
            f"expires in {max(0.0, self.ttl_seconds - age):.0f} s)"
        )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Lease:
    """The single-writer lease of one archive prefix, held by this process."""

    def __init__(
        self,
        store: ObjectStore,
        prefix: str,
        writer_id: str,
        *,
        ttl_seconds: float = DEFAULT_TTL_S,
        clock: Callable[[], float] = time.time,
        host: str | None = None,
        pid: int | None = None,
        pid_alive: Callable[[int], bool] = _pid_alive,
    ) -> None:
        self.store = store
        self.key = naming.lease_key(prefix)
        self.writer_id = writer_id
        self.ttl_seconds = ttl_seconds
        self._clock = clock
        self._host = host or socket.gethostname()
        self._pid = pid if pid is not None else os.getpid()
        self._pid_alive = pid_alive
        self._instance = uuid.uuid4().hex
        self._etag: str | None = None
        self._record: LeaseRecord | None = None
        # (clock time a refused acquire is worth retrying, the refusal): see acquire/retry_in.
        self._refusal: tuple[float, LeaseHeld] | None = None
        self._lock = threading.Lock()

    @property
    def held(self) -> bool:
        return self._etag is not None

    @property
    def renew_interval(self) -> float:
        return self.ttl_seconds / 3

    def _fresh(self, generation: int, acquired_at: float | None = None) -> LeaseRecord:
        now = self._clock()
        return LeaseRecord(
            self.writer_id,
            self._instance,
            self._host,
            self._pid,
            acquired_at if acquired_at is not None else now,
            now,
            self.ttl_seconds,
            generation,
        )

    def retry_in(self) -> float | None:
        """Seconds until a refused ``acquire`` is worth trying again (0: now); None when the last
        acquire was not refused by a live lease — e.g. the lease was lost while held."""
        with self._lock:
            if self._refusal is None:
                return None
            return max(0.0, self._refusal[0] - self._clock())

    def acquire(self) -> None:
        with self._lock:
            if self._refusal is not None:
                until, refused = self._refusal
                if self._clock() < until:  # the holder's lease is still live: no request
                    raise LeaseHeld(refused.message, hint=refused.hint)
                self._refusal = None
            record = self._fresh(1)
            try:
                self._etag = self.store.put_if_absent(self.key, record.encode())
                self._record = record
                return
            except ObjectExists:
                pass
            try:
                data, etag = self.store.get(self.key)
            except NotFound:  # released and deleted between our two calls: try once more from scratch
                self._etag = self.store.put_if_absent(self.key, record.encode())
                self._record = record
                return
            current = LeaseRecord.decode(data, self.store.where(self.key))
            now = self._clock()
            if not self._may_take_over(current, now):
                refused = LeaseHeld(
                    f"archive {self.store.where(self.key)} is held by {current.describe(now)}; "
                    "two servers must not archive to one prefix (this one retries when that "
                    "lease expires)",
                    hint="stop the other server or point this one at another --archive-url",
                )
                self._refusal = (current.renewed_at + current.ttl_seconds + RETRY_MARGIN_S, refused)
                raise refused
            record = self._fresh(current.generation + 1)
            try:
                self._etag = self.store.put_if_match(self.key, record.encode(), etag)
            except ObjectChanged as exc:
                refused = LeaseHeld(
                    f"archive {self.store.where(self.key)}: another server took the writer "
                    "lease at the same moment",
                    hint="stop the other server",
                )
                # The winner's lease is fresh: it is worth reading again after one TTL.
                self._refusal = (now + self.ttl_seconds + RETRY_MARGIN_S, refused)
                raise refused from exc
            self._record = record

    def _may_take_over(self, current: LeaseRecord, now: float) -> bool:
        if current.released or now > current.renewed_at + current.ttl_seconds:
            return True
        # The same server restarting after a crash: same id, same host, its old process is gone.
        return (
            current.writer_id == self.writer_id
            and current.host == self._host
            and current.pid != self._pid
            and not self._pid_alive(current.pid)
        )

    def renew(self) -> None:
        """Extend the lease; ``LeaseHeld`` if another writer took it (then stop writing)."""
        with self._lock:
            if self._etag is None or self._record is None:
                raise LeaseHeld(f"archive {self.store.where(self.key)}: the writer lease is not held")
            record = replace(self._record, renewed_at=self._clock())
            try:
                self._etag = self.store.put_if_match(self.key, record.encode(), self._etag)
            except ObjectChanged as exc:
                self._etag = None
                raise LeaseHeld(
                    f"archive {self.store.where(self.key)}: lost the writer lease to another "
                    "server; this server stops archiving",
                    hint="two servers were pointed at one --archive-url",
                ) from exc
            self._record = record

    def release(self) -> None:
        """Mark the lease released so the next writer need not wait for it to expire."""
        with self._lock:
            if self._etag is None or self._record is None:
                return
            record = replace(self._record, renewed_at=self._clock(), released=True)
            try:
                self.store.put_if_match(self.key, record.encode(), self._etag)
            except ObjectChanged:
                pass  # somebody else holds it now; nothing of ours to release
            finally:
                self._etag = None

    def read(self) -> LeaseRecord | None:
        """The lease as stored (for status and tests)."""
        try:
            data, _ = self.store.get(self.key)
        except NotFound:
            return None
        return LeaseRecord.decode(data, self.store.where(self.key))
