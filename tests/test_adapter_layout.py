"""Adapter files packed by a layout learned from their tensor table: the same values, and the same
refusals, as the full parse followed by pack_adapter, for every file that shares the table."""

import dataclasses
import json
import struct

import pytest
import torch
from safetensors.torch import save as st_save

from medlego.runtime import adapter_layout
from medlego.runtime.adapter import BaseSpec, TaskSpec, parse_adapter, serialize_safetensors
from medlego.runtime.adapter_layout import MAX_LAYOUTS, known_layouts, parse_packed
from medlego.runtime.errors import AdapterFormatError, IncompatibleAdapterError
from medlego.runtime.lora import pack_adapter


@pytest.fixture(autouse=True)
def no_layouts():
    """Each test learns its layouts itself (they are per process)."""
    adapter_layout._layouts.clear()
    yield
    adapter_layout._layouts.clear()


@pytest.fixture
def full_parses(monkeypatch):
    """Counts the full parses parse_packed falls back to (the real function runs: only counted)."""
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return parse_adapter(*args, **kwargs)

    monkeypatch.setattr(adapter_layout, "parse_adapter", counted)
    return calls


def _expected(data: bytes, dtype=torch.float32, **kw):
    ad = parse_adapter(data, **kw)
    return ad, pack_adapter(ad, None, dtype, "cpu")


def _assert_same(packed, data: bytes, dtype=torch.float32, **kw):
    ad, (a, e, b) = _expected(data, dtype, **kw)
    assert packed.a.dtype == dtype and torch.equal(packed.a, a) and torch.equal(packed.e, e) and torch.equal(packed.b, b)
    assert (packed.base, packed.tasks, packed.preprocess) == (ad.base, ad.tasks, ad.preprocess)
    assert set(packed.heads) == set(ad.heads)
    for name, head in ad.heads.items():
        assert torch.equal(packed.heads[name].weight, head.weight) and torch.equal(packed.heads[name].bias, head.bias)


def _copies(make_adapter, n: int, **kw) -> list[bytes]:
    """n files of one layout: other numbers (a seed each), other provenance (another header length)."""
    kw.setdefault("tasks", [TaskSpec("task1", ("a", "b", "c"), False)])
    return [dataclasses.replace(make_adapter(seed=s, **kw), provenance={"copy": "x" * s}).to_bytes() for s in range(n)]


def _as(data: bytes, dtype: torch.dtype) -> bytes:
    ad = parse_adapter(data)
    return serialize_safetensors({k: v.to(dtype) for k, v in ad.tensors().items()}, ad.metadata())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_files_of_a_learned_layout_pack_as_the_full_parse_does(make_adapter, tiny_base, full_parses, dtype):
    two = [TaskSpec("organ", ("a", "b", "c"), False), TaskSpec("finding", ("x", "y"), True)]
    files = [_as(d, dtype) for d in _copies(make_adapter, 5, rank=3, tasks=two)]
    for n, data in enumerate(files):
        packed = parse_packed(data, expected_base=tiny_base.spec, max_rank=4, dtype=torch.float32)
        _assert_same(packed, data, expected_base=tiny_base.spec)
        assert len(full_parses) == 1, n  # the first file taught the layout; the others used it
    half = parse_packed(files[2], dtype=torch.float16)  # packed in the pool's dtype, whatever the file's
    _assert_same(half, files[2], dtype=torch.float16)


def test_the_other_writer_and_mixed_ranks_are_parsed_in_full_each_time(make_adapter, full_parses):
    mixed = _copies(make_adapter, 3, rank=[1 + i % 4 for i in range(24)])
    for data in mixed:
        _assert_same(parse_packed(data), data)
    assert len(full_parses) == 3  # zero-padding per matrix is pack_adapter's job: no layout for mixed ranks
    ad = make_adapter(seed=9)
    theirs = st_save(ad.tensors(), metadata=ad.metadata())  # safetensors' own writer, its own key order
    for _ in range(2):
        _assert_same(parse_packed(theirs), theirs)


def _by_kind(ad) -> bytes:
    """A valid safetensors file whose data section holds every A, then every B, then every E, then the
    heads (the header still lists them by name): not the rows the layout packs by."""
    tensors = ad.tensors()
    header, chunks, offset = {"__metadata__": dict(sorted(ad.metadata().items()))}, [], 0
    for name in sorted(tensors, key=lambda n: (n.startswith("heads."), n[-1], n)):
        raw = tensors[name].contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": "F32", "shape": list(tensors[name].shape), "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    header = {"__metadata__": header.pop("__metadata__"), **dict(sorted(header.items()))}
    text = json.dumps(header, separators=(",", ":"))
    text += " " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text.encode() + b"".join(chunks)


def test_factors_stored_in_another_order_are_parsed_in_full_each_time(make_adapter, full_parses):
    files = [_by_kind(make_adapter(seed=s, tasks=[TaskSpec("task1", ("a", "b", "c"), False)])) for s in range(3)]
    for data in files:
        _assert_same(parse_packed(data), data)
    assert len(full_parses) == 3 and known_layouts() == 0


def test_labels_and_multilabel_come_from_each_file_not_from_its_layout(make_adapter, full_parses):
    first, second = _copies(make_adapter, 2, rank=2)
    parse_packed(first)
    ad = parse_adapter(second)
    other = [TaskSpec(ad.tasks[0].name, ("lung", "heart", "bone"), True)]  # same name and class count: same table
    data = dataclasses.replace(ad, tasks=tuple(other)).to_bytes()
    packed = parse_packed(data)
    assert packed.tasks == tuple(other) and len(full_parses) == 1


def test_adapters_for_other_tasks_share_the_layout_of_their_block_factors(make_adapter, full_parses):
    tasks = [[TaskSpec("organ", ("a", "b", "c"), False)], [TaskSpec("derma", tuple("abcdefg"), False)],
             [TaskSpec("chest", tuple("abcdefghijklmn"), True), TaskSpec("pneumonia", ("no", "yes"), False)]]
    files = [make_adapter(seed=n, rank=4, tasks=t).to_bytes() for n, t in enumerate(tasks)]
    for data in files:
        _assert_same(parse_packed(data), data)
    assert len(full_parses) == 1 and known_layouts() == 1


def _with_header(data: bytes, edit) -> bytes:
    """The file with its header's JSON text edited (re-framed and re-padded; the data section unchanged)."""
    n = struct.unpack("<Q", data[:8])[0]
    text = edit(data[8:8 + n].decode().rstrip())
    raw = text.encode() + b" " * (-len(text) % 8)
    return struct.pack("<Q", len(raw)) + raw + data[8 + n:]


def _head_edit(data: bytes, tensors=None, **meta) -> bytes:
    ad = parse_adapter(data)
    t = {k: v.clone() for k, v in ad.tensors().items()}
    (tensors or (lambda t: None))(t)
    return serialize_safetensors(t, {**ad.metadata(), **meta})


@pytest.mark.parametrize("spoil", [
    lambda d: _head_edit(d, lambda t: t.update({"heads.task1.weight": torch.ones(5, 192), "heads.task1.bias": torch.ones(5)})),
    lambda d: _head_edit(d, lambda t: t.pop("heads.task1.bias")),
    lambda d: _head_edit(d, lambda t: t.update({"heads.task2.weight": torch.ones(3, 192)})),
    lambda d: _head_edit(d, lambda t: t.update({"heads.task1.bias": torch.ones(3, 1)})),
    lambda d: _head_edit(d, tasks=json.dumps([{"name": "other", "labels": ["x", "y", "z"], "multilabel": False}])),
    lambda d: _with_header(d, lambda s: s[:-1] + ',"blocks.0.q.A":{"dtype":"F32","shape":[4,192],"data_offsets":[3072,6144]}}'),
    lambda d: _with_header(d, lambda s: s.replace('"heads.task1.bias":{"dtype":"F32","shape":[3]',
                                                  '"heads.task1.bias":{"dtype":"F32","shape":[3.0]')),
    lambda d: _with_header(d, lambda s: s.replace('"heads.task1.bias":{"dtype":"F32","shape":[3]',
                                                  '"heads.task1.bias":{"dtype":"I32","shape":[3]')),
    lambda d: _with_header(d, lambda s: s[:-1] + ',"heads.task1.bias":{"dtype":"F32"}}'),
    lambda d: _with_header(d, lambda s: s[:-1] + ',"__metadata__":{"format":"x"}}'),
])
def test_a_file_whose_heads_do_not_fit_its_tasks_is_refused_as_the_full_parse_refuses_it(make_adapter, spoil):
    good, victim = _copies(make_adapter, 2, rank=4)
    parse_packed(good)
    assert known_layouts() == 1
    bad = spoil(victim)
    kind, message = _refused(bad)
    with pytest.raises(kind) as e:
        parse_packed(bad)
    assert str(e.value) == message and "\n" not in message


def test_heads_in_another_dtype_than_the_factors_are_served_by_the_full_parse(make_adapter, full_parses):
    good, victim = _copies(make_adapter, 2, rank=4)
    parse_packed(good)
    half = _head_edit(victim, lambda t: t.update({k: v.half() for k, v in t.items() if k.startswith("heads.")}))
    _assert_same(parse_packed(half), half)
    assert len(full_parses) == 2


def _refused(data: bytes, **kw) -> tuple[type, str]:
    with pytest.raises((AdapterFormatError, IncompatibleAdapterError)) as e:
        parse_adapter(data, **kw)
    return type(e.value), str(e.value)


def _meta_edit(data: bytes, **changes) -> bytes:
    ad = parse_adapter(data)
    return serialize_safetensors(ad.tensors(), {**ad.metadata(), **changes})


def _poison(data: bytes, name: str, value: float) -> bytes:
    ad = parse_adapter(data)
    tensors = {k: v.clone() for k, v in ad.tensors().items()}
    tensors[name].view(-1)[1] = value
    return serialize_safetensors(tensors, ad.metadata())


@pytest.mark.parametrize("spoil, kw", [
    (lambda d: _poison(d, "blocks.3.v.B", float("nan")), {}),
    (lambda d: _poison(d, "heads.task1.bias", float("-inf")), {}),
    (lambda d: _meta_edit(d, format="medlego.svd-lora/9"), {}),
    (lambda d: _meta_edit(d, created="yesterday"), {}),
    (lambda d: _meta_edit(d, provenance="[1, 2]"), {}),
    (lambda d: _meta_edit(d, preprocess='{"input_size": 0}'), {}),
    (lambda d: _meta_edit(d, tasks=json.dumps([{"name": "task1", "labels": ["x", "x", "y"], "multilabel": False}])), {}),
    (lambda d: _meta_edit(d, base=json.dumps({"model": "m", "fingerprint": "0" * 64, "embed_dim": 192, "depth": 12})),
     {"expected": True}),
    (lambda d: _meta_edit(d, base=json.dumps({"model": "m", "fingerprint": "ab", "embed_dim": 96, "depth": 12})), {}),
    (lambda d: d, {"max_rank": 2}),
    (lambda d: d[:-4], {}),  # the table's offsets no longer cover the data
    (lambda d: d + b"\0" * 4, {}),
])
def test_a_file_that_shares_a_learned_table_is_refused_as_the_full_parse_refuses_it(make_adapter, tiny_base, spoil, kw):
    good, victim = _copies(make_adapter, 2, rank=4)
    expected_base = tiny_base.spec if kw.pop("expected", False) else None
    parse_packed(good)
    assert known_layouts() == 1
    bad = spoil(victim)
    kind, message = _refused(bad, expected_base=expected_base, **kw)
    with pytest.raises(kind) as e:
        parse_packed(bad, expected_base=expected_base, **kw)
    assert str(e.value) == message and "\n" not in message


def test_finite_values_whose_sum_overflows_are_accepted_on_a_learned_layout(make_adapter):
    good, victim = _copies(make_adapter, 2, rank=4)
    parse_packed(good)
    ad = parse_adapter(victim)
    tensors = {k: v.clone() for k, v in ad.tensors().items()}
    tensors["blocks.0.q.A"].fill_(3e38)  # each finite, their float32 sum is not
    data = serialize_safetensors(tensors, ad.metadata())
    _assert_same(parse_packed(data), data)


def test_a_table_with_a_second_metadata_entry_is_never_learned(make_adapter, full_parses):
    data = make_adapter(seed=1).to_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    text = data[8:8 + n].decode().rstrip()
    # JSON keeps the last of two equal keys: this header's metadata is the second one
    doubled = text[:-1] + ',"__metadata__":' + json.dumps(json.loads(text)["__metadata__"]) + "}"
    raw = doubled.encode() + b" " * (-len(doubled) % 8)
    forged = struct.pack("<Q", len(raw)) + raw + data[8 + n:]
    for _ in range(2):
        _assert_same(parse_packed(forged), forged)
    assert len(full_parses) == 2


def test_the_remembered_layouts_are_bounded(make_adapter):
    for r in range(1, MAX_LAYOUTS + 3):  # one table per rank
        parse_packed(make_adapter(seed=r, rank=r).to_bytes())
    assert known_layouts() == MAX_LAYOUTS


def test_the_pool_loads_through_the_layout_and_serves_the_same_factors(make_adapter, tiny_base, full_parses):
    from medlego.runtime.pool import AdapterPool

    pool = AdapterPool(tiny_base.spec, slots=4, max_rank=4)
    files = _copies(make_adapter, 3, rank=4)
    for n, data in enumerate(files):
        host = pool._load(f"sha{n}", data)
        _, (a, e, b) = _expected(data)
        assert torch.equal(host.a, a) and torch.equal(host.e, e) and torch.equal(host.b, b)
        head = parse_adapter(data).heads["task1"]
        weight, bias = host.heads["task1"]
        assert torch.equal(weight, head.weight) and torch.equal(bias, head.bias)
    assert len(full_parses) == 1
    other = BaseSpec(tiny_base.spec.model, "0" * 64, tiny_base.embed_dim, tiny_base.depth)
    with pytest.raises(IncompatibleAdapterError):
        AdapterPool(other, slots=4, max_rank=4)._load("sha", files[1])


def test_metadata_texts_are_remembered_only_when_short(make_adapter):
    from medlego.runtime.adapter import _parse_tasks

    short = _copies(make_adapter, 1, rank=2)[0]
    many = [TaskSpec("atlas", tuple(f"structure-{i:05d}" for i in range(2000)), True)]  # a ~30 KB tasks text
    long = make_adapter(seed=1, rank=2, tasks=many).to_bytes()
    parse_adapter(short)
    held = _parse_tasks.cache_info().currsize
    parse_adapter(short)
    assert _parse_tasks.cache_info().currsize == held  # the same text: one entry
    for _ in range(2):
        assert parse_adapter(long).tasks == tuple(many)  # parsed, served, and not kept
    assert _parse_tasks.cache_info().currsize == held
