"""The adapter registry: a SQLite index plus content-addressed adapter files under one data dir.

Layout::

    <data_dir>/registry.db                  # index (WAL): versions, aliases, pins
    <data_dir>/store/<sha256>.safetensors   # immutable adapter files, named by content

Registration validates first, then writes the file atomically under its hash, then inserts the
index row in one transaction. A reader only ever sees a row whose file is complete, because the
file is renamed into place before the row exists. A crash between the two leaves an unreferenced
file (harmless, deduplicated on the next registration of the same bytes) or a temp file, which
the next :class:`Registry` open removes. Files are deleted only when no row references them, and
an engine that already loaded an adapter keeps its in-memory value, so a delete never pulls an
adapter out from under in-flight requests.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .adapter import Adapter, BaseSpec, atomic_write, parse_adapter, read_header, sha256_hex
from .errors import AdapterFormatError, AdapterNotFoundError, AdapterPinnedError, BadInputError, ConflictError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS adapters (
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    size INTEGER NOT NULL,
    created TEXT NOT NULL,
    pinned INTEGER NOT NULL DEFAULT 0,
    meta TEXT NOT NULL,
    PRIMARY KEY (name, version)
);
CREATE TABLE IF NOT EXISTS aliases (
    alias TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    version INTEGER  -- NULL: follow the latest version of name
);
"""


@dataclass(frozen=True)
class Entry:
    """One registered adapter version."""

    name: str
    version: int
    sha256: str
    path: Path
    size: int
    created: str
    pinned: bool
    tasks: list  # [{"name", "labels", "multilabel"}]
    meta: dict  # base, preprocess, ranks, params, provenance

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def to_json(self) -> dict:
        return {"name": self.name, "version": self.version, "ref": self.ref, "sha256": self.sha256,
                "size": self.size, "created": self.created, "pinned": self.pinned, "tasks": self.tasks,
                **{k: v for k, v in self.meta.items() if k != "tasks"}}


def parse_ref(ref: str) -> tuple[str, int | None]:
    """'name' -> (name, None); 'name@3' -> (name, 3)."""
    if "@" in ref:
        name, _, ver = ref.rpartition("@")
        if not ver.isdigit():
            raise BadInputError(f"bad adapter reference '{ref}': the version after '@' must be a number")
        return name, int(ver)
    return ref, None


def _check_name(name: str, what: str = "name") -> None:
    if not _NAME.match(name or ""):
        raise BadInputError(f"bad adapter {what} {name!r}: use letters, digits, '.', '_' or '-' (max 128)")


class Registry:
    """Name → versioned adapter file + metadata. Holds no device state; safe across processes."""

    def __init__(self, data_dir: str | os.PathLike, base: BaseSpec | None = None, max_rank: int | None = None,
                 input_size: int | None = None):
        self.root = Path(data_dir).expanduser()
        self.store = self.root / "store"
        self.store.mkdir(parents=True, exist_ok=True)
        self.base, self.max_rank, self.input_size = base, max_rank, input_size
        self.db_path = self.root / "registry.db"
        self._local = threading.local()
        with self._connect() as db:
            db.executescript(_SCHEMA)
        self._clean_temp_files()

    # -- plumbing ----------------------------------------------------------------------------
    @contextmanager
    def _connect(self):
        """This thread's connection (opened once: resolving is on the request path)."""
        db = getattr(self._local, "db", None)
        if db is None or getattr(self._local, "pid", None) != os.getpid():  # never share across fork
            db = sqlite3.connect(self.db_path, timeout=30.0, isolation_level=None, check_same_thread=True)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA busy_timeout=30000")
            self._local.db, self._local.pid = db, os.getpid()
        yield db

    @contextmanager
    def _tx(self):
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    def _clean_temp_files(self) -> None:
        """Remove temp files of registrations whose writer died before its rename.

        Temp names carry the writer's pid (``.<pid>-….tmp``); a file of a live process is an upload
        in progress and is left alone.
        """
        for p in self.store.glob(".*.tmp"):
            try:
                pid = int(p.name[1:].split("-", 1)[0])
            except ValueError:
                pid = -1
            if pid > 0 and pid != os.getpid() and _alive(pid):
                continue
            try:
                p.unlink()
            except FileNotFoundError:
                pass

    def _entry(self, row) -> Entry:
        name, version, sha, size, created, pinned, meta = row
        meta = json.loads(meta)
        return Entry(name, version, sha, self.store / f"{sha}.safetensors", size, created, bool(pinned),
                     meta.get("tasks", []), meta)

    # -- writes --------------------------------------------------------------------------------
    def validate(self, data: bytes) -> Adapter:
        """Full validation against the served base (fingerprint, shapes, max rank, input size)."""
        adapter = parse_adapter(data, expected_base=self.base, max_rank=self.max_rank)
        if self.input_size is not None and adapter.preprocess.input_size != self.input_size:
            raise AdapterFormatError(
                f"adapter preprocess.input_size is {adapter.preprocess.input_size}, but the base takes {self.input_size}")
        return adapter

    def register(self, name: str, data: bytes, aliases: tuple[str, ...] | list[str] = ()) -> Entry:
        """Validate → write the file under its sha256 (atomic) → insert the next version of `name`."""
        _check_name(name)
        for a in aliases:
            _check_name(a, "alias")
        adapter = self.validate(data)
        sha = sha256_hex(data)
        path = self.store / f"{sha}.safetensors"
        if not path.exists():
            atomic_write(path, data, tmp_prefix=f".{os.getpid()}-{sha[:16]}.")
        meta = {
            "tasks": [t.to_json() for t in adapter.tasks],
            "base": adapter.base.to_json(),
            "preprocess": adapter.preprocess.to_json(),
            "max_rank": adapter.max_rank,
            "ranks": sorted(set(adapter.ranks().values())),
            "lora_params": adapter.lora_params,
            "head_params": adapter.head_params,
            "provenance": dict(adapter.provenance),
            "adapter_created": adapter.created,
        }
        created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        with self._tx() as db:
            if db.execute("SELECT 1 FROM aliases WHERE alias = ?", (name,)).fetchone():
                raise ConflictError(f"'{name}' is an alias; pick another adapter name")
            (latest,) = db.execute("SELECT COALESCE(MAX(version), 0) FROM adapters WHERE name = ?", (name,)).fetchone()
            version = latest + 1
            db.execute("INSERT INTO adapters VALUES (?, ?, ?, ?, ?, 0, ?)",
                       (name, version, sha, len(data), created, json.dumps(meta)))
            for a in aliases:
                self._set_alias(db, a, name, version)
        return self.resolve(f"{name}@{version}")

    def register_file(self, name: str, path: str | os.PathLike, aliases=()) -> Entry:
        return self.register(name, Path(path).read_bytes(), aliases)

    def delete(self, name: str, version: int | None = None) -> list[Entry]:
        """Delete one version (or every version when None). Refused while pinned or aliased."""
        with self._tx() as db:
            rows = db.execute(
                "SELECT name, version, sha256, size, created, pinned, meta FROM adapters WHERE name = ?"
                + ("" if version is None else " AND version = ?"),
                (name,) if version is None else (name, version)).fetchall()
            if not rows:
                raise AdapterNotFoundError(self._not_found_message(name if version is None else f"{name}@{version}", db))
            entries = [self._entry(r) for r in rows]
            pinned = [e.ref for e in entries if e.pinned]
            if pinned:
                raise AdapterPinnedError(f"adapter {', '.join(pinned)} is pinned; unpin it before deleting")
            remaining = db.execute("SELECT COUNT(*) FROM adapters WHERE name = ?", (name,)).fetchone()[0] - len(entries)
            for alias, v in db.execute("SELECT alias, version FROM aliases WHERE name = ?", (name,)).fetchall():
                if (v is None and remaining == 0) or any(e.version == v for e in entries):
                    raise ConflictError(f"alias '{alias}' points at {name}{'' if v is None else f'@{v}'}; "
                                        "move or remove the alias first")
            for e in entries:
                db.execute("DELETE FROM adapters WHERE name = ? AND version = ?", (e.name, e.version))
            orphans = [e for e in entries
                       if not db.execute("SELECT 1 FROM adapters WHERE sha256 = ?", (e.sha256,)).fetchone()]
        for e in orphans:  # after commit: no row references the file any more
            try:
                e.path.unlink()
            except FileNotFoundError:
                pass
        return entries

    def _set_pin(self, ref: str, pinned: bool) -> Entry:
        e = self.resolve(ref)
        with self._tx() as db:
            db.execute("UPDATE adapters SET pinned = ? WHERE name = ? AND version = ?", (int(pinned), e.name, e.version))
        return self.resolve(e.ref)

    def pin(self, ref: str) -> Entry:
        return self._set_pin(ref, True)

    def unpin(self, ref: str) -> Entry:
        return self._set_pin(ref, False)

    def _set_alias(self, db, alias: str, name: str, version: int | None) -> None:
        if db.execute("SELECT 1 FROM adapters WHERE name = ?", (alias,)).fetchone():
            raise ConflictError(f"'{alias}' is an adapter name; an alias must not shadow it")
        db.execute("INSERT OR REPLACE INTO aliases VALUES (?, ?, ?)", (alias, name, version))

    def set_alias(self, alias: str, ref: str) -> Entry:
        """Point `alias` at `ref` ('name@3' pins the version; bare 'name' follows the latest)."""
        _check_name(alias, "alias")
        target = self.resolve(ref)
        _, version = parse_ref(ref)
        with self._tx() as db:
            self._set_alias(db, alias, target.name, version)
        return target

    def remove_alias(self, alias: str) -> None:
        with self._tx() as db:
            if db.execute("DELETE FROM aliases WHERE alias = ?", (alias,)).rowcount == 0:
                raise AdapterNotFoundError(f"no alias '{alias}'")

    # -- reads ---------------------------------------------------------------------------------
    def _not_found_message(self, ref: str, db) -> str:
        names = [r[0] for r in db.execute("SELECT DISTINCT name FROM adapters ORDER BY name")]
        aliases = [r[0] for r in db.execute("SELECT alias FROM aliases ORDER BY alias")]
        known = ", ".join(names + [f"{a} (alias)" for a in aliases]) or "none registered"
        return f"unknown adapter '{ref}'; registered: {known}"

    def resolve(self, ref: str) -> Entry:
        """'name' (latest), 'name@3', or an alias → Entry. Raises AdapterNotFoundError listing names."""
        name, version = parse_ref(ref)
        with self._connect() as db:
            if version is None:
                alias = db.execute("SELECT name, version FROM aliases WHERE alias = ?", (name,)).fetchone()
                if alias:
                    name, version = alias
            q = "SELECT name, version, sha256, size, created, pinned, meta FROM adapters WHERE name = ?"
            row = (db.execute(q + " ORDER BY version DESC LIMIT 1", (name,)).fetchone() if version is None
                   else db.execute(q + " AND version = ?", (name, version)).fetchone())
            if row is None:
                raise AdapterNotFoundError(self._not_found_message(ref, db))
        return self._entry(row)

    def list(self) -> list[Entry]:
        with self._connect() as db:
            rows = db.execute("SELECT name, version, sha256, size, created, pinned, meta FROM adapters "
                              "ORDER BY name, version").fetchall()
        return [self._entry(r) for r in rows]

    def aliases(self) -> dict[str, str]:
        with self._connect() as db:
            rows = db.execute("SELECT alias, name, version FROM aliases ORDER BY alias").fetchall()
        return {a: (n if v is None else f"{n}@{v}") for a, n, v in rows}

    def describe(self, ref: str) -> dict:
        e = self.resolve(ref)
        out = e.to_json()
        out["aliases"] = [a for a, target in self.aliases().items()
                          if target in (e.ref, e.name) and self.resolve(a).ref == e.ref]
        out["versions"] = [x.version for x in self.list() if x.name == e.name]
        return out

    def read_bytes(self, entry: Entry) -> bytes:
        data = entry.path.read_bytes()
        if sha256_hex(data) != entry.sha256:  # a store file changed behind our back
            raise AdapterFormatError(f"adapter file for {entry.ref} does not match its sha256; the store is corrupt")
        return data

    def load(self, ref: str) -> tuple[Entry, Adapter]:
        entry = self.resolve(ref)
        return entry, parse_adapter(self.read_bytes(entry), expected_base=self.base, max_rank=self.max_rank)

    def __len__(self) -> int:
        with self._connect() as db:
            return db.execute("SELECT COUNT(*) FROM adapters").fetchone()[0]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def header_summary(data: bytes) -> dict:
    """The metadata of adapter bytes without loading tensors (for quick listings)."""
    return read_header(data).get("__metadata__", {})
