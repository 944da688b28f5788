"""Verifying the audit chain: every row's link, hash and indexed columns, the prune markers'
signatures, and the signed checkpoints that anchor the chain outside the database (the design:
:mod:`.audit`). The first problem found is reported, with the row named."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .audit_chain import COLUMNS, GENESIS, PAGE_ROWS, columns_of, ensure_schema, epoch_seconds, iter_rows
from .audit_keys import PublicKey, read_checkpoints

_SQLITE_COLUMNS_MATCH = ("CASE WHEN json_valid(body) AND json_type(body) = 'object' THEN (" + " AND ".join(
    f"{c} IS coalesce(json_extract(body, '$.{c}'), '')" for c in COLUMNS) + ") ELSE 0 END")
_PROGRESS_EVERY = 65536  # rows between progress() calls


@dataclass
class VerifyResult:
    ok: bool
    rows: int
    problem: str = ""
    seq: int | None = None  # the row named: the first that does not fit
    checkpoints: int = 0  # signed checkpoints checked
    notes: list = field(default_factory=list)


@dataclass
class _Walk:
    """What walking the rows learned, for the checks that need the whole chain."""
    rows: int = 0
    first: tuple[int, str] | None = None  # (seq, prev) of the first row
    last_seq: int = 0
    last_time: str = ""
    marker: tuple[int, dict] | None = None  # the latest prune marker (by its body)


def verify(index, *, public_key: PublicKey | None = None, store=None, grace_s: float = 120.0,
           progress: Callable[[int], None] | None = None, page: int = PAGE_ROWS) -> VerifyResult:
    """Walk the chain in pages (bounded memory), checking for every row its seq, prev, hash, and its
    indexed columns against its body. With `public_key`, also every prune marker's signature and
    every signed checkpoint in `store`. The first problem is returned, with the row named."""
    ensure_schema(index)
    checkpoints = _signed_checkpoints(public_key, store)
    if isinstance(checkpoints, VerifyResult):
        return checkpoints
    walk = _Walk()
    notes: list[str] = []
    problem = (_walk_rows(index, walk, checkpoints, public_key, progress, page)
               or _check_start(walk) or _check_checkpoints(walk, checkpoints)
               or _check_uncovered_tail(walk, checkpoints, public_key, grace_s, notes))
    return problem or VerifyResult(True, walk.rows, checkpoints=len(checkpoints), notes=notes)


def _signed_checkpoints(public_key: PublicKey | None, store) -> dict[int, dict] | VerifyResult:
    """The checkpoints in `store` by seq (none without both a key and a store), or the failed result
    naming the first one `public_key` did not sign."""
    checkpoints: dict[int, dict] = {}
    if public_key is None or store is None:
        return checkpoints
    for name, doc in read_checkpoints(store):
        if doc is None or not public_key.valid(doc) or not isinstance(doc.get("seq"), int):
            seq = doc.get("seq") if isinstance(doc, dict) else None
            return VerifyResult(False, 0, f"checkpoint {name} is not signed by this key (forged or altered)",
                                seq if isinstance(seq, int) else None)
        checkpoints[doc["seq"]] = doc
    return checkpoints


def _walk_rows(index, walk: _Walk, checkpoints: dict[int, dict], public_key: PublicKey | None,
               progress: Callable[[int], None] | None, page: int) -> VerifyResult | None:
    """Check each row against the one before it, its hash, its columns, its signature (prune markers)
    and its checkpoint, oldest first: the first problem, or None with `walk` filled in."""
    n = 0
    first: tuple[int, str] | None = None
    expected_seq, expected_prev = 0, ""
    marker: tuple[int, dict] | None = None
    last_seq, last_time = 0, ""
    sha = hashlib.sha256
    # SQLite checks each row's columns against its body in C (json_extract); a row it flags, and every
    # row on other databases, is checked here in Python, which alone decides
    fast = type(index).__name__ == "SqliteIndex"
    cols_sql = "seq, body, prev, hash, kind, " + (_SQLITE_COLUMNS_MATCH if fast else "0") + \
        ", time, caller, adapter, image_sha256"
    for seq, body, prev, h, k, matched, t, c, a, img in iter_rows(index, cols_sql, page=page):
        if first is None:
            first = (seq, prev)
        elif seq != expected_seq:
            what = "removed" if seq > expected_seq else "reordered or duplicated"
            return VerifyResult(False, n, f"row {expected_seq} is missing (rows {what}): next row is {seq}", expected_seq)
        elif prev != expected_prev:
            return VerifyResult(False, n, f"row {seq} does not follow row {seq - 1} (removed or reordered rows)", seq)
        if sha(f"{prev}\n{seq}\n{body}".encode()).hexdigest() != h:
            return VerifyResult(False, n, f"row {seq} was altered: its content does not match its hash", seq)
        if not matched or k == "prune":
            b = _hashed_body(seq, body, (t, k, c, a, img))
            if isinstance(b, str):
                return VerifyResult(False, n, b, seq)
            if k == "prune":
                if public_key is not None and not public_key.valid(b):
                    return VerifyResult(False, n, f"row {seq} is a prune marker not signed by the audit key (forged)", seq)
                marker = (seq, b)
        cp = checkpoints.get(seq)
        if cp is not None and cp.get("hash") != h:
            return VerifyResult(False, n, f"row {seq} differs from the checkpoint signed at {cp.get('time')}: the "
                                          f"chain was rewritten", seq)
        expected_seq, expected_prev = seq + 1, h
        last_seq, last_time = seq, t
        n += 1
        if progress is not None and n % _PROGRESS_EVERY == 0:
            progress(_PROGRESS_EVERY)
    if progress is not None:
        progress(n % _PROGRESS_EVERY)
    walk.rows, walk.first, walk.last_seq, walk.last_time, walk.marker = n, first, last_seq, last_time, marker
    return None


def _hashed_body(seq: int, body: str, stored: tuple[str, str, str, str, str]) -> dict | str:
    """The row's hashed content, or what is wrong with it: not a JSON object, or an indexed column
    (`stored`) that says something else."""
    try:
        b = json.loads(body)
    except ValueError:
        return f"row {seq} was altered: its content is not JSON"
    if not isinstance(b, dict):
        return f"row {seq} was altered: its content is not a JSON object"
    cols = columns_of(b)
    if cols != stored:
        name, said, hashed = next((name, x, y) for name, x, y in zip(COLUMNS, stored, cols) if x != y)
        return f"row {seq} was altered: its column {name} says {said!r} but its hashed content says {hashed!r}"
    return b


def _chain_start(walk: _Walk) -> int:
    marker = walk.marker
    return walk.first[0] if walk.first is not None else (marker[1]["kept_from_seq"] if marker else 1)


def _check_start(walk: _Walk) -> VerifyResult | None:
    """The chain may start at the genesis, or at the anchor the latest prune marker records."""
    first, marker = walk.first, walk.marker
    if first is not None and first != (1, GENESIS):
        if marker is None or (marker[1].get("kept_from_seq"), marker[1].get("anchor")) != first:
            return VerifyResult(False, walk.rows, f"row {first[0]} starts the chain, but no prune marker says so: "
                                                  f"the rows before it were removed", first[0])
    return None


def _check_checkpoints(walk: _Walk, checkpoints: dict[int, dict]) -> VerifyResult | None:
    """Every checkpointed row is still there, or was removed by a signed prune marker whose anchor
    matches the checkpoint just before the rows it kept."""
    n, last_seq, marker, start = walk.rows, walk.last_seq, walk.marker, _chain_start(walk)
    for seq in sorted(checkpoints):
        cp = checkpoints[seq]
        if seq > last_seq:
            return VerifyResult(False, n, f"row {seq} is gone: the checkpoint signed at {cp.get('time')} covers rows "
                                          f"up to {seq}, the log ends at row {last_seq} (its tail was truncated)", seq)
        if seq < start:
            kept_from = marker[1].get("kept_from_seq", 0) if marker else 0
            if marker is None or kept_from <= seq:
                return VerifyResult(False, n, f"row {seq} is gone: it is checkpointed, and no signed prune marker "
                                              f"removed it", seq)
            if seq == kept_from - 1 and marker[1].get("anchor") != cp.get("hash"):
                return VerifyResult(False, n, f"row {seq} differs from the checkpoint signed at {cp.get('time')}: "
                                              f"the prune marker's anchor does not match", marker[0])
    return None


def _check_uncovered_tail(walk: _Walk, checkpoints: dict[int, dict], public_key: PublicKey | None,
                          grace_s: float, notes: list[str]) -> VerifyResult | None:
    """Rows after the last checkpoint (with a key): noted while younger than `grace_s` (the server
    has not checkpointed them yet), a problem once older (nothing signed them)."""
    n, last_seq = walk.rows, walk.last_seq
    if public_key is None or not n:
        return None
    covered = max(checkpoints) if checkpoints else 0
    if last_seq <= covered:
        return None
    start = _chain_start(walk)
    age = time.time() - epoch_seconds(walk.last_time)
    if age > grace_s or age < -grace_s:
        bad = max(covered + 1, start)
        return VerifyResult(False, n, f"row {bad} (and the {last_seq - bad} after it) is not covered by any "
                                      f"signed checkpoint and is older than {grace_s:g} s: appended behind the "
                                      f"server's back, or left by a crash before its checkpoint", bad,
                            checkpoints=len(checkpoints))
    notes.append(f"rows {max(covered + 1, start)}-{last_seq} are newer than the last checkpoint "
                 f"(written in the last {grace_s:g} s)")
    return None
