"""The fleet store: objects ``<PREFIX>/<sha256>.safetensors`` in an S3-compatible bucket (boto3).

Configured the standard way, from the environment: ``AWS_ENDPOINT_URL`` (MinIO, Ceph, moto, or
unset for AWS), ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``. A PUT is atomic
(S3 never shows half an object) and reads are strongly consistent, so the registry's protocol
needs nothing more from the bucket. Reads go through the node's :class:`~.node_cache.NodeCache`;
every download is verified against its sha256 before it is cached or returned. A cache that
cannot take the file (its disk full) is only a warning: the verified bytes are served from memory.

Every request is bounded (an outage must not hold a thread for minutes): ``CONNECT_TIMEOUT_S`` to
connect, ``READ_TIMEOUT_S`` for each read of the answer, ``ATTEMPTS`` attempts in all (botocore's
standard retry mode, with its jittered back-off of at most a second here). A hung or unreachable
store therefore fails a call with :class:`StorageUnavailableError` (503) within about
``ATTEMPTS × (READ_TIMEOUT_S + 1)`` seconds.
"""

from __future__ import annotations

import logging
import os
import re
import time
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

from boto3.session import Session
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from ..errors import BadInputError, StorageFullError, StorageUnavailableError
from .store import Store, verified
from .node_cache import NodeCache

_MISSING = {"404", "NoSuchKey", "NotFound"}
CONNECT_TIMEOUT_S = 2.0
READ_TIMEOUT_S = 3.0  # per socket read, not per object: a large download that keeps flowing is not cut
ATTEMPTS = 2  # in all, the first included
CACHE_WARNING_INTERVAL_S = 60.0

_log = logging.getLogger(__name__)


class S3Store(Store):
    def __init__(self, url: str, cache: NodeCache):
        parts = urlsplit(url)
        self.url, self.bucket, self.cache = url, parts.netloc, cache
        if not self.bucket:
            raise BadInputError(f"bad store URL {url!r}: name the bucket, s3://BUCKET/PREFIX")
        prefix = parts.path.strip("/")
        self.prefix = f"{prefix}/" if prefix else ""
        self._object = re.compile(re.escape(self.prefix) + r"([0-9a-f]{64})\.safetensors\Z")
        self._s3 = Session().client(
            "s3", region_name=os.environ.get("AWS_REGION") or None,
            config=Config(connect_timeout=CONNECT_TIMEOUT_S, read_timeout=READ_TIMEOUT_S,
                          retries={"total_max_attempts": ATTEMPTS, "mode": "standard"}))
        self._cache_warned = 0.0
        with self._errors():
            try:
                self._s3.head_bucket(Bucket=self.bucket)
            except ClientError as e:
                if _code(e) in _MISSING | {"NoSuchBucket"}:
                    raise BadInputError(f"S3 bucket '{self.bucket}' does not exist (store {url})") from None
                raise

    @contextmanager
    def _errors(self):
        """Every failure of the service (unreachable, refused credentials) as one line."""
        try:
            yield
        except (BotoCoreError, ClientError) as e:
            raise StorageUnavailableError(f"cannot use the S3 store {self.url}: {e}") from None

    def _key(self, sha: str) -> str:
        return f"{self.prefix}{sha}.safetensors"

    def exists(self, sha: str) -> bool:
        with self._errors():
            try:
                self._s3.head_object(Bucket=self.bucket, Key=self._key(sha))
            except ClientError as e:
                if _code(e) in _MISSING:
                    return False
                raise
        return True

    def put(self, sha: str, data: bytes) -> None:
        with self._errors():
            self._s3.put_object(Bucket=self.bucket, Key=self._key(sha), Body=data,
                                ContentType="application/octet-stream")

    def _download(self, sha: str) -> bytes | None:
        with self._errors():
            try:
                body = self._s3.get_object(Bucket=self.bucket, Key=self._key(sha))["Body"]
            except ClientError as e:
                if _code(e) in _MISSING:
                    return None
                raise
            with body:
                return body.read()

    def get(self, sha: str) -> bytes | None:
        return self.get_tiered(sha)[0]

    def get_tiered(self, sha: str) -> tuple[bytes | None, str]:
        data = self.cache.get(sha)
        if data is not None:
            return data, "node"
        data = self._download(sha)
        if data is not None:
            self._cache(sha, verified(sha, data))
        return data, "store"

    def warm(self, sha: str) -> str:
        if self.cache.holds(sha):  # a damaged cached file is caught when it is read, and fetched then
            return "cached"
        data = self._download(sha)
        if data is None:
            return "missing"
        self._cache(sha, verified(sha, data))
        return "fetched"

    def warm_room(self) -> int | None:
        return self.cache.room()

    def _cache(self, sha: str, data: bytes) -> None:
        """Keep verified bytes in the node cache; a cache that cannot (its disk full) costs a warning, not the read."""
        try:
            self.cache.put(sha, data)
        except OSError as e:  # the cache removed its temp file; the bytes in hand are verified and served
            now = time.monotonic()
            if now - self._cache_warned >= CACHE_WARNING_INTERVAL_S:
                self._cache_warned = now
                _log.warning("node cache %s cannot keep adapter %s (%s); serving it from memory, and every cold "
                             "load reads the store until the cache has room", self.cache.root, sha[:12], e)

    def delete(self, sha: str) -> None:
        with self._errors():
            self._s3.delete_object(Bucket=self.bucket, Key=self._key(sha))  # no error when already gone

    def list(self) -> list[str]:
        out = []
        with self._errors():
            for page in self._s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix):
                for obj in page.get("Contents", []):
                    m = self._object.match(obj["Key"])
                    if m:
                        out.append(m[1])
        return sorted(out)

    def local_path(self, sha: str) -> Path | None:
        if self.get(sha) is None:
            return None
        path = self.cache.path(sha)
        if not path.is_file():  # the cache could not keep it (or evicted it at once)
            raise StorageFullError(f"the node cache {self.cache.root} cannot hold adapter {sha[:12]} (disk full?)")
        return path

    def put_checkpoint(self, name: str, data: bytes) -> None:
        with self._errors():
            self._s3.put_object(Bucket=self.bucket, Key=f"{self.prefix}checkpoints/{name}", Body=data,
                                ContentType="application/json")

    def checkpoints(self) -> list[tuple[str, bytes]]:
        out = []
        with self._errors():
            for page in self._s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                           Prefix=f"{self.prefix}checkpoints/"):
                for obj in page.get("Contents", []):
                    body = self._s3.get_object(Bucket=self.bucket, Key=obj["Key"])["Body"]
                    with body:
                        out.append((obj["Key"].rsplit("/", 1)[1], body.read()))
        return sorted(out)

    def remove_stale_uploads(self, older_than_s: float | None) -> int:
        return 0  # a PUT is atomic: a writer that dies leaves no partial object in a bucket


def _code(e: ClientError) -> str:
    return str(e.response.get("Error", {}).get("Code", ""))
