"""The frozen base ViT: build by timm name, load local weights, freeze, fingerprint.

A weights file is a timm ``state_dict`` as timm writes it (its classifier head is included and
ignored). Accepted: ``.safetensors``; timm/PyTorch checkpoints (``.pth``/``.pt``/``.bin``,
loaded with ``weights_only=True`` so nothing arbitrary is unpickled; ``state_dict``/``model``/
``state_dict_ema`` wrappers and ``module.`` prefixes are unwrapped); the original JAX ``.npz``.
The input size is read from the file's ``pos_embed`` so a base built at a small size (tests,
demos) loads by the same ``--model NAME --weights FILE`` as a real one.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .adapter import BaseSpec, Preprocess
from .errors import BaseModelError
from .vit import create, typed

PLAIN_VIT_PREFIXES = ("vit_", "deit_", "deit3_")
HEAD_PREFIXES = ("head.", "head_dist.")


@dataclass
class BaseModel:
    """A frozen timm VisionTransformer plus what adapters need to know about it."""

    name: str
    model: nn.Module  # timm VisionTransformer, num_classes=0, eval(), requires_grad False
    spec: BaseSpec
    input_size: int
    preprocess: Preprocess  # the base's own normalisation (timm pretrained_cfg)
    num_params: int  # backbone parameters (the classifier head excluded)

    @property
    def fingerprint(self) -> str:
        return self.spec.fingerprint

    @property
    def embed_dim(self) -> int:
        return self.spec.embed_dim

    @property
    def depth(self) -> int:
        return self.spec.depth

    @property
    def tokens(self) -> int:
        """Tokens per image in every block: patches plus the prefix (class, register) tokens."""
        return int(typed(self.model).patch_embed.num_patches) + int(getattr(self.model, "num_prefix_tokens", 1))


def _timm():
    import timm  # heavy import; kept local so `medlego --help` stays fast

    return timm


def check_model_name(name: str) -> None:
    timm = _timm()
    if not name.startswith(PLAIN_VIT_PREFIXES):
        raise BaseModelError(f"'{name}' is not a plain ViT/DeiT; supported: vit_*/deit_*/deit3_* timm models")
    if name not in timm.list_models(name):
        raise BaseModelError(f"unknown timm model '{name}'")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A timm state_dict from a local file, unwrapped; never arbitrary unpickling."""
    p = _weights_file(path)
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        if _safetensors_metadata(p).get("format", "").startswith("medlego.svd-lora"):
            raise BaseModelError(f"{p} is a medlego adapter, not base weights: pass it as --adapter")
        try:
            sd = load_file(str(p))
        except Exception as e:
            raise BaseModelError(f"cannot read safetensors weights {p}: {e}") from None
    else:
        with open(p, "rb") as fh:
            magic = fh.read(4)
        # a PyTorch checkpoint is a zip archive (torch.save) or a bare pickle (legacy); anything else
        # would only fail deep inside the unpickler with an opcode error
        if not (magic.startswith(b"PK") or magic[:1] == b"\x80"):
            raise BaseModelError(f"{p} is not a weights file: expected .safetensors, a PyTorch checkpoint "
                                 f"(.pth/.pt/.bin) or a JAX .npz")
        try:
            obj = torch.load(str(p), map_location="cpu", weights_only=True)
        except Exception as e:
            raise BaseModelError(f"cannot read checkpoint {p} (only tensors are accepted): {str(e).splitlines()[0]}") from None
        for key in ("state_dict_ema", "model_ema", "state_dict", "model"):
            if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
        if not isinstance(obj, dict):
            raise BaseModelError(f"checkpoint {p} does not hold a state_dict")
        sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in obj.items()
              if isinstance(v, torch.Tensor)}
    return sd


def _weights_file(path: str | Path) -> Path:
    p = Path(path)
    if not p.is_file():
        raise BaseModelError(f"weights file not found: {p}")
    return p


def _safetensors_metadata(p: Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(p), "pt") as f:
            return f.metadata() or {}
    except Exception:  # unreadable: load_file says why
        return {}


def _shape_of(sd: dict[str, torch.Tensor]) -> str:
    """What architecture a ViT state_dict holds, in words ("width 192, 12 blocks, patch 16")."""
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    if not depth or "cls_token" not in sd:
        return f"no ViT (its first tensor: {next(iter(sd), 'none')})"
    patch = sd["patch_embed.proj.weight"].shape[-1] if "patch_embed.proj.weight" in sd else "?"
    return f"width {sd['cls_token'].shape[-1]}, {depth} blocks, patch {patch}"


def _mismatch(weights: Path, name: str, sd: dict[str, torch.Tensor], model: nn.Module) -> str:
    """One line naming both sides of a weights file that does not fit the named model."""
    made_for = _safetensors_metadata(weights).get("model") if weights.suffix == ".safetensors" else None
    fix = f"use --model {made_for}" if made_for and made_for != name else "name the model it was made for with --model"
    return (f"weights file {weights}{f' (made for {made_for})' if made_for else ''} does not fit '{name}': "
            f"the file holds {_shape_of(sd)}, '{name}' is {_shape_of(dict(model.state_dict()))}; {fix}")


def _grid_from_pos_embed(sd: dict[str, torch.Tensor], patch: int, prefix_tokens: int) -> int | None:
    pe = sd.get("pos_embed")
    if pe is None or pe.dim() != 3:
        return None
    n = pe.shape[1] - prefix_tokens
    g = int(math.isqrt(n))
    return g * patch if g * g == n else None


def build_model(name: str, weights: str | Path | None = None, *, pretrained: bool = False,
                img_size: int | None = None) -> nn.Module:
    """A timm ViT with the classifier removed (``num_classes=0``), weights loaded, not yet frozen."""
    check_model_name(name)
    sd = None
    kwargs = {}
    if weights is not None and Path(weights).suffix != ".npz":
        sd = read_state_dict(weights)
        probe = typed(create(name, pretrained=False, num_classes=0))
        size = _grid_from_pos_embed(sd, probe.patch_embed.patch_size[0], probe.num_prefix_tokens)
        if size is not None and size != probe.patch_embed.img_size[0]:
            kwargs["img_size"] = size
    elif img_size is not None:
        kwargs["img_size"] = img_size
    offline = pretrained and prefer_offline_hub()
    try:
        model = create(name, pretrained=pretrained, num_classes=0, **kwargs)
    except Exception as e:  # pretrained weights neither reachable nor cached, bad kwargs
        if offline:
            from huggingface_hub import constants

            raise BaseModelError(f"cannot load pretrained '{name}': the model hub ({constants.ENDPOINT}) is not "
                                 f"reachable from this machine (or HF_HUB_OFFLINE is set) and the weights are not in "
                                 f"its local cache; "
                                 f"pass --weights FILE instead") from None
        raise BaseModelError(f"cannot build '{name}': {str(e).splitlines()[0]}") from None
    if weights is not None:
        if Path(weights).suffix == ".npz":
            try:
                typed(model).load_pretrained(str(_weights_file(weights)))
            except BaseModelError:
                raise
            except Exception as e:  # not a JAX ViT checkpoint, or one of another shape
                raise BaseModelError(f"cannot load JAX weights {weights} into '{name}': {str(e).splitlines()[0]}") from None
        else:
            raw = {k: v for k, v in sd.items() if not k.startswith(HEAD_PREFIXES)}
            own = model.state_dict()
            # compared before timm's filter, which would resample a patch embedding of another size
            if any(k in own and own[k].shape != v.shape for k, v in raw.items()):
                raise BaseModelError(_mismatch(Path(weights), name, raw, model))
            try:
                from timm.models.vision_transformer import checkpoint_filter_fn

                sd = checkpoint_filter_fn(raw, model)
            except Exception:  # the filter only converts foreign layouts; a timm dict passes as is
                sd = raw
            missing, unexpected = model.load_state_dict(sd, strict=False)
            missing = [k for k in missing if not k.startswith(HEAD_PREFIXES)]
            if missing or unexpected:
                if _shape_of(raw) != _shape_of(dict(own)):
                    raise BaseModelError(_mismatch(Path(weights), name, raw, model))
                what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
                raise BaseModelError(f"weights file {weights} does not fit '{name}': {what}")
    if not hasattr(model, "blocks") or not all(hasattr(b, "attn") and hasattr(b.attn, "qkv") for b in typed(model).blocks):
        raise BaseModelError(f"'{name}' has no fused qkv attention blocks")
    return model


def prefer_offline_hub(timeout_s: float = 3.0) -> bool:
    """Put the Hugging Face hub client in offline mode when its endpoint (or the proxy in the way)
    does not answer a TCP connect within `timeout_s`: a cached download still loads, and a missing
    one fails at once instead of after the client's retries (most of a minute). True when offline."""
    import os

    from huggingface_hub import constants

    if not constants.HF_HUB_OFFLINE and not _reachable(_hub_address(constants.ENDPOINT), timeout_s):
        os.environ["HF_HUB_OFFLINE"] = "1"  # for anything that reads the variable later
        constants.HF_HUB_OFFLINE = True  # the client read the variable at import; it asks this at every call
    return constants.HF_HUB_OFFLINE


def _hub_address(endpoint: str) -> tuple[str, int]:
    import os
    from urllib.parse import urlsplit

    proxy = next((os.environ[v] for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy") if os.environ.get(v)),
                 None)
    url = urlsplit(proxy if proxy and "://" in proxy else f"http://{proxy}" if proxy else endpoint)
    return url.hostname or "", url.port or (443 if url.scheme == "https" else 80)


def _reachable(address: tuple[str, int], timeout_s: float) -> bool:
    """A TCP connect, name resolution included, within timeout_s (resolution ignores socket timeouts,
    so the attempt runs in a thread that is abandoned when late)."""
    import socket
    import threading

    answer: list[bool] = []

    def attempt():
        try:
            socket.create_connection(address, timeout=timeout_s).close()
            answer.append(True)
        except OSError:
            answer.append(False)

    t = threading.Thread(target=attempt, daemon=True)
    t.start()
    t.join(timeout_s)
    return bool(answer and answer[0])


def fingerprint(model: nn.Module) -> str:
    """sha256 over (name, dtype, shape, bytes) of every backbone tensor, sorted by name, in float32."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        if k.startswith(HEAD_PREFIXES):
            continue
        t = v.detach().to("cpu", torch.float32).contiguous()
        h.update(k.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def load_base(name: str, weights: str | Path | None = None, *, pretrained: bool = False,
              img_size: int | None = None) -> BaseModel:
    """Build, load, freeze and fingerprint a base (float32 on the CPU; the engine moves it)."""
    if weights is None and not pretrained:
        raise BaseModelError("a base needs --weights FILE (or --pretrained where a model hub is reachable)")
    model = freeze(build_model(name, weights, pretrained=pretrained, img_size=img_size))
    fp = fingerprint(model)
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    mean = tuple(float(x) for x in cfg.get("mean", (0.5, 0.5, 0.5)))
    std = tuple(float(x) for x in cfg.get("std", (0.5, 0.5, 0.5)))
    vit = typed(model)
    size = int(vit.patch_embed.img_size[0])
    spec = BaseSpec(model=name, fingerprint=fp, embed_dim=int(vit.embed_dim), depth=len(vit.blocks))
    n = sum(p.numel() for k, p in model.named_parameters() if not k.startswith(HEAD_PREFIXES))
    return BaseModel(name=name, model=model, spec=spec, input_size=size,
                     preprocess=Preprocess(size, mean, std, 3), num_params=n)


def init_weights_file(name: str, seed: int, out: str | Path, *, img_size: int | None = None) -> Path:
    """Write a reproducible random-init timm state_dict (its own 1000-class head included) as safetensors."""
    check_model_name(name)
    from .adapter import atomic_write
    from safetensors.torch import save

    torch.manual_seed(seed)
    kwargs = {"img_size": img_size} if img_size else {}
    model = create(name, pretrained=False, **kwargs)
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    out = Path(out)
    atomic_write(out, save(sd, metadata={"model": name, "seed": str(seed)}))
    return out
