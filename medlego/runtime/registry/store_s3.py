"""The fleet store: objects ``<PREFIX>/<sha256>.safetensors`` in an S3-compatible bucket (boto3).

Configured the standard way, from the environment: ``AWS_ENDPOINT_URL`` (MinIO, Ceph, moto, or
unset for AWS), ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``. A PUT is atomic
(S3 never shows half an object) and reads are strongly consistent, so the registry's protocol
needs nothing more from the bucket. Reads go through the node's :class:`~.node_cache.NodeCache`;
every download is verified against its sha256 before it is cached or returned.
"""

from __future__ import annotations

import os
import re
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

from boto3.session import Session
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from ..errors import BadInputError, StorageUnavailableError
from .store import Store, verified
from .node_cache import NodeCache

_MISSING = {"404", "NoSuchKey", "NotFound"}


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
            config=Config(connect_timeout=5, read_timeout=60, retries={"max_attempts": 3, "mode": "standard"}))
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
        data = self.cache.get(sha)
        if data is None:
            data = self._download(sha)
            if data is None:
                return None
            self.cache.put(sha, verified(sha, data))
        return data

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
        return self.cache.path(sha) if self.get(sha) is not None else None

    def remove_stale_uploads(self, older_than_s: float | None) -> int:
        return 0  # a PUT is atomic: a writer that dies leaves no partial object in a bucket


def _code(e: ClientError) -> str:
    return str(e.response.get("Error", {}).get("Code", ""))
