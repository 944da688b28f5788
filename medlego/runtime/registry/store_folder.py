"""The default store: ``<data_dir>/store/<sha256>.safetensors``, each file written by temp + rename.

A temp file is named ``.<pid>@<host>-<sha prefix>.….tmp``, so that a writer's death can be seen:
opening the store removes the temp files of dead processes of this host, and ``gc`` also removes
any temp file older than its grace period (a writer on another host sharing the folder).
"""

from __future__ import annotations

import os
import re
import socket
import time
from pathlib import Path

from ..adapter import atomic_write
from .store import Store, TrustedFiles, disk_full, verified

_OBJECT = re.compile(r"[0-9a-f]{64}\.safetensors\Z")
_TEMP = re.compile(r"\.(\d+)@(.+)-[0-9a-f]{16}\..*\.tmp\Z")


class FolderStore(Store):
    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self._host = socket.gethostname()
        self._trusted = TrustedFiles()  # a file is hashed once per process, not on every cold load
        self.remove_stale_uploads(None)

    def _path(self, sha: str) -> Path:
        return self.root / f"{sha}.safetensors"

    def exists(self, sha: str) -> bool:
        return self._path(sha).is_file()

    def put(self, sha: str, data: bytes) -> None:
        try:  # a failed write leaves no temp file (atomic_write removes it)
            atomic_write(self._path(sha), data, tmp_prefix=f".{os.getpid()}@{self._host}-{sha[:16]}.")
        except OSError as e:
            full = disk_full(e, str(self.root))
            if full is None:
                raise
            raise full from None

    def get(self, sha: str) -> bytes | None:
        try:
            data, ok = self._trusted.read(self._path(sha), sha)
        except FileNotFoundError:
            return None
        return data if ok else verified(sha, data)  # raises: the one-line "store is corrupt"

    def delete(self, sha: str) -> None:
        self._path(sha).unlink(missing_ok=True)

    def list(self) -> list[str]:
        return sorted(p.name[:64] for p in self.root.iterdir() if _OBJECT.match(p.name))

    def local_path(self, sha: str) -> Path | None:
        path = self._path(sha)
        return path if self.get(sha) is not None else None

    def put_checkpoint(self, name: str, data: bytes) -> None:
        folder = self.root / "checkpoints"
        folder.mkdir(exist_ok=True)
        atomic_write(folder / name, data)

    def checkpoints(self) -> list[tuple[str, bytes]]:
        folder = self.root / "checkpoints"
        if not folder.is_dir():
            return []
        return [(p.name, p.read_bytes()) for p in sorted(folder.glob("*.json"))]

    def remove_stale_uploads(self, older_than_s: float | None) -> int:
        """Temp files of dead writers on this host, and (when older_than_s is given) any older than that."""
        removed, now = 0, time.time()
        for p in self.root.glob(".*.tmp"):
            m = _TEMP.match(p.name)
            dead_here = m is not None and m[2] == self._host and int(m[1]) != os.getpid() and not _alive(int(m[1]))
            try:
                if dead_here or (older_than_s is not None and now - p.stat().st_mtime > older_than_s):
                    p.unlink()
                    removed += 1
            except FileNotFoundError:  # its writer renamed it, or another cleaner was first
                pass
        return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True
