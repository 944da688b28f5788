"""`medlego registry …` on both backends, and its one-line errors."""

import json

import pytest
from backends import free_port

from medlego.cli import main
from medlego.jobs.synthetic import random_adapter


def _run(capsys, *argv) -> tuple[int, str, str]:
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_every_action_on_both_backends(backend, tiny_base, tiny_base_file, tmp_path, capsys):
    reg_args = ["registry", *backend.cli_args()]
    src = tmp_path / "blood.safetensors"
    adapter = random_adapter(tiny_base.spec, tiny_base.preprocess, seed=1, provenance={"dataset": "blood"})
    src.write_bytes(adapter.to_bytes())
    rc, out, _ = _run(capsys, *reg_args, "add", "blood", str(src), "--alias", "general",
                      "--model", "vit_tiny_patch16_224", "--weights", str(tiny_base_file))
    assert rc == 0 and out.startswith("registered blood@1 sha256=")
    rc, _, err = _run(capsys, *reg_args, "add", "derma", str(src), "--alias", "general")
    assert rc == 2 and err == ("medlego registry: error: alias 'general' already points at blood@1; "
                               "pass move_aliases to move it\n")
    assert _run(capsys, *reg_args, "add", "derma", str(src), "--alias", "general", "--move-aliases")[0] == 0
    rc, out, _ = _run(capsys, *reg_args, "list", "--json")
    listing = json.loads(out)
    assert [a["ref"] for a in listing["adapters"]] == ["blood@1", "derma@1"] and listing["aliases"] == {"general": "derma@1"}
    assert all("provenance" not in a for a in listing["adapters"])
    rc, out, _ = _run(capsys, *reg_args, "show", "blood")
    assert json.loads(out)["provenance"] == {"dataset": "blood"}
    assert _run(capsys, *reg_args, "alias", "general", "blood@1")[1] == "alias general -> blood@1 (now blood@1)\n"
    assert _run(capsys, *reg_args, "pin", "blood")[1] == "pinned blood@1\n"
    rc, _, err = _run(capsys, *reg_args, "delete", "blood@1")
    assert rc == 2 and err == "medlego registry: error: adapter blood@1 is pinned; unpin it before deleting\n"
    assert _run(capsys, *reg_args, "unpin", "blood@1")[1] == "unpinned blood@1\n"
    assert _run(capsys, *reg_args, "alias", "general", "--remove")[1] == "removed alias general\n"
    assert _run(capsys, *reg_args, "delete", "derma@1")[1] == "deleted derma@1\n"
    rc, out, _ = _run(capsys, *reg_args, "list")
    assert "blood@1" in out and "derma" not in out
    assert _run(capsys, *reg_args, "gc")[1] == "gc: removed 0 unreferenced objects and 0 stale temp files\n"
    rc, _, err = _run(capsys, *reg_args, "show", "blood@²")
    assert rc == 2 and err.startswith("medlego registry: error: bad adapter reference 'blood@²'") and err.count("\n") == 1


def test_gc_command_removes_an_orphan(backend, make_adapter, capsys):
    from medlego.runtime.adapter import sha256_hex

    orphan = make_adapter(seed=7, rank=2).to_bytes()
    backend.open()
    backend.put_raw(f"{sha256_hex(orphan)}.safetensors", orphan)
    rc, out, _ = _run(capsys, "registry", *backend.cli_args(), "gc", "--grace", "60")
    assert rc == 0 and out.splitlines() == [f"removed unreferenced object {sha256_hex(orphan)}",
                                            "gc: removed 1 unreferenced objects and 0 stale temp files"]
    assert backend.stored() == []


@pytest.mark.parametrize("flags, message", [
    (["--registry", "mysql://db/x"], "unsupported registry URL 'mysql://db/x'"),
    (["--registry", "postgresql://nobody@127.0.0.1:1/x"], "cannot reach the registry database postgresql://nobody@127.0.0.1:1/x"),
    (["--store", "ftp://host/x"], "unsupported store URL 'ftp://host/x'"),
    (["--store", "s3://medlego-missing-bucket/x"], "S3 bucket 'medlego-missing-bucket' does not exist"),
])
def test_cli_mistakes_are_one_line_and_exit_2(flags, message, tmp_path, s3_server, capsys):
    rc, out, err = _run(capsys, "registry", "--data-dir", str(tmp_path), *flags, "list")
    assert rc == 2 and out == "" and err.startswith(f"medlego registry: error: {message}") and err.count("\n") == 1


def test_an_unreachable_s3_endpoint_is_one_line(tmp_path, monkeypatch, capsys):
    for k, v in {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}", "AWS_ACCESS_KEY_ID": "x",
                 "AWS_SECRET_ACCESS_KEY": "x", "AWS_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)  # nothing listens there
    rc, _, err = _run(capsys, "registry", "--data-dir", str(tmp_path), "--store", "s3://bucket/x", "list")
    assert rc == 2 and err.startswith("medlego registry: error: cannot use the S3 store s3://bucket/x: ")
    assert err.count("\n") == 1
