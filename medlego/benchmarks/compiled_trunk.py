"""Would a compiled trunk beat ONNX Runtime on the CPU? (issue 30: "≥ 1.2× if a compiled trunk gets there")

Times, interleaved round by round on the same batch (every image a different adapter):

* the plain trunk (no adapters), eager and under ``torch.compile`` (inductor): the most a compiled
  trunk with adapters could reach, since it does the same work plus the low-rank terms;
* the adapted trunk with the engine's own per-image path (``AdaptedViT.features`` with a
  ``PackedSource`` over one slot per image), eager and compiled;
* both eager forms again with the trunk's Linears on ``F.linear`` (MKL's addmm, then a separate
  GELU) instead of the engine's oneDNN path (:func:`medlego.kernels.reference.dense`): what that path gains;
* ONNX Runtime on one adapter folded into the model ``medlego export`` writes.

Each method's throughput over ORT's is taken per round (the two ran back to back) and summarised
by its median and range. The compiled forward is checked against the eager one before timing.

    python -m medlego.benchmarks.compiled_trunk [--model vit_small_patch16_224] [--batch 32] [--rounds 9] [--out DIR]

Writes ``compiled_trunk.{json,md}`` into ``--out`` (default ``./medlego-results``).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from medlego.kernels.reference import onednn_linears
from medlego.runtime.base import init_weights_file, load_base
from medlego.runtime.lora import PackedSource
from medlego.runtime.model import AdaptedViT, pooled_features

from .baselines import OrtFolded
from .bench import _adapters, paired_ratio
from .common import OUT_HELP, hardware, results_dir, uptime, write_json

ORT = "ONNX Runtime, one folded adapter"
PLAIN = ", F.linear"  # the suffix of the rows with the trunk's Linears on F.linear (not oneDNN)


def _plain_linears(fn):
    def run():
        with onednn_linears(False):
            return fn()
    return run


def run(model: str, batch: int, rounds: int, img_size: int | None = None) -> dict:
    with tempfile.TemporaryDirectory(prefix="medlego-compiled-") as tmp:
        base = load_base(model, init_weights_file(model, 0, Path(tmp) / "base.safetensors", img_size=img_size))
        adapters = _adapters(base, batch, 4)
        ort = OrtFolded(base, adapters[0], Path(tmp))
    adapted = AdaptedViT(base)
    vit = base.model.eval()
    source = PackedSource.for_adapters(adapters, list(range(batch)))
    s = base.input_size
    x = torch.randn(batch, 3, s, s, generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    compiled_base = torch.compile(lambda px: pooled_features(vit, px))
    compiled_mixed = torch.compile(lambda px: adapted.features(px, source))
    with torch.no_grad():
        eager = adapted.features(x, source)
        diff = float((compiled_mixed(x) - eager).abs().max())
        compiled_base(x)
        compile_s = time.perf_counter() - t0
        with onednn_linears(False):
            diff_plain = float((adapted.features(x, source) - eager).abs().max())
        runs = {"trunk alone, eager": lambda: pooled_features(vit, x),
                "trunk alone, eager" + PLAIN: _plain_linears(lambda: pooled_features(vit, x)),
                "trunk alone, torch.compile": lambda: compiled_base(x),
                "mixed batch, eager": lambda: adapted.features(x, source),
                "mixed batch, eager" + PLAIN: _plain_linears(lambda: adapted.features(x, source)),
                "mixed batch, torch.compile": lambda: compiled_mixed(x),
                ORT: lambda: ort.run(x)}
        secs: dict[str, list[float]] = {name: [] for name in runs}
        for fn in runs.values():
            fn()
        load_before = uptime()
        for _ in range(rounds):
            for name, fn in runs.items():
                t = time.perf_counter()
                fn()
                secs[name].append(time.perf_counter() - t)
    methods = {name: {"images_per_s_best": batch / min(v), "rounds_s": v,
                      "vs_ort": paired_ratio(secs[ORT], v)} for name, v in secs.items()}
    return {"model": model, "input_size": s, "batch": batch, "rounds": rounds, "hardware": hardware(),
            "compile_s": compile_s, "compiled_max_abs_diff": diff, "plain_linears_max_abs_diff": diff_plain,
            "load_before": load_before, "load_after": uptime(),
            "methods": methods}


def to_markdown(r: dict) -> str:
    lines = [f"# A compiled trunk vs ONNX Runtime — {r['model']} at {r['input_size']} px, batch {r['batch']}, CPU", "",
             f"{r['hardware']['cpu']}, {r['hardware']['torch_threads']} torch threads (ORT: as many intra-op threads); "
             f"torch {r['hardware']['torch']}. {r['rounds']} interleaved rounds; compile took {r['compile_s']:.0f} s; "
             f"the compiled mixed batch is within {r['compiled_max_abs_diff']:.2g} of the eager one, the eager one on "
             f"F.linear within {r.get('plain_linears_max_abs_diff', float('nan')):.2g} of it on oneDNN.", "",
             f"Load: before `{r['load_before']}`; after `{r['load_after']}`.", "",
             "| method | best images/s | vs ORT, median of paired rounds | range |", "| --- | ---: | ---: | --- |"]
    for name, m in r["methods"].items():
        v = m["vs_ort"]
        lines.append(f"| {name} | {m['images_per_s_best']:.1f} | {v['median']:.3f}× | {v['min']:.3f}–{v['max']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_small_patch16_224")
    p.add_argument("--img-size", type=int, default=None, help="input size (default: the model's)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--out", default=None, help=OUT_HELP)
    a = p.parse_args(argv)
    r = run(a.model, a.batch, a.rounds, a.img_size)
    out = Path(a.out or results_dir())
    write_json(r, out / "compiled_trunk.json")
    (out / "compiled_trunk.md").write_text(to_markdown(r))
    print(to_markdown(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
