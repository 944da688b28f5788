"""The adapter registry: names, versions, aliases and pins in an index, adapter files in a store.

One API, the same semantics on every backend pair::

    index  url=None / "sqlite"   <data_dir>/registry.db (SQLite, WAL)            one machine
           url="postgresql://…"  a PostgreSQL database shared by a fleet
    store  store=None            <data_dir>/store/<sha256>.safetensors           one machine
           store="s3://B/P"      an S3-compatible bucket, read through a node-local
                                 LRU cache <cache_dir>/<sha256>.safetensors

Tables: ``adapters`` (name, version) → sha256, size, created, pinned, meta; ``aliases`` alias →
(name, version, or NULL for the latest); ``objects`` (sha256): the lock row of each object, created
by whoever needs it (so a registry made before this table existed needs no migration);
``adapter_tags`` (kind, value, name, version): what listings filter on, back-filled on open
(``listing.py``: keyset pages of any registry size).

**The protocol** — why a listed version's file never disappears, with writers in several
processes on several machines, under PostgreSQL READ COMMITTED:

* The ``objects`` row of an object X is the lock on X's existence. Registration, the reaping of
  X, and gc all take it with one statement, an upsert that creates the row when missing
  (``INSERT … ON CONFLICT DO UPDATE``: it waits for whoever holds the row, an uncommitted insert
  of it included, then holds it). On SQLite, ``BEGIN IMMEDIATE`` serializes all writers anyway.
* **register**: validate (and run the caller's ``check``) before any write; then one
  transaction: lock the claimed names → lock X's row → refuse name/alias clashes → insert
  version latest+1 (``PRIMARY KEY (name, version)``: of two registrations of one name at once,
  one fails and retries from the start) → aliases → put X into the store unless it is there →
  commit. The object is therefore written while the lock is held and before any row that
  references it is visible, and a refused upload writes nothing.
* **reap X** (right after a delete commits, and in gc): one transaction: lock X's row → stop if
  any adapters row references X → remove X from the store → delete the row → commit. Holding the
  lock means no registration of X is in flight; seeing no reference after taking it (a fresh
  statement sees all that committed) means none committed. A crash between the removal and the
  commit leaves a row without a file: the next registration of X re-puts it, gc reaps it.
* **delete** locks every version row of the name (``FOR UPDATE``), so it sees the pins and
  aliases of transactions that locked those rows first; **set_alias** locks its target's rows
  (``FOR SHARE``); register and set_alias take advisory locks on the names they claim, in key
  order, so an alias and an adapter can never take one name at the same moment.
* **Crashes** leave at most orphans: a registration killed after its put and before its commit,
  or a delete whose process dies before the reap, leaves an object that no row references.
* **gc** reaps every object that the store holds or the objects table lists and that no row
  references. A registration in flight holds X's row (its intent row), so gc waits for it and
  then sees its reference. Temp files of a folder store are removed when their writer (a pid on
  this host) is dead, or when older than the grace period (a writer on another host).

**Reads**: ``resolve`` is one statement (alias → target → latest version → the row), so what can
change — alias targets, latest versions, pins, deletions by other processes — is always fresh.
What cannot change is cached in-process: the metadata of an object (a function of its bytes, so
keyed by sha256; the first resolve of an object costs one more statement). Object bytes are
cached on disk by the S3 store (``cache_max_bytes``).
"""

from __future__ import annotations

import difflib
import functools
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ..adapter import Adapter, BaseSpec, parse_adapter, sha256_hex
from ..errors import AdapterFormatError, AdapterNotFoundError, AdapterPinnedError, ConflictError, MedlegoError
from . import listing
from .index import open_index
from .listing import Filters, Page
from .names import MAX_VERSION, check_name, check_version, parse_ref
from .store import open_store

__all__ = ["DEFAULT_CACHE_MAX_BYTES", "GC_GRACE_S", "MAX_PROVENANCE_BYTES", "Entry", "Filters", "Page", "Registry",
           "parse_ref"]

DEFAULT_CACHE_MAX_BYTES = 2 * 1024**3  # node-local cache of an S3 store: ~3,500 ViT-B r=4 adapters (~0.6 MB)
MAX_PROVENANCE_BYTES = 64 * 1024  # provenance JSON is stored in every index row and returned by describe
GC_GRACE_S = 3600.0  # a temp file this old is an upload whose writer died, even on another host
META_CACHE_ENTRIES = 4096
PUT_THREADS = 8  # concurrent uploads of one register_many batch

_log = logging.getLogger(__name__)

_COLUMNS = "name, version, sha256, size, created, pinned"
_BY_VERSION = f"SELECT {_COLUMNS} FROM adapters WHERE name = ? AND version = ?"
# A bare name: the alias's target if it is an alias (its version, or the latest), else the latest.
_BY_NAME_OR_ALIAS = """
SELECT a.name, a.version, a.sha256, a.size, a.created, a.pinned
FROM (SELECT COALESCE((SELECT name FROM aliases WHERE alias = ?), ?) AS name,
             (SELECT version FROM aliases WHERE alias = ?) AS version) AS t
JOIN adapters AS a ON a.name = t.name
WHERE a.version = COALESCE(t.version, (SELECT MAX(version) FROM adapters WHERE name = t.name))"""
_LOCK_OBJECT = "INSERT INTO objects (sha256) VALUES (?) ON CONFLICT (sha256) DO UPDATE SET sha256 = excluded.sha256"
_UPSERT_ALIAS = ("INSERT INTO aliases (alias, name, version) VALUES (?, ?, ?) "
                 "ON CONFLICT (alias) DO UPDATE SET name = excluded.name, version = excluded.version")


@dataclass(frozen=True)
class Entry:
    """One registered adapter version."""

    name: str
    version: int
    sha256: str
    size: int
    created: str
    pinned: bool
    tasks: list  # [{"name", "labels", "multilabel"}]
    meta: dict  # base, preprocess, ranks, params, provenance; shared between entries of one sha256: do not mutate

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def to_json(self) -> dict:
        """What listings show: everything but the provenance (up to 64 KiB each; describe shows it)."""
        return {"name": self.name, "version": self.version, "ref": self.ref, "sha256": self.sha256,
                "size": self.size, "created": self.created, "pinned": self.pinned, "tasks": self.tasks,
                **{k: v for k, v in self.meta.items() if k not in ("tasks", "provenance")}}


def _close_names(name: str, candidates: list[str], n: int = 5, cutoff: float = 0.6) -> list[str]:
    """The n candidates most like `name` (difflib's ratio, at least cutoff), best first, ties by name
    (difflib.get_close_matches breaks ties by the greatest name)."""
    matcher = difflib.SequenceMatcher()
    matcher.set_seq2(name)
    scored = []
    for c in candidates:
        matcher.set_seq1(c)
        if matcher.real_quick_ratio() >= cutoff and matcher.quick_ratio() >= cutoff and matcher.ratio() >= cutoff:
            scored.append((-matcher.ratio(), c))
    return [c for _, c in sorted(scored)[:n]]


def _target(name: str, version: int | None) -> str:
    return name if version is None else f"{name}@{version}"


class Registry:
    """Name → versioned adapter file + metadata. Holds no device state; safe across processes and machines."""

    def __init__(self, data_dir: str | os.PathLike, base: BaseSpec | None = None, max_rank: int | None = None,
                 input_size: int | None = None, *, url: str | None = None, store: str | None = None,
                 cache_dir: str | os.PathLike | None = None, cache_max_bytes: int = DEFAULT_CACHE_MAX_BYTES):
        self.root = Path(data_dir).expanduser()
        self.base, self.max_rank, self.input_size = base, max_rank, input_size
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else self.root / "cache"  # used by an S3 store only
        self._store = open_store(store, self.root, self.cache_dir, cache_max_bytes)
        self._index = open_index(url, self.root)
        self._meta = functools.lru_cache(maxsize=META_CACHE_ENTRIES)(self._read_meta)
        listing.backfill_tags(self._index)  # a registry made before listings could filter

    @property
    def index(self):
        """The index database (the audit log shares it: runtime/registry/audit.py)."""
        return self._index

    @property
    def store(self):
        """The object store (the audit log's signed checkpoints go there too: runtime/registry/audit.py)."""
        return self._store

    def close(self) -> None:
        """Close this process's database connections (the next call opens new ones)."""
        self._index.close()

    # -- plumbing ----------------------------------------------------------------------------
    def _read_meta(self, sha: str) -> dict:
        rows = self._index.read("SELECT meta FROM adapters WHERE sha256 = ? LIMIT 1", (sha,))
        if not rows:
            raise KeyError(sha)  # deleted since the row was read; not cached
        return json.loads(rows[0][0])

    def _entry(self, row, meta_json: str | None = None) -> Entry:
        name, version, sha, size, created, pinned = row
        try:
            meta = self._meta(sha) if meta_json is None else json.loads(meta_json)
        except KeyError:
            raise AdapterNotFoundError(f"unknown adapter '{name}@{version}': it was deleted just now") from None
        return Entry(name, version, sha, size, created, bool(pinned), meta.get("tasks", []), meta)

    @staticmethod
    def _lookup(query, name: str, version: int | None) -> list[tuple]:
        """The row a parsed reference names, in one statement (query: index.read or tx.all)."""
        if version is None:
            return query(_BY_NAME_OR_ALIAS, (name, name, name))
        return query(_BY_VERSION, (name, version))

    @staticmethod
    def _not_found_message(ref: str, query) -> str:
        """What is missing, and at most a handful of close names: never the whole registry, which may
        hold thousands of names and goes to anyone who may diagnose."""
        name, version = parse_ref(ref)
        aliases = {r[0] for r in query("SELECT alias FROM aliases", ())}
        if version is not None:
            if name in aliases:
                return f"unknown adapter '{ref}': '{name}' is an alias; name it without @{version}"
            latest = query("SELECT MAX(version) FROM adapters WHERE name = ?", (name,))[0][0]
            if latest is not None:
                return f"unknown adapter '{ref}': '{name}' has no version {version} (its latest is {name}@{latest})"
        names = [r[0] for r in query("SELECT DISTINCT name FROM adapters", ())]
        close = _close_names(name, names + sorted(aliases))
        hint = f"; did you mean {', '.join(close)}?" if close else "" if names else "; no adapter is registered yet"
        return f"unknown adapter '{ref}'{hint}"

    # -- writes --------------------------------------------------------------------------------
    def validate(self, data: bytes) -> Adapter:
        """Full validation against the served base (fingerprint, shapes, max rank, input size, provenance size)."""
        adapter = parse_adapter(data, expected_base=self.base, max_rank=self.max_rank)
        if self.input_size is not None and adapter.preprocess.input_size != self.input_size:
            raise AdapterFormatError(
                f"adapter preprocess.input_size is {adapter.preprocess.input_size}, but the base takes {self.input_size}")
        size = len(json.dumps(dict(adapter.provenance), sort_keys=True, default=str).encode())
        if size > MAX_PROVENANCE_BYTES:
            raise AdapterFormatError(f"adapter provenance is {size:,} bytes of JSON; the registry takes at most "
                                     f"{MAX_PROVENANCE_BYTES:,}")
        return adapter

    def register(self, name: str, data: bytes, aliases: tuple[str, ...] | list[str] = (), *,
                 move_aliases: bool = False, check=None) -> Entry:
        """Validate → (check(adapter)) → one transaction: next version of `name`, aliases, the object.

        An alias that already exists is moved to the new version only with move_aliases=True.
        `check` is the caller's extra validation (e.g. a numeric probe); what it raises propagates
        and nothing is written."""
        aliases, sha, meta = self._prepare(name, data, aliases, check)
        created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        version = self._index.write(lambda tx: self._insert(tx, name, data, sha, meta, created, aliases, move_aliases))
        return Entry(name, version, sha, len(data), created, False, meta["tasks"], meta)

    def register_many(self, items, *, check=None) -> list[Entry]:
        """Register [(name, bytes)] in ONE transaction (a batch: all or none); each is validated first.
        The next version of each name, no aliases. `medlego registry add --many` cuts a folder into batches."""
        prepared = []
        for name, data in items:
            try:
                prepared.append((name, data, *self._prepare(name, data, (), check)[1:]))
            except MedlegoError as e:  # which of the batch: the whole batch is refused for it
                raise type(e)(f"{str(name)[:128]}: {e}") from None
        created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())

        def write(tx) -> list[int]:
            versions = [self._insert(tx, name, data, sha, meta, created, [], False, put=False)
                        for name, data, sha, meta in prepared]
            self._put_all({sha: data for _, data, sha, _ in prepared})  # still under the locks, before the commit
            return versions

        versions = self._index.write(write)
        return [Entry(name, v, sha, len(data), created, False, meta["tasks"], meta)
                for (name, data, sha, meta), v in zip(prepared, versions)]

    def _prepare(self, name: str, data: bytes, aliases, check) -> tuple[list[str], str, dict]:
        """Everything checked before any write: (aliases, sha256, the index's meta)."""
        check_name(name)
        aliases = list(dict.fromkeys(check_name(a, "alias") for a in aliases))
        if name in aliases:
            raise ConflictError(f"'{name}' is an adapter name; an alias must not shadow it")
        adapter = self.validate(data)
        if check is not None:
            check(adapter)
        sha = sha256_hex(data)
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
        return aliases, sha, meta

    def _put_all(self, objects: dict[str, bytes]) -> None:
        """Put the objects the store lacks, PUT_THREADS at a time: a batch's uploads overlap (S3 answers
        each in milliseconds; a folder store's fsyncs overlap too). Bounded, as every S3 client here is."""
        def put(item: tuple[str, bytes]) -> None:
            if not self._store.exists(item[0]):
                self._store.put(*item)

        with ThreadPoolExecutor(max(1, min(PUT_THREADS, len(objects))), thread_name_prefix="medlego-put") as pool:
            list(pool.map(put, objects.items()))

    def _insert(self, tx, name: str, data: bytes, sha: str, meta: dict, created: str, aliases: list[str],
                move_aliases: bool, *, put: bool = True) -> int:
        """The registration's writes in tx (see the protocol); the new version. put=False: the caller
        puts the object itself before the commit (register_many, all of a batch's at once)."""
        tx.lock_names(shared=[name], exclusive=aliases)
        tx.run(_LOCK_OBJECT, (sha,))
        if tx.one("SELECT 1 FROM aliases WHERE alias = ?", (name,)):
            raise ConflictError(f"'{name}' is an alias; pick another adapter name")
        for a in aliases:
            if tx.one("SELECT 1 FROM adapters WHERE name = ? LIMIT 1", (a,)):
                raise ConflictError(f"'{a}' is an adapter name; an alias must not shadow it")
            current = tx.one("SELECT name, version FROM aliases WHERE alias = ?", (a,))
            if current and not move_aliases:
                raise ConflictError(f"alias '{a}' already points at {_target(*current)}; "
                                    "pass move_aliases to move it")
        latest = tx.all("SELECT MAX(version) FROM adapters WHERE name = ?", (name,))[0][0] or 0
        if latest >= MAX_VERSION:
            raise ConflictError(f"adapter '{name}' has reached the last version number {MAX_VERSION}")
        tx.run("INSERT INTO adapters VALUES (?, ?, ?, ?, ?, 0, ?)",
               (name, latest + 1, sha, len(data), created, json.dumps(meta)))
        listing.write_tags(tx, name, latest + 1, sha, meta)
        for a in aliases:
            tx.run(_UPSERT_ALIAS, (a, name, latest + 1))
        if put and not self._store.exists(sha):  # also after a reap that ran just before this lock
            self._store.put(sha, data)
        return latest + 1

    def delete(self, name: str, version: int | None = None) -> list[Entry]:
        """Delete one version (or every version when None). Refused while pinned or aliased."""
        check_name(name)
        ref = name if version is None else f"{name}@{check_version(version)}"

        def write(tx) -> list[Entry]:
            rows = tx.all(f"SELECT {_COLUMNS}, meta FROM adapters WHERE name = ? ORDER BY version FOR UPDATE", (name,))
            doomed = [r for r in rows if version in (None, r[1])]
            if not doomed:
                raise AdapterNotFoundError(self._not_found_message(ref, tx.all))
            pinned = [f"{name}@{r[1]}" for r in doomed if r[5]]
            if pinned:
                raise AdapterPinnedError(f"adapter {', '.join(pinned)} is pinned; unpin it before deleting")
            remaining = len(rows) - len(doomed)
            for alias, v in tx.all("SELECT alias, version FROM aliases WHERE name = ? ORDER BY alias", (name,)):
                if (v is None and remaining == 0) or any(r[1] == v for r in doomed):
                    raise ConflictError(f"alias '{alias}' points at {_target(name, v)}; move or remove the alias first")
            for r in doomed:
                tx.run("DELETE FROM adapters WHERE name = ? AND version = ?", (name, r[1]))
                listing.delete_tags(tx, name, r[1])
            return [self._entry(r[:6], r[6]) for r in doomed]

        entries = self._index.write(write)
        for sha in sorted({e.sha256 for e in entries}):
            try:
                self._reap(sha)
            except MedlegoError as e:  # the delete has committed; what is left is an orphan for gc
                _log.warning("deleted %s but could not remove its object %s yet (gc will): %s", ref, sha, e)
        return entries

    def _reap(self, sha: str) -> bool:
        """Remove object `sha` if nothing references it (see the protocol). True if it was removed."""
        def write(tx) -> bool:
            tx.run(_LOCK_OBJECT, (sha,))
            if tx.one("SELECT 1 FROM adapters WHERE sha256 = ? LIMIT 1", (sha,)):
                return False
            self._store.delete(sha)
            tx.run("DELETE FROM objects WHERE sha256 = ?", (sha,))
            return True

        return self._index.write(write)

    def gc(self, grace_s: float = GC_GRACE_S) -> dict:
        """Remove objects no version references (orphans of killed registrations, of deletes whose
        process died before reaping) and stale temp files. Safe while others register: see the protocol."""
        temp_files = self._store.remove_stale_uploads(grace_s)
        referenced = {sha for (sha,) in self._index.read("SELECT DISTINCT sha256 FROM adapters")}
        listed = {sha for (sha,) in self._index.read("SELECT sha256 FROM objects")}
        candidates = sorted((set(self._store.list()) | listed) - referenced)
        return {"objects_removed": [sha for sha in candidates if self._reap(sha)], "temp_files_removed": temp_files}

    def _set_pin(self, ref: str, pinned: bool) -> Entry:
        name, version = parse_ref(ref)

        def write(tx) -> tuple:
            rows = self._lookup(tx.all, name, version)
            if not rows or not tx.run("UPDATE adapters SET pinned = ? WHERE name = ? AND version = ?",
                                      (int(pinned), rows[0][0], rows[0][1])):
                raise AdapterNotFoundError(self._not_found_message(ref, tx.all))
            return (*rows[0][:5], pinned)

        return self._entry(self._index.write(write))

    def pin(self, ref: str) -> Entry:
        return self._set_pin(ref, True)

    def unpin(self, ref: str) -> Entry:
        return self._set_pin(ref, False)

    def set_alias(self, alias: str, ref: str) -> Entry:
        """Point `alias` at `ref` ('name@3' fixes the version; bare 'name' follows the latest; another
        alias: what that alias points at). Returns the entry it resolves to now."""
        check_name(alias, "alias")
        name, version = parse_ref(ref)

        def write(tx) -> tuple:
            tx.lock_names(exclusive=[alias])
            target = (name, version)
            if version is None:
                target = tx.one("SELECT name, version FROM aliases WHERE alias = ?", (name,)) or target
            rows = tx.all(f"SELECT {_COLUMNS} FROM adapters WHERE name = ? ORDER BY version FOR SHARE", (target[0],))
            hits = [r for r in rows if target[1] in (None, r[1])]
            if not hits:
                raise AdapterNotFoundError(self._not_found_message(ref, tx.all))
            if tx.one("SELECT 1 FROM adapters WHERE name = ? LIMIT 1", (alias,)):
                raise ConflictError(f"'{alias}' is an adapter name; an alias must not shadow it")
            tx.run(_UPSERT_ALIAS, (alias, *target))
            return hits[-1]

        return self._entry(self._index.write(write))

    def remove_alias(self, alias: str) -> None:
        check_name(alias, "alias")
        if not self._index.write(lambda tx: tx.run("DELETE FROM aliases WHERE alias = ?", (alias,))):
            raise AdapterNotFoundError(f"no alias '{alias}'")

    # -- reads ---------------------------------------------------------------------------------
    def resolve(self, ref: str) -> Entry:
        """'name' (latest), 'name@3', or an alias → Entry, read fresh in one statement.
        Raises AdapterNotFoundError listing names, BadInputError for a malformed reference."""
        name, version = parse_ref(ref)
        rows = self._lookup(self._index.read, name, version)
        if not rows:
            raise AdapterNotFoundError(self._not_found_message(ref, self._index.read))
        return self._entry(rows[0])

    def list(self) -> list[Entry]:
        """Every version at once: for small registries and tools; servers answer with :meth:`list_page`."""
        rows = self._index.read(f"SELECT {_COLUMNS}, meta FROM adapters ORDER BY name, version")
        return [self._entry(r[:6], r[6]) for r in rows]

    def list_page(self, limit: int | None = None, cursor: str | None = None, filters: Filters = Filters()) -> Page:
        """One page of versions in (name, version) order after `cursor` (None: the first page), at a cost
        independent of the registry's size (registry/listing.py). BadInputError for a bad limit or cursor."""
        limit = listing.check_limit(limit)
        after = listing.decode_cursor(cursor, filters)
        sql, params = listing.page_sql(filters, after, limit)
        rows = self._index.read(sql, params)
        page = Page([self._entry(r[2:8], r[8]) for r in rows[:limit] if r[2] is not None])
        entries = page.entries
        if len(rows) > limit:  # the cursor is the last key read, even one whose version was gone
            page.next_cursor = listing.encode_cursor(rows[limit - 1][0], rows[limit - 1][1], filters)
        if entries:
            names = {e.name for e in entries}
            sql, params = listing.alias_sql(entries[0].name, entries[-1].name)
            page.aliases = {a: _target(n, v) for a, n, v in self._index.read(sql, params) if n in names}
        return page

    def aliases(self) -> dict[str, str]:
        rows = self._index.read("SELECT alias, name, version FROM aliases ORDER BY alias")
        return {a: _target(n, v) for a, n, v in rows}

    def describe(self, ref: str) -> dict:
        """Everything about one version: the listing's fields, its provenance, aliases and sibling versions."""
        e = self.resolve(ref)
        versions = [v for (v,) in self._index.read("SELECT version FROM adapters WHERE name = ? ORDER BY version",
                                                   (e.name,))]
        latest = versions[-1] if versions else e.version
        aliases = self._index.read("SELECT alias, version FROM aliases WHERE name = ? ORDER BY alias", (e.name,))
        return {**e.to_json(), "provenance": e.meta.get("provenance", {}),
                "aliases": [a for a, v in aliases if v == e.version or (v is None and e.version == latest)],
                "versions": versions}

    def read_bytes(self, entry: Entry) -> bytes:
        """The adapter file's bytes, verified against entry.sha256."""
        return self.read_tiered(entry)[0]

    def read_tiered(self, entry: Entry) -> tuple[bytes, str]:
        """:meth:`read_bytes` and the tier that had them: "node" (local disk) or "store" (downloaded)."""
        data, tier = self._store.get_tiered(entry.sha256)
        if data is None:
            raise AdapterNotFoundError(f"adapter {entry.ref} is no longer in the store (deleted)")
        return data, tier

    def warm(self, filters: Filters = Filters(), workers: int = 4):
        """Fetch the matching versions' files into this node's cache before traffic needs them: a WarmReport."""
        from .warm import warm

        return warm(self, filters, workers)

    def local_path(self, entry: Entry) -> Path:
        """A file on this machine with the entry's verified bytes (the store's file, or the node cache's)."""
        path = self._store.local_path(entry.sha256)
        if path is None:
            raise AdapterNotFoundError(f"adapter {entry.ref} is no longer in the store (deleted)")
        return path

    def load(self, ref: str) -> tuple[Entry, Adapter]:
        entry = self.resolve(ref)
        return entry, parse_adapter(self.read_bytes(entry), expected_base=self.base, max_rank=self.max_rank)

    def __len__(self) -> int:
        return self._index.read("SELECT COUNT(*) FROM adapters")[0][0]
