"""The audit trail against someone with write access to its database (issue 25): every attack is
detected by verify with the row named, on SQLite + folder store and on PostgreSQL + S3."""

from __future__ import annotations

import json
import sqlite3
import time

import pytest

from medlego.runtime.config import AuditConfig
from medlego.runtime.registry import audit

ROWS = 30


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    private, public, _ = audit.generate_keypair(d / "audit.key")
    return private, public, audit.PublicKey.from_file(public)


@pytest.fixture
def log(backend, keys):
    """A registry with ROWS signed-and-checkpointed audit rows; (registry, backend, raw SQL runner)."""
    reg = backend.open()
    w = audit.AuditLog(reg.index, AuditConfig(signing_key=str(keys[0]), checkpoint_rows=10, batch_rows=5,
                                              flush_interval_s=0.01), store=reg.store)
    for i in range(ROWS):
        w.record("diagnosis", caller=f"caller{i % 3}", adapter=f"derma@{1 + i % 2}", image_sha256="%064x" % i,
                 outcome="ok")
        if i % 5 == 4:
            w.flush()
            w._maybe_checkpoint(False)
    w.close()

    def sql(statement, params=()):
        if backend.url is None:
            db = sqlite3.connect(backend.data_dir / "registry.db")
            out = db.execute(statement, params).fetchall()
            db.commit()
            db.close()
            return out
        import psycopg

        with psycopg.connect(backend.url, autocommit=True) as db:
            cur = db.execute(statement.replace("?", "%s"), params)
            return cur.fetchall() if cur.description else []
    yield reg, backend, sql
    reg.close()


def check(reg, keys, signed=True):
    return audit.verify(reg.index, public_key=keys[2] if signed else None, store=reg.store, grace_s=0)


def test_untouched_log_verifies_with_and_without_the_key(log, keys):
    reg, _, _ = log
    assert len(reg.store.checkpoints()) >= 3
    for signed in (False, True):
        r = check(reg, keys, signed)
        assert r.ok and r.rows == ROWS, r
    assert check(reg, keys).checkpoints >= 3


@pytest.mark.parametrize("column,value", [("caller", "someone-else"), ("time", "2001-01-01T00:00:00.000000Z"),
                                          ("adapter", "other@9"), ("image_sha256", "f" * 64), ("kind", "admin")])
def test_an_edited_column_is_named(log, keys, column, value):
    reg, _, sql = log
    sql(f"UPDATE audit SET {column} = ? WHERE seq = 12", (value,))
    for signed in (False, True):
        r = check(reg, keys, signed)
        assert not r.ok and r.seq == 12 and f"column {column}" in r.problem, r
    # what export reads is what verify checks: the edited column smuggles nothing into a filter
    if column == "caller":
        assert [x["seq"] for x in audit.query(reg.index, caller="someone-else")] == []


def test_an_edited_body_and_a_deleted_middle_row_are_named(log, keys):
    reg, _, sql = log
    (body,) = sql("SELECT body FROM audit WHERE seq = 7")[0]
    edited = json.loads(body)
    edited["outcome"] = "refused"
    sql("UPDATE audit SET body = ? WHERE seq = 7", (audit.canonical(edited),))
    r = check(reg, keys)
    assert not r.ok and r.seq == 7 and "altered" in r.problem, r
    sql("UPDATE audit SET body = ? WHERE seq = 7", (body,))
    sql("DELETE FROM audit WHERE seq = 15")
    r = check(reg, keys)
    assert not r.ok and r.seq == 15 and "missing" in r.problem, r


def test_a_truncated_tail_is_named(log, keys):
    reg, _, sql = log
    sql("DELETE FROM audit WHERE seq > ?", (ROWS - 3,))
    assert check(reg, keys, signed=False).ok  # the chain alone cannot see it…
    r = check(reg, keys)  # …the signed checkpoint of the last row can
    assert not r.ok and r.seq == ROWS and "truncated" in r.problem, r


def _forge_after(sql, last_seq, body):
    (prev,) = sql("SELECT hash FROM audit WHERE seq = ?", (last_seq,))[0]
    text = audit.canonical(body)
    sql("INSERT INTO audit (seq, time, kind, caller, adapter, image_sha256, body, prev, hash) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (last_seq + 1, *audit.columns_of(body), text, prev, audit.row_hash(prev, last_seq + 1, text)))


def test_a_forged_tail_row_with_a_recomputed_hash_is_named(log, keys):
    reg, _, sql = log
    time.sleep(0.01)
    _forge_after(sql, ROWS, {"time": audit.now_iso(), "kind": "diagnosis", "caller": "caller0",
                             "adapter": "derma@1", "image_sha256": "e" * 64, "outcome": "ok"})
    assert check(reg, keys, signed=False).ok
    r = check(reg, keys)
    assert not r.ok and r.seq == ROWS + 1 and "not covered by any signed checkpoint" in r.problem, r


def test_a_rewritten_chain_is_named(log, keys):
    reg, _, sql = log
    rows = sql("SELECT seq, body, prev FROM audit ORDER BY seq")
    prev = rows[2][2]
    for seq, body, _ in rows[2:]:  # row 3 on: caller changed, every hash recomputed, columns kept in step
        b = json.loads(body)
        b["caller"] = "rewritten"
        text = audit.canonical(b)
        h = audit.row_hash(prev, seq, text)
        sql("UPDATE audit SET body = ?, caller = ?, prev = ?, hash = ? WHERE seq = ?", (text, "rewritten", prev, h, seq))
        prev = h
    assert check(reg, keys, signed=False).ok
    first_checkpoint = min(json.loads(data)["seq"] for _, data in reg.store.checkpoints())
    r = check(reg, keys)
    assert not r.ok and r.seq == first_checkpoint and "rewritten" in r.problem, r


def test_a_forged_prune_marker_is_named_and_a_signed_prune_verifies(log, keys):
    reg, backend, sql = log
    # the forger deletes rows 1-10 and appends an unsigned marker that explains the new start
    (anchor,) = sql("SELECT prev FROM audit WHERE seq = 11")[0]
    saved = sql("SELECT seq, time, kind, caller, adapter, image_sha256, body, prev, hash FROM audit WHERE seq <= 10")
    sql("DELETE FROM audit WHERE seq <= 10")
    _forge_after(sql, ROWS, {"time": audit.now_iso(), "kind": "prune", "caller": "cli", "before": "x",
                             "removed": 10, "kept_from_seq": 11, "anchor": anchor})
    assert check(reg, keys, signed=False).ok
    r = check(reg, keys)
    assert not r.ok and r.seq == ROWS + 1 and "prune marker" in r.problem, r
    # restore, then prune for real (signed), after the last row too: the chain verifies for any date
    sql("DELETE FROM audit WHERE seq = ?", (ROWS + 1,))
    for row in saved:
        sql("INSERT INTO audit (seq, time, kind, caller, adapter, image_sha256, body, prev, hash) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", row)
    assert check(reg, keys).ok
    signer = audit.Signer.from_file(keys[0])
    cut = sql("SELECT time FROM audit WHERE seq = 11")[0][0]
    marker = audit.prune(reg.index, cut, signer=signer, store=reg.store)
    assert marker["removed"] == 10 and marker["seq"] == ROWS + 1
    assert check(reg, keys).ok
    marker = audit.prune(reg.index, "2999-01-01", signer=signer, store=reg.store)
    assert marker["seq"] == ROWS + 2 and marker["kept_from_seq"] == ROWS + 2  # numbering continues
    assert check(reg, keys).ok and check(reg, keys, signed=False).ok
    w = audit.AuditLog(reg.index, AuditConfig(signing_key=str(keys[0])), store=reg.store)
    w.record("admin", caller="ops", op="alias")
    w.close()
    r = check(reg, keys)
    assert r.ok and r.rows == 2, r
    # a checkpointed row removed by an unsigned prune: refused with the key
    unsigned = audit.prune(reg.index, "2999-01-02")
    assert check(reg, keys, signed=False).ok
    r = check(reg, keys)
    assert not r.ok and r.seq == unsigned["seq"] and "prune marker" in r.problem, r


def test_a_forged_checkpoint_is_refused(log, keys):
    reg, backend, _ = log
    other_private, _, _ = audit.generate_keypair(backend.data_dir / "other.key")
    audit.write_checkpoint(reg.store, audit.Signer.from_file(other_private), ROWS + 5, "0" * 64)
    r = check(reg, keys)
    assert not r.ok and "not signed by this key" in r.problem, r


def test_the_cli_names_the_row_with_flags_after_the_action(log, keys):
    from test_audit import cli

    reg, backend, sql = log
    ok = cli("audit", "verify", *backend.cli_args(), "--public-key", str(keys[1]), "--grace", "0")
    assert ok.returncode == 0 and f"{ROWS} rows" in ok.stdout and "signed checkpoints" in ok.stdout, ok
    sql("DELETE FROM audit WHERE seq = ?", (ROWS,))
    bad = cli("audit", *backend.cli_args(), "verify", "--public-key", str(keys[1]))
    assert bad.returncode == 1 and f"row {ROWS}" in bad.stderr and "truncated" in bad.stderr, bad
