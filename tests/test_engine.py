"""The engine: mixed adapters/ranks/tasks per batch equal a folded single-image forward."""

import pytest
import torch

from conftest import TINY_MODEL
from medlego.runtime.adapter import TaskSpec
from medlego.runtime.config import EngineConfig
from medlego.runtime.engine import Engine
from medlego.runtime.errors import (AdapterNotFoundError, AdapterNumericError, ConflictError, OverloadedError,
                                    TaskNotFoundError)
from medlego.runtime.model import fold_adapter, pooled_features
from medlego.runtime.registry import Registry


def _expected(base, adapter, image, task):
    f = pooled_features(fold_adapter(base.model, adapter), image.unsqueeze(0))
    h = adapter.heads[task.name]
    logits = f @ h.weight.T + h.bias
    return (torch.sigmoid(logits) if task.multilabel else torch.softmax(logits, -1))[0]


@pytest.fixture
def setup(tmp_path, tiny_base, make_adapter):
    reg = Registry(tmp_path / "data")
    depth = tiny_base.depth
    two_tasks = [TaskSpec("blood", tuple(f"b{i}" for i in range(8))),
                 TaskSpec("chest", tuple(f"c{i}" for i in range(14)), multilabel=True)]
    adapters = {
        "r1": make_adapter(seed=1, rank=1),
        "mixed": make_adapter(seed=2, rank=[1 + (i % 6) for i in range(2 * depth)]),
        "merged": make_adapter(seed=3, rank=8, tasks=two_tasks),
        "r4": make_adapter(seed=4, rank=4, tasks=[TaskSpec("derma", tuple("abcdefg"))]),
    }
    for name, ad in adapters.items():
        reg.register(name, ad.to_bytes())
    return reg, adapters


def test_mixed_batch_matches_folded_model(setup, tiny_base):
    reg, adapters = setup
    engine = Engine(tiny_base, reg, EngineConfig(slots=8))
    torch.manual_seed(0)
    images = torch.randn(9, 3, 32, 32)
    refs = ["r1", "mixed", None, "merged", "merged", "r4", None, "mixed", "r1@1"]
    tasks = [None, None, None, "blood", "chest", None, None, None, None]
    out = engine.infer(images, refs, tasks)
    for n, (ref, task_name, res) in enumerate(zip(refs, tasks, out)):
        if ref is None:
            assert res.probabilities is None
            ref_emb = pooled_features(tiny_base.model, images[n:n + 1])[0]
            assert torch.allclose(torch.tensor(res.embedding), ref_emb, atol=1e-4)
            continue
        name = ref.split("@")[0]
        ad = adapters[name]
        task = ad.task(task_name)
        got = torch.tensor([res.probabilities[lab] for lab in task.labels])
        assert (got - _expected(tiny_base, ad, images[n], task)).abs().max() < 1e-4
        assert res.adapter == name and res.version == 1 and res.task == task.name
        assert res.sha256 == reg.resolve(name).sha256
        assert len(res.probabilities) == task.num_classes
        assert res.top[0][1] == max(res.probabilities.values())
    assert out[4].multilabel and not out[3].multilabel


def test_eviction_and_reload_keep_answers(setup, tiny_base):
    reg, _ = setup
    engine = Engine(tiny_base, reg, EngineConfig(slots=2))
    torch.manual_seed(1)
    images = torch.randn(4, 3, 32, 32)
    refs = ["r1", "mixed", "r4", "merged"]
    tasks = [None, None, None, "blood"]
    first = engine.infer(images, refs, tasks)
    assert engine.counters.total("pool_evictions") > 0  # 4 adapters through 2 slots
    for sha in list(engine.pool.host_resident()):
        engine.forget(sha)
    assert engine.pool.resident() == [] and engine.pool.host_resident() == []
    again = engine.infer(images, refs, tasks)
    for a, b in zip(first, again):
        assert a.probabilities == pytest.approx(b.probabilities, abs=1e-6)


def test_pinned_adapter_never_evicted(setup, tiny_base):
    reg, _ = setup
    engine = Engine(tiny_base, reg, EngineConfig(slots=2, unpinned_slots=1))
    engine.pin("r1")
    x = torch.randn(1, 3, 32, 32)
    engine.infer(x, ["r1"])
    pinned_sha = reg.resolve("r1").sha256
    for ref in ["mixed", "r4", "merged", "mixed", "r4"]:
        engine.infer(x, [ref], ["blood" if ref == "merged" else None])
        assert pinned_sha in engine.pool.resident()
    engine.unpin("r1")
    for ref in ["mixed", "r4"]:
        engine.infer(x, [ref])
    assert pinned_sha not in engine.pool.resident()  # unpinned: evicted like any other


def test_pins_may_not_take_the_slots_every_other_adapter_needs(setup, tiny_base):
    reg, _ = setup
    engine = Engine(tiny_base, reg, EngineConfig(slots=3, unpinned_slots=1))
    engine.pin("r1")
    engine.pin("mixed")
    with pytest.raises(ConflictError, match="at most 2 of the 3 device slots"):
        engine.pin("r4")
    assert not reg.resolve("r4").pinned
    # a batch of three different adapters with two slots pinned: served in passes, never a failure
    x = torch.randn(4, 3, 32, 32)
    out = engine.infer(x, ["r4", "merged", "r1", "mixed"], [None, "blood", None, None])
    assert [d.adapter for d in out] == ["r4", "merged", "r1", "mixed"]


def test_pins_made_elsewhere_leave_no_slot_answer_overloaded_not_internal(setup, tiny_base):
    """Another server of a fleet pinned more than this one's slots allow: 503 for the rest, never a 500."""
    reg, _ = setup
    for ref in ("r1", "mixed"):
        reg.pin(ref)  # straight in the registry, as another server would
    engine = Engine(tiny_base, reg, EngineConfig(slots=2))
    x = torch.randn(1, 3, 32, 32)
    engine.infer(x, ["r1"])
    engine.infer(x, ["mixed"])
    with pytest.raises(OverloadedError, match="pinned by other adapters"):
        engine.infer(x, ["r4"])


def _with_huge_head(adapter):
    from dataclasses import replace

    from medlego.runtime.adapter import Head

    name = adapter.tasks[0].name
    head = adapter.heads[name]
    return replace(adapter, heads={name: Head(torch.full_like(head.weight, 3e38), head.bias)})


def test_probe_refuses_an_adapter_whose_logits_overflow(setup, tiny_base, tiny_base_file, make_adapter):
    from medlego.runtime.base import load_base

    reg, _ = setup
    engine = Engine(tiny_base, reg)
    engine.check_adapter(make_adapter(seed=7))  # a normal adapter passes
    huge = _with_huge_head(make_adapter(seed=7))  # finite in float32, so the file itself is valid
    with pytest.raises(AdapterNumericError, match="logits overflow"):
        engine.check_adapter(huge)
    # an engine converts its base in place: the float16 one gets a base of its own (the shared one stays float32)
    half = Engine(load_base(TINY_MODEL, tiny_base_file), reg, EngineConfig(dtype="float16"))
    with pytest.raises(AdapterNumericError, match="overflows in float16"):
        half.check_adapter(huge)


def test_a_non_finite_answer_is_that_request_s_error_never_an_answer(setup, tiny_base, make_adapter):
    reg, _ = setup
    reg.register("huge", _with_huge_head(make_adapter(seed=8)).to_bytes())  # registered without the probe
    engine = Engine(tiny_base, reg)
    requests = [engine.request(img, ref) for img, ref in zip(torch.randn(2, 3, 32, 32), ["huge", "r1"])]
    bad, good = engine.run(requests)
    assert isinstance(bad, AdapterNumericError) and "non-finite probabilities" in str(bad)
    assert abs(sum(good.probabilities.values()) - 1) < 1e-5


def test_unknown_adapter_and_task_errors(setup, tiny_base):
    reg, _ = setup
    engine = Engine(tiny_base, reg)
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(AdapterNotFoundError, match=r"^unknown adapter 'mergd'; did you mean merged, mixed\?$"):
        engine.infer(x, ["mergd"])
    with pytest.raises(TaskNotFoundError, match="blood, chest"):
        engine.infer(x, ["merged"], [None])  # two tasks: must name one
    with pytest.raises(TaskNotFoundError, match="unknown task 'lung'"):
        engine.infer(x, ["r4"], ["lung"])


def test_triton_kernel_path_matches_torch_path(setup, tiny_base):
    """The CUDA path (the fused kernel; Triton's interpreter here on the CPU) answers like the reference."""
    reg, _ = setup
    torch.manual_seed(2)
    images = torch.randn(3, 3, 32, 32)
    refs, tasks = ["mixed", None, "merged"], [None, None, "chest"]
    fused = Engine(tiny_base, reg, EngineConfig(kernel="triton"))
    assert fused.qkv_fn.__name__ == "qkv_lora_triton"
    plain = Engine(tiny_base, reg, EngineConfig(kernel="torch"))
    for a, b in zip(fused.infer(images, refs, tasks), plain.infer(images, refs, tasks)):
        if a.probabilities is None:
            assert a.embedding == pytest.approx(b.embedding, abs=1e-4)
        else:
            assert a.probabilities == pytest.approx(b.probabilities, abs=1e-5)
