"""Reading the audit log by filter: the SQL narrows on the indexed columns, the hashed body decides."""

from __future__ import annotations

import json
from collections.abc import Iterator

from .audit_chain import PAGE_ROWS, columns_of, iter_rows, parse_time


def iter_query(index, *, since: str | None = None, until: str | None = None, adapter: str | None = None,
               caller: str | None = None, image_sha256: str | None = None, kind: str | None = None,
               limit: int | None = None, after_seq: int = 0) -> Iterator[dict]:
    """Rows matching every given filter, oldest first, streamed. `adapter` matches NAME or NAME@VERSION.
    The SQL narrows on the indexed columns; every filter is then checked again on the hashed body."""
    where, params = [], []
    since_t = parse_time(since, "since") if since else None
    until_t = parse_time(until, "until") if until else None
    if since_t:
        where.append("time >= ?")
        params.append(since_t)
    if until_t:
        where.append("time < ?")
        params.append(until_t)
    if adapter:
        if "@" in adapter:
            where.append("adapter = ?")
            params.append(adapter)
        else:
            where.append("(adapter = ? OR adapter LIKE ?)")
            params += [adapter, adapter.replace("%", "").replace("_", "") + "@%"]
    if caller:
        where.append("caller = ?")
        params.append(caller)
    if image_sha256:
        image_sha256 = image_sha256.lower()
        where.append("image_sha256 = ?")
        params.append(image_sha256)
    if kind:
        where.append("kind = ?")
        params.append(kind)

    def matches(b: dict) -> bool:
        t, k, c, a, img = columns_of(b)
        return ((not since_t or t >= since_t) and (not until_t or t < until_t)
                and (not adapter or a == adapter or ("@" not in adapter and a.startswith(adapter + "@")))
                and (not caller or c == caller) and (not image_sha256 or img == image_sha256)
                and (not kind or k == kind))

    n = 0
    page = PAGE_ROWS if limit is None else max(1, min(PAGE_ROWS, int(limit)))
    for seq, body, h in iter_rows(index, "seq, body, hash", " AND ".join(where), tuple(params), after_seq, page):
        b = json.loads(body)
        if not matches(b):
            continue  # an edited column: the body (what the hash covers) decides, and verify names the row
        yield {"seq": seq, **b, "hash": h}
        n += 1
        if limit is not None and n >= limit:
            return


def query(index, **filters) -> list[dict]:
    """:func:`iter_query` as a list (bounded callers: give `limit`)."""
    return list(iter_query(index, **filters))
