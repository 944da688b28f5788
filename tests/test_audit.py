"""The audit trail and named callers, against a real server on loopback (issue 17)."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import subprocess
import sys

import httpx
import pytest

from medlego.jobs.synthetic import encode_png, random_adapter, random_image
from medlego.runtime.registry import audit
from medlego.runtime.base import load_base
from medlego.runtime.config import AuditConfig, AuthConfig, BatchingConfig, EngineConfig
from medlego.runtime.engine import Engine
from medlego.runtime.registry import Registry
from medlego.serving.auth import Auth
from medlego.serving.server import EmbeddedServer
from medlego.serving.service import DiagnosisService
from servers import TINY_MODEL

ADMIN = "audit-admin-token"
TOKENS = {"alice": ("diagnose", "alice-secret-1"), "bob": ("diagnose", "bob-secret-2"),
          "carol": ("read", "carol-secret-3"), "ops": ("admin", "ops-secret-4")}


def bearer(token):
    return {"Authorization": f"Bearer {token}"}


def medlego(*args):
    return subprocess.run([sys.executable, "-m", "medlego", *args], capture_output=True, text=True, timeout=60)


def cli(*args):
    """`medlego ARGS` in this process (the same main() as the command; a subprocess costs seconds of imports)."""
    import contextlib
    import io

    from medlego.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(list(args))
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else 1
    return subprocess.CompletedProcess(args, rc, out.getvalue(), err.getvalue())


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_base_file):
    d = tmp_path_factory.mktemp("audit")
    base = load_base(TINY_MODEL, tiny_base_file)
    reg = Registry(d, base=base.spec, max_rank=16, input_size=base.input_size)
    reg.register("derma", random_adapter(base.spec, base.preprocess, rank=4, seed=3).to_bytes())
    reg.register("derma", random_adapter(base.spec, base.preprocess, rank=4, seed=4).to_bytes())
    lines = []
    for name, (role, token) in TOKENS.items():
        lines += ["[[token]]", f'name = "{name}"', f'role = "{role}"',
                  f'sha256 = "{hashlib.sha256(token.encode()).hexdigest()}"']
    tokens_file = d / "tokens.toml"
    tokens_file.write_text("\n".join(lines) + "\n")
    auth = Auth.from_config(AuthConfig(admin_token=ADMIN, tokens_file=str(tokens_file)))
    log = audit.AuditLog(reg.index, AuditConfig(flush_interval_s=0.05))
    service = DiagnosisService(Engine(base, reg, EngineConfig(slots=8)), auth=auth, audit=log,
                               batching=BatchingConfig(max_batch=8, max_wait_ms=2))
    srv = EmbeddedServer(service, host="127.0.0.1", port=0, grpc_port=0).start()
    yield srv, d, reg
    srv.stop()


def _diagnose(srv, token, image, adapter="derma", request_id=None):
    headers = bearer(token)
    if request_id:
        headers["X-Request-ID"] = request_id
    return httpx.post(srv.url + "/v1/diagnose", files={"file": ("x.png", image, "image/png")},
                      data={"adapter": adapter}, headers=headers, timeout=60)


def test_named_callers_audit_and_roles(setup):
    srv, d, reg = setup
    images = [encode_png(random_image(i, 32)) for i in range(3)]
    callers = ["alice", "bob", "alice"]
    answers = []
    for n, (caller, image) in enumerate(zip(callers, images)):
        r = _diagnose(srv, TOKENS[caller][1], image, request_id=f"study-{n}")
        assert r.status_code == 200, r.text
        assert r.headers["x-request-id"] == f"study-{n}"  # the client's id is echoed
        answers.append(r.json())
    bad_id = _diagnose(srv, TOKENS["alice"][1], images[0], request_id="bad id with spaces")
    assert bad_id.status_code == 200 and bad_id.headers["x-request-id"] != "bad id with spaces"

    # the read role sees the trail; rows are per diagnosis, with caller, version, sha256 and image sha256
    r = httpx.get(srv.url + "/v1/audit", params={"kind": "diagnosis"}, headers=bearer(TOKENS["carol"][1]))
    assert r.status_code == 200, r.text
    rows = r.json()["rows"]
    latest = reg.resolve("derma")
    assert len(rows) == 4
    for n, (row, caller, image, answer) in enumerate(zip(rows, callers, images, answers)):
        assert row["caller"] == caller
        assert row["request_id"] == f"study-{n}"
        assert row["api"] == "rest" and row["outcome"] == "ok"
        assert row["adapter"] == f"derma@{latest.version}" == f"derma@{answer['version']}"
        assert row["adapter_sha256"] == latest.sha256 == answer["sha256"]
        assert row["image_sha256"] == hashlib.sha256(image).hexdigest()
        assert row["image_format"] == "png"
        assert row["top_label"] == answer["top"][0]["label"]
        assert row["probabilities"] == answer["probabilities"]
        assert "image" not in row
    # filters: caller, image sha256, adapter, limit
    only_bob = httpx.get(srv.url + "/v1/audit", params={"caller": "bob"}, headers=bearer(ADMIN)).json()["rows"]
    assert [x["caller"] for x in only_bob] == ["bob"]
    by_image = httpx.get(srv.url + "/v1/audit", headers=bearer(ADMIN),
                         params={"image_sha256": hashlib.sha256(images[1]).hexdigest()}).json()["rows"]
    assert [x["request_id"] for x in by_image] == ["study-1"]
    assert httpx.get(srv.url + "/v1/audit", params={"adapter": "derma@1"}, headers=bearer(ADMIN)).json()["rows"] == []
    assert len(httpx.get(srv.url + "/v1/audit", params={"limit": 2}, headers=bearer(ADMIN)).json()["rows"]) == 2
    # paged (issue 24): at most 1000 rows an answer; "next" is the cursor for ?after=
    every = httpx.get(srv.url + "/v1/audit", params={"kind": "diagnosis"}, headers=bearer(ADMIN)).json()
    assert every["next"] is None and len(every["rows"]) == 4
    first = httpx.get(srv.url + "/v1/audit", params={"kind": "diagnosis", "limit": 3}, headers=bearer(ADMIN)).json()
    rest = httpx.get(srv.url + "/v1/audit", params={"kind": "diagnosis", "limit": 3, "after": first["next"]},
                     headers=bearer(ADMIN)).json()
    assert first["next"] == first["rows"][-1]["seq"] and rest["next"] is None
    assert first["rows"] + rest["rows"] == every["rows"]
    assert httpx.get(srv.url + "/v1/audit", params={"limit": 1001}, headers=bearer(ADMIN)).status_code == 400
    assert httpx.get(srv.url + "/v1/audit", params={"since": "yesterday"}, headers=bearer(ADMIN)).status_code == 400

    # roles: diagnose cannot read the audit log or register; read cannot diagnose or register
    alice = bearer(TOKENS["alice"][1])
    assert httpx.get(srv.url + "/v1/audit", headers=alice).status_code == 403
    upload = {"file": ("a.safetensors", b"x" * 10)}
    assert httpx.post(srv.url + "/v1/adapters", files=upload, data={"name": "x"}, headers=alice).status_code == 403
    assert httpx.get(srv.url + "/v1/adapters", headers=alice).status_code == 403
    carol = bearer(TOKENS["carol"][1])
    assert _diagnose(srv, TOKENS["carol"][1], images[0]).status_code == 403
    assert httpx.post(srv.url + "/v1/adapters", files=upload, data={"name": "x"}, headers=carol).status_code == 403
    assert httpx.get(srv.url + "/v1/adapters", headers=carol).status_code == 200
    assert httpx.get(srv.url + "/v1/audit", headers=bearer("nobody")).status_code == 403
    assert httpx.get(srv.url + "/v1/audit").status_code == 401
    assert _diagnose(srv, "nobody", images[0]).status_code == 403
    # the v2 routes follow the same role table as /v1 (auth.py ROUTES): model metadata is "describe",
    # allowed to the read role as /v1/adapters/{ref} is; inference is "diagnose"
    assert httpx.get(srv.url + "/v2/models/derma", headers=carol).status_code == 200
    assert httpx.post(srv.url + "/v2/models/derma/infer", headers=carol, json={"inputs": []}).status_code == 403

    # admin operations by a named admin are recorded with before and after
    ops = bearer(TOKENS["ops"][1])
    assert httpx.put(srv.url + "/v1/aliases/skin", json={"target": "derma@1"}, headers=ops).status_code == 200
    assert httpx.put(srv.url + "/v1/aliases/skin", json={"target": "derma@2"}, headers=ops).status_code == 200
    admin_rows = httpx.get(srv.url + "/v1/audit", params={"kind": "admin"}, headers=ops).json()["rows"]
    assert [(x["caller"], x["op"], x["before"], x["after"]["target"]) for x in admin_rows] == [
        ("ops", "alias", None, "derma@1"), ("ops", "alias", "derma@1", "derma@2")]
    refused = httpx.get(srv.url + "/v1/audit", params={"kind": "refused"}, headers=ops).json()["rows"]
    assert any(x["caller"] == "alice" and x["action"] == "audit" for x in refused)
    assert any(x["caller"] == "carol" and x["action"] == "diagnose" for x in refused)
    assert all("reason" in x for x in refused)


def test_verify_catches_edits_and_deletions_and_prune_keeps_the_chain(setup, tmp_path):
    srv, d, reg = setup
    for i in range(3):
        assert _diagnose(srv, TOKENS["bob"][1], encode_png(random_image(20 + i, 24))).status_code == 200
    srv.service.audit.flush()
    ok = cli("audit", "--data-dir", str(d), "verify")
    assert ok.returncode == 0 and "verified" in ok.stdout, ok.stdout + ok.stderr

    # export filters, as JSON lines
    out = cli("audit", "--data-dir", str(d), "export", "--caller", "bob", "--adapter", "derma")
    lines = [json.loads(x) for x in out.stdout.splitlines()]
    assert out.returncode == 0 and lines and all(x["caller"] == "bob" and x["adapter"].startswith("derma@") for x in lines)
    none = cli("audit", "--data-dir", str(d), "export", "--until", "2000-01-01")
    assert none.returncode == 0 and none.stdout == ""
    mistake = medlego("audit", "--data-dir", str(d), "export", "--since", "not-a-date")
    assert mistake.returncode == 2 and len(mistake.stderr.strip().splitlines()) == 1, mistake.stderr

    # a copy of the database, tampered: one row's top label edited, then a row deleted
    src = sqlite3.connect(d / "registry.db")
    copy_dir = tmp_path / "copy"
    copy_dir.mkdir()
    dst = sqlite3.connect(copy_dir / "registry.db")
    src.backup(dst)
    src.close()
    seq, body = dst.execute("SELECT seq, body FROM audit WHERE kind = 'diagnosis' ORDER BY seq LIMIT 1 OFFSET 1").fetchone()
    row = json.loads(body)
    row["top_label"] = "benign" if row["top_label"] != "benign" else "malignant"
    dst.execute("UPDATE audit SET body = ? WHERE seq = ?", (audit.canonical(row), seq))
    dst.commit()
    bad = cli("audit", "--data-dir", str(copy_dir), "verify")
    assert bad.returncode == 1 and f"row {seq}" in bad.stderr, bad.stderr
    dst.execute("UPDATE audit SET body = ? WHERE seq = ?", (body, seq))
    dst.execute("DELETE FROM audit WHERE seq = ?", (seq,))  # a middle row (the tail needs checkpoints: test_audit_tamper.py)
    dst.commit()
    gone = cli("audit", "verify", "--data-dir", str(copy_dir))  # registry flags after the action work too
    assert gone.returncode == 1 and f"row {seq}" in gone.stderr, gone.stderr
    dst.close()

    # prune: rows before a cut-off go, a marker row stays, and the chain still verifies
    rows = audit.query(reg.index)
    cut = rows[len(rows) // 2]["time"]
    pr = cli("audit", "--data-dir", str(d), "prune", "--before", cut)
    assert pr.returncode == 0 and "pruned" in pr.stdout, pr.stdout + pr.stderr
    after = audit.query(reg.index)
    assert after[0]["seq"] == rows[len(rows) // 2]["seq"] and after[-1]["kind"] == "prune"
    assert cli("audit", "--data-dir", str(d), "verify").returncode == 0
    # the server keeps appending after the marker, and the chain still verifies
    assert _diagnose(srv, TOKENS["alice"][1], encode_png(random_image(30, 24))).status_code == 200
    srv.service.audit.flush()
    assert audit.verify(reg.index).ok


def test_grpc_diagnoses_are_audited_and_queried_with_roles(setup):
    import grpc

    from medlego.serving import medlego_pb2 as pb
    from medlego.serving import medlego_pb2_grpc as pb_grpc

    srv, d, reg = setup
    image = encode_png(random_image(40, 24))
    with grpc.insecure_channel(srv.grpc_target) as channel:
        stub = pb_grpc.MedlegoStub(channel)
        answer, call = stub.Diagnose.with_call(pb.DiagnoseRequest(image=image, adapter="derma@1"), metadata=[
            ("authorization", f"Bearer {TOKENS['bob'][1]}"), ("x-request-id", "grpc-1")])
        assert answer.version == 1 and ("x-request-id", "grpc-1") in call.trailing_metadata()  # echoed, as REST does
        with pytest.raises(grpc.RpcError) as refused:  # an error carries an id too (a fresh one: none was given)
            stub.Diagnose(pb.DiagnoseRequest(image=image, adapter="nope"),
                          metadata=[("authorization", f"Bearer {TOKENS['bob'][1]}")])
        (rid,) = [v for k, v in refused.value.trailing_metadata() if k == "x-request-id"]
        assert len(rid) == 32 and rid != "grpc-1"
        rows = [json.loads(x) for x in stub.QueryAudit(pb.AuditRequest(image_sha256=hashlib.sha256(image).hexdigest()),
                                                       metadata=[("authorization", f"Bearer {TOKENS['carol'][1]}")]).rows_json]
        assert sorted((x["caller"], x["api"], x["adapter"], x["request_id"]) for x in rows) == sorted(
            [("bob", "grpc", "derma@1", "grpc-1"), ("bob", "grpc", "", rid)])  # the failure is audited under its id
        # paged as GET /v1/audit: next_after is the cursor, 0 after the last page; pages neither overlap nor skip
        carol = [("authorization", f"Bearer {TOKENS['carol'][1]}")]
        srv.service.audit.flush()
        everything = [json.loads(x)["seq"] for x in stub.QueryAudit(pb.AuditRequest(), metadata=carol).rows_json]
        paged, after = [], 0
        while True:
            page = stub.QueryAudit(pb.AuditRequest(limit=1, after=after), metadata=carol)
            paged += [json.loads(x)["seq"] for x in page.rows_json]
            if not page.next_after:
                break
            assert page.next_after == paged[-1] and len(page.rows_json) == 1
            after = page.next_after
        assert len(everything) >= 2 and paged == everything
        for who, call in (("alice", lambda md: stub.QueryAudit(pb.AuditRequest(), metadata=md)),
                          ("carol", lambda md: stub.Diagnose(pb.DiagnoseRequest(image=image, adapter="derma"), metadata=md))):
            with pytest.raises(grpc.RpcError) as e:
                call([("authorization", f"Bearer {TOKENS[who][1]}")])
            assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_token_new_prints_a_token_and_its_entry(tmp_path):
    out = medlego("token", "new", "--name", "dr-smith", "--role", "read")
    assert out.returncode == 0, out.stderr
    token = out.stdout.splitlines()[0].rsplit(" ", 1)[1]
    entry = out.stdout[out.stdout.index("[[token]]"):]
    path = tmp_path / "tokens.toml"
    path.write_text(entry)
    auth = Auth.from_config(AuthConfig(tokens_file=str(path)))
    assert auth.check_audit(f"Bearer {token}") == "dr-smith"
    assert token not in entry
    assert medlego("token", "new", "--name", "x", "--role", "root").returncode == 2


_WRITER = """
import sys
import time
from pathlib import Path
from medlego.runtime.errors import OverloadedError
from medlego.runtime.registry.audit import AuditLog
from medlego.runtime.config import AuditConfig
from medlego.runtime.registry.index import open_index

log = AuditLog(open_index(None, Path(sys.argv[1])), AuditConfig(max_buffer=64, batch_rows=16, flush_interval_s=0.05))
n = 0
while True:
    try:
        log.record("diagnosis", caller="load", adapter="derma@1", image_sha256="%064x" % n, outcome="ok")
    except OverloadedError:  # the buffer is full: record() never waits, the caller (a server: 503) retries
        time.sleep(0.001)
        continue
    n += 1
    print(n, flush=True)
"""


def test_kill_9_loses_at_most_the_buffer_and_the_chain_verifies(tmp_path):
    import os
    import signal
    import time

    from medlego.runtime.registry.index import open_index

    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    index = None
    deadline = time.time() + 60
    while time.time() < deadline:
        if (tmp_path / "registry.db").exists():
            index = index or open_index(None, tmp_path)
            try:
                if index.read("SELECT COUNT(*) FROM audit")[0][0] > 200:
                    break
            except sqlite3.OperationalError:
                pass
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    out, _ = proc.communicate(timeout=30)
    recorded = int(out.split()[-1])  # rows the writer had handed to record() and returned from
    written = index.read("SELECT COUNT(*) FROM audit")[0][0]
    assert written > 200
    assert -1 <= recorded - written <= 64  # at most max_buffer rows lost (-1: killed between record and print)
    result = audit.verify(index)
    assert result.ok and result.rows == written, result


def test_postgresql_one_chain_for_two_writers_tamper_and_prune(postgres_url, tmp_path):
    import threading

    import psycopg

    from medlego.runtime.config import AuditConfig
    from medlego.runtime.registry.index import open_index

    logs = [audit.AuditLog(open_index(postgres_url, tmp_path), AuditConfig(batch_rows=8, flush_interval_s=0.01))
            for _ in range(2)]  # two replicas of a fleet, one database

    def load(k):
        for i in range(60):
            logs[k].record("diagnosis", caller=f"replica{k}", adapter="derma@1", image_sha256="%064x" % i, outcome="ok")

    threads = [threading.Thread(target=load, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for log in logs:
        log.close()
    index = logs[0].index
    assert audit.verify(index).ok and audit.verify(index).rows == 120
    assert len(audit.query(index, caller="replica1", adapter="derma")) == 60
    with psycopg.connect(postgres_url, autocommit=True) as db:
        (body,) = db.execute("SELECT body FROM audit WHERE seq = 7").fetchone()
        edited = json.loads(body)
        edited["caller"] = "someone-else"
        db.execute("UPDATE audit SET body = %s WHERE seq = 7", (audit.canonical(edited),))
        result = audit.verify(index)
        assert not result.ok and result.seq == 7
        db.execute("UPDATE audit SET body = %s WHERE seq = 7", (body,))
    cut = audit.query(index)[50]["time"]
    marker = audit.prune(index, cut, caller="test")
    assert marker["removed"] >= 1 and audit.verify(index).ok
    index.close()


def test_refusals_of_every_stage_are_recorded_and_floods_aggregated(setup):
    srv, d, reg = setup
    log = srv.service.audit
    log.flush()
    before = audit.query(reg.index, kind="refused")
    seen = before[-1]["seq"] if before else 0
    api = bearer(TOKENS["alice"][1])
    assert httpx.post(srv.url + "/v1/diagnose", content=b"{not json", headers={**api, "Content-Type": "application/json",
                      "X-Request-ID": "bad-json"}).status_code == 400
    big = srv.service.limits.max_body_bytes + 1
    assert httpx.post(srv.url + "/v1/diagnose", content=b"x" * big, headers={**api, "X-Request-ID": "too-big"}
                      ).status_code == 413
    assert httpx.post(srv.url + "/v2/models/derma/infer", json={"inputs": [{"name": "image", "shape": [1],
                      "datatype": "FP32", "data": [1.0]}]}, headers={**api, "X-Request-ID": "bad-tensor"}
                      ).status_code in (400, 422)
    for _ in range(25):  # an anonymous 401 flood: one row, then one row counting the rest
        assert httpx.get(srv.url + "/v1/audit").status_code == 401
    log.flush()
    rows = [x for x in audit.query(reg.index, kind="refused") if x["seq"] > seen]
    by_id = {x.get("request_id"): x for x in rows}
    assert by_id["bad-json"]["status"] == 400 and by_id["bad-json"]["caller"] == "alice"
    assert by_id["too-big"]["status"] == 413 and "limit" in by_id["too-big"]["reason"]
    assert by_id["bad-tensor"]["api"] == "v2" and by_id["bad-tensor"]["reason"]
    flood = [x for x in rows if x.get("action") == "audit" and x["caller"] == ""]
    assert len(flood) == 2 and flood[1]["repeated"] == 24, flood
    assert audit.verify(reg.index).ok


def test_fhir_export_of_a_real_servers_log_validates(setup, tmp_path):
    from fhir.resources.R4B.bundle import Bundle  # AuditEvent in R4B is R4's

    srv, d, reg = setup
    assert _diagnose(srv, "nobody", encode_png(random_image(50, 24))).status_code == 403
    assert _diagnose(srv, TOKENS["bob"][1], encode_png(random_image(50, 24))).status_code == 200
    srv.service.audit.flush()
    out = tmp_path / "audit.fhir.json"
    r = cli("audit", "export", "--data-dir", str(d), "--format", "fhir", "-o", str(out))
    assert r.returncode == 0, r.stderr
    doc = json.loads(out.read_text())
    bundle = Bundle.model_validate(doc)
    rows = audit.query(reg.index)
    assert bundle.type == "collection" and len(bundle.entry) == len(rows) > 0
    kinds = {e.resource.subtype[0].code for e in bundle.entry}
    assert {"diagnosis", "refused"} <= kinds
    last = bundle.entry[-1].resource
    assert last.get_resource_type() == "AuditEvent" and last.agent[0].who.display == "bob"
    assert last.outcome == "0" and last.recorded.isoformat().startswith(rows[-1]["time"][:19])
    # the row as hashed rides along: the export can be checked against the chain
    detail = {x.type: x.valueString for x in last.entity[0].detail}
    assert detail["hash"] == rows[-1]["hash"] and json.loads(detail["row"])["image_sha256"] == rows[-1]["image_sha256"]


def test_a_revoked_token_stops_working_within_seconds_and_is_recorded(setup):
    import time

    srv, d, reg = setup
    tokens_file = d / "tokens.toml"
    original = tokens_file.read_text()
    bob = TOKENS["bob"][1]
    assert _diagnose(srv, bob, encode_png(random_image(60, 24))).status_code == 200
    kept = original.split("[[token]]")
    tokens_file.write_text("[[token]]".join(p for p in kept if 'name = "bob"' not in p))
    try:
        deadline = time.time() + 10
        while _diagnose(srv, bob, encode_png(random_image(61, 24))).status_code != 403:
            assert time.time() < deadline, "revocation did not take effect"
            time.sleep(0.3)
        assert _diagnose(srv, TOKENS["alice"][1], encode_png(random_image(62, 24))).status_code == 200
        srv.service.audit.flush()
        changes = [x for x in audit.query(reg.index, kind="admin") if x.get("op") == "tokens"]
        assert changes and changes[-1]["after"]["revoked"] == ["bob"], changes
    finally:
        tokens_file.write_text(original)
        time.sleep(1.2)


def test_a_full_buffer_never_blocks_and_failed_flushes_count_once(tmp_path):
    import time

    from medlego.runtime.errors import OverloadedError
    from medlego.runtime.registry.index import open_index

    index = open_index(None, tmp_path)

    class Down:  # the database is unreachable: every write fails
        def __getattr__(self, name):
            return getattr(index, name)

        def write(self, fn):
            raise OSError("database down")

    log = audit.AuditLog(index, AuditConfig(max_buffer=50, batch_rows=10, flush_interval_s=0.05))
    log.index = Down()
    for i in range(49):  # a failed flush puts its rows back and counts them once: 49 rows fit in 50
        log.record("diagnosis", caller="x", image_sha256="%064x" % i)
        time.sleep(0.002)
    t0 = time.perf_counter()
    with pytest.raises(OverloadedError):
        for i in range(5):
            log.record("diagnosis", caller="x")
    assert time.perf_counter() - t0 < 0.05  # refused at once, never waiting on the event loop
    for _ in range(100):  # refusals are counted, never refused
        log.refusal(caller="", api="rest", action="diagnose", reason="no token")
    log.index = index  # the database is back: everything buffered is written, the chain verifies
    log.close()
    rows = audit.query(index)
    assert len(rows) == 51 and rows[-1]["repeated"] == 100 and audit.verify(index).ok


def test_an_outage_logs_its_first_failure_then_one_line_per_interval(tmp_path, caplog):
    """The flusher retries every flush_interval_s; an outage gives one ERROR line, not one per retry,
    and the recovery one WARNING line."""
    import logging
    import time

    from medlego.runtime.registry.index import open_index

    index = open_index(None, tmp_path)

    class Down:
        def __getattr__(self, name):
            return getattr(index, name)

        def write(self, fn):
            raise OSError("database down")

    log = audit.AuditLog(index, AuditConfig(flush_interval_s=0.02))
    log.index = Down()
    with caplog.at_level(logging.WARNING, logger="medlego.audit"):
        log.record("diagnosis", caller="x")
        deadline = time.monotonic() + 5
        while log.flush_errors < 10 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert log.flush_errors >= 10
        log.index = index
        log.flush()
    failed = [r for r in caplog.records if "audit write failed" in r.getMessage()]
    assert len(failed) == 1, [r.getMessage() for r in failed]
    assert any("audit writes work again" in r.getMessage() for r in caplog.records)
    log.close()
    assert len(audit.query(index)) == 1 and audit.verify(index).ok
