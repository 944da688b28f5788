"""`medlego bench`: the numbers a hospital team checks on its own hardware, every ratio from one run.

Sections:
  1. throughput and latency vs batch size — base alone; one adapter; all-distinct adapters;
     a Med-LEGO merged adapter; PEFT's mixed-batch forward on equivalent adapters; switch per
     request (fold → run → unfold); on the CPU, ONNX Runtime on one adapter folded into an
     exported model (paired with the mixed batch round by round), and the mixed batch in bfloat16
     where the CPU has native bf16 matmuls (AVX512-BF16, AMX), with its agreement with float32;
  2. cold-load and swap latency (p50/p99) per tier: disk → host, host → device, device hit;
  3. pool memory per resident adapter and how many fit in a memory budget;
  4. scale: many registered adapters, fewer resident, batches drawn uniformly from all of them;
  5. merge time, factor space vs dense (benchmarks/merge_speed.py);
  6. optional: end-to-end HTTP latency against a running server (--http URL).
Writes bench.json, bench.md and bench.png (throughput vs batch size per method) to --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import math
import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from medlego.runtime.adapter import BaseSpec, Preprocess, TaskSpec
from medlego.runtime.base import BaseModel, init_weights_file, load_base
from medlego.runtime.config import EngineConfig
from medlego.runtime.engine import Engine
from medlego.runtime.model import pooled_features
from medlego.runtime.registry import Registry
from medlego.jobs.synthetic import random_adapter

from . import merge_speed
from .baselines import OrtFolded, SwitchPerRequest, onnxruntime_available, peft_model
from .common import OUT_HELP, hardware, percentile, summary, time_call, write_json, results_dir


@dataclass
class BenchConfig:
    model: str = "vit_small_patch16_224"
    weights: str | None = None  # None: a random-init base is written to a temp folder
    img_size: int | None = None
    device: str = "cpu"
    kernel: str = "auto"  # the engine's --kernel
    cuda_graphs: bool = False
    batch_sizes: tuple[int, ...] = (1, 8, 32)
    distinct: int = 64  # registered adapters for the all-distinct run
    merge_sources: int = 7
    rank: int = 4
    repeats: int = 3
    load_repeats: int = 50
    scale_registered: int = 1000
    scale_resident: int = 256
    scale_batch: int = 32
    scale_batches: int = 10
    memory_budget_gib: float = 1.0
    cold_load_dim: int = 768  # cold-load measured on vit_base-shaped adapters (the issue's goal)
    cold_load_depth: int = 12
    merge_dim: int = 768
    http: str | None = None
    http_adapter: str | None = None
    http_requests: int = 50
    cpu_bf16: bool = True  # on a CPU with native bf16 matmuls, also time the mixed batch in bfloat16
    progress: bool = True
    quick: bool = False

    @staticmethod
    def quick_config(**kw) -> "BenchConfig":
        c = BenchConfig(model="vit_tiny_patch16_224", img_size=32, batch_sizes=(1, 4), distinct=8, merge_sources=3,
                        repeats=2, load_repeats=10, scale_registered=40, scale_resident=16, scale_batch=8,
                        scale_batches=2, cold_load_dim=192, merge_dim=192, quick=True)
        for k, v in kw.items():
            setattr(c, k, v)
        return c


@dataclass
class Progress:
    enabled: bool
    total: int
    bar: object = field(default=None)

    def __post_init__(self):
        if self.enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, desc="bench", unit="step", disable=None)  # None: off when not a terminal

    def step(self, what: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(what)
            self.bar.update(1)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _weights(cfg: BenchConfig, workdir: Path) -> Path:
    if cfg.weights is not None:
        return Path(cfg.weights)
    return init_weights_file(cfg.model, 0, workdir / "base.safetensors", img_size=cfg.img_size)


def cpu_has_bf16() -> bool:
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _adapters(base: BaseModel, n: int, rank: int, seed0: int = 0):
    task = lambda i: [TaskSpec(f"t{i}", tuple(f"c{j}" for j in range(2 + i % 7)))]  # noqa: E731
    return [random_adapter(base.spec, base.preprocess, rank=rank, seed=seed0 + i, tasks=task(i)) for i in range(n)]


ORT_NAME = "ONNX Runtime: one folded adapter"
MIXED_NAME = "engine: all-distinct adapters"
BF16_NAME = "engine: all-distinct adapters, bfloat16"


def throughput_section(cfg, base, engine, adapters, merged_name, prog, workdir: Path, engine_bf16=None) -> dict:
    """images/s and latency per batch for each method at each batch size, and every round's time."""
    s = base.input_size
    results: dict[str, dict] = {}
    pm = peft_model(base.model, adapters[:max(cfg.batch_sizes)]) if max(cfg.batch_sizes) <= len(adapters) else None
    if pm is not None:  # on the engine's device and dtype: the comparison the goals name (≥ 3× on a GPU)
        pm = pm.to(cfg.device, engine.dtype)
    switch = SwitchPerRequest(base.model)
    ort = OrtFolded(base, adapters[0], workdir) if cfg.device == "cpu" and onnxruntime_available() else None
    vit = base.model
    head = adapters[0].heads[adapters[0].tasks[0].name]
    with torch.no_grad():
        for bs in cfg.batch_sizes:
            g = torch.Generator().manual_seed(bs)
            x = torch.randn(bs, 3, s, s, generator=g).to(cfg.device, engine.dtype)
            images = list(x.unbind(0))
            distinct_refs = [f"a{i % cfg.distinct}" for i in range(bs)]
            one_refs = ["a0"] * bs
            runs = {
                "base alone": lambda: torch.nn.functional.linear(pooled_features(vit, x), head.weight.to(x), head.bias.to(x)),
                "engine: one adapter": lambda: engine.infer(images, one_refs),
                MIXED_NAME: lambda: engine.infer(images, distinct_refs),
                "engine: merged adapter": lambda: engine.infer(images, [merged_name] * bs, ["t0"] * bs),
                "switch per request": lambda: switch.run(x, [adapters[i % len(adapters)] for i in range(bs)]),
            }
            if pm is not None:
                names = [f"a{i}" for i in range(bs)]
                runs["PEFT mixed batch (adapter_names)"] = lambda: pm(x, adapter_names=names)
            if ort is not None:
                runs[ORT_NAME] = lambda: ort.run(x)
            if engine_bf16 is not None:
                runs[BF16_NAME] = lambda: engine_bf16.infer(images, distinct_refs)
            # methods are interleaved round by round and the best round counts, so that load from
            # elsewhere on a shared machine hits every method alike instead of one of them
            secs: dict[str, list[float]] = {name: [] for name in runs}
            for name, fn in runs.items():
                time_call(fn, repeats=0, warmup=1, device=cfg.device)
            for _ in range(cfg.repeats):
                for name, fn in runs.items():
                    secs[name] += time_call(fn, repeats=1, warmup=0, device=cfg.device)
            for name in runs:
                best = min(secs[name])
                results.setdefault(name, {})[str(bs)] = {"images_per_s": bs / best, "batch_latency_s": best,
                                                          "median_s": summary(secs[name])["median_s"],
                                                          "rounds_s": secs[name]}
                prog.step(f"{name} b{bs}")
    return results


def bf16_agreement(cfg, base, engine, engine_bf16) -> dict:
    """How far the bfloat16 engine's answers are from float32's on the same mixed batch."""
    bs, s = max(cfg.batch_sizes), base.input_size
    x = torch.randn(bs, 3, s, s, generator=torch.Generator().manual_seed(1))
    refs = [f"a{i % cfg.distinct}" for i in range(bs)]
    ours, theirs = engine.infer(x, refs), engine_bf16.infer(x, refs)
    diffs = [abs(a.probabilities[k] - b.probabilities[k]) for a, b in zip(ours, theirs)
             for k in (a.probabilities or {})]
    same_top = sum(a.top[0][0] == b.top[0][0] for a, b in zip(ours, theirs) if a.top and b.top)
    return {"images": bs, "max_abs_probability_diff": max(diffs), "top1_agreement": same_top / bs,
            "random_init_base": cfg.weights is None}


def cold_load_section(cfg, workdir: Path, prog) -> dict:
    """Disk → host, host → device and device-hit latency, on adapters of vit_base shape (no weights needed)."""
    from medlego.runtime.pool import AdapterPool

    d, depth = cfg.cold_load_dim, cfg.cold_load_depth
    spec = BaseSpec(f"shape-d{d}-L{depth}", "0" * 64, d, depth)
    pp = Preprocess(224, (0.5,) * 3, (0.5,) * 3)
    reg = Registry(workdir / "coldload")
    n = cfg.load_repeats
    entries = [reg.register(f"c{i}", random_adapter(spec, pp, rank=cfg.rank, seed=1000 + i).to_bytes()) for i in range(n)]
    pool = AdapterPool(spec, slots=4, max_rank=max(cfg.rank, 4), host_capacity=n + 1, device=cfg.device)
    disk, host, hit = [], [], []
    for e in entries:
        t0 = time.perf_counter()
        h = pool.host(e.sha256, lambda: reg.read_bytes(e))  # noqa: B023 (called at once)
        t1 = time.perf_counter()
        pool.acquire([(h, False)])
        if cfg.device.startswith("cuda"):
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        pool.acquire([(h, False)])
        t3 = time.perf_counter()
        disk.append(t1 - t0)
        host.append(t2 - t1)
        hit.append(t3 - t2)
    prog.step("cold load")
    total = [a + b for a, b in zip(disk, host)]
    ms = lambda v: {"p50_ms": 1000 * percentile(v, 50), "p99_ms": 1000 * percentile(v, 99)}  # noqa: E731
    return {"adapter_shape": {"dim": d, "depth": depth, "rank": cfg.rank}, "file_bytes": entries[0].size,
            "disk_to_host": ms(disk), "host_to_device": ms(host), "device_hit": ms(hit), "cold_to_ready": ms(total),
            "goal_p50_ms": 2.0, "goal_met": percentile(total, 50) * 1000 <= 2.0}


def memory_section(cfg, engine) -> dict:
    pool = engine.pool
    per_slot = pool.bytes_per_slot
    budget = int(cfg.memory_budget_gib * 2 ** 30)
    d, depth = engine.base.embed_dim, engine.base.depth
    r4 = depth * 2 * cfg.rank * (2 * d + 1) * pool.lora_a.element_size()
    return {"dtype": str(pool.dtype).replace("torch.", ""), "pool_max_rank": pool.max_rank, "bytes_per_slot": per_slot,
            "bytes_per_rank4_adapter_packed_exactly": r4, "budget_bytes": budget,
            "adapters_in_budget_at_pool_rank": budget // per_slot, "adapters_in_budget_at_rank4": budget // r4}


def scale_section(cfg, base, workdir: Path, prog) -> dict:
    reg = Registry(workdir / "scale")
    ads = _adapters(base, cfg.scale_registered, cfg.rank, seed0=5000)
    for i, ad in enumerate(ads):
        reg.register(f"s{i}", ad.to_bytes())
    prog.step("scale: registered")
    engine = Engine(base, reg, EngineConfig(device=cfg.device, slots=cfg.scale_resident, max_rank=max(cfg.rank, 4),
                                            host_capacity=cfg.scale_registered + 1, max_pass_images=cfg.scale_batch))
    rng = random.Random(0)
    s = base.input_size
    x = torch.randn(cfg.scale_batch, 3, s, s).to(cfg.device, engine.dtype)
    images = list(x.unbind(0))
    t0 = time.perf_counter()
    for e in reg.list():  # first touch of every adapter: disk -> host
        engine.resolve(e.name)
    first_touch = time.perf_counter() - t0
    batches = [[f"s{rng.randrange(cfg.scale_registered)}" for _ in range(cfg.scale_batch)] for _ in range(cfg.scale_batches)]
    one = [["s0"] * cfg.scale_batch] * cfg.scale_batches
    time_call(lambda: engine.infer(images, batches[0]), repeats=1, warmup=0, device=cfg.device)

    def run(bs_list):
        t = time.perf_counter()
        for refs in bs_list:
            engine.infer(images, refs)
        return cfg.scale_batch * len(bs_list) / (time.perf_counter() - t)

    uniform, single = run(batches), run(one)
    prog.step("scale")
    snap = engine.counters
    return {"registered": cfg.scale_registered, "resident_slots": cfg.scale_resident, "batch": cfg.scale_batch,
            "uniform_images_per_s": uniform, "one_adapter_images_per_s": single, "ratio": uniform / single,
            "first_touch_all_s": first_touch, "device_misses": snap.get("pool_misses", tier="device"),
            "device_evictions": snap.get("pool_evictions", tier="device")}


def http_section(cfg, prog) -> dict:
    import httpx
    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (224, 224), dtype=np.uint8)).save(buf, format="PNG")
    png = buf.getvalue()
    lat, errors = [], 0
    with httpx.Client(base_url=cfg.http, timeout=30) as client:
        for _ in range(cfg.http_requests):
            t0 = time.perf_counter()
            r = client.post("/v1/diagnose", files={"file": ("x.png", png, "image/png")}, data={"adapter": cfg.http_adapter})
            lat.append(time.perf_counter() - t0)
            errors += r.status_code != 200
    prog.step("http")
    return {"url": cfg.http, "adapter": cfg.http_adapter, "requests": len(lat), "errors": errors,
            "p50_ms": 1000 * percentile(lat, 50), "p99_ms": 1000 * percentile(lat, 99)}


def run_bench(cfg: BenchConfig) -> dict:
    from medlego.runtime.adapter_merge import merge_adapters

    steps = len(cfg.batch_sizes) * 8 + 4 + (1 if cfg.http else 0)
    prog = Progress(cfg.progress, steps)
    with tempfile.TemporaryDirectory(prefix="medlego-bench-") as tmp:
        work = Path(tmp)
        weights = _weights(cfg, work)
        base = load_base(cfg.model, weights)
        reg = Registry(work / "registry")
        adapters = _adapters(base, cfg.distinct, cfg.rank)
        for i, ad in enumerate(adapters):
            reg.register(f"a{i}", ad.to_bytes())
        merged, _ = merge_adapters(adapters[:cfg.merge_sources], "med-lego")
        reg.register("merged", merged.to_bytes())
        max_rank = max(16, merged.max_rank)
        config = EngineConfig(device=cfg.device, slots=max(cfg.distinct, 8) + 1, max_rank=max_rank,
                              max_pass_images=max(cfg.batch_sizes), kernel=cfg.kernel, cuda_graphs=cfg.cuda_graphs)
        engine = Engine(base, reg, config)
        engine.warmup()
        engine_bf16 = None
        if cfg.device == "cpu" and cfg.cpu_bf16 and cpu_has_bf16():  # its own copy of the base: an engine casts it
            engine_bf16 = Engine(load_base(cfg.model, weights), reg, dataclasses.replace(config, dtype="bfloat16"))
            engine_bf16.warmup()
        prog.step("setup")
        results = {
            "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.__dict__.items()},
            "hardware": hardware(),
            "base": {"model": base.name, "input_size": base.input_size, "params": base.num_params,
                     "engine_dtype": str(engine.dtype).replace("torch.", ""), "kernel": engine.kernel_report(),
                     "pool_max_rank": max_rank, "merged_adapter_max_rank": merged.max_rank},
            "throughput": throughput_section(cfg, base, engine, adapters, "merged", prog, work, engine_bf16),
            "cold_load": cold_load_section(cfg, work, prog),
            "memory": memory_section(cfg, engine),
            "scale": scale_section(cfg, base, work, prog),
        }
        if engine_bf16 is not None:
            results["bf16_agreement"] = bf16_agreement(cfg, base, engine, engine_bf16)
        m = merge_speed.run(sources=7 if not cfg.quick else 3, dim=cfg.merge_dim, depth=12 if not cfg.quick else 2,
                            rank=cfg.rank, repeats=2)
        results["merge"] = m
        prog.step("merge")
        if cfg.http:
            results["http"] = http_section(cfg, prog)
    prog.close()
    results["goals"] = goals(results)
    return results


def goals(r: dict) -> list[dict]:
    tp = r["throughput"]
    big = str(max(int(b) for b in tp["base alone"]))
    base = tp["base alone"][big]["images_per_s"]
    mixed = tp[MIXED_NAME][big]["images_per_s"]
    out = [{"issue": 5, "what": f"mixed batch (every image a different adapter) vs base alone, batch {big}",
            "ratio": mixed / base, "goal": "≥ 0.97×", "met": mixed / base >= 0.97}]
    peft_name = "PEFT mixed batch (adapter_names)"
    if peft_name in tp:
        peft = tp[peft_name][big]["images_per_s"]
        gpu = r["config"]["device"].startswith("cuda")
        out.append({"issue": 5, "what": f"engine vs PEFT mixed-batch forward, batch {big}", "ratio": mixed / peft,
                    "goal": "≥ 3×" if gpu else "≥ 1.1×", "met": mixed / peft >= (3 if gpu else 1.1)})
    if ORT_NAME in tp and "rounds_s" in tp[ORT_NAME][big]:
        pr = paired_ratio(tp[ORT_NAME][big]["rounds_s"], tp[MIXED_NAME][big]["rounds_s"])
        out.append({"issue": 30, "what": f"mixed batch ({r['config']['distinct']} adapters, every image a different one) "
                    f"vs ONNX Runtime on one folded adapter, batch {big}: median of {pr['rounds']} paired rounds "
                    f"(range {pr['min']:.2f}–{pr['max']:.2f}, engine ahead in {pr['ahead']} of {pr['rounds']})",
                    "ratio": pr["median"], "goal": "≥ 1.0×", "met": pr["median"] >= 1.0, "paired": pr})
        if BF16_NAME in tp:
            pb = paired_ratio(tp[ORT_NAME][big]["rounds_s"], tp[BF16_NAME][big]["rounds_s"])
            ag = r["bf16_agreement"]
            out.append({"issue": 30, "what": f"the same mixed batch in bfloat16 (`[engine] dtype`) vs ONNX Runtime in "
                        f"float32, batch {big}: median of {pb['rounds']} paired rounds (range {pb['min']:.2f}–"
                        f"{pb['max']:.2f}); probabilities within {ag['max_abs_probability_diff']:.3g} of float32's, "
                        f"top-1 the same for {ag['top1_agreement']:.0%}", "ratio": pb["median"], "goal": "(reported)",
                        "met": None, "paired": pb})
    cl = r["cold_load"]
    out.append({"issue": 5, "what": f"cold load disk→ready, d={cl['adapter_shape']['dim']} r={cl['adapter_shape']['rank']}, p50 ms",
                "ratio": cl["cold_to_ready"]["p50_ms"], "goal": "≤ 2 ms", "met": cl["goal_met"]})
    sc = r["scale"]
    out.append({"issue": 5, "what": f"{sc['registered']} registered / {sc['resident_slots']} resident, uniform vs one adapter",
                "ratio": sc["ratio"], "goal": "(reported)", "met": None})
    mg = r["merge"]
    out.append({"issue": 4, "what": f"merge {mg['sources']}×d={mg['dim']} r={mg['rank']}: factor space vs dense",
                "ratio": mg["speedup"], "goal": "≥ 10×", "met": mg["goal_met"]})
    if not r["config"]["device"].startswith("cuda"):
        out.append({"issue": 6, "what": "fused kernel vs F.linear / vs unfused; engine vs base on CUDA",
                    "ratio": None, "goal": "≤ 1.10× / ≥ 1.3× / ≥ 0.97×", "met": None,
                    "note": "not measured: no GPU here (python -m medlego.benchmarks.kernel_bench on a GPU)"})
    return out


def paired_ratio(baseline_s: list[float], ours_s: list[float]) -> dict:
    """Throughput ratio ours/baseline per interleaved round (the two ran back to back in each round,
    so load from elsewhere hits both alike), summarised by its median and range."""
    ratios = sorted(b / o for b, o in zip(baseline_s, ours_s))
    n = len(ratios)
    median = ratios[n // 2] if n % 2 else (ratios[n // 2 - 1] + ratios[n // 2]) / 2
    return {"rounds": n, "median": median, "min": ratios[0], "max": ratios[-1],
            "ahead": sum(x > 1.0 for x in ratios), "ratios": ratios}


def kernel_summary(rep: dict | str) -> str:
    """One line of the engine's kernel report: the forced path, or the measured choice per batch size."""
    if isinstance(rep, str):  # results written before the kernel choice existed
        return f"`{rep}`"
    graphs = ", CUDA graphs" if rep.get("cuda_graphs") else ""
    if "kernel" in rep:
        return f"`{rep['kernel']}` ({rep['mode']}{graphs})"
    chosen = ", ".join(f"{b}→{c['kernel']}" for b, c in rep.get("by_batch", {}).items())
    return f"auto, measured per batch: {chosen or 'nothing yet'}{graphs}"


def ort_text(r: dict) -> str:
    """The paired rounds against ONNX Runtime, and the bfloat16 run's agreement with float32."""
    text = (f"ONNX Runtime ran one adapter folded into the model `medlego export` writes "
            f"({r['hardware']['torch_threads']} intra-op threads, all graph optimisations), back to back with "
            f"the engine's mixed batch in each interleaved round. Engine/ORT throughput per round, sorted:")
    for g in (g for g in r["goals"] if "paired" in g):
        pr = g["paired"]
        label = "bfloat16" if "bfloat16" in g["what"] else "float32"
        text += f" {label} " + ", ".join(f"{x:.3f}" for x in pr["ratios"]) + f" (median **{pr['median']:.3f}×**);"
    if "bf16_agreement" in r:
        ag = r["bf16_agreement"]
        text += (f" bfloat16 vs float32 on {ag['images']} images: largest probability difference "
                 f"{ag['max_abs_probability_diff']:.3g}, same top-1 label for {ag['top1_agreement']:.0%}"
                 + (" (a random-init base, whose near-uniform answers flip easily)." if ag["random_init_base"] else "."))
    return text.rstrip(";")


def to_markdown(r: dict) -> str:
    hw = r["hardware"]
    lines = [f"# medlego bench — {r['base']['model']} at {r['base']['input_size']} px, {r['base']['engine_dtype']}, "
             f"kernel {kernel_summary(r['base']['kernel'])}", "",
             f"Hardware: {hw.get('gpu') or hw['cpu']} ({hw['cores']} cores, {hw['torch_threads']} torch threads); "
             f"torch {hw['torch']}, triton {hw['triton']}, Python {hw['python']}.", "",
             "## Goals", "", "| issue | what | measured | goal | met |", "| --- | --- | ---: | --- | --- |"]
    for g in r["goals"]:
        val = "—" if g["ratio"] is None else f"{g['ratio']:.3g}"
        met = {True: "yes", False: "**no**", None: "—"}[g["met"]]
        lines.append(f"| {g['issue']} | {g['what']}{' (' + g['note'] + ')' if g.get('note') else ''} | {val} | {g['goal']} | {met} |")
    tp = r["throughput"]
    sizes = list(next(iter(tp.values())).keys())

    def table(title: str, cell) -> list[str]:
        out = ["", title, "", "| method | " + " | ".join(f"b={b}" for b in sizes) + " |",
               "| --- | " + " | ".join("---:" for _ in sizes) + " |"]
        return out + [f"| {name} | " + " | ".join(cell(per[b]) for b in sizes) + " |" for name, per in tp.items()]

    lines += table("## Throughput (images/s) by batch size", lambda v: f"{v['images_per_s']:.1f}")
    lines += table("## Batch latency (ms, best of the interleaved rounds)", lambda v: f"{1000 * v['batch_latency_s']:.1f}")
    cl = r["cold_load"]
    lines += ["", f"## Adapter load latency (d={cl['adapter_shape']['dim']}, {cl['adapter_shape']['depth']} blocks, "
                  f"r={cl['adapter_shape']['rank']}, file {cl['file_bytes']:,} bytes)", "", "| tier | p50 ms | p99 ms |",
              "| --- | ---: | ---: |"]
    for k in ("disk_to_host", "host_to_device", "device_hit", "cold_to_ready"):
        lines.append(f"| {k.replace('_', ' ')} | {cl[k]['p50_ms']:.3f} | {cl[k]['p99_ms']:.3f} |")
    mem, sc = r["memory"], r["scale"]
    rank = r["config"]["rank"]
    sections = [
        ("Pool memory",
         f"{mem['bytes_per_slot']:,} bytes per device slot ({mem['dtype']}, pool rank {mem['pool_max_rank']}); "
         f"{mem['bytes_per_rank4_adapter_packed_exactly']:,} bytes for an r={rank} adapter at its own rank. "
         f"In {r['config']['memory_budget_gib']} GiB: {mem['adapters_in_budget_at_pool_rank']:,} adapters at the "
         f"pool's rank, {mem['adapters_in_budget_at_rank4']:,} at r={rank}."),
        ("Scale",
         f"{sc['registered']} registered, {sc['resident_slots']} device slots, batch {sc['batch']} drawn uniformly: "
         f"{sc['uniform_images_per_s']:.1f} images/s vs {sc['one_adapter_images_per_s']:.1f} with one adapter "
         f"(**{sc['ratio']:.3f}×**); first touch of all adapters (disk → host) {sc['first_touch_all_s']:.2f} s; "
         f"{int(sc['device_evictions'])} device evictions."),
        ("Merge", merge_speed.to_markdown(r["merge"])),
    ]
    if any("paired" in g for g in r["goals"]):
        sections.append(("Against ONNX Runtime", ort_text(r)))
    if "http" in r:
        h = r["http"]
        sections.append(("End-to-end HTTP", f"{h['requests']} requests to {h['url']} ({h['adapter']}): "
                         f"p50 {h['p50_ms']:.1f} ms, p99 {h['p99_ms']:.1f} ms, {h['errors']} errors."))
    for title, text in sections:
        lines += ["", f"## {title}", "", text]
    return "\n".join(lines) + "\n"


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, per in r["throughput"].items():
        xs = [int(b) for b in per]
        ax.plot(xs, [per[b]["images_per_s"] for b in per], marker="o", label=name)
    ax.set(xscale="log", xlabel="batch size (images)", ylabel="images / s",
           title=f"{r['base']['model']} {r['base']['input_size']}px on {r['hardware'].get('gpu') or 'CPU'}")
    ax.set_xticks([int(b) for b in next(iter(r["throughput"].values()))])
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_all(r: dict, out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "bench.json", "md": out / "bench.md", "png": out / "bench.png"}
    write_json(r, paths["json"])
    paths["md"].write_text(to_markdown(r))
    plot(r, paths["png"])
    return paths


def all_finite(obj) -> bool:
    if isinstance(obj, dict):
        return all(all_finite(v) for v in obj.values())
    if isinstance(obj, list):
        return all(all_finite(v) for v in obj)
    if isinstance(obj, float):
        return math.isfinite(obj)
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(p)
    return run_from_args(p.parse_args(argv))


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="tiny model, small counts: a CI-sized run (< 1 min)")
    p.add_argument("--model", help="timm ViT name (default vit_small_patch16_224; --quick: vit_tiny at 32 px)")
    p.add_argument("--weights", help="base weights file (default: a random-init base written to a temp folder)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 …")
    p.add_argument("--kernel", choices=["auto", "fused", "split", "torch"], default="auto",
                   help="the engine's qkv path (auto: measured per batch size on CUDA, the reference on CPU)")
    p.add_argument("--cuda-graphs", action="store_true", help="replay the trunk from CUDA graphs (CUDA only)")
    p.add_argument("--batch-sizes", help="comma-separated images per batch (default 1,8,32; --quick: 1,4)")
    p.add_argument("--repeats", type=int, help="timed repetitions per measurement (default 3; --quick: 2)")
    p.add_argument("--http", metavar="URL", help="also measure POST /v1/diagnose latency against this server")
    p.add_argument("--http-adapter", metavar="NAME", help="adapter to name in the HTTP requests")
    p.add_argument("--out", default=None, metavar="DIR", help="folder for bench.json, bench.md, bench.png " + OUT_HELP[len("folder for the results "):])
    p.add_argument("--no-progress", action="store_true", help="no progress bar (it is off in a pipe anyway)")
    p.add_argument("--no-bf16", action="store_true",
                   help="skip the bfloat16 run of the mixed batch (default: on a CPU with native bf16 matmuls)")


def run_from_args(a) -> int:
    cfg = BenchConfig.quick_config() if a.quick else BenchConfig()
    if a.model:
        cfg.model = a.model
        cfg.img_size = None if not a.quick else cfg.img_size
    if a.weights:
        cfg.weights = a.weights
    cfg.device, cfg.kernel, cfg.cuda_graphs = a.device, a.kernel, a.cuda_graphs
    if a.batch_sizes:
        cfg.batch_sizes = tuple(int(x) for x in a.batch_sizes.split(","))
    if a.repeats:
        cfg.repeats = a.repeats
    if a.http:
        if not a.http_adapter:
            from medlego.runtime.errors import BadInputError

            raise BadInputError("--http needs --http-adapter NAME")
        cfg.http, cfg.http_adapter = a.http, a.http_adapter
    cfg.progress = not a.no_progress
    cfg.cpu_bf16 = not a.no_bf16
    r = run_bench(cfg)
    paths = write_all(r, Path(a.out or results_dir()))
    print(to_markdown(r))
    print("wrote " + ", ".join(str(v) for v in paths.values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
