"""The trunk's Linears on oneDNN (issue 30): kernels.reference.dense equals F.linear (+ GELU) within float32
rounding where it takes the oneDNN path (on a packed weight that follows in-place writes), and is F.linear
itself wherever it must be (autograd, tracing); the reference's in-place low-rank expand equals the per-image
oracle; the adapted model with its Linears converted computes what the plain timm model (folded) computes."""

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medlego.kernels.plan import BatchPlan
from medlego.kernels.reference import _onednn_applies, dense, dense_reference, onednn_linears, qkv_lora_reference
from medlego.runtime.base import load_base
from medlego.runtime.lora import PackedSource
from medlego.runtime.model import AdaptedViT, DenseLinear, fold_adapter, pooled_features
from medlego.runtime.vit import typed

ONEDNN = torch.backends.mkldnn.is_available()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("shape, d_in, d_out", [((6, 4, 48), 48, 144), ((37, 96), 96, 24), ((3, 197, 64), 64, 256)])
@pytest.mark.parametrize("gelu", [None, "none", "tanh"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_dense_equals_its_reference(shape, d_in, d_out, gelu, with_bias):
    g = torch.Generator().manual_seed(d_in + d_out)
    x = torch.randn(*shape, generator=g)
    w = torch.randn(d_out, d_in, generator=g) / d_in ** 0.5
    b = torch.randn(d_out, generator=g) if with_bias else None
    ref = dense_reference(x, w, b, gelu)
    assert ref.abs().max() > 0.5  # non-trivial values
    with torch.inference_mode():
        assert _onednn_applies(x, w, b) == ONEDNN  # the fast path is the one under test
        got = dense(x, w, b, gelu)
    assert got.shape == ref.shape and _rel(got, ref) < 1e-5
    with onednn_linears(False):
        assert torch.equal(dense(x, w, b, gelu), ref)  # switched off: F.linear exactly
    xt = x.transpose(0, -1).contiguous().transpose(0, -1) if x.dim() == 2 else x[:, ::2]  # strided input
    with torch.no_grad():
        assert _rel(dense(xt, w, b, gelu), dense_reference(xt, w, b, gelu)) < 1e-5


def test_dense_falls_back_where_onednn_cannot_go():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 7, 32, generator=g, requires_grad=True)
    w, b = torch.randn(64, 32, generator=g), torch.randn(64, generator=g)
    assert not _onednn_applies(x, w, b)  # autograd needs F.linear's backward
    assert not _onednn_applies(x.detach().double(), w.double(), b.double())
    y = dense(x, w, b, "none")
    assert torch.equal(y, dense_reference(x, w, b, "none"))
    (y * torch.randn(5, 7, 64, generator=g)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    traced = torch.jit.trace(lambda t: dense(t, w, b), (x.detach(),))  # ONNX export traces: F.linear's graph
    graph = str(getattr(traced, "graph"))
    assert "linear" in graph and "mkldnn" not in graph


def test_the_packed_weight_follows_in_place_writes():
    """dense keeps oneDNN's packed copy of a weight; a write into the weight (as folding does) must reach it."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 11, 32, generator=g)
    w, b = torch.randn(96, 32, generator=g), torch.randn(96, generator=g)
    delta = torch.randn(32, 32, generator=g)
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            before = dense(x, w, b)
            w[:32] += delta  # the Q rows, in place
            after = dense(x, w, b)
            assert _rel(after, dense_reference(x, w, b)) < 1e-5 and (after - before).abs().max() > 0.1
            w[:32] -= delta
            assert _rel(dense(x, w, b), before) < 1e-6


def _oracle(x, w, bias, a, e, b, slots):
    """The reference's docstring, one image at a time, on F.linear."""
    y = F.linear(x, w, bias)
    d = x.shape[-1]
    for n, s in enumerate(slots):
        if s >= 0:
            y[n, :, :d] += ((x[n] @ a[s, 0].T) * e[s, 0]) @ b[s, 0].T
            y[n, :, 2 * d:] += ((x[n] @ a[s, 1].T) * e[s, 1]) @ b[s, 1].T
    return y


@pytest.mark.parametrize("n, t, d, slots", [(4, 9, 48, [0, 1, 2, 1]), (5, 17, 32, [2, -1, 0, -1, 1]),
                                             (3, 5, 64, [0, 0, 0])])
def test_qkv_reference_in_place_expand_equals_the_per_image_oracle(n, t, d, slots):
    g = torch.Generator().manual_seed(n * t)
    r, s = 4, 3
    a = torch.randn(s, 2, r, d, generator=g) * 0.3
    e = torch.rand(s, 2, r, generator=g) + 0.5
    b = torch.randn(s, 2, d, r, generator=g) * 0.3
    e[2, :, 3] = 0  # a rank-3 adapter padded to 4
    x = torch.randn(n, t, d, generator=g)
    w = torch.randn(3 * d, d, generator=g) / d ** 0.5
    bias = torch.randn(3 * d, generator=g)
    want = _oracle(x, w, bias, a, e, b, slots)
    assert (want - F.linear(x, w, bias)).abs().max() > 0.1  # the adapters matter
    for plan in (BatchPlan.build(slots, max_rank=r), BatchPlan.build(slots)):
        with torch.inference_mode():
            got = qkv_lora_reference(x, w, bias, a, e, b, plan)
        assert _rel(got, want) < 1e-5
    # training: the factors get gradients through the in-place expand
    a.requires_grad_(True)
    qkv_lora_reference(x, w, bias, a, e, b, BatchPlan.build(slots, max_rank=r)).square().sum().backward()
    assert a.grad is not None and a.grad.abs().sum() > 0


def test_adapted_model_on_dense_linears_equals_the_plain_model(tiny_base, tiny_base_file, make_adapter):
    plain: Any = load_base(tiny_base.name, tiny_base_file, img_size=tiny_base.input_size).model  # timm's own modules
    assert type(plain.blocks[0].mlp.fc1) is nn.Linear and isinstance(plain.blocks[0].mlp.act, nn.GELU)
    model = AdaptedViT(tiny_base)
    blk: Any = typed(model.vit).blocks[0]
    assert type(blk.attn.qkv.qkv) is DenseLinear and type(blk.attn.proj) is DenseLinear
    assert blk.mlp.fc1.gelu == "none" and isinstance(blk.mlp.act, nn.Identity) and type(blk.mlp.fc2) is DenseLinear
    keys = set(model.vit.state_dict())
    assert "blocks.0.mlp.fc1.weight" in keys and "blocks.0.attn.proj.bias" in keys
    adapters = [make_adapter(seed=s) for s in range(2)]
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        feats = model.features(x, PackedSource.for_adapters(adapters, [1, None, 0]))
        with onednn_linears(False):
            feats_plain = model.features(x, PackedSource.for_adapters(adapters, [1, None, 0]))
        for n, c in enumerate([1, None, 0]):
            vit = plain if c is None else fold_adapter(plain, adapters[c])
            want = pooled_features(vit, x[n:n + 1])
            assert (feats[n:n + 1] - want).abs().max() < 1e-4
        other = model.features(x, PackedSource.for_adapters(adapters, [0, None, 1]))
    assert (feats - feats_plain).abs().max() < 1e-4
    assert (other[0] - feats[0]).abs().max() > 1e-3  # another adapter, another answer
    copied: Any = copy.deepcopy(model.vit)  # as fold_adapter and export copy it
    AdaptedViT(tiny_base)  # idempotent: nothing converted twice, the GELU not dropped
    b: Any
    for b in (blk, copied.blocks[0]):
        assert b.mlp.fc1.gelu == "none" and isinstance(b.mlp.act, nn.Identity) and type(b.mlp.fc1) is DenseLinear
