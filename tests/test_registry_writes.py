"""What registration refuses, and that a refusal writes nothing; aliases on upload; provenance."""

import pytest

from medlego.runtime.errors import AdapterFormatError, AdapterNumericError, ConflictError
from medlego.runtime.registry import MAX_PROVENANCE_BYTES


def test_an_upload_does_not_move_an_existing_alias_unless_asked(backend, make_adapter):
    reg = backend.open()
    reg.register("blood", make_adapter(seed=1).to_bytes(), aliases=["current"])
    assert reg.resolve("current").ref == "blood@1"
    stored = backend.stored()
    with pytest.raises(ConflictError, match=r"alias 'current' already points at blood@1; pass move_aliases to move it"):
        reg.register("derma", make_adapter(seed=2).to_bytes(), aliases=["current"])
    assert reg.resolve("current").ref == "blood@1" and [e.ref for e in reg.list()] == ["blood@1"]
    assert backend.stored() == stored  # the refused upload left nothing in the store
    e = reg.register("derma", make_adapter(seed=2).to_bytes(), aliases=["current"], move_aliases=True)
    assert reg.resolve("current").ref == e.ref == "derma@1"


def test_name_and_alias_clashes_are_refused_before_anything_is_stored(backend, make_adapter):
    reg = backend.open()
    reg.register("blood", make_adapter(seed=1).to_bytes(), aliases=["general"])
    stored = backend.stored()
    new = make_adapter(seed=9).to_bytes()
    for name, aliases, message in [("general", (), "'general' is an alias; pick another adapter name"),
                                   ("x", ["blood"], "'blood' is an adapter name; an alias must not shadow it"),
                                   ("x", ["x"], "'x' is an adapter name; an alias must not shadow it")]:
        with pytest.raises(ConflictError, match=message):
            reg.register(name, new, aliases)
    with pytest.raises(ConflictError, match="'blood' is an adapter name"):
        reg.set_alias("blood", "blood@1")
    assert backend.stored() == stored and [e.ref for e in reg.list()] == ["blood@1"]


def test_the_callers_check_runs_after_parsing_and_before_any_write(backend, make_adapter):
    reg = backend.open()
    seen = []

    def probe(adapter):
        seen.append(adapter.task_names)
        raise AdapterNumericError("adapter overflows in bfloat16: heads.task0.weight")

    with pytest.raises(AdapterNumericError, match="overflows"):
        reg.register("blood", make_adapter(seed=1).to_bytes(), check=probe)
    assert seen == [["task1"]] and reg.list() == [] and backend.stored() == []
    e = reg.register("blood", make_adapter(seed=1).to_bytes(), check=lambda adapter: None)
    assert e.ref == "blood@1"


def test_provenance_is_capped_and_shown_by_describe_only(backend, tiny_base):
    from medlego.jobs.synthetic import random_adapter

    reg = backend.open()
    big = random_adapter(tiny_base.spec, tiny_base.preprocess, seed=1, provenance={"notes": "x" * MAX_PROVENANCE_BYTES})
    with pytest.raises(AdapterFormatError, match=r"provenance is 65,5\d\d bytes of JSON; the registry takes at most 65,536"):
        reg.register("big", big.to_bytes())
    assert reg.list() == [] and backend.stored() == []
    ok = random_adapter(tiny_base.spec, tiny_base.preprocess, seed=1, provenance={"dataset": "bloodmnist", "seed": 3})
    e = reg.register("blood", ok.to_bytes())
    assert "provenance" not in e.to_json() and all("provenance" not in x.to_json() for x in reg.list())
    assert e.meta["provenance"] == {"dataset": "bloodmnist", "seed": 3}
    d = reg.describe("blood")
    assert d["provenance"] == {"dataset": "bloodmnist", "seed": 3} and d["versions"] == [1]


def test_same_bytes_under_two_names_share_one_object(backend, make_adapter):
    reg = backend.open()
    data = make_adapter(seed=3).to_bytes()
    a, b = reg.register("a", data), reg.register("b", data)
    assert a.sha256 == b.sha256 and backend.stored() == [f"{a.sha256}.safetensors"]
    reg.delete("a")
    assert reg.read_bytes(reg.resolve("b")) == data and backend.stored() == [f"{a.sha256}.safetensors"]
    reg.delete("b")
    assert backend.stored() == []  # deleting the last reference removes the object


def test_an_alias_of_an_alias_points_at_its_target(backend, make_adapter):
    reg = backend.open()
    reg.register("blood", make_adapter(seed=1).to_bytes())
    reg.register("blood", make_adapter(seed=2).to_bytes())
    reg.set_alias("stable", "blood@1")
    assert reg.set_alias("prod", "stable").ref == "blood@1"
    assert reg.aliases() == {"prod": "blood@1", "stable": "blood@1"}
    reg.set_alias("latest", "blood")
    reg.register("blood", make_adapter(seed=3).to_bytes())
    assert reg.resolve("latest").ref == "blood@3" and reg.resolve("prod").ref == "blood@1"
    assert reg.describe("blood@1")["aliases"] == ["prod", "stable"] and reg.describe("blood")["aliases"] == ["latest"]


def test_pins_are_reported_and_follow_the_reference(backend, make_adapter):
    reg = backend.open()
    reg.register("blood", make_adapter(seed=1).to_bytes(), aliases=["general"])
    assert reg.pin("general").pinned and reg.resolve("blood@1").pinned
    assert reg.list()[0].pinned and not reg.unpin("blood").pinned and not reg.resolve("general").pinned
