"""Listing a registry of any size: keyset pages over an index, with filters, behind an opaque cursor.

A page is one statement: ``ORDER BY name, version LIMIT n+1`` starting strictly after the last
``(name, version)`` the previous page returned, on a B-tree index (the ``adapters`` primary key,
or ``adapter_tags``' for a task or base filter), so its cost does not grow with the registry: an
OFFSET would scan every row before the page. The extra row only says whether a next page exists.
Because the key of the next page is a position in the order and not a row count, a registration
or a delete while a client pages neither repeats nor skips an adapter that existed throughout;
one that appears behind the cursor is simply not in this walk.

``adapter_tags (kind, value, name, version)`` holds what a listing filters on besides the name:
``task`` (one row per task of the adapter) and ``base`` (the base fingerprint). It is written in
the registration's transaction and deleted with the version; a registry made before the table
existed is back-filled when it is opened (:func:`backfill_tags`).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from dataclasses import dataclass, field

from ..errors import BadInputError
from .names import MAX_NAME, MAX_VERSION, check_name

DEFAULT_PAGE = 100
MAX_PAGE = 1000  # an answer is built in one piece (JSON or protobuf): bounded like the audit pages
MAX_CURSOR = 512  # far above a real cursor (a 128-character name, a version, a filter hash)

_PREFIX = re.compile(r"[A-Za-z0-9_.\-]{0,%d}\Z" % MAX_NAME)
_HEX = re.compile(r"[0-9a-f]{8,128}\Z")
_TASK_MAX = 256

_DELETE_TAGS = "DELETE FROM adapter_tags WHERE name = ? AND version = ?"
_INSERT_TAG = ("INSERT INTO adapter_tags (kind, value, name, version) SELECT ?, ?, name, version FROM adapters "
               "WHERE name = ? AND version = ? AND sha256 = ? ON CONFLICT DO NOTHING")
_COLUMNS = "a.name, a.version, a.sha256, a.size, a.created, a.pinned, a.meta"


@dataclass(frozen=True)
class Filters:
    """What a listing is narrowed to; None: not filtered on that."""

    prefix: str | None = None  # of the adapter name
    task: str | None = None  # an exact task name
    base: str | None = None  # the whole base fingerprint (lower-case hex): equality keeps the page on the index

    def key(self) -> str:
        """A short digest binding a cursor to the filters it was issued for."""
        return hashlib.sha256(json.dumps([self.prefix, self.task, self.base]).encode()).hexdigest()[:8]


@dataclass
class Page:
    entries: list  # list[Entry], in (name, version) order
    aliases: dict[str, str] = field(default_factory=dict)  # the aliases that point at names on this page
    next_cursor: str | None = None  # None: this was the last page


def check_filters(prefix=None, task=None, base=None) -> Filters:
    """Filters as a client sends them (empty strings mean none); one-line BadInputError otherwise."""
    prefix, task, base = (v or None for v in (prefix, task, base))
    if prefix is not None and (not isinstance(prefix, str) or not _PREFIX.match(prefix)):
        raise BadInputError(f"bad name prefix {str(prefix)[:64]!r}: letters, digits, '.', '_' or '-' (max {MAX_NAME})")
    if task is not None and (not isinstance(task, str) or len(task) > _TASK_MAX or not task.isprintable()):
        raise BadInputError(f"bad task filter: a printable task name of at most {_TASK_MAX} characters")
    if base is not None and (not isinstance(base, str) or not _HEX.match(base)):
        raise BadInputError("bad base filter: the whole base fingerprint, in lower-case hex")
    return Filters(prefix, task, base)


def check_limit(limit) -> int:
    if limit is None:
        return DEFAULT_PAGE
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_PAGE:
        raise BadInputError(f"bad limit {limit!r}: a page holds 1 to {MAX_PAGE} adapters (default {DEFAULT_PAGE})")
    return limit


def encode_cursor(name: str, version: int, filters: Filters) -> str:
    raw = json.dumps([name, version, filters.key()], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str | None, filters: Filters) -> tuple[str, int] | None:
    """(name, version) the page starts after; None for the first page. BadInputError for anything
    this server did not issue, or issued for other filters (its position would mean nothing there)."""
    if not cursor:
        return None
    try:
        if not isinstance(cursor, str) or len(cursor) > MAX_CURSOR:
            raise ValueError
        name, version, key = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        check_name(name)
        if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= MAX_VERSION:
            raise ValueError
    except (ValueError, TypeError, BadInputError, RecursionError):
        raise BadInputError("bad cursor: pass back the next_cursor of the previous page unchanged") from None
    if key != filters.key():
        raise BadInputError("bad cursor: it was issued for other filters; keep the filters while paging")
    return name, version


def _after_prefix(prefix: str) -> str:
    """The least string above every name starting with prefix (names are ASCII, so bump the last character)."""
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


def _range(t: str, filters: Filters, after: tuple[str, int] | None) -> tuple[str, list]:
    """The page's key range on table alias t: the name prefix, and strictly after the cursor."""
    sql, params = "", []
    if filters.prefix:
        sql += f" AND {t}.name >= ? AND {t}.name < ?"
        params += [filters.prefix, _after_prefix(filters.prefix)]
    if after is not None:
        sql += f" AND ({t}.name, {t}.version) > (?, ?)"
        params += list(after)
    return sql, params


def page_sql(filters: Filters, after: tuple[str, int] | None, limit: int) -> tuple[str, list]:
    """One keyset statement; each row is (key name, key version, the adapter's columns). Unfiltered (or by prefix): a range of the adapters primary key. By task
    or base: the page's keys are first taken from the tags index in a LIMITed subquery (its order is
    the index's: no sort, and never more rows read than the page plus what the filters skip), then
    joined to their rows; so no planner can choose a join that reads the table from its start."""
    if filters.task is None and filters.base is None:
        where, params = _range("a", filters, after)
        return (f"SELECT a.name, a.version, {_COLUMNS} FROM adapters AS a WHERE 1 = 1{where} "
                "ORDER BY a.name, a.version LIMIT ?", [*params, limit + 1])
    kind, value = ("task", filters.task) if filters.task is not None else ("base", filters.base)
    # every table of the subquery gets the key range (the planner does not carry a row comparison
    # across an equi-join, and a merge join would read the others from their start)
    sub = "SELECT k.name, k.version FROM adapter_tags AS k WHERE k.kind = ? AND k.value = ?"
    params: list = [kind, value]
    if filters.task is not None and filters.base is not None:
        b_range, b_params = _range("b", filters, after)
        sub += (" AND EXISTS (SELECT 1 FROM adapter_tags AS b WHERE b.kind = 'base' AND b.value = ?"
                f" AND b.name = k.name AND b.version = k.version{b_range})")
        params += [filters.base, *b_params]
    where, more = _range("k", filters, after)
    sub += f"{where} ORDER BY k.name, k.version LIMIT ?"
    # LEFT: a tag whose version is gone (left by an older server's delete) comes back as a key with
    # NULL columns, so that it moves the cursor without shortening the page into a false last one
    sql = (f"SELECT p.name, p.version, {_COLUMNS} FROM ({sub}) AS p LEFT JOIN adapters AS a "
           "ON a.name = p.name AND a.version = p.version ORDER BY p.name, p.version")
    return sql, [*params, *more, limit + 1]


def alias_sql(first: str, last: str) -> tuple[str, tuple]:
    """The aliases of the names a page spans (indexed by aliases_by_name); the caller keeps those of its names."""
    return "SELECT alias, name, version FROM aliases WHERE name >= ? AND name <= ? ORDER BY alias", (first, last)


def tags_of(meta: dict) -> list[tuple[str, str]]:
    tasks = [("task", t["name"]) for t in meta.get("tasks", []) if isinstance(t, dict) and "name" in t]
    fingerprint = (meta.get("base") or {}).get("fingerprint")
    return tasks + ([("base", fingerprint)] if isinstance(fingerprint, str) else [])


def write_tags(tx, name: str, version: int, sha: str, meta: dict, *, checked: bool = False) -> None:
    """Replace whatever an older server left for this (name, version) by the tags of meta. In the
    registration's own transaction (the row is there: one multi-row insert), or `checked`: only if
    the row still holds sha (a back-fill racing a delete)."""
    tx.run(_DELETE_TAGS, (name, version))
    tags = list(dict.fromkeys(tags_of(meta)))
    if checked:
        for kind, value in tags:
            tx.run(_INSERT_TAG, (kind, value, name, version, sha))
    elif tags:
        tx.run("INSERT INTO adapter_tags (kind, value, name, version) VALUES "
               + ", ".join(["(?, ?, ?, ?)"] * len(tags)), [x for kind, value in tags for x in (kind, value, name, version)])


def delete_tags(tx, name: str, version: int) -> None:
    tx.run(_DELETE_TAGS, (name, version))


def backfill_tags(index) -> int:
    """Tag the versions that have none (registered before adapter_tags existed, or by an older server);
    how many. The insert re-checks the row in its own transaction, so a version deleted meanwhile is not tagged."""
    rows = index.read("SELECT a.name, a.version, a.sha256, a.meta FROM adapters AS a WHERE NOT EXISTS "
                      "(SELECT 1 FROM adapter_tags AS t WHERE t.kind = 'base' AND t.name = a.name "
                      "AND t.version = a.version)")
    if not rows:
        return 0

    def write(tx) -> int:
        for name, version, sha, meta in rows:
            write_tags(tx, name, version, sha, json.loads(meta), checked=True)
        return len(rows)

    return index.write(write)
