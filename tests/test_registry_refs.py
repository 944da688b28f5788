"""Malformed names and references are refused with one line, before any database sees them."""

import pytest

from medlego.runtime.errors import AdapterNotFoundError, BadInputError, MedlegoError
from medlego.runtime.registry import parse_ref
from medlego.runtime.registry.names import MAX_VERSION

MALFORMED_REFS = [
    "evil\n", "blood\n@1", "blood@1\n", "blood@99999999999999999999", f"blood@{MAX_VERSION + 1}", "blood@0",
    "blood@-1", "blood@", "blood@²", "blood@١", "blood@1.0", "blood@ 1", "\ud800", "blood\ud800", "blood@\udfff",
    "bl\x00ood", "blood@1\x00", "", "@1", "x" * 129, "x" * 100_000, "a/b", "../etc", "bad name!", ".hidden",
]


def test_parse_ref_accepts_names_and_versions():
    assert parse_ref("blood") == ("blood", None)
    assert parse_ref("blood-v2.1_x@7") == ("blood-v2.1_x", 7)
    assert parse_ref(f"b@{MAX_VERSION}") == ("b", MAX_VERSION)
    assert parse_ref("x" * 128) == ("x" * 128, None)


@pytest.mark.parametrize("ref", MALFORMED_REFS, ids=repr)
def test_parse_ref_refuses_malformed_references_in_one_line(ref):
    with pytest.raises(BadInputError) as info:
        parse_ref(ref)
    message = str(info.value)
    assert "\n" not in message and len(message) < 600
    message.encode("utf-8")  # printable: a lone surrogate is shown escaped, never raw


def test_parse_ref_refuses_what_is_not_a_string():
    for ref in (None, 3, b"blood", ["blood"]):
        with pytest.raises(BadInputError, match="expected a string"):
            parse_ref(ref)


def test_every_registry_entry_point_refuses_malformed_input_as_a_medlego_error(backend, make_adapter):
    """A NUL byte or a lone surrogate reaching SQLite or PostgreSQL would raise a driver error:
    that each of these is a MedlegoError shows the reference never got that far."""
    reg = backend.open()
    data = make_adapter(seed=1, rank=2).to_bytes()
    reg.register("blood", data)
    for ref in MALFORMED_REFS:
        for call in (lambda: reg.resolve(ref), lambda: reg.describe(ref), lambda: reg.load(ref),
                     lambda: reg.pin(ref), lambda: reg.unpin(ref), lambda: reg.set_alias("g", ref),
                     lambda: reg.set_alias(ref, "blood"), lambda: reg.remove_alias(ref), lambda: reg.delete(ref),
                     lambda: reg.delete("blood", ref), lambda: reg.register(ref, data),
                     lambda: reg.register("other", data, [ref])):
            with pytest.raises((BadInputError, AdapterNotFoundError)) as info:
                call()
            assert isinstance(info.value, MedlegoError) and "\n" not in str(info.value)
    for version in (0, -1, MAX_VERSION + 1, 2**64, True, "1"):
        with pytest.raises(BadInputError, match="bad adapter version"):
            reg.delete("blood", version)
    assert [e.ref for e in reg.list()] == ["blood@1"] and reg.aliases() == {}
