"""The adapter file: bit-identical round trip, and one clear message per validation failure."""

import json
import pickle
import struct

import pytest
import torch

from medlego.runtime.adapter import (FORMAT, BaseSpec, load_adapter, parse_adapter, save_adapter,
                                     serialize_safetensors)
from medlego.runtime.errors import AdapterFormatError, IncompatibleAdapterError


def test_round_trip_is_bit_identical(tmp_path, make_adapter, tiny_base):
    ad = make_adapter(seed=7, rank=[1 + i % 5 for i in range(2 * tiny_base.depth)])
    path = tmp_path / "a.safetensors"
    save_adapter(ad, path)
    back = load_adapter(path, expected_base=tiny_base.spec)
    for k, t in ad.tensors().items():
        assert torch.equal(back.tensors()[k], t), k
    assert back.metadata() == ad.metadata()
    assert back.to_bytes() == path.read_bytes()  # save(load(x)) == x, byte for byte
    assert back.ranks() == ad.ranks()


def _parts(ad):
    return dict(ad.tensors()), dict(ad.metadata())


def _bytes(tensors, meta):
    return serialize_safetensors(tensors, meta)


@pytest.mark.parametrize("mutate, message", [
    (lambda t, m: m.update(format="medlego.svd-lora/9"), "unsupported adapter format 'medlego.svd-lora/9'"),
    (lambda t, m: m.pop("format"), "missing metadata 'format'"),
    (lambda t, m: m.pop("preprocess"), "missing metadata 'preprocess'"),
    (lambda t, m: m.update(extra="1"), "unexpected metadata key(s): extra"),
    (lambda t, m: t.pop("blocks.3.v.E"), "missing tensor 'blocks.3.v.E'"),
    (lambda t, m: t.update({"blocks.99.q.A": torch.ones(2, 192)}), "unexpected tensor 'blocks.99.q.A'"),
    (lambda t, m: t.update({"blocks.0.q.B": torch.ones(192, 3)}),
     "tensor 'blocks.0.q.B' has shape [192, 3], expected [192, 4] (rank from blocks.0.q.A)"),
    (lambda t, m: t.update({"blocks.1.v.A": torch.ones(4, 100)}), "tensor 'blocks.1.v.A' has shape [4, 100], expected [r, 192]"),
    (lambda t, m: t["blocks.2.q.E"].__setitem__(0, float("nan")), "tensor 'blocks.2.q.E' has non-finite values"),
    (lambda t, m: t.update({"heads.task1.weight": torch.ones(5, 192), "heads.task1.bias": torch.ones(5)}),
     "head 'task1' has 5 classes but task 'task1' has 3 labels"),
    (lambda t, m: m.update(base=json.dumps({"model": "x", "fingerprint": "zz", "embed_dim": 192, "depth": 12})),
     "base.fingerprint must be a lower-case hex string"),
    (lambda t, m: m.update(created="yesterday"), "metadata 'created' is not an ISO 8601 time"),
    (lambda t, m: m.update(tasks=json.dumps([{"name": "a.b", "labels": ["x", "y"], "multilabel": False}])),
     "task name 'a.b' must be letters"),
])
def test_each_validation_failure_has_its_message(make_adapter, mutate, message):
    t, m = _parts(make_adapter(seed=1, rank=4))
    t = {k: v.clone() for k, v in t.items()}
    mutate(t, m)
    with pytest.raises(AdapterFormatError) as e:
        parse_adapter(_bytes(t, m))
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_rank_above_maximum(make_adapter):
    with pytest.raises(AdapterFormatError, match="rank 8, above the configured maximum 4"):
        parse_adapter(make_adapter(rank=8).to_bytes(), max_rank=4)


def test_different_base_fingerprint_refused(make_adapter, tiny_base):
    other = BaseSpec(tiny_base.spec.model, "0" * 64, tiny_base.embed_dim, tiny_base.depth)
    with pytest.raises(IncompatibleAdapterError, match="resident base is vit_tiny_patch16_224 \\(fingerprint 0000"):
        parse_adapter(make_adapter().to_bytes(), expected_base=other)


def test_not_safetensors_and_pickles_refused(tmp_path):
    with pytest.raises(AdapterFormatError, match="not a safetensors file"):
        parse_adapter(pickle.dumps({"blocks.0.q.A": [1.0]}))
    with pytest.raises(AdapterFormatError, match="not a safetensors file"):
        parse_adapter(b"abc")
    torch.save({"x": torch.ones(2)}, tmp_path / "a.pt")
    with pytest.raises(AdapterFormatError, match="not a safetensors file"):
        load_adapter(tmp_path / "a.pt")
    # a valid safetensors file with no medlego metadata
    head = json.dumps({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    head += b" " * (-len(head) % 8)
    with pytest.raises(AdapterFormatError, match="missing metadata 'format'"):
        parse_adapter(struct.pack("<Q", len(head)) + head + b"\0\0\0\0")
    assert FORMAT == "medlego.svd-lora/1"


def test_a_non_finite_value_is_found_in_every_dtype_and_layout(make_adapter):
    # the one-pass check covers the data section only when it is one dtype: mixed dtypes take the per-tensor path
    t, m = _parts(make_adapter(seed=2, rank=4))
    for layout in ("float32", "float16", "mixed"):
        bad = {k: (v.half() if layout == "float16" or (layout == "mixed" and k.endswith(".B")) else v.clone())
               for k, v in t.items()}
        bad["blocks.5.v.B"][3, 1] = float("inf")
        with pytest.raises(AdapterFormatError, match="tensor 'blocks.5.v.B' has non-finite values"):
            parse_adapter(_bytes(bad, m))


def test_large_finite_values_whose_sum_overflows_are_accepted(make_adapter):
    t, m = _parts(make_adapter(seed=3, rank=4))
    big = {k: v.clone() for k, v in t.items()}
    big["blocks.0.q.A"].fill_(3e38)  # finite, but their float32 sum is not: the per-tensor pass must clear it
    assert torch.equal(parse_adapter(_bytes(big, m)).q[0].A, big["blocks.0.q.A"])


def test_a_borrowed_parse_views_the_file_and_a_plain_parse_owns_a_copy(make_adapter):
    made = make_adapter(seed=4, rank=2)
    data = bytearray(made.to_bytes())
    lent, owned = parse_adapter(data, borrow=True), parse_adapter(data)
    assert torch.equal(parse_adapter(made.to_bytes(), borrow=True).q[1].A, made.q[1].A)  # immutable bytes too
    data[8 + int.from_bytes(data[:8], "little"):] = bytes(len(data) - 8 - int.from_bytes(data[:8], "little"))
    assert not any(m.A.any() or m.B.any() or m.E.any() for m in lent.q + lent.v)  # views: no copy was made
    assert all(torch.equal(a.A, b.A) and torch.equal(a.B, b.B) and torch.equal(a.E, b.E)
               for a, b in zip(owned.q + owned.v, made.q + made.v))



@pytest.mark.parametrize("field, value", [
    ("shape", [4.0, 192]), ("shape", ["4", 192]), ("shape", [True, 192]), ("shape", 4), ("shape", [-4, 192]),
    ("data_offsets", ["0", "3072"]), ("data_offsets", [0]), ("dtype", "F8"),
])
def test_a_header_entry_that_is_not_json_integers_is_refused_in_one_line(make_adapter, field, value):
    data = make_adapter(seed=2, rank=4).to_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    header["blocks.0.q.A"][field] = value
    raw = json.dumps(header).encode()
    with pytest.raises(AdapterFormatError, match="corrupt safetensors payload: .*'blocks.0.q.A'") as e:
        parse_adapter(struct.pack("<Q", len(raw)) + raw + data[8 + n:], borrow=True)
    assert "\n" not in str(e.value)
