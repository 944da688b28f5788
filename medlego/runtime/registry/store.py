"""Where adapter files live: immutable objects named by their sha256, in a folder or an S3 bucket.

A store knows nothing about names or references; the registry's index decides which objects
must exist (see the protocol in registry.py). Every read is verified against the name.
"""

from __future__ import annotations

import errno
import os
import threading
from collections import OrderedDict
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

    def get_tiered(self, sha: str) -> tuple[bytes | None, str]:
        """:meth:`get` and where the bytes came from: "node" (this machine's disk: a folder store, the
        node cache) or "store" (downloaded); for the pool's per-tier metrics."""
        return self.get(sha), "node"

    def delete(self, sha: str) -> None:
        """Remove the object (nothing happens when it is already gone)."""
        raise NotImplementedError

    def list(self) -> list[str]:
        """The sha256 of every complete object."""
        raise NotImplementedError

    def local_path(self, sha: str) -> Path | None:
        """A file on this machine holding the verified object; None when there is no such object."""
        raise NotImplementedError

    def warm(self, sha: str) -> str:
        """Make the object's bytes local to this node, without reading a copy that already is: "local"
        (the store is on this machine's disk), "cached" (in the node cache), "fetched" (downloaded,
        verified, cached) or "missing" (no such object)."""
        return "local"

    def warm_room(self) -> int | None:
        """Bytes a warm-up may place in the node cache before it starts evicting what it placed (None: no cache)."""
        return None

    def remove_stale_uploads(self, older_than_s: float) -> int:
        """Remove what writers that died left behind; how many were removed."""
        raise NotImplementedError

    # the audit trail's signed checkpoints (runtime/registry/audit.py), under the checkpoints/ prefix
    def put_checkpoint(self, name: str, data: bytes) -> None:
        raise NotImplementedError

    def checkpoints(self) -> list[tuple[str, bytes]]:
        """(name, bytes) of every checkpoint, sorted by name."""
        raise NotImplementedError


class TrustedFiles:
    """Reads of content-addressed files on this node, hashed once per version of each file.

    sha256 of a ViT-B adapter costs ~0.4 ms, a fifth of a cold load, and the bytes of a file that
    this process already verified change only if something writes the file. So each verified file
    is remembered with its (inode, size, mtime): a read that finds the same stat before and after
    it returns the bytes unhashed; any write (a damaged disk, a truncation, someone's editor, a
    replacement by rename) changes that signature and the next read hashes again. Bounded LRU:
    a forgotten file is simply hashed again. (Bit rot that changes no metadata is not seen here;
    the parse still validates structure and finiteness.)"""

    def __init__(self, max_entries: int = 65536):
        self._seen: OrderedDict[str, tuple[int, int, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.max_entries = max_entries

    @staticmethod
    def _sig(st: os.stat_result) -> tuple[int, int, int]:
        return st.st_ino, st.st_size, st.st_mtime_ns

    def read(self, path: Path, sha: str) -> tuple[bytes, bool]:
        """(the file's bytes, whether they are sha's); FileNotFoundError when there is no file."""
        with open(path, "rb") as fh:
            before = self._sig(os.fstat(fh.fileno()))
            data = fh.read()
            after = self._sig(os.fstat(fh.fileno()))  # a write during the read: hash what was read
        key = str(path)
        with self._lock:
            trusted = before == after == self._seen.get(key) and len(data) == before[1]
        if trusted:
            return data, True
        ok = sha256_hex(data) == sha
        if ok and before == after:
            self.remember(path, after)
        return data, ok

    def remember(self, path: Path, sig: tuple[int, int, int] | None = None) -> None:
        """Trust the file as it is now (its bytes were just verified, or written from verified bytes)."""
        try:
            sig = sig or self._sig(os.stat(path))
        except FileNotFoundError:
            return
        with self._lock:
            self._seen[str(path)] = sig
            self._seen.move_to_end(str(path))
            while len(self._seen) > self.max_entries:
                self._seen.popitem(last=False)

    def trusts(self, path: Path) -> bool:
        """Whether the file is as it was when last verified (False when it is gone)."""
        try:
            sig = self._sig(os.stat(path))
        except FileNotFoundError:
            return False
        with self._lock:
            return self._seen.get(str(path)) == sig

    def forget(self, path: Path) -> None:
        with self._lock:
            self._seen.pop(str(path), None)


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
