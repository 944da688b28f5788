"""GPU benchmark of the fused qkv + SVD-LoRA kernel (issue 6), one command:

    python -m medlego.benchmarks.kernel_bench --out benchmarks/results

For vit_base (D=768) and vit_large (D=1024) shapes × 197 tokens, batch 1/8/64/256 images, with
1, 8 and all-distinct adapters (r=4 in a pool of rank 16), bf16: the fused kernel vs cuBLAS plain
qkv (F.linear, no LoRA) vs the unfused PyTorch path (the reference), timed with CUDA events via
triton.testing.do_bench; then the whole engine's mixed-adapter throughput vs the base alone.
Goals: fused ≤ 1.10× F.linear's time, ≥ 1.3× faster than unfused, engine ≥ 0.97× base.

``--interpret`` runs the same logic on tiny CPU shapes under TRITON_INTERPRET=1 (a smoke test of
the script itself, not a measurement).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def _bench(fn, device):
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100) / 1000.0
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def kernel_rows(dims, batches, mixes, tokens, dtype, device, slots=256, pool_rank=16, rank=4):
    import torch
    import torch.nn.functional as F

    from medlego.kernels.plan import BatchPlan
    from medlego.kernels.qkv_lora_triton import qkv_lora_triton
    from medlego.kernels.reference import qkv_lora_reference

    rows = []
    for d in dims:
        w = torch.randn(3 * d, d, device=device, dtype=dtype) / d ** 0.5
        bias = torch.randn(3 * d, device=device, dtype=dtype)
        a = torch.zeros(slots, 2, pool_rank, d, device=device, dtype=dtype)
        e = torch.zeros(slots, 2, pool_rank, device=device, dtype=dtype)
        b = torch.zeros(slots, 2, d, pool_rank, device=device, dtype=dtype)
        a[:, :, :rank] = torch.randn(slots, 2, rank, d, device=device, dtype=dtype) * 0.05
        e[:, :, :rank] = 1.0
        b[:, :, :, :rank] = torch.randn(slots, 2, d, rank, device=device, dtype=dtype) * 0.05
        for n in batches:
            x = torch.randn(n, tokens, d, device=device, dtype=dtype)
            for mix in mixes:
                k = {"1": 1, "8": 8, "distinct": n}[mix]
                plan = BatchPlan.build([i % min(k, slots) for i in range(n)], device=device, max_rank=pool_rank)
                y_f = qkv_lora_triton(x, w, bias, a, e, b, plan)
                y_r = qkv_lora_reference(x, w, bias, a, e, b, plan)
                err = float((y_f.float() - y_r.float()).abs().max() / y_r.float().abs().max())
                t_lin = _bench(lambda: F.linear(x, w, bias), device)
                t_fused = _bench(lambda: qkv_lora_triton(x, w, bias, a, e, b, plan), device)
                t_unfused = _bench(lambda: qkv_lora_reference(x, w, bias, a, e, b, plan), device)
                rows.append({"dim": d, "images": n, "adapters": mix, "linear_ms": 1e3 * t_lin, "fused_ms": 1e3 * t_fused,
                             "unfused_ms": 1e3 * t_unfused, "fused_over_linear": t_fused / t_lin,
                             "unfused_over_fused": t_unfused / t_fused, "max_rel_err": err})
    return rows


def engine_rows(device, dtype_name, batch, model, img_size=None):
    import tempfile

    import torch

    from medlego.runtime.base import init_weights_file, load_base
    from medlego.runtime.engine import Engine, EngineConfig
    from medlego.runtime.model import pooled_features
    from medlego.runtime.registry import Registry
    from medlego.runtime.synthetic import random_adapter

    with tempfile.TemporaryDirectory() as tmp:
        base = load_base(model, init_weights_file(model, 0, Path(tmp) / "b.safetensors", img_size=img_size))
        reg = Registry(Path(tmp) / "r")
        for i in range(batch):
            reg.register(f"a{i}", random_adapter(base.spec, base.preprocess, seed=i).to_bytes())
        eng = Engine(base, reg, EngineConfig(device=device, dtype=dtype_name, slots=batch + 1, max_batch=batch))
        eng.warmup()
        s = base.input_size
        x = torch.randn(batch, 3, s, s, device=device, dtype=eng.dtype)
        imgs = list(x.unbind(0))
        refs = [f"a{i}" for i in range(batch)]
        eng.infer(imgs, refs)
        with torch.no_grad():
            t_base = _bench(lambda: pooled_features(base.model, x), device)
        t_eng = _bench(lambda: eng.infer(imgs, refs), device)
        return {"model": model, "batch": batch, "kernel": eng.qkv_fn.__name__, "base_images_per_s": batch / t_base,
                "engine_mixed_images_per_s": batch / t_eng, "ratio": t_base / t_eng}


def to_markdown(res) -> str:
    lines = [f"# Fused kernel benchmark on {res['device_name']} ({res['dtype']})", "",
             "| D | images | adapters | F.linear ms | fused ms | unfused ms | fused / linear (goal ≤ 1.10) | unfused / fused (goal ≥ 1.3) | max rel err |",
             "| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in res["kernel"]:
        lines.append(f"| {r['dim']} | {r['images']} | {r['adapters']} | {r['linear_ms']:.3f} | {r['fused_ms']:.3f} | "
                     f"{r['unfused_ms']:.3f} | {r['fused_over_linear']:.3f} | {r['unfused_over_fused']:.2f} | {r['max_rel_err']:.1e} |")
    e = res["engine"]
    lines += ["", f"Engine ({e['model']}, batch {e['batch']}, all-distinct adapters, kernel `{e['kernel']}`): "
              f"{e['engine_mixed_images_per_s']:.1f} images/s vs base alone {e['base_images_per_s']:.1f} "
              f"→ **{e['ratio']:.3f}×** (goal ≥ 0.97×)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--interpret", action="store_true", help="tiny CPU shapes under TRITON_INTERPRET=1 (script smoke test)")
    a = p.parse_args(argv)
    if a.interpret:
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    from medlego.benchmarks.common import hardware, write_json

    if a.interpret:
        device, dtype, name = "cpu", torch.float32, "CPU (Triton interpreter, not a measurement)"
        res = {"kernel": kernel_rows([32], [1, 2], ["1", "distinct"], 9, dtype, device, slots=4, pool_rank=4, rank=2),
               "engine": engine_rows("cpu", "float32", 2, "vit_tiny_patch16_224", img_size=32)}
    else:
        if not torch.cuda.is_available():
            print("kernel_bench needs a CUDA GPU (or --interpret for a CPU smoke test)", file=sys.stderr)
            return 2
        device, dtype, name = "cuda", torch.bfloat16, torch.cuda.get_device_name(0)
        res = {"kernel": kernel_rows([768, 1024], [1, 8, 64, 256], ["1", "8", "distinct"], 197, dtype, device),
               "engine": engine_rows("cuda", "bfloat16", 64, "vit_base_patch16_224")}
    res.update(device_name=name, dtype=str(dtype).replace("torch.", ""), hardware=hardware())
    out = Path(a.out)
    stem = "kernel_bench_interpret" if a.interpret else "kernel_bench"
    write_json(res, out / f"{stem}.json")
    (out / f"{stem}.md").write_text(to_markdown(res))
    print(to_markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
