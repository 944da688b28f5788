"""Kernel choice by measurement (with an injected timer), its cache, the preallocated plan and
batch padding to the CUDA-graph buckets (graphs off: the CPU has none)."""

import json

import pytest
import torch

from medlego.kernels import get_qkv_impl, impl_name, qkv_lora_reference
from medlego.kernels.plan import BatchPlan, PlanBuffers
from medlego.runtime.config import EngineConfig
from medlego.runtime.engine import Engine
from medlego.runtime.errors import BadInputError
from medlego.runtime.kernel_choice import KernelChoice, batch_bucket, batch_buckets, measurement_case
from medlego.runtime.registry import Registry

CPU = torch.device("cpu")


class FakeTimer:
    """Seconds per call by implementation, and a log of what was timed (the functions are still run)."""

    def __init__(self, seconds: dict[str, float]):
        self.seconds, self.timed = seconds, []

    def __call__(self, fn):
        fn()
        name = self.current
        self.timed.append(name)
        return self.seconds[name]


def _timed_impls(timer: FakeTimer, names=("fused", "split", "torch")) -> dict:
    """The real implementations, each telling the timer which one it is when called."""
    def wrap(name):
        real = get_qkv_impl(name)

        def impl(*args, **kw):
            timer.current = name
            return real(*args, **kw)

        impl.__name__ = real.__name__
        return impl

    return {n: wrap(n) for n in names}


def _case(bucket=4, tokens=9, d=32):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(3 * d, d, generator=g) / d ** 0.5
    return measurement_case(w, torch.randn(3 * d, generator=g), 6, 4, bucket, tokens)


def test_buckets_are_powers_of_two_capped():
    assert [batch_bucket(n, 64) for n in (1, 2, 3, 5, 8, 9, 33, 64)] == [1, 2, 4, 8, 8, 16, 64, 64]
    assert batch_bucket(40, 48) == 48 and batch_bucket(3, 3) == 3
    assert batch_buckets(64) == [1, 2, 4, 8, 16, 32, 64] and batch_buckets(24) == [1, 2, 4, 8, 16, 24]
    assert batch_buckets(1) == [1] and {batch_bucket(n, 24) for n in range(1, 25)} == set(batch_buckets(24))


@pytest.mark.parametrize("fastest", ["fused", "split", "torch"])
def test_auto_keeps_the_fastest_measured_path(tmp_path, fastest):
    seconds = {"fused": 3e-3, "split": 2e-3, "torch": 4e-3}
    seconds[fastest] = 1e-3
    timer = FakeTimer(seconds)
    kc = KernelChoice("auto", CPU, torch.float32, cache_path=tmp_path / "k.json", candidates=("fused", "split", "torch"),
                      timer=timer, device_name="Test GPU", impls=_timed_impls(timer))
    fn = kc.for_batch(4, 32, 9, _case)
    assert impl_name(fn) == fastest
    assert sorted(timer.timed) == ["fused", "split", "torch"]  # each path timed once, on the real shapes
    rep = kc.report()
    assert rep["by_batch"]["4"]["kernel"] == fastest and rep["by_batch"]["4"]["source"] == "measured"
    assert rep["by_batch"]["4"]["ms"][fastest] == pytest.approx(1.0)
    assert impl_name(kc.for_batch(4, 32, 9, lambda: pytest.fail("measured twice"))) == fastest  # remembered
    saved = json.loads((tmp_path / "k.json").read_text())
    (key,) = saved
    assert "Test GPU" in key and f"torch {torch.__version__}" in key and "D=32 T=9" in key and "batch 4" in key
    assert saved[key]["kernel"] == fastest


def test_the_cache_spares_a_restart_but_not_another_gpu(tmp_path):
    cache = tmp_path / "k.json"
    timer = FakeTimer({"fused": 1e-3, "split": 2e-3, "torch": 3e-3})
    KernelChoice("auto", CPU, torch.float32, cache_path=cache, candidates=("fused", "split", "torch"), timer=timer,
                 device_name="GPU A", impls=_timed_impls(timer)).for_batch(8, 32, 9, lambda: _case(8))

    def never(fn):
        raise AssertionError("a cached choice must not be measured again")

    again = KernelChoice("auto", CPU, torch.float32, cache_path=cache, candidates=("fused", "split", "torch"),
                         timer=never, device_name="GPU A")
    assert impl_name(again.for_batch(8, 32, 9, lambda: pytest.fail("measured"))) == "fused"
    assert again.report()["by_batch"]["8"]["source"] == "cache"
    timer2 = FakeTimer({"fused": 5e-3, "split": 1e-3, "torch": 3e-3})
    other = KernelChoice("auto", CPU, torch.float32, cache_path=cache, candidates=("fused", "split", "torch"),
                         timer=timer2, device_name="GPU B", impls=_timed_impls(timer2))
    assert impl_name(other.for_batch(8, 32, 9, lambda: _case(8))) == "split"
    assert len(json.loads(cache.read_text())) == 2  # both GPUs' choices kept


def test_a_wrong_or_failing_path_is_left_out(tmp_path, caplog):
    timer = FakeTimer({"fused": 1e-3, "split": 2e-3, "torch": 3e-3, "broken": 1e-4, "crashing": 1e-5})
    impls = _timed_impls(timer)

    def broken(x, weight, bias, *rest):  # fast but ignores the adapters
        timer.current = "broken"
        return torch.nn.functional.linear(x, weight, bias)

    def crashing(*args):
        raise RuntimeError("out of resources: shared memory\nmore lines")

    impls.update(broken=broken, crashing=crashing)
    kc = KernelChoice("auto", CPU, torch.float32, candidates=("broken", "crashing", "fused", "split", "torch"),
                      timer=timer, device_name="Test GPU", impls=impls)
    with caplog.at_level("WARNING", logger="medlego.kernels"):
        assert impl_name(kc.for_batch(2, 32, 9, lambda: _case(2))) == "fused"
    got = kc.report()["by_batch"]["2"]
    assert "relative error" in got["refused"]["broken"]
    assert got["refused"]["crashing"] == "RuntimeError: out of resources: shared memory"
    assert "broken" not in timer.timed and "left out" in caplog.text


def test_forced_and_cpu_auto_never_measure():
    def never(fn):
        raise AssertionError("no measurement")

    for mode, want in (("fused", "fused"), ("split", "split"), ("torch", "torch"), ("triton", "fused")):
        kc = KernelChoice(mode, CPU, torch.float32, timer=never, candidates=("fused", "split", "torch"))
        assert impl_name(kc.for_batch(4, 32, 9, lambda: pytest.fail("measured"))) == want
        assert kc.report()["kernel"] == want and kc.report()["mode"] == ("fused" if mode == "triton" else mode)
    cpu = KernelChoice("auto", CPU, torch.float32)
    assert cpu.for_batch(4, 32, 9, lambda: pytest.fail("measured")) is qkv_lora_reference
    assert cpu.report()["why"].startswith("CPU")
    with pytest.raises(ValueError, match="unknown kernel 'cublas'"):
        KernelChoice("cublas", CPU, torch.float32)


def test_plan_buffers_are_refilled_in_place():
    bufs = PlanBuffers(8)
    p1 = bufs.fill([3, -1, 1, 3], pad_to=8, max_rank=4)
    ptr = (p1.image_slots.data_ptr(), p1.order.data_ptr())
    assert p1.image_slots.tolist() == [3, -1, 1, 3, -1, -1, -1, -1] and p1.num_active == 3 and p1.max_rank == 4
    ref = BatchPlan.build([3, -1, 1, 3, -1, -1, -1, -1])
    assert torch.equal(p1.order, ref.order)  # the same stable slot-sorted order as a fresh plan
    p2 = bufs.fill([0, 2])
    assert (p2.image_slots.data_ptr(), p2.order.data_ptr()) == ptr  # same addresses: what a CUDA graph needs
    assert p2.image_slots.tolist() == [0, 2] and p2.order.tolist() == [0, 1] and p2.batch == 2
    with pytest.raises(ValueError, match="does not fit"):
        bufs.fill([0] * 9)


@pytest.fixture
def registry_of(tmp_path, tiny_base, make_adapter):
    reg = Registry(tmp_path / "reg")
    for i in range(3):
        reg.register(f"a{i}", make_adapter(seed=10 + i, rank=1 + i).to_bytes())
    return reg


@pytest.mark.parametrize("kernel", ["torch", "split"])
def test_padding_to_the_bucket_changes_no_answer(tiny_base, registry_of, kernel):
    """What the CUDA-graph path runs (batches padded with slot −1 zero images), checked with graphs off.
    (The fused kernel's handling of slot −1 images is in tests/test_kernel.py; in the interpreter a
    whole trunk through it costs a minute.)"""
    g = torch.Generator().manual_seed(5)
    images = torch.randn(5, 3, 32, 32, generator=g)
    refs = ["a0", None, "a2", "a1", "a0"]  # 5 images → bucket 8: three padding images
    plain = Engine(tiny_base, registry_of, EngineConfig(kernel="torch", pad_batches=False)).infer(images, refs)
    eng = Engine(tiny_base, registry_of, EngineConfig(kernel=kernel, pad_batches=True))
    padded = eng.infer(images, refs)
    assert eng.plans.slots[:8].tolist()[5:] == [-1, -1, -1]  # the batch ran padded to 8
    assert eng.kernel_report()["pad_batches"] is True and eng.kernel_report()["cuda_graphs"] is False
    for p, q in zip(plain, padded):
        if p.probabilities is None:
            assert q.probabilities is None and torch.allclose(torch.tensor(p.embedding), torch.tensor(q.embedding), atol=1e-4)
        else:
            assert (p.adapter, p.task, p.top[0][0]) == (q.adapter, q.task, q.top[0][0])
            for lab, v in p.probabilities.items():
                assert q.probabilities[lab] == pytest.approx(v, abs=1e-4)
    # the adapters matter in this batch, so equal answers are not vacuous
    assert plain[0].probabilities != plain[2].probabilities


def test_engine_measures_each_bucket_once_at_warmup(tiny_base, registry_of):
    timer = FakeTimer({"split": 1e-3, "torch": 3e-3})
    eng = Engine(tiny_base, registry_of, EngineConfig(max_pass_images=4))
    eng.kernels = KernelChoice("auto", CPU, torch.float32, candidates=("split", "torch"), timer=timer,
                               device_name="Test GPU", impls=_timed_impls(timer, ("split", "torch")))
    eng.warmup()
    assert sorted(eng.kernel_report()["by_batch"]) == ["1", "2", "4"]
    assert len(timer.timed) == 6
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    out = eng.infer(images, ["a0", "a1", None])
    assert len(timer.timed) == 6  # no measurement on the request path
    ref = Engine(tiny_base, registry_of, EngineConfig(kernel="torch")).infer(images, ["a0", "a1", None])
    for p, q in zip(ref[:2], out[:2]):  # answered by the chosen path (split), like the reference
        assert p.top[0][0] == q.top[0][0] and max(abs(p.probabilities[k] - q.probabilities[k]) for k in p.probabilities) < 1e-4


def test_cuda_graphs_need_a_gpu(tiny_base, registry_of):
    with pytest.raises(BadInputError, match="cuda_graphs needs a CUDA device"):
        Engine(tiny_base, registry_of, EngineConfig(cuda_graphs=True))
    with pytest.raises(BadInputError, match="unknown kernel 'cuBLAS'"):
        Engine(tiny_base, registry_of, EngineConfig(kernel="cuBLAS"))


def test_serve_flags_and_config_keys_reach_the_engine_config(tmp_path):
    from medlego.cli import build_parser
    from medlego.cli.serve import config_from_args
    from medlego.runtime.config import load_config

    argv = ["serve", "--model", "m", "--weights", "w", "--data-dir", str(tmp_path), "--kernel", "split", "--cuda-graphs"]
    cfg = config_from_args(build_parser("serve").parse_args(argv))
    assert (cfg.engine.kernel, cfg.engine.cuda_graphs) == ("split", True)
    cfg = config_from_args(build_parser("serve").parse_args(argv[:-3]))
    assert (cfg.engine.kernel, cfg.engine.cuda_graphs) == ("auto", False)  # the defaults: measured, no graphs
    toml = tmp_path / "serve.toml"
    toml.write_text('[engine]\nkernel = "fused"\ncuda_graphs = true\npad_batches = true\n')
    eng = load_config(toml).engine
    assert (eng.kernel, eng.cuda_graphs, eng.pad_batches) == ("fused", True, True)
