"""Paged, filtered listings (issue 30), on both backend pairs and over REST and gRPC: every version
exactly once in (name, version) order while others register, filters, bad cursors and limits."""

from __future__ import annotations

import json
import threading

import grpc
import httpx
import pytest

from medlego.runtime.adapter import TaskSpec
from medlego.runtime.errors import BadInputError
from medlego.runtime.registry import Filters, Registry
from medlego.runtime.registry.listing import DEFAULT_PAGE, MAX_PAGE


def _walk(reg, limit: int, filters: Filters = Filters()) -> list[str]:
    refs, cursor = [], None
    while True:
        page = reg.list_page(limit, cursor, filters)
        assert len(page.entries) <= limit
        refs += [e.ref for e in page.entries]
        cursor = page.next_cursor
        if cursor is None:
            return refs


def _key(ref: str) -> tuple[str, int]:
    name, version = ref.split("@")
    return name, int(version)


@pytest.fixture
def two_tasks(make_adapter):
    """Two adapter files with different task names (and their task names)."""
    a, b = make_adapter(seed=1, tasks=[TaskSpec("lungs", ("n", "y"), False)]), \
        make_adapter(seed=2, tasks=[TaskSpec("skin", ("a", "b", "c"), False)])
    return a.to_bytes(), b.to_bytes()


def test_pages_cover_every_version_once_while_others_register(backend, tiny_base, two_tasks):
    reg = backend.open(base=tiny_base.spec)
    a, b = two_tasks
    reg.register_many([(f"n{i:03d}", a if i % 2 else b) for i in range(120)])
    reg.register("n007", b)  # a second version
    before = sorted(_key(e.ref) for e in reg.list())

    stop, errors = threading.Event(), []

    def register_more():  # names before, between and after the pages' positions
        i = 0
        while not stop.is_set():
            try:
                backend.open().register(f"{'a' if i % 3 == 0 else 'n' if i % 3 == 1 else 'z'}{i:04d}x", a)
            except Exception as e:  # noqa: BLE001 - reported by the assertion below
                errors.append(e)
            i += 1

    writer = threading.Thread(target=register_more)
    writer.start()
    try:
        seen = [_key(r) for r in _walk(reg, 7)]
    finally:
        stop.set()
        writer.join()
    assert errors == []
    assert seen == sorted(set(seen)), "strictly increasing: no duplicate, stable order"
    assert set(before) <= set(seen), "no version that existed throughout is skipped"
    assert len(reg.list_page(MAX_PAGE).entries) == min(MAX_PAGE, len(reg))


def test_filters_and_aliases(backend, tiny_base, two_tasks, other_base_file):
    reg = backend.open()
    a, b = two_tasks
    reg.register_many([(f"lung-{i}", a) for i in range(5)] + [(f"skin-{i}", b) for i in range(4)])
    reg.set_alias("lungs-current", "lung-3")
    fp = tiny_base.spec.fingerprint
    assert _walk(reg, 2, Filters(prefix="lung-")) == [f"lung-{i}@1" for i in range(5)]
    assert _walk(reg, 3, Filters(task="skin")) == [f"skin-{i}@1" for i in range(4)]
    assert _walk(reg, 2, Filters(task="skin", prefix="skin-2")) == ["skin-2@1"]
    assert len(_walk(reg, 4, Filters(base=fp))) == 9 and _walk(reg, 4, Filters(base="0" * 64)) == []
    assert _walk(reg, 4, Filters(base=fp, task="lungs", prefix="lung-1")) == ["lung-1@1"]
    page = reg.list_page(3, None, Filters(prefix="lung-"))
    assert page.aliases == {} and reg.list_page(3, page.next_cursor, Filters(prefix="lung-")).aliases == \
        {"lungs-current": "lung-3"}
    reg.delete("skin-1")  # its tags go with it: a filtered page never shows a deleted version
    assert _walk(reg, 10, Filters(task="skin")) == ["skin-0@1", "skin-2@1", "skin-3@1"]
    assert reg.list_page().next_cursor is None and len(reg.list_page().entries) == 8 <= DEFAULT_PAGE


def test_old_registry_is_backfilled(backend, tiny_base, two_tasks):
    reg = backend.open()
    reg.register_many([("old-a", two_tasks[0]), ("old-b", two_tasks[1])])
    reg.index.write(lambda tx: tx.run("DELETE FROM adapter_tags"))  # as a registry made before the table
    assert _walk(reg, 5, Filters(task="skin")) == []
    assert _walk(backend.open(), 5, Filters(task="skin")) == ["old-b@1"]


@pytest.mark.parametrize("call, message", [
    (lambda r: r.list_page(0), "bad limit 0"), (lambda r: r.list_page(MAX_PAGE + 1), "bad limit"),
    (lambda r: r.list_page(5, "not-a-cursor"), "bad cursor"), (lambda r: r.list_page(5, "x" * 600), "bad cursor"),
    (lambda r: r.list_page(1, r.list_page(1).next_cursor, Filters(prefix="a")), "issued for other filters"),
])
def test_bad_cursor_and_limit(tmp_path, two_tasks, call, message):
    reg = Registry(tmp_path)
    reg.register_many([("a1", two_tasks[0]), ("a2", two_tasks[0]), ("b", two_tasks[0])])
    with pytest.raises(BadInputError, match=message) as e:
        call(reg)
    assert "\n" not in str(e.value)


def test_register_many_is_one_transaction(tmp_path, two_tasks):
    reg = Registry(tmp_path)
    with pytest.raises(BadInputError):
        reg.register_many([("good", two_tasks[0]), ("bad name!", two_tasks[1])])
    assert reg.list() == []
    entries = reg.register_many([("x", two_tasks[0]), ("x", two_tasks[1])])
    assert [e.ref for e in entries] == ["x@1", "x@2"]


# -- over the wire ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tiny_base_file, tiny_base, tmp_path_factory):
    from medlego.jobs.synthetic import random_adapter
    from servers import start_server

    d = tmp_path_factory.mktemp("listing")
    data = random_adapter(tiny_base.spec, tiny_base.preprocess, seed=5).to_bytes()
    Registry(d, base=tiny_base.spec).register_many([(f"m{i:02d}", data) for i in range(25)])
    srv = start_server(tiny_base_file, d, grpc=True)
    yield srv
    srv.stop()


def test_rest_pages_and_errors(server):
    refs, cursor = [], None
    with httpx.Client(base_url=server.url, timeout=30) as c:
        while True:
            body = c.get("/v1/adapters", params={"limit": 10, **({"cursor": cursor} if cursor else {})}).json()
            refs += [a["ref"] for a in body["adapters"]]
            cursor = body.get("next_cursor")
            if not cursor:
                break
        assert refs == [f"m{i:02d}@1" for i in range(25)]
        assert len(c.get("/v1/adapters").json()["adapters"]) == 25  # no cursor: the first page, as before
        assert [a["ref"] for a in c.get("/v1/adapters", params={"prefix": "m1"}).json()["adapters"]][:1] == ["m10@1"]
        for params, message in (({"cursor": "garbage"}, "bad cursor"), ({"limit": 0}, "bad limit"),
                                ({"limit": 5000}, "bad limit"), ({"limit": "ten"}, "limit"), ({"prefix": "a b"}, "prefix"),
                                ({"base": "xyz"}, "base filter")):
            r = c.get("/v1/adapters", params=params)
            assert r.status_code == 400 and message in r.json()["detail"] and "\n" not in r.json()["detail"], params


def test_grpc_pages_and_errors(server):
    from medlego.serving import medlego_pb2 as pb
    from medlego.serving import medlego_pb2_grpc as pb_grpc

    with grpc.insecure_channel(server.grpc_target) as ch:
        stub = pb_grpc.MedlegoStub(ch)
        refs, cursor = [], ""
        while True:
            r = stub.ListAdapters(pb.ListAdaptersRequest(limit=7, cursor=cursor))
            refs += [a.ref for a in r.adapters]
            cursor = r.next_cursor
            if not cursor:
                break
        assert refs == [f"m{i:02d}@1" for i in range(25)]
        assert len(stub.ListAdapters(pb.ListAdaptersRequest(task="no-such-task")).adapters) == 0
        for request in (pb.ListAdaptersRequest(cursor="garbage"), pb.ListAdaptersRequest(limit=MAX_PAGE + 1)):
            with pytest.raises(grpc.RpcError) as e:
                stub.ListAdapters(request)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "\n" not in (e.value.details() or "")


def test_kserve_repository_index_pages(server):
    names, cursor = [], None
    with httpx.Client(base_url=server.url, timeout=30) as c:
        while True:
            r = c.post("/v2/repository/index", json={"ready": True, "limit": 10, **({"cursor": cursor} if cursor else {})})
            assert r.status_code == 200
            names += [(m["name"], m["version"], m["state"]) for m in r.json()]
            cursor = r.headers.get("x-next-cursor")
            if not cursor:
                break
        assert names == [(f"m{i:02d}", "1", "READY") for i in range(25)]
        assert len(c.post("/v2/repository/index").json()) == 25  # no body: the first page
        for body, message in (({"cursor": "garbage"}, "bad cursor"), ({"limit": 0}, "bad limit"), ([1], "JSON object"),
                              ({"limit": "x"}, "'limit'"), ({"nope": 1}, "unknown field")):
            r = c.post("/v2/repository/index", json=body)
            assert r.status_code == 400 and message in r.json()["error"], body


def test_kserve_grpc_repository_index_pages(server):
    """Triton's RepositoryIndex over gRPC: tritonclient gets the first page; medlego's paging fields
    (100 on) walk every version once; a named repository or a bad cursor is INVALID_ARGUMENT."""
    import tritonclient.grpc as triton_grpc

    from medlego.serving import kserve_v2_pb2 as pb
    from medlego.serving import kserve_v2_pb2_grpc as pb_grpc

    triton = triton_grpc.InferenceServerClient(server.grpc_target)
    answer = triton.get_model_repository_index(as_json=True)
    assert answer is not None
    assert [(m["name"], m["version"], m["state"]) for m in answer["models"]] == [(f"m{i:02d}", "1", "READY") for i in range(25)]
    with grpc.insecure_channel(server.grpc_target) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        names, cursor = [], ""
        while True:
            r = stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True, limit=10, cursor=cursor))
            assert len(r.models) <= 10
            names += [m.name for m in r.models]
            cursor = r.next_cursor
            if not cursor:
                break
        assert names == [f"m{i:02d}" for i in range(25)]
        assert [m.name for m in stub.RepositoryIndex(pb.RepositoryIndexRequest(prefix="m1")).models] == \
            [f"m{i}" for i in range(10, 20)]
        for request, message in ((pb.RepositoryIndexRequest(repository_name="other"), "one repository"),
                                 (pb.RepositoryIndexRequest(cursor="garbage"), "bad cursor")):
            with pytest.raises(grpc.RpcError) as e:
                stub.RepositoryIndex(request)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in (e.value.details() or ""), request


# -- medlego registry add --many / list -------------------------------------------------------------------
def _cli(capsys, *argv) -> tuple[int, str, str]:
    from medlego.cli import main

    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_add_many_and_paged_list(backend, tmp_path, two_tasks, capsys):
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(7):
        (folder / f"site-{i}.safetensors").write_bytes(two_tasks[i % 2])
    (folder / "notes.txt").write_text("not an adapter")
    reg = ["registry", *backend.cli_args()]
    rc, out, _ = _cli(capsys, *reg, "add", "--many", str(folder), "--batch", "3")
    assert rc == 0 and out.splitlines()[-1].startswith("registered 7/7")
    rc, out, _ = _cli(capsys, *reg, "list", "--json", "--limit", "3", "--all")
    pages = [json.loads(line) for line in out.splitlines()]
    assert [a["ref"] for p in pages for a in p["adapters"]] == [f"site-{i}@1" for i in range(7)]
    assert [bool(p.get("next_cursor")) for p in pages] == [True, True, False]
    rc, out, _ = _cli(capsys, *reg, "list", "--limit", "2", "--task", "skin")
    assert rc == 0 and "site-1@1" in out and "site-3@1" in out and out.splitlines()[-1].startswith("more: --cursor ")
    cursor = out.splitlines()[-1].split()[2]
    rc, out, _ = _cli(capsys, *reg, "list", "--limit", "2", "--task", "skin", "--cursor", cursor)
    assert "site-5@1" in out and "more:" not in out


def test_cli_add_many_mistakes(tmp_path, two_tasks, capsys):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "ok.safetensors").write_bytes(two_tasks[0])
    (folder / "zz.safetensors").write_bytes(b"not safetensors")
    reg = ["registry", "--data-dir", str(tmp_path / "d")]
    for argv, message in ((["add", "--many", str(folder)], "zz: "), (["add", "--many", str(tmp_path / "none")], "not a folder"),
                          (["add", "x", "f", "--many", str(folder)], "not both"), (["add", "x"], "give NAME and ADAPTER_FILE"),
                          (["list", "--limit", "0"], "bad limit"), (["list", "--cursor", "nope"], "bad cursor")):
        rc, _, err = _cli(capsys, *reg, *argv)
        assert rc == 2 and message in err and err.count("\n") == 1, (argv, err)
    assert _cli(capsys, *reg, "list", "--json")[1].strip() == '{"adapters": [], "aliases": {}}'  # the bad batch wrote nothing


def test_a_tag_left_behind_does_not_end_the_walk(backend, two_tasks):
    reg = backend.open()
    reg.register_many([(f"s{i}", two_tasks[1]) for i in range(5)])
    reg.index.write(lambda tx: tx.run("DELETE FROM adapters WHERE name = ?", ("s1",)))  # an older server's delete
    assert _walk(reg, 1, Filters(task="skin")) == ["s0@1", "s2@1", "s3@1", "s4@1"]
