"""A not-found error names what is missing and suggests a handful of close names, never the registry."""

from __future__ import annotations

import pytest

from medlego.runtime.errors import AdapterNotFoundError
from medlego.runtime.registry import Registry


@pytest.fixture
def registry(tmp_path, tiny_base, make_adapter):
    reg = Registry(tmp_path / "reg", base=tiny_base.spec)
    data = make_adapter(seed=1).to_bytes()
    for i in range(40):  # many names: a message that listed them all would be long
        reg.register(f"derma-{i:02d}", data)
    reg.register("blood", data)
    reg.register("blood", make_adapter(seed=2).to_bytes())
    reg.set_alias("general", "blood@1")
    return reg


def _message(reg: Registry, ref: str) -> str:
    with pytest.raises(AdapterNotFoundError) as e:
        reg.resolve(ref)
    return str(e.value)


def test_a_typo_gets_close_names_best_first(registry):
    assert _message(registry, "bloood") == "unknown adapter 'bloood'; did you mean blood?"
    assert _message(registry, "genral") == "unknown adapter 'genral'; did you mean general?"


def test_at_most_five_suggestions_and_never_the_listing(registry):
    message = _message(registry, "derma")
    assert message.startswith("unknown adapter 'derma'; did you mean derma-0")
    assert message.count("derma-") == 5 and "blood" not in message


def test_nothing_close_names_only_the_missing_thing(registry):
    assert _message(registry, "xyz") == "unknown adapter 'xyz'"


def test_a_missing_version_names_the_latest(registry):
    assert _message(registry, "blood@7") == "unknown adapter 'blood@7': 'blood' has no version 7 (its latest is blood@2)"
    assert _message(registry, "general@1") == "unknown adapter 'general@1': 'general' is an alias; name it without @1"


def test_an_empty_registry_says_so(tmp_path, tiny_base):
    assert _message(Registry(tmp_path / "empty", base=tiny_base.spec), "blood") == \
        "unknown adapter 'blood'; no adapter is registered yet"


def test_every_write_that_misses_uses_the_same_message(registry):
    with pytest.raises(AdapterNotFoundError, match=r"^unknown adapter 'bloood'; did you mean blood\?$"):
        registry.pin("bloood")
    with pytest.raises(AdapterNotFoundError, match=r"^unknown adapter 'blood@9': 'blood' has no version 9"):
        registry.delete("blood", 9)
