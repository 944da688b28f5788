"""Cold-load latency of one adapter: registry resolve → node (page cache) → host copy → device slot.

For each of N registered adapters, none of them in the pool and every file in the OS page cache
(read once beforehand), times what a request for a cold adapter costs the server:
``Registry.resolve`` + the store's read + ``AdapterPool.host`` (parse, validate, pack) +
``AdapterPool.acquire`` (the copy into a device slot) — the work of ``Engine.resolve`` and of the
batch's acquire, without the loader thread's hand-off. Each stage is timed too. Default: vit_base
shapes (d = 768, depth 12), rank 4, the embedded SQLite index and folder store, on the CPU device
(the device copy is then a memcpy).

    python -m medlego.benchmarks.cold_load [-n 500] [--model vit_base] [--out DIR] [--label after]

Writes ``cold_load.{json,md}`` into ``--out`` (default ``./medlego-results``); with ``--label`` the
run is added to the file's runs, replacing a run of the same label. ``legacy_total`` is the path as
it was before issue 30 (sha256 on every read, safetensors' copying load), timed alternately with
the current one on the same adapters, so that a shared machine's load falls on both alike.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from medlego.benchmarks.common import OUT_HELP, hardware, percentile, results_dir, uptime, write_json

SHAPES = {"vit_base": (768, 12), "vit_small": (384, 12), "vit_tiny": (192, 12)}


def _stats(times: list[float]) -> dict:
    return {"p50_ms": round(1e3 * percentile(times, 50), 4), "p99_ms": round(1e3 * percentile(times, 99), 4),
            "mean_ms": round(1e3 * sum(times) / len(times), 4), "n": len(times)}


def measure(model: str, n: int, rank: int, root: Path) -> dict:
    from medlego.jobs.synthetic import random_adapter
    from medlego.runtime.adapter import BaseSpec, Preprocess
    from medlego.runtime.pool import AdapterPool
    from medlego.runtime.registry import Registry

    d, depth = SHAPES[model]
    base = BaseSpec(f"{model}_patch16_224", "ab" * 32, d, depth)
    pre = Preprocess(224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    reg = Registry(root, base=base)
    reg.register_many([(f"a{i:05d}", random_adapter(base, pre, rank=rank, seed=i).to_bytes()) for i in range(n)])
    for e in reg.list():  # every file in the page cache: the node tier, warm
        reg.read_bytes(e)
    pool, legacy_pool = (AdapterPool(base, slots=64, max_rank=16, host_capacity=n + 1) for _ in range(2))
    stages: dict[str, list[float]] = {k: [] for k in ("resolve", "read", "host", "acquire", "total", "legacy_total")}
    root_store = root / "store"
    for i in range(n):  # the two paths alternate, adapter by adapter: the machine's load falls on both alike
        t0 = time.perf_counter()
        entry = reg.resolve(f"a{i:05d}")
        t1 = time.perf_counter()
        data = reg.read_bytes(entry)
        t2 = time.perf_counter()
        host = pool.host(entry.sha256, lambda: data)
        t3 = time.perf_counter()
        pool.acquire([(host, False)])
        t4 = time.perf_counter()
        for k, v in zip(stages, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0)):
            stages[k].append(v)
        stages["legacy_total"].append(_legacy(reg, legacy_pool, f"a{i:05d}", root_store))
    return {k: _stats(v[5:]) for k, v in stages.items()}  # the first few: imports, first statements


def _legacy(reg, pool, ref: str, store: Path) -> float:
    """The cold load as it was before issue 30, step by step: sha256 of every read, and safetensors'
    own load (a copy per tensor) before the same validation and packing; seconds."""
    from safetensors.torch import load as st_load

    from medlego.runtime.adapter import _build, _parse_metadata, read_header, sha256_hex
    from medlego.runtime.lora import pack_adapter
    from medlego.runtime.pool import HostAdapter

    t0 = time.perf_counter()
    entry = reg.resolve(ref)
    data = (store / f"{entry.sha256}.safetensors").read_bytes()
    assert sha256_hex(data) == entry.sha256
    adapter = _build(_parse_metadata(read_header(data).get("__metadata__") or {}), st_load(data),
                     expected_base=pool.base, max_rank=pool.max_rank)
    a, e, b = pack_adapter(adapter, None, pool.dtype, "cpu")
    heads = {name: (h.weight.to(pool.device, pool.dtype), h.bias.to(pool.device, pool.dtype))
             for name, h in adapter.heads.items()}
    pool.acquire([(HostAdapter(entry.sha256, adapter.tasks, adapter.preprocess, a, e, b, heads), False)])
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("-n", type=int, default=500, help="cold adapters, each loaded once")
    ap.add_argument("--model", choices=sorted(SHAPES), default="vit_base")
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--label", default="run", help="name of this run in the results file (e.g. before, after)")
    ap.add_argument("--out", type=Path, default=None, help=OUT_HELP)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="medlego-cold-") as tmp:
        stages = measure(args.model, args.n, args.rank, Path(tmp))
    run = {"label": args.label, "model": args.model, "rank": args.rank, "stages": stages, "uptime": uptime(),
           "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    out = args.out or results_dir()
    path = out / "cold_load.json"
    doc: dict = json.loads(path.read_text()) if path.is_file() else {"runs": []}
    doc["runs"] = [r for r in doc["runs"] if r["label"] != args.label] + [run]
    doc["hardware"] = hardware()
    write_json(doc, path)
    (out / "cold_load.md").write_text(_markdown(doc))
    print(json.dumps(run, indent=1))
    return run


def _markdown(doc: dict) -> str:
    lines = ["# Cold adapter load: resolve → page cache → host copy → device slot", "",
             "`python -m medlego.benchmarks.cold_load` (CPU device; every file in the page cache; "
             f"{os.cpu_count()} cores, shared machine: load average per run).", "",
             "| run | model r | stage | p50 ms | p99 ms | mean ms |", "|---|---|---|---:|---:|---:|"]
    for r in doc["runs"]:
        for stage, s in r["stages"].items():
            lines.append(f"| {r['label']} | {r['model']} r={r['rank']} | {stage} | {s['p50_ms']:.3f} | "
                         f"{s['p99_ms']:.3f} | {s['mean_ms']:.3f} |")
    lines += ["", "Load while measuring:", ""] + [f"- {r['label']}: `{r['uptime']}`" for r in doc["runs"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
