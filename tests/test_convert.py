"""Plain LoRA → SVD-LoRA is exact: PEFT (checked against PEFT itself) and the LoRA-ViT layout."""

import pytest
import timm
import torch
from safetensors.torch import save_file

from medlego.runtime.base import read_state_dict
from medlego.runtime.convert import convert_lora_vit, convert_peft, lowrank_to_svd, make_task
from medlego.runtime.errors import AdapterFormatError
from medlego.runtime.model import AdaptedViT, adapter_logits

import peft
from conftest import TINY_IMG, TINY_MODEL


def test_lowrank_to_svd_is_exact_and_orthonormal():
    g = torch.Generator().manual_seed(0)
    b, a = torch.randn(40, 5, generator=g), torch.randn(5, 30, generator=g)
    m = lowrank_to_svd(b, a, 0.75)
    assert torch.allclose(m.delta(), 0.75 * b @ a, atol=1e-5)
    assert torch.allclose(m.A @ m.A.T, torch.eye(5), atol=1e-5)
    assert torch.allclose(m.B.T @ m.B, torch.eye(5), atol=1e-5)
    assert bool((m.E[:-1] >= m.E[1:]).all())


def _timm_with_head(tiny_base_file, classes=3):
    model = timm.create_model(TINY_MODEL, pretrained=False, img_size=TINY_IMG, num_classes=classes)
    sd = {k: v for k, v in read_state_dict(tiny_base_file).items() if not k.startswith("head.")}
    model.load_state_dict(sd, strict=False)
    torch.manual_seed(3)
    torch.nn.init.normal_(model.head.weight, std=0.5)
    return model.eval()


def _randomise(peft_model, d, zero_k=True, adalora=False):
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
                if zero_k:
                    p[d:2 * d] = 0
            elif "lora_E" in name and adalora:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif "lora_A" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.mark.parametrize("kind", ["lora", "lora-rslora", "adalora"])
def test_peft_conversion_reproduces_peft(tmp_path, tiny_base, tiny_base_file, kind):
    d = tiny_base.embed_dim
    model = _timm_with_head(tiny_base_file)
    if kind == "adalora":
        cfg = peft.AdaLoraConfig(init_r=6, target_r=4, lora_alpha=16, target_modules=["qkv"],
                                 modules_to_save=["head"], total_step=10)
    else:
        cfg = peft.LoraConfig(r=5, lora_alpha=10, target_modules=["qkv"], modules_to_save=["head"],
                              use_rslora=kind == "lora-rslora")
    pm = peft.get_peft_model(model, cfg).eval()
    _randomise(pm, d, adalora=kind == "adalora")
    x = torch.randn(3, 3, TINY_IMG, TINY_IMG)
    with torch.no_grad():
        expected = pm(x)
    pm.save_pretrained(tmp_path / "peft")
    task = make_task("t", None, 3, False)
    adapter, report = convert_peft(tmp_path / "peft", tiny_base, task)
    got = adapter_logits(AdaptedViT(tiny_base), adapter, x, "t")
    with torch.no_grad():
        with pm.disable_adapter():
            plain = pm(x)
    assert (expected - plain).abs().max() > 1e-3  # the adapter matters, so equality is meaningful
    assert (got - expected).abs().max() < 1e-4
    assert report.matrices == 2 * tiny_base.depth and report.dropped == []


def test_peft_k_update_refused_or_dropped(tmp_path, tiny_base, tiny_base_file):
    d = tiny_base.embed_dim
    model = _timm_with_head(tiny_base_file)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["qkv"], modules_to_save=["head"]))
    _randomise(pm, d, zero_k=False)
    pm.save_pretrained(tmp_path / "peft")
    task = make_task("t", None, 3, False)
    with pytest.raises(AdapterFormatError, match="adapts the K rows too.*--drop-k"):
        convert_peft(tmp_path / "peft", tiny_base, task)
    adapter, report = convert_peft(tmp_path / "peft", tiny_base, task, drop_k=True)
    assert len(report.dropped) == tiny_base.depth and report.dropped[0].startswith("blocks.0.k")
    assert adapter.provenance["converted_from"]["dropped"] == report.dropped


def test_lora_vit_layout(tmp_path, tiny_base):
    d, depth, r, alpha = tiny_base.embed_dim, tiny_base.depth, 4, 9  # alpha // r = 2
    g = torch.Generator().manual_seed(5)
    sd = {}
    for i in range(2 * depth):
        sd[f"w_a_{i:03d}"] = torch.randn(r, d, generator=g) * 0.2
        sd[f"w_b_{i:03d}"] = torch.randn(d, r, generator=g) * 0.2
    sd[f"fc_{d}in_4out"] = torch.randn(4, d, generator=g)
    path = tmp_path / f"melo_r{r}_alpha{alpha}.safetensors"
    save_file(sd, str(path))
    adapter, _ = convert_lora_vit(path, tiny_base, make_task("t", ["a", "b", "c", "d"], None, False))
    # the reference, as that code computes it: x W^T + (alpha // r) * (x A^T) B^T on q and v
    vit = tiny_base.model
    x = torch.randn(2, 3, TINY_IMG, TINY_IMG)
    hooks = []
    for blk_i, blk in enumerate(vit.blocks):
        def hook(mod, inp, out, i=blk_i):
            xin = inp[0]
            q = (xin @ sd[f"w_a_{2 * i:03d}"].T) @ sd[f"w_b_{2 * i:03d}"].T * (alpha // r)
            v = (xin @ sd[f"w_a_{2 * i + 1:03d}"].T) @ sd[f"w_b_{2 * i + 1:03d}"].T * (alpha // r)
            return out + torch.cat([q, torch.zeros_like(q), v], -1)
        hooks.append(blk.attn.qkv.register_forward_hook(hook))
    try:
        with torch.no_grad():
            ref = vit.forward_head(vit.forward_features(x), pre_logits=True) @ sd[f"fc_{d}in_4out"].T
    finally:
        for h in hooks:
            h.remove()
    got = adapter_logits(AdaptedViT(tiny_base), adapter, x, "t")
    assert (got - ref).abs().max() < 1e-4
    assert adapter.provenance["converted_from"]["scale"] == 2


def test_adalora_pruned_ranks_reproduce_reloaded_peft(tmp_path, tiny_base, tiny_base_file):
    """After AdaLoRA's rank allocation the file holds fewer (even zero) ranks, while PEFT keeps dividing
    by init_r: the conversion must match what PEFT itself loads back."""
    model = _timm_with_head(tiny_base_file)
    cfg = peft.AdaLoraConfig(init_r=6, target_r=4, lora_alpha=16, target_modules=["qkv"], modules_to_save=["head"],
                             total_step=10)
    pm = peft.get_peft_model(model, cfg).eval()
    _randomise(pm, tiny_base.embed_dim, adalora=True)
    pattern = {f"blocks.{i}.attn.qkv.lora_E.default": [j < i % 4 for j in range(6)] for i in range(tiny_base.depth)}
    pm.peft_config["default"].rank_pattern = pattern  # as update_and_allocate leaves it: blocks 0, 4, 8 pruned to 0
    pm.base_model.rankallocator.mask_using_rank_pattern(pm.base_model.model, pattern)
    pm.save_pretrained(tmp_path / "peft")
    reloaded = peft.PeftModel.from_pretrained(_timm_with_head(tiny_base_file), tmp_path / "peft").eval()
    x = torch.randn(2, 3, TINY_IMG, TINY_IMG)
    with torch.no_grad():
        expected = reloaded(x)
    adapter, report = convert_peft(tmp_path / "peft", tiny_base, make_task("t", None, 3, False))
    got = adapter_logits(AdaptedViT(tiny_base), adapter, x, "t")
    assert (got - expected).abs().max() < 1e-4
    assert adapter.ranks()["blocks.1.q"] == 1 and adapter.ranks()["blocks.3.v"] == 3
    assert float(adapter.q[0].E.abs().max()) == 0.0 and any("rank 0" in n for n in report.notes)


@pytest.mark.parametrize("extra, message", [
    ({"use_dora": True}, "lora_magnitude_vector"),
    ({"lora_bias": True}, "lora_bias=true"),
    ({"modules_to_save": ["head", "norm"]}, "also changes base_model.model.norm.bias"),
])
def test_peft_features_svd_lora_cannot_carry_are_refused(tmp_path, tiny_base, tiny_base_file, extra, message):
    kwargs = {"modules_to_save": ["head"], **extra}
    pm = peft.get_peft_model(_timm_with_head(tiny_base_file), peft.LoraConfig(r=2, target_modules=["qkv"], **kwargs))
    pm.save_pretrained(tmp_path / "peft")
    if extra.get("use_dora"):  # the config flag alone is caught first; also check the tensor guard
        import json
        cfg_path = tmp_path / "peft" / "adapter_config.json"
        cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "use_dora": False}))
    with pytest.raises(AdapterFormatError, match=message):
        convert_peft(tmp_path / "peft", tiny_base, make_task("t", None, 3, False))


def test_convert_cli_writes_a_loadable_adapter_and_reports_dropped_k(tmp_path, tiny_base, tiny_base_file, capsys):
    from medlego.cli import main
    from medlego.runtime.adapter import load_adapter

    pm = peft.get_peft_model(_timm_with_head(tiny_base_file), peft.LoraConfig(r=3, target_modules=["qkv"],
                                                                             modules_to_save=["head"]))
    _randomise(pm, tiny_base.embed_dim, zero_k=False)
    pm.save_pretrained(tmp_path / "peft")
    out = tmp_path / "conv.safetensors"
    args = ["convert", str(tmp_path / "peft"), "-o", str(out), "--model", TINY_MODEL, "--weights", str(tiny_base_file),
            "--task", "xray", "--labels", "normal,effusion,nodule"]
    assert main(args) == 2 and not out.exists()  # K is adapted: refused by default
    assert "--drop-k" in capsys.readouterr().err
    assert main(args + ["--drop-k"]) == 0
    printed = capsys.readouterr().out
    assert "dropped: blocks.0.k" in printed and printed.count("dropped:") == tiny_base.depth
    ad = load_adapter(out, expected_base=tiny_base.spec)
    assert ad.tasks[0].labels == ("normal", "effusion", "nodule") and ad.ranks()["blocks.5.v"] == 3
    assert ad.provenance["converted_from"]["format"] == "peft-lora" and ad.preprocess == tiny_base.preprocess


class _SplitQKV(torch.nn.Module):
    """timm's fused qkv as three Linears (q, k, v) with the same weights: a model with separate projections."""

    def __init__(self, fused: torch.nn.Linear):
        super().__init__()
        d = fused.in_features
        self.q, self.k, self.v = (torch.nn.Linear(d, d) for _ in range(3))
        with torch.no_grad():
            for j, lin in enumerate((self.q, self.k, self.v)):
                lin.weight.copy_(fused.weight[j * d:(j + 1) * d])
                lin.bias.copy_(fused.bias[j * d:(j + 1) * d])

    def forward(self, x):
        return torch.cat([self.q(x), self.k(x), self.v(x)], -1)


def test_peft_separate_q_v_projections(tmp_path, tiny_base, tiny_base_file):
    model = _timm_with_head(tiny_base_file)
    for blk in model.blocks:
        blk.attn.qkv = _SplitQKV(blk.attn.qkv)
    cfg = peft.LoraConfig(r=3, lora_alpha=7, target_modules=["q", "v"], modules_to_save=["head"],
                          alpha_pattern={"v": 2})  # PEFT: only modules named v, not "qkv.q"
    pm = peft.get_peft_model(model, cfg).eval()
    _randomise(pm, tiny_base.embed_dim, zero_k=False)
    x = torch.randn(2, 3, TINY_IMG, TINY_IMG)
    with torch.no_grad():
        expected = pm(x)
    pm.save_pretrained(tmp_path / "peft")
    adapter, report = convert_peft(tmp_path / "peft", tiny_base, make_task("t", None, 3, False))
    got = adapter_logits(AdaptedViT(tiny_base), adapter, x, "t")
    assert (got - expected).abs().max() < 1e-4 and report.matrices == 2 * tiny_base.depth


def test_peft_lora_on_the_head_is_folded_into_it(tmp_path, tiny_base, tiny_base_file):
    """target_modules=[qkv, head]: PEFT saves the head's LoRA but not its frozen weight, which --head supplies."""
    from medlego.runtime.adapter import Head
    from medlego.runtime.errors import BadInputError

    model = _timm_with_head(tiny_base_file)
    frozen = Head(model.head.weight.detach().clone(), model.head.bias.detach().clone())
    pm = peft.get_peft_model(model, peft.LoraConfig(r=3, lora_alpha=6, target_modules=["qkv", "head"])).eval()
    _randomise(pm, tiny_base.embed_dim)
    x = torch.randn(3, 3, TINY_IMG, TINY_IMG)
    with torch.no_grad():
        expected = pm(x)
    pm.save_pretrained(tmp_path / "peft")
    task = make_task("t", None, 3, False)
    with pytest.raises(BadInputError, match="a LoRA on its head but not the head's weight: pass --head"):
        convert_peft(tmp_path / "peft", tiny_base, task)
    adapter, report = convert_peft(tmp_path / "peft", tiny_base, task, head=frozen)
    got = adapter_logits(AdaptedViT(tiny_base), adapter, x, "t")
    assert (adapter.heads["t"].weight - frozen.weight).abs().max() > 1e-3  # the LoRA changed the head
    assert (got - expected).abs().max() < 1e-4
    assert any("folded into the head" in n for n in report.notes)


def test_the_adapters_own_head_wins_over_head_file(tmp_path, tiny_base, tiny_base_file):
    """As the README says: the modules_to_save head if present, else --head (and the user is told)."""
    from medlego.runtime.adapter import Head

    pm = peft.get_peft_model(_timm_with_head(tiny_base_file), peft.LoraConfig(r=2, target_modules=["qkv"],
                                                                             modules_to_save=["head"]))
    _randomise(pm, tiny_base.embed_dim)
    pm.save_pretrained(tmp_path / "peft")
    other = Head(torch.zeros(3, tiny_base.embed_dim), torch.zeros(3))
    adapter, report = convert_peft(tmp_path / "peft", tiny_base, make_task("t", None, 3, False), head=other)
    assert adapter.heads["t"].weight.abs().max() > 0 and any("--head was not" in n for n in report.notes)
