"""The engine's mixed-adapter batch against per-image folded weights, on every qkv path and dtype.

    python -m medlego.benchmarks.gpu_correctness --device cuda --out benchmarks/results   # vit_base at 224 px
    python -m medlego.benchmarks.gpu_correctness --quick                                   # CPU check (CI)

One batch, image n with adapter n mod k (every third image with none), through ``Engine.infer``
for each path (torch reference, fused, split, auto) × dtype (float32, bfloat16) × CUDA graphs off
and (on CUDA) on. The oracle is independent of the engine's LoRA code: for each adapter a deep
copy of the timm model with ΔW = B·diag(E)·A added to its qkv weight (``fold_adapter``), run in
float32, its head applied. Reported per run: the largest probability error, and the largest
effect of the adapters (folded vs the base with the same head), so that a small error is not
small only because the adapters do nothing. Writes ``gpu_correctness.{json,md}``; exit 1 on a
failure.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from .common import OUT_HELP, results_dir, write_json

TOL = {"float32": 2e-3, "bfloat16": 3e-2}  # on probabilities; bf16 keeps 8 bits of mantissa
MIN_EFFECT = 0.05  # the adapters must move some probability at least this much


def _oracle(base, adapters, images, refs, device):
    """Probabilities (or, without an adapter, features) of each image from folded fp32 weights."""
    from medlego.runtime.model import fold_adapter, pooled_features

    vit = base.model.to(device, torch.float32)
    x = images.to(device, torch.float32)
    out, effect = [], 0.0
    folded = {}
    with torch.inference_mode():
        plain = pooled_features(vit, x)
        for n, ref in enumerate(refs):
            if ref is None:
                out.append(plain[n])
                continue
            ad = adapters[ref]
            if ref not in folded:
                folded[ref] = fold_adapter(vit, ad)
            f = pooled_features(folded[ref], x[n:n + 1])[0]
            task = ad.tasks[0]
            head = ad.heads[task.name]
            w, b = head.weight.float().to(device), head.bias.float().to(device)
            p = torch.softmax(f @ w.T + b, -1)
            effect = max(effect, float((p - torch.softmax(plain[n] @ w.T + b, -1)).abs().max()))
            out.append(p)
    return out, effect


def run(device: str, model: str, img_size: int | None, batch: int, kinds: int, kernels: list[str], dtypes: list[str],
        graphs: list[bool], scale: float) -> dict:
    from medlego.jobs.synthetic import random_adapter
    from medlego.runtime.base import init_weights_file, load_base
    from medlego.runtime.config import EngineConfig
    from medlego.runtime.engine import Engine
    from medlego.runtime.registry import Registry

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        wfile = init_weights_file(model, 0, Path(tmp) / "b.safetensors", img_size=img_size)
        base = load_base(model, wfile)
        reg = Registry(Path(tmp) / "reg")
        adapters = {}
        for k in range(kinds):
            ranks = [1 + (k + i) % 8 for i in range(2 * base.depth)]  # mixed ranks, up to 8
            ad = random_adapter(base.spec, base.preprocess, rank=ranks, seed=k, scale=scale)
            reg.register(f"a{k}", ad.to_bytes())
            adapters[f"a{k}"] = ad
        s = base.input_size
        images = torch.randn(batch, 3, s, s, generator=torch.Generator().manual_seed(1))
        refs = [None if n % 3 == 2 else f"a{n % kinds}" for n in range(batch)]
        want, effect = _oracle(base, adapters, images, refs, device)
        for dtype in dtypes:
            for kernel in kernels:
                for g in graphs:
                    if g and kernel == "torch":
                        continue  # graphs need a Triton path
                    base = load_base(model, wfile)  # a fresh module per engine (the oracle moved its own)
                    t0 = time.perf_counter()
                    eng = Engine(base, reg, EngineConfig(device=device, dtype=dtype, kernel=kernel, cuda_graphs=g,
                                                         max_pass_images=max(8, batch), slots=kinds + 1,
                                                         kernel_cache=str(Path(tmp) / "k.json")))
                    eng.warmup()
                    got = eng.infer(images, refs)
                    got = eng.infer(images, refs)  # a second time: graphs replay, slots already resident
                    err = 0.0
                    for n, (d, w) in enumerate(zip(got, want)):
                        if refs[n] is None:
                            e = torch.tensor(d.embedding) - w.float().cpu()
                            err_n = float(e.abs().max() / w.abs().max().cpu())
                        else:
                            p = torch.tensor([d.probabilities[lab] for lab in adapters[refs[n]].tasks[0].labels])
                            err_n = float((p - w.cpu()).abs().max())
                        err = max(err, err_n)
                    ok = err <= TOL[dtype] and effect >= MIN_EFFECT
                    rows.append({"dtype": dtype, "kernel": kernel, "cuda_graphs": g, "max_error": err,
                                 "adapter_effect": effect, "tolerance": TOL[dtype], "ok": ok,
                                 "chosen": eng.kernel_report(), "seconds": time.perf_counter() - t0})
                    print(f"{dtype:9s} {kernel:6s} graphs={g!s:5s} max error {err:.2e} (effect {effect:.3f}) "
                          f"{'ok' if ok else 'FAILED'}", flush=True)
                    del eng
    name = torch.cuda.get_device_name(0) if device.startswith("cuda") else "CPU"
    return {"device": device, "device_name": name, "model": model, "input_size": s, "batch": batch, "adapters": kinds,
            "torch": torch.__version__, "rows": rows, "ok": all(r["ok"] for r in rows)}


def to_markdown(res: dict) -> str:
    lines = [f"# Engine mixed batch vs per-image folded weights on {res['device_name']}", "",
             f"{res['model']} at {res['input_size']} px, batch {res['batch']} over {res['adapters']} adapters of mixed "
             f"ranks (every third image without an adapter), torch {res['torch']}. Error: the largest |p − p_folded| "
             "over the batch (features, relative, for images without an adapter); effect: the largest probability the "
             "adapters move.", "", "| dtype | kernel | CUDA graphs | max error | tolerance | adapter effect | ok |",
             "| --- | --- | --- | ---: | ---: | ---: | --- |"]
    for r in res["rows"]:
        lines.append(f"| {r['dtype']} | {r['kernel']} | {'on' if r['cuda_graphs'] else 'off'} | {r['max_error']:.2e} | "
                     f"{r['tolerance']:.0e} | {r['adapter_effect']:.3f} | {'yes' if r['ok'] else '**no**'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true", help="CPU, vit_tiny at 32 px, float32, Triton in its interpreter")
    p.add_argument("--out", default=None, metavar="DIR", help=OUT_HELP)
    a = p.parse_args(argv)
    if a.quick:
        import os

        os.environ.setdefault("TRITON_INTERPRET", "1")
        res = run("cpu", "vit_tiny_patch16_224", 32, 5, 3, ["torch", "fused", "split"], ["float32"], [False], 0.5)
        stem = "gpu_correctness_quick"
    else:
        if a.device.startswith("cuda") and not torch.cuda.is_available():
            print("gpu_correctness needs a CUDA GPU (or --quick for the CPU check)", file=sys.stderr)
            return 2
        res = run(a.device, "vit_base_patch16_224", None, 24, 8, ["torch", "fused", "split", "auto"],
                  ["float32", "bfloat16"], [False, True], 0.3)
        stem = "gpu_correctness"

    out = Path(a.out or results_dir())
    write_json(res, out / f"{stem}.json")
    (out / f"{stem}.md").write_text(to_markdown(res))
    print(to_markdown(res))
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
