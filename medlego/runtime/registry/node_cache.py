"""A node-local, size-bounded cache of store objects: ``<cache_dir>/<sha256>.safetensors``.

Objects are immutable and named by content, so a cached file can never be stale; it can only be
missing (evicted by any process of the node) or damaged, and both fall back to the store.
Recency is the file's mtime, touched on every hit; after each insertion the least recently used
files are removed until the cache fits its byte limit again (the file just inserted stays, even
when it alone is larger than the limit: the caller is about to read it). Several processes may
share one cache folder: files appear by atomic rename and a file removed under a reader is a miss.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from ..adapter import atomic_write, sha256_hex


class NodeCache:
    def __init__(self, root: Path, max_bytes: int):
        self.root, self.max_bytes = root, max_bytes
        root.mkdir(parents=True, exist_ok=True)

    def path(self, sha: str) -> Path:
        return self.root / f"{sha}.safetensors"

    def get(self, sha: str) -> bytes | None:
        """The cached bytes if present and intact (a damaged file is removed)."""
        path = self.path(sha)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        if sha256_hex(data) != sha:
            path.unlink(missing_ok=True)
            return None
        _touch(path)  # most recently used
        return data

    def put(self, sha: str, data: bytes) -> None:
        """Insert bytes already verified against sha, then evict down to the limit."""
        atomic_write(self.path(sha), data, tmp_prefix=f".{os.getpid()}-{sha[:16]}.")
        _touch(self.path(sha))
        self._evict(keep=self.path(sha))

    def size(self) -> int:
        return sum(size for _, size, _ in self._files())

    def _files(self) -> list[tuple[int, int, Path]]:
        out = []
        for entry in os.scandir(self.root):
            if entry.name.endswith(".safetensors") and not entry.name.startswith("."):
                try:
                    st = entry.stat()
                except FileNotFoundError:
                    continue
                out.append((st.st_mtime_ns, st.st_size, Path(entry.path)))
        return out

    def _evict(self, keep: Path) -> None:
        files = sorted(self._files())  # oldest first
        total = sum(size for _, size, _ in files)
        for _, size, path in files:
            if total <= self.max_bytes:
                break
            if path != keep:
                path.unlink(missing_ok=True)
                total -= size


def _touch(path: Path) -> None:
    """mtime = now, to the nanosecond: the kernel's own timestamps can be a clock tick coarse, which
    would make files used within one tick tie in the LRU order."""
    now = time.time_ns()
    try:
        os.utime(path, ns=(now, now))
    except FileNotFoundError:  # another process of the node evicted it just now: the caller has the bytes
        pass
