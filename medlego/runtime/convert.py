"""Plain LoRA in: PEFT LoRA / AdaLoRA and the MeLo (LoRA-ViT) layout → SVD-LoRA, exactly.

A plain update ΔW = s · B·A (B [d_out, r], A [r, d_in]) becomes B'·diag(E)·A' with orthonormal
B', A' by QR of both factors and an SVD of the r×r core (in float64), so ΔW is unchanged up to
rounding. AdaLoRA's ΔW = s/ranknum · B·diag(E)·A goes the same way.

PEFT on timm's fused ``qkv`` adapts the K rows too. A non-zero K part is refused unless the
caller asks to drop it (``drop_k=True``), and then what was dropped is reported: the model is
never changed silently.

A LoRA on the classifier head (PEFT target ``head``) is folded into the head exactly: the head
becomes W + s·B·A. Its W is the head PEFT saved (``modules_to_save``) or, since PEFT does not save
a frozen target's weight, the caller's ``head`` (the head the LoRA was trained on top of).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from .adapter import Adapter, Head, LowRank, TaskSpec, utc_now
from .base import BaseModel
from .errors import AdapterFormatError, BadInputError

_BLOCK = re.compile(r"(?:^|\.)(?:blocks|layers?)\.(\d+)\.")
_HEAD_MODULE = re.compile(r"(?:^|\.)head$")
_TARGETS = {"qkv": "qkv", "q": "q", "query": "q", "q_proj": "q", "v": "v", "value": "v", "v_proj": "v",
            "k": "k", "key": "k", "k_proj": "k"}


def lowrank_to_svd(b: torch.Tensor, a: torch.Tensor, scale: float = 1.0) -> LowRank:
    """Exact SVD-LoRA factors of scale · b @ a (b [d_out, r], a [r, d_in])."""
    b64, a64 = b.double(), a.double()
    qb, rb = torch.linalg.qr(b64)  # b = qb rb
    qa, ra = torch.linalg.qr(a64.T)  # a = ra^T qa^T
    u, s, vh = torch.linalg.svd(rb @ ra.T * scale)
    return LowRank((vh @ qa.T).float().contiguous(), s.float().contiguous(), (qb @ u).float().contiguous())


def zero_lowrank(d: int) -> LowRank:
    """A rank-1 matrix with E = 0: 'no update' in a format that needs r >= 1."""
    return LowRank(torch.zeros(1, d), torch.zeros(1), torch.zeros(d, 1))


@dataclass
class ConversionReport:
    source: str
    kind: str
    matrices: int = 0
    dropped: list[str] = field(default_factory=list)  # what was not carried over, for the user
    notes: list[str] = field(default_factory=list)


def make_task(name: str, labels: list[str] | None, num_classes: int | None, multilabel: bool) -> TaskSpec:
    if labels:
        return TaskSpec(name, tuple(labels), multilabel)
    if not num_classes:
        raise BadInputError("give the task's --labels a,b,c or --num-classes N")
    return TaskSpec(name, tuple(f"class{i}" for i in range(num_classes)), multilabel)


def _assemble(base: BaseModel, task: TaskSpec, per_block: dict[tuple[int, str], LowRank], head: Head,
              provenance: dict) -> Adapter:
    d, depth = base.embed_dim, base.depth
    bad = [i for i, _ in per_block if i >= depth]
    if bad:
        raise AdapterFormatError(f"source adapts block {max(bad)}, but the base has {depth} blocks")
    q = tuple(per_block.get((i, "q"), zero_lowrank(d)) for i in range(depth))
    v = tuple(per_block.get((i, "v"), zero_lowrank(d)) for i in range(depth))
    if head.weight.shape != (task.num_classes, d):
        raise AdapterFormatError(f"head has shape {list(head.weight.shape)}, expected [{task.num_classes}, {d}] "
                                 f"for task '{task.name}' with {task.num_classes} labels")
    return Adapter(base=base.spec, tasks=(task,), preprocess=base.preprocess, q=q, v=v, heads={task.name: head},
                   provenance=provenance, created=utc_now())


# -- PEFT ----------------------------------------------------------------------------------------

def _peft_head(sd: dict[str, torch.Tensor]) -> Head | None:
    w = [k for k in sd if re.search(r"(?:^|\.)head(?:\.modules_to_save(?:\.[^.]+)?)?\.weight$", k)]
    if not w:
        return None
    b = sd.get(w[0][: -len("weight")] + "bias")
    weight = sd[w[0]].float()
    return Head(weight, b.float() if b is not None else torch.zeros(weight.shape[0]))


def _alpha_for(module: str, config: dict) -> float:
    # PEFT matches a pattern against the whole module path (get_pattern_key): r"(.*\.)?(pattern)$"
    name = module.removeprefix("base_model.model.")
    for pattern, alpha in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", name):
            return float(alpha)
    return float(config.get("lora_alpha", 8))


def _refuse_unsupported(config: dict, sd: dict[str, torch.Tensor], used: set[str]) -> None:
    """PEFT features whose effect SVD-LoRA on Q/V + a head cannot carry: refuse, never drop silently."""
    for flag in ("use_dora", "lora_bias"):
        if config.get(flag):
            raise AdapterFormatError(f"PEFT adapter uses {flag}=true, which SVD-LoRA cannot represent exactly")
    rest = sorted(k for k in sd if k not in used)
    if rest:
        more = f" (+{len(rest) - 3} more)" if len(rest) > 3 else ""
        raise AdapterFormatError(f"PEFT adapter also changes {', '.join(rest[:3])}{more}: medlego carries only "
                                 "the Q/V LoRA and the head, so it refuses rather than change the model silently")


def convert_peft(path: str | Path, base: BaseModel, task: TaskSpec, *, head: Head | None = None,
                 drop_k: bool = False) -> tuple[Adapter, ConversionReport]:
    """A PEFT LoRA/AdaLoRA directory (adapter_config.json + adapter_model.safetensors) → Adapter."""
    root = Path(path)
    config, kind, sd = _read_peft_folder(root)
    report = ConversionReport(str(root), f"peft-{kind.lower()}")
    per_block: dict[tuple[int, str], LowRank] = {}
    head_delta: torch.Tensor | None = None
    modules = sorted({k.rsplit(".lora_A", 1)[0] for k in sd if ".lora_A" in k})
    if not modules:
        raise AdapterFormatError(f"no lora_A tensors in {root / 'adapter_model.safetensors'}")
    used: set[str] = set()
    for module in modules:
        factors = _peft_factors(module, sd, config, kind, used, report)
        if factors is None:
            continue
        b, a, scale = factors
        if _HEAD_MODULE.search(module):
            head_delta = scale * (b.double() @ a.double())  # [classes, d], folded into the head below
            report.notes.append(f"the LoRA on '{module}' (rank {a.shape[0]}) was folded into the head")
            continue
        _place_block_lora(module, b, a, scale, base.embed_dim, drop_k, per_block, report)
    stored_head = _peft_head(sd)
    if stored_head is not None:
        used.update(k for k in sd if re.search(r"(?:^|\.)head(?:\.modules_to_save(?:\.[^.]+)?)?\.(?:weight|bias)$", k))
    _refuse_unsupported(config, sd, used)
    head = _peft_final_head(stored_head, head, head_delta, report)
    provenance = {"converted_from": {"format": report.kind, "path": str(root), "config": config,
                                     "dropped": report.dropped}}
    return _assemble(base, task, per_block, head, provenance), report


def _read_peft_folder(root: Path) -> tuple[dict, str, dict[str, torch.Tensor]]:
    """(adapter_config.json, its PEFT type upper-cased, the tensors) of a PEFT folder of a type we read."""
    cfg_path, weights = root / "adapter_config.json", root / "adapter_model.safetensors"
    if not cfg_path.is_file() or not weights.is_file():
        raise BadInputError(f"{root} is not a PEFT adapter folder (needs adapter_config.json and "
                            "adapter_model.safetensors; .bin pickles are not read)")
    config = json.loads(cfg_path.read_text())
    kind = str(config.get("peft_type", "LORA")).upper()
    if kind not in ("LORA", "ADALORA"):
        raise BadInputError(f"PEFT type {kind} is not supported (LORA or ADALORA)")
    return config, kind, load_file(str(weights))


def _peft_factors(module: str, sd: dict[str, torch.Tensor], config: dict, kind: str, used: set[str],
                  report: ConversionReport) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    """(B, A, scale) of one PEFT module, so that its update is scale · B·A (its tensor names are added
    to `used`); None when AdaLoRA pruned it to rank 0."""
    a_key = next(k for k in sd if k.startswith(module + ".lora_A"))
    b_key = next(k for k in sd if k.startswith(module + ".lora_B") and not k.endswith(".bias"))
    e_key = next((k for k in sd if k.startswith(module + ".lora_E")), None)
    used.update(k for k in (a_key, b_key, e_key) if k)
    a, b = sd[a_key].float(), sd[b_key].float()
    r = a.shape[0]
    if r == 0:  # AdaLoRA can prune a matrix to rank 0: no update there
        report.notes.append(f"'{module}' has rank 0 (pruned): no update")
        return None
    if kind == "ADALORA":
        if e_key is None:
            raise AdapterFormatError(f"AdaLoRA module '{module}' has no lora_E tensor")
        a = a * sd[e_key].float().reshape(r, 1)  # lora_A * lora_E, as AdaLoRA computes it
        init_r = float(config.get("init_r") or r)
        alpha = float(config.get("lora_alpha", 0))
        scaling = alpha if alpha > 0 else float(r)  # AdaLoRA: alpha itself (not alpha / r), else the rank
        # divided by ranknum, which PEFT keeps at init_r even when rank_pattern pruned the stored rank
        scale = scaling / (init_r + 1e-5)
    else:
        alpha = _alpha_for(module, config)
        scale = alpha / (r ** 0.5) if config.get("use_rslora") else alpha / r
    return b, a, scale


def _place_block_lora(module: str, b: torch.Tensor, a: torch.Tensor, scale: float, d: int, drop_k: bool,
                      per_block: dict[tuple[int, str], LowRank], report: ConversionReport) -> None:
    """Put one block's attention LoRA into `per_block` as SVD-LoRA: Q and V kept, K refused unless
    `drop_k` (then reported as dropped)."""
    m_block, leaf = _BLOCK.search(module), module.rsplit(".", 1)[-1]
    target = _TARGETS.get(leaf)
    if m_block is None or target is None:
        raise AdapterFormatError(f"PEFT module '{module}' is not an attention q/v/qkv projection of a block or the head")
    i = int(m_block.group(1))
    if target == "qkv":
        if b.shape[0] != 3 * d:
            raise AdapterFormatError(f"'{module}' lora_B has {b.shape[0]} rows, expected 3·{d}")
        k_part = b[d:2 * d]
        if k_part.abs().max() > 0:
            if not drop_k:
                raise AdapterFormatError(
                    f"'{module}' adapts the K rows too (|ΔK| max {float((k_part @ a).abs().max() * scale):.3g}); "
                    "medlego adapts Q and V only: pass --drop-k to keep Q/V and drop K")
            report.dropped.append(f"blocks.{i}.k (‖ΔK‖_F = {float((k_part @ a).norm() * scale):.4g})")
        per_block[(i, "q")] = lowrank_to_svd(b[:d], a, scale)
        per_block[(i, "v")] = lowrank_to_svd(b[2 * d:], a, scale)
        report.matrices += 2
    elif target == "k":
        if (b @ a).abs().max() > 0 and not drop_k:
            raise AdapterFormatError(f"'{module}' adapts K; medlego adapts Q and V only: pass --drop-k to drop it")
        report.dropped.append(f"blocks.{i}.k")
    else:
        per_block[(i, target)] = lowrank_to_svd(b, a, scale)
        report.matrices += 1


def _peft_final_head(stored_head: Head | None, head: Head | None, head_delta: torch.Tensor | None,
                     report: ConversionReport) -> Head:
    """The head the adapter serves: the one PEFT saved, else the caller's, plus any head LoRA folded in."""
    if stored_head is not None and head is not None:
        report.notes.append("the adapter's own head (modules_to_save) was used; --head was not")
    head = stored_head or head
    if head is None:
        what = "a LoRA on its head but not the head's weight" if head_delta is not None else "no classification head"
        raise BadInputError(f"the PEFT adapter carries {what}: pass --head FILE "
                            "(safetensors with 'weight' [classes, d] and 'bias' [classes])")
    if head_delta is not None:
        if head_delta.shape != head.weight.shape:
            raise AdapterFormatError(f"the head LoRA has shape {list(head_delta.shape)}, the head {list(head.weight.shape)}")
        head = Head((head.weight.double() + head_delta).float(), head.bias)
    return head


# -- MeLo / LoRA-ViT -----------------------------------------------------------------------------

def parse_rank_alpha(filename: str) -> tuple[int | None, int | None]:
    """Rank and alpha as LoRA-ViT/MeLo checkpoint names carry them (e.g. '..._r4_alpha8.safetensors')."""
    r = re.search(r"(?:^|[_\-.])r(?:ank)?[_\-]?(\d+)", filename)
    al = re.search(r"alpha[_\-]?(\d+)", filename)
    return (int(r.group(1)) if r else None), (int(al.group(1)) if al else None)


def convert_lora_vit(path: str | Path, base: BaseModel, task: TaskSpec, *, rank: int | None = None,
                     alpha: int | None = None) -> tuple[Adapter, ConversionReport]:
    """The MeLo/LoRA-ViT safetensors layout: w_a_{i:03d} [r, d], w_b_{i:03d} [d, r] (i = 2·block for Q,
    2·block + 1 for V), update scaled by alpha // r, head 'fc_{in}in_{out}out' saved without bias."""
    p = Path(path)
    sd = load_file(str(p))
    f_rank, f_alpha = parse_rank_alpha(p.name)
    rank = rank or f_rank
    alpha = alpha if alpha is not None else f_alpha
    first = sd.get("w_a_000")
    if first is None:
        raise AdapterFormatError(f"{p} has no 'w_a_000': not the LoRA-ViT layout")
    rank = rank or int(first.shape[0])
    if rank != first.shape[0]:
        raise AdapterFormatError(f"rank {rank} (from the name or --rank) but w_a_000 has {first.shape[0]} rows")
    if alpha is None:
        raise BadInputError("alpha is not in the file name: pass --alpha (LoRA-ViT scales by alpha // r)")
    scale = alpha // rank  # integer division, exactly as that code computes it
    report = ConversionReport(str(p), "lora-vit")
    per_block: dict[tuple[int, str], LowRank] = {}
    for key in sorted(k for k in sd if k.startswith("w_a_")):
        idx = int(key[4:])
        a, b = sd[key].float(), sd.get(f"w_b_{idx:03d}")
        if b is None:
            raise AdapterFormatError(f"{key} has no matching w_b_{idx:03d}")
        per_block[(idx // 2, "q" if idx % 2 == 0 else "v")] = lowrank_to_svd(b.float(), a, float(scale))
        report.matrices += 1
    head_keys = [k for k in sd if re.fullmatch(r"fc_\d+in_\d+out", k)]
    if not head_keys:
        raise AdapterFormatError(f"{p} has no head tensor 'fc_<in>in_<out>out'")
    w = sd[head_keys[0]].float()
    if w.shape[0] == base.embed_dim and w.shape[1] != base.embed_dim:  # stored as [in, out]
        w = w.T.contiguous()
    report.notes.append("the LoRA-ViT head has no bias: a zero bias was added")
    provenance = {"converted_from": {"format": "lora-vit", "path": str(p), "rank": rank, "alpha": alpha,
                                     "scale": scale}}
    return _assemble(base, task, per_block, Head(w, torch.zeros(w.shape[0])), provenance), report


def read_head_file(path: str | Path) -> Head:
    sd = load_file(str(path))
    if "weight" not in sd:
        raise BadInputError(f"head file {path} needs a 'weight' tensor [classes, d] (and optionally 'bias')")
    w = sd["weight"].float()
    return Head(w, sd.get("bias", torch.zeros(w.shape[0])).float())
