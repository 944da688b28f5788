"""The audit trail: an append-only, hash-chained log of every diagnosis, refusal and admin operation.

It lives in the registry's own database (``audit`` table, SQLite or PostgreSQL). Each row holds
its content as canonical JSON (``body``) and ``hash = sha256(prev_hash + "\\n" + seq + "\\n" + body)``,
where ``prev_hash`` is the hash of the row before it (:data:`GENESIS` for the first). Changing a
row's content breaks its own hash; removing or reordering rows breaks the next row's ``prev`` or
the run of ``seq``. The indexed columns (``time``, ``kind``, ``caller``, ``adapter``,
``image_sha256``) that filters read are copies of body fields: :func:`verify` recomputes each
from the hashed body and names the row whose columns disagree, and :func:`query` re-checks every
filter against the body, so a row an edited column smuggles into a filter is not returned.

**Anchored outside the database.** With ``[audit] signing_key`` (an Ed25519 private key made by
``medlego audit keygen``), the server signs a *checkpoint* (last seq, its hash, time) every
``checkpoint_rows`` rows or ``checkpoint_interval_s`` seconds and when it closes, and writes it to
the registry's object store (``checkpoints/`` in the folder store or under the S3 prefix) and to
the server log. ``verify(public_key=…)`` checks the chain against every checkpoint: a checkpointed
row that is gone (truncation), a checkpointed hash that differs (a rewritten chain), a prune marker
without a valid signature (forged), and rows after the last checkpoint older than a grace period
(appended behind the server's back) are each reported with the row named.

Writes are off the request path: :meth:`AuditLog.record` appends to a bounded in-memory buffer
(``max_buffer`` rows) and never waits: when the buffer is full (the database is down or too slow)
it raises :class:`OverloadedError` (the request is answered 503: nothing is served unrecorded).
Refusals never raise: identical ones (same caller, API, action, stage and reason) within
``aggregate_interval_s`` are written as the first row plus one row counting the rest, so an
anonymous 401 flood costs two rows per interval, not one per request. A background thread writes
the buffer in one transaction every ``flush_interval_s`` (or sooner once ``batch_rows`` wait). A
``kill -9`` therefore loses at most the rows still in the buffer; what was written is complete,
committed transactions, so the chain on disk still verifies.

Pruning (:func:`prune`) deletes rows older than a date and appends a ``prune`` marker row that
records the first kept row's ``seq`` and ``prev`` hash (the anchor), signed with the audit key when
one is given. The marker continues the chain: it follows the last kept row, or (everything
pruned) takes the seq after the last removed row with the anchor as its ``prev``, so the chain
verifies for any cut-off date. Image content is never stored: only the sha256 of the bytes as received.

The modules, one job each (this one gathers their public names, which callers import from here):
``audit_chain.py`` the row hashes, the table, appending and paging; ``audit_keys.py`` the Ed25519
keys and signed checkpoints; ``audit_writer.py`` the buffered :class:`AuditLog` and :data:`CURRENT`;
``audit_query.py`` reading by filter; ``audit_verify.py`` :func:`verify`; ``audit_prune.py`` :func:`prune`.
"""

from __future__ import annotations

from .audit_chain import (COLUMNS, GENESIS, KINDS, PAGE_ROWS, append_now, canonical, columns_of, ensure_schema,
                          iter_rows, now_iso, parse_time, row_hash)
from .audit_keys import (CHECKPOINT_PREFIX, PublicKey, Signer, checkpoint_name, generate_keypair, read_checkpoints,
                         write_checkpoint)
from .audit_prune import prune
from .audit_query import iter_query, query
from .audit_verify import VerifyResult, verify
from .audit_writer import CURRENT, MAX_AGGREGATES, AuditLog

__all__ = [
    "AuditLog", "CHECKPOINT_PREFIX", "COLUMNS", "CURRENT", "GENESIS", "KINDS", "MAX_AGGREGATES", "PAGE_ROWS",
    "PublicKey", "Signer", "VerifyResult", "append_now", "canonical", "checkpoint_name", "columns_of",
    "ensure_schema", "generate_keypair", "iter_query", "iter_rows", "now_iso", "parse_time", "prune", "query",
    "read_checkpoints", "row_hash", "verify", "write_checkpoint",
]
