"""Both Triton paths (fused; split = cuBLAS + shrink/expand) equal the PyTorch reference (under
TRITON_INTERPRET=1 on the CPU)."""

import pytest
import torch

from medlego.kernels import get_qkv_impl
from medlego.kernels.plan import BatchPlan
from medlego.kernels.lora_split_triton import lora_expand_triton, lora_shrink_triton, qkv_lora_split
from medlego.kernels.qkv_lora_triton import qkv_lora_triton
from medlego.kernels.reference import lora_expand_reference, lora_shrink_reference, qkv_lora_reference
from medlego.runtime.lora import PackedSource
from medlego.runtime.model import AdaptedViT

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# bf16 needs real hardware: the interpreter emulates dtypes with numpy, which has no bfloat16
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def _bank(s, r, d, ranks, g, zero_q=(), zero_v=()):
    """A packed bank whose slot i has rank ranks[i] (zero-padded to r), like the pool holds it."""
    a = torch.zeros(s, 2, r, d)
    e = torch.zeros(s, 2, r)
    b = torch.zeros(s, 2, d, r)
    for i, ri in enumerate(ranks):
        a[i, :, :ri] = torch.randn(2, ri, d, generator=g) * 0.3
        b[i, :, :, :ri] = torch.randn(2, d, ri, generator=g) * 0.3
        e[i, :, :ri] = torch.rand(2, ri, generator=g) + 0.5
        if i in zero_q:
            e[i, 0] = 0
        if i in zero_v:
            e[i, 1] = 0
    return a, e, b


CASES = [  # (images, tokens, dim, slots per image, ranks per slot)
    (1, 5, 32, [0], [1]),  # one image, rank 1
    (7, 21, 48, [0, -1, 2, 1, 0, 3, 2], [1, 4, 8, 8]),  # tokens not a multiple of the tile, mixed ranks up to max
    (3, 17, 64, [-1, -1, -1], [4]),  # nobody has an adapter
    (4, 9, 48, [1, 1, 1, 1], [2, 3]),  # uniform
    (5, 33, 32, [0, 1, 0, 1, -1], [3, 5]),  # Q-only and V-only adapters (see zero_q / zero_v)
]


@pytest.mark.parametrize("impl", [qkv_lora_triton, qkv_lora_split], ids=["fused", "split"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, t, d, slots, ranks", CASES)
def test_kernel_matches_reference(n, t, d, slots, ranks, dtype, impl):
    g = torch.Generator().manual_seed(n * 100 + t)
    r = max(ranks)
    a, e, b = _bank(len(ranks), r, d, ranks, g, zero_q={0} if t == 33 else (), zero_v={1} if t == 33 else ())
    x = torch.randn(n, t, d, generator=g)
    w = torch.randn(3 * d, d, generator=g) / d ** 0.5
    bias = torch.randn(3 * d, generator=g)
    args = [v.to(DEVICE, dtype) for v in (x, w, bias, a, e, b)]
    plan = BatchPlan.build(slots, device=DEVICE, max_rank=r)
    out = torch.full((n, t, 3 * d), float("nan"), device=DEVICE, dtype=dtype)  # poisoned: every entry must be written
    got = impl(*args, plan, out=out)
    ref = qkv_lora_reference(*[v.float() for v in args], plan)
    assert not torch.isnan(got).any()
    rel = (got.float() - ref).abs().max() / ref.abs().max()
    assert rel < TOL[dtype], f"relative error {rel:.2e}"
    if any(s >= 0 for s in slots):  # the adapters matter here, so equality is not vacuous
        plain = torch.nn.functional.linear(*[v.float() for v in args[:3]])
        assert (ref - plain).abs().max() > 0.1


@pytest.mark.parametrize("dtype", DTYPES)
def test_shrink_and_expand_match_their_references(dtype):
    """The split path's two steps, each against its reference: odd token count, mixed ranks, a slot −1."""
    g = torch.Generator().manual_seed(7)
    n, t, d, ranks, slots = 5, 13, 48, [2, 5, 3], [2, -1, 0, 1, 2]
    a, e, b = (v.to(DEVICE, dtype) for v in _bank(len(ranks), max(ranks), d, ranks, g))
    plan = BatchPlan.build(slots, device=DEVICE, max_rank=max(ranks))
    x2 = torch.randn(n * t, d, generator=g).to(DEVICE, dtype)
    r = max(ranks)
    h = lora_shrink_triton(x2, a, e, plan, t, r)
    h_ref = lora_shrink_reference(x2, a, e, plan, t, r)
    active = torch.tensor([s >= 0 for s in slots]).repeat_interleave(t).to(DEVICE)
    assert h_ref[active].abs().max() > 0.1
    assert (h[active] - h_ref[active]).abs().max() / h_ref.abs().max() < TOL[dtype]
    y0 = torch.randn(n * t, 3 * d, generator=g).to(DEVICE, dtype)
    got = lora_expand_triton(h_ref.clone(), b, plan, y0.clone(), t, r)
    want = lora_expand_reference(h_ref, b, plan, y0.clone().float(), t, r)
    assert (got.float() - want).abs().max() / want.abs().max() < TOL[dtype]
    k_cols, inactive = slice(d, 2 * d), ~active
    assert torch.equal(got[:, k_cols], y0[:, k_cols])  # K columns never touched
    assert torch.equal(got[inactive], y0[inactive])  # nor images without an adapter
    assert (got.float() - y0.float()).abs().max() > 0.1  # the adapters changed Q and V


def test_wrapper_validates_inputs():
    d = 32
    x = torch.randn(2, 5, d)
    w, bias = torch.randn(3 * d, d), torch.randn(3 * d)
    a, e, b = torch.randn(2, 2, 4, d), torch.randn(2, 2, 4), torch.randn(2, 2, d, 4)
    plan = BatchPlan.build([0, 1])
    with pytest.raises(ValueError, match=r"weight has shape \(96, 31\)"):
        qkv_lora_triton(x, torch.randn(3 * d, d - 1), bias, a, e, b, plan)
    with pytest.raises(ValueError, match="dtype torch.float16, expected torch.float32"):
        qkv_lora_triton(x, w, bias, a.half(), e, b, plan)
    with pytest.raises(ValueError, match="plan has 3 images, x has 2"):
        qkv_lora_triton(x, w, bias, a, e, b, BatchPlan.build([0, 1, 1]))
    with pytest.raises(ValueError, match="multiple of 16"):
        qkv_lora_triton(torch.randn(2, 5, 20), torch.randn(60, 20), None, a[..., :20], e, torch.randn(2, 2, 20, 4), plan)


def test_model_forward_through_the_kernel(tiny_base, make_adapter):
    ads = [make_adapter(seed=1, rank=1), make_adapter(seed=2, rank=[1 + i % 6 for i in range(2 * tiny_base.depth)])]
    model = AdaptedViT(tiny_base)
    x = torch.randn(3, 3, 32, 32)
    fused = model.features(x, PackedSource.for_adapters(ads, [0, None, 1], qkv_fn=get_qkv_impl("triton")))
    ref = model.features(x, PackedSource.for_adapters(ads, [0, None, 1]))
    assert (fused - ref).abs().max() < 1e-4


def test_gpu_benchmark_script_runs_in_interpreter_mode(tmp_path):
    """The GPU benchmark's own logic (shapes, plans, correctness check, report) on tiny CPU shapes."""
    import json
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "medlego.benchmarks.kernel_bench", "--interpret", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "kernel_bench_interpret.json").read_text())
    assert len(res["kernel"]) == 4 and all(row["max_rel_err"] < 1e-4 for row in res["kernel"])
    assert all(row["split_max_rel_err"] < 1e-4 and row["best"] in ("fused", "split") for row in res["kernel"])
    assert res["engine"]["kernel"] == "qkv_lora_reference" and res["engine"]["ratio"] > 0
    assert res["engine"]["kernel_choice"]["kernel"] == "torch"  # CPU auto: the reference, not measured
    lat = res["engine"]["latency"]
    assert lat["base_batch1_ms"] > 0 and [r["engine"] for r in lat["rows"]] == ["eager"]  # no graphs on a CPU
    assert [r["adapters"] for r in res["engine"]["rows"]] == ["1", "distinct"]
    assert res["sweep"] and all("error" not in r and r["max_rel_err"] < 1e-4 for r in res["sweep"])
    assert len(res["goals"]) == 4 and all(g["met"] is None for g in res["goals"])  # the interpreter is not a measurement
