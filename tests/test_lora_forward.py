"""The per-image mixed-adapter forward equals a folded-weights forward for every image."""

import pytest
import torch

from medlego.kernels.plan import BatchPlan
from medlego.kernels.reference import dense, onednn_linears, qkv_lora_reference
from medlego.runtime.lora import PackedSource, TrainableSVDLoRA, pack_adapter
from medlego.runtime.model import AdaptedViT, fold_adapter, head_logits, pooled_features


def _mixed_ranks(depth, seed):
    g = torch.Generator().manual_seed(seed)
    return [int(x) for x in torch.randint(1, 7, (2 * depth,), generator=g)]


def test_mixed_batch_equals_folded_per_image(tiny_base, make_adapter):
    depth = tiny_base.depth
    adapters = [make_adapter(seed=s, rank=_mixed_ranks(depth, s)) for s in range(3)]
    assert len({ad.max_rank for ad in adapters}) > 1 or adapters[0].ranks() != adapters[1].ranks()
    model = AdaptedViT(tiny_base)
    torch.manual_seed(0)
    x = torch.randn(7, 3, 32, 32)
    choice = [0, 1, None, 2, 1, None, 0]
    feats = model.features(x, PackedSource.for_adapters(adapters, choice))
    plain = pooled_features(tiny_base.model, x)
    for n, c in enumerate(choice):
        if c is None:
            ref = pooled_features(tiny_base.model, x[n:n + 1])
        else:
            ref = pooled_features(fold_adapter(tiny_base.model, adapters[c]), x[n:n + 1])
            # the adapter really changes the output, so equality is not vacuous
            assert (ref - plain[n:n + 1]).abs().max() > 1e-3
        assert (feats[n:n + 1] - ref).abs().max() < 1e-4
    logits = head_logits(feats[:1], adapters[0].heads["task0"])
    assert logits.shape == (1, 3)


def test_reference_leaves_k_rows_untouched(make_adapter):
    ad = make_adapter(seed=3, rank=5)
    a, e, b = pack_adapter(ad)
    d = ad.base.embed_dim
    torch.manual_seed(1)
    x = torch.randn(3, 9, d)
    w = torch.randn(3 * d, d)
    bias = torch.randn(3 * d)
    plan = BatchPlan.build([0, -1, 0])
    y = qkv_lora_reference(x, w, bias, a[0].unsqueeze(0), e[0].unsqueeze(0), b[0].unsqueeze(0), plan)
    base = dense(x, w, bias)  # the projection the reference computes (oneDNN on the CPU)
    assert torch.equal(y[1], base[1])  # no adapter: bit-identical to the base
    assert torch.allclose(base, torch.nn.functional.linear(x, w, bias), atol=1e-4)
    assert torch.allclose(y[:, :, d:2 * d], base[:, :, d:2 * d])  # K never touched
    dq = x[0] @ ad.q[0].delta().T
    dv = x[0] @ ad.v[0].delta().T
    assert torch.allclose(y[0, :, :d], base[0, :, :d] + dq, atol=1e-4)
    assert torch.allclose(y[0, :, 2 * d:], base[0, :, 2 * d:] + dv, atol=1e-4)
    assert dq.abs().max() > 1e-3 and dv.abs().max() > 1e-3


def test_trainable_init_and_regulariser(tiny_base):
    m = TrainableSVDLoRA(tiny_base.depth, tiny_base.embed_dim, rank=4, generator=torch.Generator().manual_seed(0))
    assert torch.count_nonzero(m.E) == 0  # ΔW = 0 at the start
    assert m.A.abs().min() > 0 or torch.count_nonzero(m.A) > 0
    expect = 0.0
    for i in range(tiny_base.depth):
        for j in range(2):
            A, B = m.A[i, j], m.B[i, j]
            expect += ((B.T @ B - torch.eye(4)) ** 2).sum() + ((A @ A.T - torch.eye(4)) ** 2).sum()
    assert torch.allclose(m.orthogonality_penalty(), expect, rtol=1e-5)
    # the trainable path at E = 0 is the base model (up to float32 rounding: with gradients on, the trunk's
    # Linears run on F.linear, without them on oneDNN; kernels.reference.dense)
    model = AdaptedViT(tiny_base)
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(model.features(x, m), pooled_features(tiny_base.model, x), atol=1e-5)
    with onednn_linears(False):
        assert torch.allclose(model.features(x, m), pooled_features(tiny_base.model, x), atol=1e-6)
    # gradients reach E (and only through E at the start)
    # (a plain .sum() of layer-normed features has zero gradient, hence the random projection)
    (model.features(x, m) * torch.randn(2, tiny_base.embed_dim)).sum().backward()
    assert m.E.grad is not None and m.E.grad.abs().sum() > 0
