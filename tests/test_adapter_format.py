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


def test_a_scratch_parse_reuses_one_buffer_and_survives_a_larger_file(make_adapter):
    from medlego.runtime.adapter import ScratchBuffer

    scratch = ScratchBuffer()
    small, large = make_adapter(seed=4, rank=2), make_adapter(seed=5, rank=8)
    first = parse_adapter(small.to_bytes(), scratch=scratch)
    assert torch.equal(first.q[1].A, small.q[1].A)
    again = parse_adapter(make_adapter(seed=6, rank=2).to_bytes(), scratch=scratch)
    # the same memory: the first parse's views now show the second file (why the pool copies at once)
    assert first.q[1].A.untyped_storage().data_ptr() == again.q[1].A.untyped_storage().data_ptr()
    grown = parse_adapter(large.to_bytes(), scratch=scratch)  # a new buffer while views of the old one live
    assert torch.equal(grown.v[3].B, large.v[3].B) and torch.equal(again.q[1].A, make_adapter(seed=6, rank=2).q[1].A)
