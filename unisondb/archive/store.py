"""The narrow object-store client the archive uses: a few calls, one place where S3 errors are translated.

Why boto3 (docs/ARCHIVE.md has the long form): it is the AWS SDK itself, so it follows the standard
credential chain (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN``,
``AWS_PROFILE``, ``~/.aws/credentials`` and ``~/.aws/config``, instance and container roles) exactly as
``aws s3`` does; it speaks to any S3-compatible endpoint (``endpoint_url``) with path-style addressing;
and since 1.35 ``put_object`` takes ``IfNoneMatch='*'`` and ``IfMatch=etag``, the conditional writes the
single-writer lease and the never-overwrite rule rest on.

Objects above ``multipart_threshold`` (default 64 MiB; one S3 PUT holds at most 5 GiB) are sent as a
multipart upload whose ``CompleteMultipartUpload`` carries ``If-None-Match: *`` (AWS since 2024-08,
SeaweedFS too: ``tests/archive/test_archive_multipart.py``), so a big object is created-if-absent
exactly like a small one; a failed or refused upload is aborted. Every upload (not the lease) first
takes its bytes from the ``--archive-rate-limit`` token bucket (``unisondb/ratelimit.py``).

Every call goes through :func:`_translate`, so callers only ever see ``unisondb.errors``:

=============================================  ====================================================
S3 answer                                      error
=============================================  ====================================================
412 on ``put_if_absent``                       ``ObjectExists``
412 on ``put_if_match``                        ``ObjectChanged``
404 / NoSuchKey / NoSuchBucket                 ``NotFound``
401 / 403 (bad signature, denied)              ``PermissionDenied``
other 4xx (bad bucket name, bad request)       ``InvalidRequest``
5xx, throttling, connection/timeout failures   ``ArchiveUnavailable`` (the only retryable one)
=============================================  ====================================================
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import IO, Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from unisondb.errors import (
    ArchiveUnavailable,
    InvalidRequest,
    NotFound,
    ObjectChanged,
    ObjectExists,
    PermissionDenied,
    UnisonDBError,
)
from unisondb.ratelimit import TokenBucket

_URL_RE = re.compile(r"^s3://(?P<bucket>[a-z0-9][a-z0-9.-]{1,61}[a-z0-9])(?:/(?P<prefix>.*))?$")
_THROTTLED = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "ServiceUnavailable",
    "InternalError",
}


#: Objects larger than this go up as a multipart upload (S3 allows 5 GiB in one PUT; smaller
#: parts also bound the memory and the time one request holds the rate limiter).
MULTIPART_THRESHOLD = 64 << 20
#: Part size (S3: at least 5 MiB except the last, at most 10 000 parts — raised to fit).
PART_SIZE = 16 << 20
MIN_PART_SIZE = 5 << 20
MAX_PARTS = 10_000


@dataclass(frozen=True)
class ArchiveURL:
    """``s3://bucket/prefix``: the prefix has no leading or trailing slash (may be empty)."""

    bucket: str
    prefix: str

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"


def parse_url(url: str) -> ArchiveURL:
    match = _URL_RE.match(url)
    if not match:
        raise InvalidRequest(
            f"invalid archive URL {url!r}: expected s3://bucket/prefix "
            "(bucket: 3-63 lowercase letters, digits, dots, dashes)"
        )
    prefix = (match["prefix"] or "").strip("/")
    if "//" in prefix or any(part in (".", "..") for part in prefix.split("/") if prefix):
        raise InvalidRequest(f"invalid archive URL {url!r}: the prefix has an empty, '.' or '..' part")
    return ArchiveURL(match["bucket"], prefix)


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    etag: str
    #: Unix time the store last wrote the object (None when the answer lacked it).
    last_modified: float | None = None


class ObjectStore:
    """One bucket of an S3-compatible store. Thread-safe (boto3 clients are)."""

    def __init__(
        self,
        bucket: str,
        *,
        endpoint_url: str | None = None,
        path_style: bool = False,
        region: str | None = None,
        max_attempts: int = 3,
        client: Any = None,
        limiter: TokenBucket | None = None,
        multipart_threshold: int = MULTIPART_THRESHOLD,
        part_size: int = PART_SIZE,
    ) -> None:
        if part_size < MIN_PART_SIZE or multipart_threshold < part_size:
            raise ValueError(f"part size {part_size} must be >= 5 MiB and <= the multipart threshold")
        self.bucket = bucket
        self.endpoint_url = endpoint_url
        self.limiter = limiter
        self.multipart_threshold = multipart_threshold
        self.part_size = part_size
        if client is None:
            config = Config(
                s3={"addressing_style": "path" if path_style else "auto"},
                # botocore retries transient errors a few times inside one call; the archiver's own
                # backoff (archiver.py) handles outages longer than that.
                retries={"mode": "standard", "max_attempts": max_attempts},
                connect_timeout=5,
                read_timeout=60,
            )
            # region None: boto3 reads AWS_REGION / AWS_DEFAULT_REGION / the config file; an
            # S3-compatible endpoint that ignores regions still needs one for SigV4, so default it.
            session = boto3.session.Session()
            client = session.client(
                "s3",
                endpoint_url=endpoint_url,
                config=config,
                region_name=region or session.region_name or "us-east-1",
            )
        self._client = client

    def where(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def put_if_absent(self, key: str, body: bytes | IO[bytes]) -> str:
        """Create ``key``; ``ObjectExists`` if any object already has that name. Returns the ETag.

        A seekable file body is sent from its current position to its end; above the multipart
        threshold, as a multipart upload completed with the same condition."""
        size = _remaining(body)
        if size > self.multipart_threshold and not isinstance(body, bytes):
            return self._put_multipart(key, body, size)
        if self.limiter is not None:
            self.limiter.take(size)
        try:
            response = self._client.put_object(Bucket=self.bucket, Key=key, Body=body, IfNoneMatch="*")
        except (ClientError, BotoCoreError) as exc:
            raise _translate(exc, self.where(key), on_412=ObjectExists) from exc
        return str(response["ETag"])

    def _put_multipart(self, key: str, body: IO[bytes], size: int) -> str:
        part_size = max(self.part_size, -(-size // MAX_PARTS))
        try:
            upload_id = str(self._client.create_multipart_upload(Bucket=self.bucket, Key=key)["UploadId"])
        except (ClientError, BotoCoreError) as exc:
            raise _translate(exc, self.where(key)) from exc
        try:
            parts: list[dict[str, Any]] = []
            while chunk := body.read(part_size):
                if self.limiter is not None:
                    self.limiter.take(len(chunk))
                number = len(parts) + 1
                response = self._client.upload_part(
                    Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=chunk
                )
                parts.append({"ETag": response["ETag"], "PartNumber": number})
            done = self._client.complete_multipart_upload(
                Bucket=self.bucket,
                Key=key,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},
                IfNoneMatch="*",
            )
        except (ClientError, BotoCoreError) as exc:
            self._abort(key, upload_id)
            raise _translate(exc, self.where(key), on_412=ObjectExists) from exc
        except BaseException:
            self._abort(key, upload_id)
            raise
        return str(done["ETag"])

    def _abort(self, key: str, upload_id: str) -> None:
        # Best effort: an upload left behind (a crash here) is invisible to GET/LIST of objects and
        # is reclaimed by an AbortIncompleteMultipartUpload lifecycle rule (docs/ARCHIVE.md).
        try:
            self._client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
        except (ClientError, BotoCoreError):
            pass

    def put_if_match(self, key: str, body: bytes | IO[bytes], etag: str) -> str:
        """Replace ``key`` only if its ETag is still ``etag``; ``ObjectChanged`` otherwise."""
        try:
            response = self._client.put_object(Bucket=self.bucket, Key=key, Body=body, IfMatch=etag)
        except (ClientError, BotoCoreError) as exc:
            raise _translate(exc, self.where(key), on_412=ObjectChanged) from exc
        return str(response["ETag"])

    def get(self, key: str, *, length: int | None = None) -> tuple[bytes, str]:
        """The object's bytes (only the first ``length`` if given) and its ETag."""
        extra = {"Range": f"bytes=0-{length - 1}"} if length else {}
        try:
            response = self._client.get_object(Bucket=self.bucket, Key=key, **extra)
            return response["Body"].read(), str(response["ETag"])
        except (ClientError, BotoCoreError) as exc:
            raise _translate(exc, self.where(key)) from exc

    def open(self, key: str) -> IO[bytes]:
        """A streaming reader of the object (for decoding large objects with bounded memory)."""
        try:
            body: IO[bytes] = self._client.get_object(Bucket=self.bucket, Key=key)["Body"]
            return body
        except (ClientError, BotoCoreError) as exc:
            raise _translate(exc, self.where(key)) from exc

    def head(self, key: str) -> ObjectInfo | None:
        """Size and ETag, or None if there is no such object."""
        try:
            response = self._client.head_object(Bucket=self.bucket, Key=key)
        except (ClientError, BotoCoreError) as exc:
            error = _translate(exc, self.where(key))
            if isinstance(error, NotFound):
                return None
            raise error from exc
        return ObjectInfo(key, int(response["ContentLength"]), str(response["ETag"]), _time(response))

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Every object under ``prefix``, in key order. For rebuilding the catalog only: LIST is the
        expensive call (Litestream #234), so nothing on the steady-state upload path uses it."""
        paginator = self._client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
                for item in page.get("Contents", []):
                    yield ObjectInfo(str(item["Key"]), int(item["Size"]), str(item["ETag"]), _time(item))
        except (ClientError, BotoCoreError) as exc:
            raise _translate(exc, self.where(prefix)) from exc

    def delete_many(self, keys: Sequence[str]) -> None:
        """Remove up to ``DELETE_BATCH`` keys in one request (retention's segment pruning). Any key
        the store reports as not deleted fails the call, naming it."""
        if not keys:
            return
        if len(keys) > DELETE_BATCH:
            raise ValueError(f"at most {DELETE_BATCH} keys per delete, got {len(keys)}")
        try:
            response = self._client.delete_objects(
                Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in keys], "Quiet": True}
            )
        except (ClientError, BotoCoreError) as exc:
            raise _translate(exc, self.where(keys[0])) from exc
        errors = response.get("Errors") or []
        if errors:
            first = errors[0]
            where = self.where(str(first.get("Key", keys[0])))
            detail = f"{first.get('Code', '')}: {first.get('Message', '')}"
            if str(first.get("Code", "")) in ("AccessDenied",):
                raise PermissionDenied(f"object store refused to delete {where} ({detail})")
            raise ArchiveUnavailable(
                f"object store did not delete {where} and {len(errors) - 1} more ({detail})"
            )

    def delete(self, key: str) -> None:
        """Remove ``key`` (no error if it is already gone: S3 DELETE is idempotent)."""
        try:
            self._client.delete_object(Bucket=self.bucket, Key=key)
        except (ClientError, BotoCoreError) as exc:
            raise _translate(exc, self.where(key)) from exc


#: Keys per DeleteObjects request (the S3 maximum).
DELETE_BATCH = 1000


def _time(answer: dict[str, Any]) -> float | None:
    stamp = answer.get("LastModified")
    return float(stamp.timestamp()) if stamp is not None else None


def _remaining(body: bytes | IO[bytes]) -> int:
    """Bytes from the body's position to its end (what a PUT of it sends)."""
    if isinstance(body, (bytes, bytearray)):
        return len(body)
    here = body.tell()
    end = body.seek(0, os.SEEK_END)
    body.seek(here)
    return end - here


def _translate(
    exc: ClientError | BotoCoreError, where: str, on_412: type[UnisonDBError] = ObjectChanged
) -> UnisonDBError:
    if not isinstance(exc, ClientError):
        # EndpointConnectionError, ReadTimeoutError, ConnectionClosedError, NoCredentialsError, ...
        name = type(exc).__name__
        if name in ("NoCredentialsError", "PartialCredentialsError"):
            return PermissionDenied(
                f"no AWS credentials for {where}",
                hint="set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE",
            )
        return ArchiveUnavailable(f"object store unreachable for {where}: {exc}")
    error = exc.response.get("Error", {})
    code = str(error.get("Code", ""))
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    detail = f"{code or status}: {error.get('Message', '')}".rstrip(": ")
    if status == 412 or code == "PreconditionFailed":
        return on_412(f"{where} changed under a conditional write ({detail})")
    if status == 404 or code in ("NoSuchKey", "NoSuchBucket", "404"):
        hint = "create the bucket or fix --archive-url" if code == "NoSuchBucket" else None
        return NotFound(f"not in the archive: {where} ({detail})", hint=hint)
    if status in (401, 403):
        return PermissionDenied(
            f"object store refused access to {where} ({detail})",
            hint="check the AWS credentials and the bucket policy",
        )
    if status >= 500 or status == 429 or code in _THROTTLED:
        return ArchiveUnavailable(f"object store failed on {where} ({detail})")
    return InvalidRequest(f"object store rejected a request for {where} ({detail})")
