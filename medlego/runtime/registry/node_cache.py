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
import threading
import time
from pathlib import Path

from ..adapter import atomic_write
from .store import TrustedFiles


# Eviction scans the folder (a stat per file: ~10 ms at 10,000 files), so it is amortized: a process
# tracks what it added since its last scan and scans when that may have crossed the limit, or
# every RESCAN_PUTS insertions (what other processes of the node added); a scan evicts down to
# LOW_WATER of the limit, so the next scan is many insertions away.
RESCAN_PUTS = 256
LOW_WATER = 0.9


class NodeCache:
    def __init__(self, root: Path, max_bytes: int):
        self.root, self.max_bytes = root, max_bytes
        root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._known_bytes: int | None = None  # the folder's size at the last scan, plus this process's puts since
        self._puts = 0
        # bytes are verified when they enter the node (download → put); a cached file is hashed again
        # only when it changed since (store.TrustedFiles), not on every cold load
        self._trusted = TrustedFiles()

    def path(self, sha: str) -> Path:
        return self.root / f"{sha}.safetensors"

    def get(self, sha: str) -> bytes | None:
        """The cached bytes if present and intact (a damaged file is removed)."""
        path = self.path(sha)
        try:
            data, ok = self._trusted.read(path, sha)
        except FileNotFoundError:
            return None
        if not ok:
            self._trusted.forget(path)
            path.unlink(missing_ok=True)
            return None
        if _touch(path):  # most recently used; the new mtime is ours, not a write: still trusted
            self._trusted.remember(path)
        return data

    def holds(self, sha: str) -> bool:
        """Whether the object has a file here, marked most recently used (not read: a damaged file is found by get)."""
        path = self.path(sha)
        trusted = self._trusted.trusts(path)
        if not _touch(path):
            return False
        if trusted:  # the new mtime is ours, not a write
            self._trusted.remember(path)
        return True

    def room(self) -> int:
        """What a warm-up may fill: eviction scans trim to LOW_WATER of the limit, so more would evict its own files."""
        return int(self.max_bytes * LOW_WATER)

    def put(self, sha: str, data: bytes) -> None:
        """Insert bytes already verified against sha, then evict down to the limit."""
        # no fsync (~20 ms on a busy disk, on the cold-load path): after a crash, a torn file is caught by
        # the first read of any process (trust in TrustedFiles is per process) and fetched again
        atomic_write(self.path(sha), data, tmp_prefix=f".{os.getpid()}-{sha[:16]}.", durable=False)
        _touch(self.path(sha))
        self._trusted.remember(self.path(sha))  # written from verified bytes
        with self._lock:
            self._puts += 1
            if self._known_bytes is not None:
                self._known_bytes += len(data)
            due = self._known_bytes is None or self._known_bytes > self.max_bytes or self._puts >= RESCAN_PUTS
        if due:
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
        target = self.max_bytes if total <= self.max_bytes else int(self.max_bytes * LOW_WATER)
        for _, size, path in files:
            if total <= target:
                break
            if path != keep:
                path.unlink(missing_ok=True)
                self._trusted.forget(path)
                total -= size
        with self._lock:
            self._known_bytes, self._puts = total, 0


def _touch(path: Path) -> bool:
    """mtime = now, to the nanosecond: the kernel's own timestamps can be a clock tick coarse, which
    would make files used within one tick tie in the LRU order."""
    now = time.time_ns()
    try:
        os.utime(path, ns=(now, now))
    except FileNotFoundError:  # another process of the node evicted it just now: the caller has the bytes
        return False
    return True
