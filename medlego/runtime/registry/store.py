"""Where adapter files live: immutable objects named by their sha256, in a folder or an S3 bucket.

A store knows nothing about names or references; the registry's index decides which objects
must exist (see the protocol in registry.py). Every read is verified against the name.
"""

from __future__ import annotations

import errno
from pathlib import Path
from urllib.parse import urlsplit

from ..adapter import sha256_hex
from ..errors import AdapterFormatError, BadInputError, StorageFullError

# a write that failed for want of space: the disk is full, a quota is reached, or a file-size limit
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


class Store:
    """Implemented by :class:`~.store_folder.FolderStore` and :class:`~.store_s3.S3Store`."""

    def exists(self, sha: str) -> bool:
        raise NotImplementedError

    def put(self, sha: str, data: bytes) -> None:
        """Write atomically: a reader sees the whole object or none."""
        raise NotImplementedError

    def get(self, sha: str) -> bytes | None:
        """The object's bytes, verified against sha; None when there is no such object."""
        raise NotImplementedError

    def delete(self, sha: str) -> None:
        """Remove the object (nothing happens when it is already gone)."""
        raise NotImplementedError

    def list(self) -> list[str]:
        """The sha256 of every complete object."""
        raise NotImplementedError

    def local_path(self, sha: str) -> Path | None:
        """A file on this machine holding the verified object; None when there is no such object."""
        raise NotImplementedError

    def remove_stale_uploads(self, older_than_s: float) -> int:
        """Remove what writers that died left behind; how many were removed."""
        raise NotImplementedError

    # the audit trail's signed checkpoints (runtime/registry/audit.py), under the checkpoints/ prefix
    def put_checkpoint(self, name: str, data: bytes) -> None:
        raise NotImplementedError

    def checkpoints(self) -> list[tuple[str, bytes]]:
        """(name, bytes) of every checkpoint, sorted by name."""
        raise NotImplementedError


def verified(sha: str, data: bytes) -> bytes:
    if sha256_hex(data) != sha:  # changed behind the registry's back
        raise AdapterFormatError(f"stored adapter file {sha} does not match its sha256; the store is corrupt")
    return data


def disk_full(e: BaseException, where: str) -> StorageFullError | None:
    """The one-line 507 for an OSError that says the disk is full (None for any other error)."""
    if isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS:
        return StorageFullError(f"no space left for the registry at {where} ({e.strerror or 'disk full'}); "
                                "nothing was stored: free space and retry")
    return None


def open_store(url: str | None, data_dir: Path, cache_dir: Path, cache_max_bytes: int) -> Store:
    """None: the folder ``<data_dir>/store``; ``s3://BUCKET/PREFIX``: a bucket, read through a node-local cache."""
    if url in (None, ""):
        from .store_folder import FolderStore

        return FolderStore(data_dir / "store")
    if urlsplit(url).scheme == "s3":
        from .node_cache import NodeCache

        try:
            from .store_s3 import S3Store
        except ModuleNotFoundError as e:
            from .index import missing_extra

            raise missing_extra(e, "an s3:// store") from None

        return S3Store(url, NodeCache(cache_dir, cache_max_bytes))
    raise BadInputError(f"unsupported store URL {url!r}: leave it unset for the folder <data-dir>/store, "
                        "or use s3://BUCKET/PREFIX")
