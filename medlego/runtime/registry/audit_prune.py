"""Pruning the audit log: old rows go, a (signed) marker row records where the chain now starts."""

from __future__ import annotations

from .audit_chain import append_rows, ensure_schema, lock_chain, now_iso, parse_time
from .audit_keys import Signer, write_checkpoint


def prune(index, before: str, caller: str = "cli", signer: Signer | None = None, store=None) -> dict:
    """Delete rows older than `before` and chain a marker row naming the new start of the chain
    (signed, and checkpointed in `store`, when `signer` is given)."""
    ensure_schema(index)
    cutoff = parse_time(before, "--before")

    def run(tx):
        lock_chain(tx)
        last = tx.one("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1 FOR UPDATE")
        if last is None:
            return {"removed": 0}
        kept = tx.one("SELECT seq, prev FROM audit WHERE time >= ? ORDER BY seq LIMIT 1", (cutoff,))
        # rows from the first one at/after the cutoff on are kept (a prune never makes a hole mid-chain)
        kept_from, anchor = kept if kept is not None else (last[0] + 1, last[1])
        removed = tx.run("DELETE FROM audit WHERE seq < ?", (kept_from,))
        marker = {"time": now_iso(), "kind": "prune", "caller": caller, "before": cutoff, "removed": removed,
                  "kept_from_seq": kept_from, "anchor": anchor}
        if signer is not None:
            marker = signer.sign(marker)
        if removed:
            # after the last kept row; everything pruned: the marker itself starts the chain at kept_from
            seq, h = append_rows(tx, [marker], after=(last[0], last[1]) if kept is not None else (kept_from - 1, anchor))
            marker = {**marker, "seq": seq, "hash": h}
        return marker
    marker = index.write(run)
    if marker.get("removed") and signer is not None:
        write_checkpoint(store, signer, marker["seq"], marker["hash"])
    return marker
