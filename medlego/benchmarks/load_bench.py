"""Load benchmark: the served system vs the engine called in-process, 32 adapters uniformly mixed.

    python -m medlego.benchmarks.load_bench                       # embedded, then Ray Serve with one replica
    python -m medlego.benchmarks.load_bench --replicas 1,2        # Ray with one, then two replicas
    python -m medlego.benchmarks.load_bench --modes embedded --rounds 0 --label before   # light load only

One run: build a base (``--model`` at ``--img-size``, seeded random weights) and a registry of
``--adapters`` random SVD-LoRA adapters (ranks 2..8); encode ``--images`` distinct PNGs; draw a
plan of ``--requests`` (image, adapter) pairs with adapters uniform at random. The reference is the
engine's own ``infer`` on the preprocessed plan, in batches of ``--max-batch``, in this process: it
gives the answer for every pair and the throughput to match. Then, per mode:

* **embedded**: ``EmbeddedServer`` (REST) in this process;
* **ray**: a local Ray Serve deployment per count in ``--replicas`` (engine replicas behind the
  FastAPI ingress, adapter-affine routing; several replicas split the cores);

each loaded from a *separate process* on loopback: ``--concurrency`` requests in flight (closed
loop), ``--requests`` per round (a bounded load), multipart PNG uploads to ``/v1/diagnose``,
``--rounds`` rounds, each bracketed by in-process runs (the machine may be shared, so every ratio
is taken against the reference measured beside it); then a light load (``--light-concurrency``
in flight) for latency, beside the engine alone on one batch of that size (its floor). Every
answer is checked against the in-process answer for its image and adapter (adapter, sha256,
task, every probability within 1e-4). Reported: throughput (images/s) and its ratio to the
in-process engine and to the embedded server, p50/p99 latency, the median of each stage of the
answers' ``timings_ms``, the load average at each start, errors, mismatches; ``--baseline``
adds earlier runs' light-load rows (before/after a change).
Results: ``load_bench.{json,md}`` under ``--out`` (default ``./medlego-results/``; ``--out benchmarks/results/load_bench`` replaces the committed ones).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from medlego.benchmarks.common import OUT_HELP, results_dir

TOLERANCE = 1e-4


# -- the load generator (runs in its own process) ---------------------------------------------------
async def _client_main(url: str, plan: list, images_dir: Path, concurrency: int, out: Path) -> None:
    """Closed-loop load: `concurrency` requests in flight until the plan is done.

    aiohttp (a dependency of Ray Serve) is used when present: it costs the shared CPU far less
    per request than httpx (measured here: ~7 ms of client CPU per request with httpx), so the
    numbers are about the server, not the load generator."""
    images = {i: (images_dir / f"{i}.png").read_bytes() for i in {i for i, _ in plan}}
    try:
        import aiohttp
    except ImportError:
        aiohttp = None
    results: list = [None] * len(plan)
    queue = list(enumerate(plan))[::-1]

    async def post_aiohttp(session, image, adapter):
        form = aiohttp.FormData()
        form.add_field("file", images[image], filename=f"{image}.png", content_type="image/png")
        form.add_field("adapter", adapter)
        async with session.post(url + "/v1/diagnose", data=form) as r:
            return r.status, (await r.json() if r.content_type == "application/json" else await r.text())

    async def post_httpx(client, image, adapter):
        r = await client.post("/v1/diagnose", files={"file": (f"{image}.png", images[image])}, data={"adapter": adapter})
        return r.status_code, (r.json() if r.headers.get("content-type", "").startswith("application/json") else r.text)

    async def worker(session, post):
        while queue:
            n, (image, adapter) = queue.pop()
            t0 = time.perf_counter()
            try:
                status, body = await post(session, image, adapter)
            except Exception as e:  # a transport error counts as an error, never a crash of the generator
                status, body = -1, f"{type(e).__name__}: {e}"
            t1 = time.perf_counter()
            if status == 200:
                body = {k: body.get(k) for k in ("adapter", "version", "sha256", "task", "probabilities", "replica",
                                                  "multiplex_hit", "timings_ms")}
            results[n] = {"status": status, "latency_s": t1 - t0, "body": body}

    t_start = time.perf_counter()
    if aiohttp is not None:
        connector = aiohttp.TCPConnector(limit=concurrency)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=300)) as session:
            await asyncio.gather(*[worker(session, post_aiohttp) for _ in range(concurrency)])
    else:
        import httpx

        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
            await asyncio.gather(*[worker(client, post_httpx) for _ in range(concurrency)])
    wall = time.perf_counter() - t_start
    out.write_text(json.dumps({"wall_s": wall, "results": results, "client": "aiohttp" if aiohttp else "httpx"}))


def run_client_process(url: str, plan: list, images_dir: Path, concurrency: int, work: Path) -> dict:
    plan_file, out_file = work / "plan.json", work / f"client-{time.time_ns()}.json"
    plan_file.write_text(json.dumps(plan))
    cmd = [sys.executable, "-m", "medlego.benchmarks.load_bench", "--client", "--url", url, "--plan", str(plan_file),
           "--images-dir", str(images_dir), "--concurrency", str(concurrency), "--client-out", str(out_file)]
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads(out_file.read_text())


# -- setup ---------------------------------------------------------------------------------------
def build_world(args, work: Path):
    import torch

    from medlego.runtime.base import init_weights_file, load_base
    from medlego.runtime.registry import Registry
    from medlego.jobs.synthetic import random_adapter
    from medlego.jobs.synthetic import encode_png, random_image

    weights = init_weights_file(args.model, 0, work / "base.safetensors", img_size=args.img_size)
    base = load_base(args.model, weights)
    data = work / "registry"
    reg = Registry(data, base=base.spec)
    names = [f"adapter{i:02d}" for i in range(args.adapters)]
    for i, name in enumerate(names):
        reg.register(name, random_adapter(base.spec, base.preprocess, rank=2 + (i % 4) * 2, seed=1000 + i).to_bytes())
    images_dir = work / "images"
    images_dir.mkdir()
    for i in range(args.images):
        (images_dir / f"{i}.png").write_bytes(encode_png(random_image(i, args.img_size)))
    rng = np.random.default_rng(args.seed)
    plans = [[(int(rng.integers(args.images)), names[int(rng.integers(len(names)))]) for _ in range(n)]
             for n in (args.requests, args.light_requests)]
    torch.manual_seed(0)
    return weights, data, images_dir, names, plans


class InProcess:
    """The engine alone: answers for the plan and images/s (inference calls only, inputs preprocessed)."""

    def __init__(self, args, weights, data, images_dir, names, plan):
        from medlego.runtime.base import load_base
        from medlego.runtime.engine import Engine, EngineConfig
        from medlego.runtime.imaging import decode_image, preprocess
        from medlego.runtime.registry import Registry

        self.plan, self.max_batch = plan, args.max_batch
        base = load_base(args.model, weights)
        self.engine = Engine(base, Registry(data, base=base.spec), EngineConfig(slots=64))
        self.engine.warmup()
        pp = self.engine.resolve(names[0]).preprocess
        self.tensors = {i: preprocess(decode_image((images_dir / f"{i}.png").read_bytes()), pp)
                        for i in range(args.images)}
        for name in names:  # adapters resident first: the servers are warmed the same way
            self.engine.infer(self.tensors[0].unsqueeze(0), [name])

    def run(self, plan: list | None = None) -> tuple[list, float]:
        import torch

        plan = self.plan if plan is None else plan
        answers = []
        t0 = time.perf_counter()
        for s in range(0, len(plan), self.max_batch):
            chunk = plan[s:s + self.max_batch]
            answers += self.engine.infer(torch.stack([self.tensors[i] for i, _ in chunk]), [a for _, a in chunk])
        elapsed = time.perf_counter() - t0
        return [{"adapter": d.adapter, "sha256": d.sha256, "task": d.task, "probabilities": d.probabilities}
                for d in answers], len(plan) / elapsed

    def batch_ms(self, n: int, repeats: int = 9) -> float:
        """Median ms of one `infer` of the plan's first `n` images: the floor of a light-load latency."""
        import torch

        chunk = self.plan[:n]
        pixels, refs = torch.stack([self.tensors[i] for i, _ in chunk]), [a for _, a in chunk]
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            self.engine.infer(pixels, refs)
            times.append(time.perf_counter() - t0)
        return round(float(np.median(times)) * 1000, 1)


def check(results: list, expected: list) -> tuple[int, int, list]:
    errors, mismatches, examples = 0, 0, []
    for n, (r, exp) in enumerate(zip(results, expected)):
        if r["status"] != 200:
            errors += 1
            if len(examples) < 3:
                examples.append(f"request {n}: {r['status']} {str(r['body'])[:200]}")
            continue
        b = r["body"]
        same = (b["adapter"] == exp["adapter"] and b["sha256"] == exp["sha256"] and b["task"] == exp["task"]
                and set(b["probabilities"]) == set(exp["probabilities"])
                and all(abs(b["probabilities"][k] - v) <= TOLERANCE for k, v in exp["probabilities"].items()))
        if not same:
            mismatches += 1
            if len(examples) < 3:
                examples.append(f"request {n}: got {b['adapter']} {b['probabilities']}, expected {exp['probabilities']}")
    return errors, mismatches, examples


def stage_medians(bodies: list[dict], latencies_ms: np.ndarray) -> dict:
    """Median ms per stage of the server's own timings, and the rest of the client's latency.

    ``outside_server``: client latency minus the server's ``total`` (HTTP, the event loop before
    the handler, Ray's proxy and ingress, the client itself)."""
    timings = [b.get("timings_ms") or {} for b in bodies]
    keys = sorted({k for t in timings for k in t})
    out = {k: round(float(np.median([t[k] for t in timings if k in t])), 1) for k in keys}
    totals = np.array([t.get("total", np.nan) for t in timings])
    if np.isfinite(totals).all():
        out["outside_server"] = round(float(np.median(latencies_ms - totals)), 1)
    return out


def summarize(mode: str, run: dict, expected: list, extra: dict | None = None) -> dict:
    results = run["results"]
    ok = [r for r in results if r["status"] == 200]
    lat = np.array([r["latency_s"] for r in ok]) * 1000
    errors, mismatches, examples = check(results, expected)
    throughput = len(results) / run["wall_s"]
    out = {"mode": mode, "requests": len(results), "wall_s": round(run["wall_s"], 3),
           "throughput_img_s": round(throughput, 2),
           "p50_ms": round(float(np.percentile(lat, 50)), 1) if len(lat) else None,
           "p99_ms": round(float(np.percentile(lat, 99)), 1) if len(lat) else None,
           "errors": errors, "mismatches": mismatches, "examples": examples,
           "stages_ms": stage_medians([r["body"] for r in ok], lat) if ok else {}}
    if ok and ok[0]["body"].get("replica"):
        bodies = [r["body"] for r in ok]
        out["replicas"] = sorted({b["replica"] for b in bodies})
        out["multiplex_hit_ratio"] = round(sum(bool(b.get("multiplex_hit")) for b in bodies) / len(bodies), 3)
    out.update(extra or {})
    return out


def load_average() -> float:
    """The 1-minute load average: how busy the shared machine was (this run's own processes included)."""
    return round(os.getloadavg()[0], 2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _warm(url: str, names: list, images_dir: Path) -> None:
    """One request per adapter before timing (the in-process engine is warmed the same way)."""
    import httpx

    png = (images_dir / "0.png").read_bytes()
    with httpx.Client(base_url=url, timeout=300) as c:
        deadline = time.time() + 300
        while c.get("/readyz").status_code != 200:
            if time.time() > deadline:
                raise RuntimeError("server not ready")
            time.sleep(0.2)
        for name in names:
            r = c.post("/v1/diagnose", files={"file": ("0.png", png)}, data={"adapter": name})
            r.raise_for_status()


def measured_rounds(label: str, url: str, args, plan, light_plan, images_dir, expected, light_expected,
                    reference: InProcess | None, work: Path, extra=None) -> tuple[list[dict], dict]:
    """Per round: in-process engine, then the load on the server, then the in-process engine again;
    then the light load (latency), after a floor measurement: the engine alone on one light batch.

    The machine may be shared, so each ratio is taken against the in-process runs right beside it
    (reference None: the caller measures them, and fills the ratio and the floor in)."""
    rounds = []
    for k in range(args.rounds):
        before = reference.run()[1] if reference else float("nan")
        load = load_average()
        run = run_client_process(url, plan, images_dir, args.concurrency, work)
        extra_now = extra() if extra else {}
        after = reference.run()[1] if reference else float("nan")
        r = summarize(label, run, expected, extra_now)
        r.update(round=k + 1, load_avg=load, in_process_before_img_s=round(before, 2),
                 in_process_after_img_s=round(after, 2),
                 ratio_vs_in_process=round(r["throughput_img_s"] / ((before + after) / 2), 3))
        rounds.append(r)
        print(json.dumps({k2: v for k2, v in r.items() if k2 != "examples"}), flush=True)
    floor = reference.batch_ms(args.light_concurrency) if reference else None
    load = load_average()
    light = summarize(label, run_client_process(url, light_plan, images_dir, args.light_concurrency, work),
                      light_expected, extra() if extra else {})
    light = {k: light[k] for k in ("mode", "requests", "throughput_img_s", "p50_ms", "p99_ms", "errors", "mismatches",
                                   "stages_ms", "mean_batch_size") if k in light}
    light.update(load_avg=load, engine_batch_ms=floor)
    print(json.dumps({"light": light}), flush=True)
    return rounds, light


def run_embedded(args, weights, data, images_dir, names, plans, expected, reference, work):
    from medlego.runtime.base import load_base
    from medlego.runtime.config import BatchingConfig, EngineConfig
    from medlego.runtime.engine import Engine
    from medlego.runtime.registry import Registry
    from medlego.serving.server import EmbeddedServer
    from medlego.serving.service import DiagnosisService

    base = load_base(args.model, weights)
    engine = Engine(base, Registry(data, base=base.spec, input_size=base.input_size), EngineConfig(slots=64))
    service = DiagnosisService(engine, batching=BatchingConfig(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                                                               decode_workers=2))
    server = EmbeddedServer(service, port=0, grpc_port=None).start()
    seen = [engine.counters.observations("batch_size")]

    def batch_stats():
        count, total = engine.counters.observations("batch_size")
        c0, t0 = seen[0]
        seen[0] = (count, total)
        return {"mean_batch_size": round((total - t0) / max(1, count - c0), 2)}

    try:
        _warm(server.url, names, images_dir)
        batch_stats()
        return measured_rounds("embedded (REST)", server.url, args, plans[0], plans[1], images_dir, expected[0],
                               expected[1], reference, work, extra=batch_stats)
    finally:
        server.stop()


def run_ray(args, replicas: int, weights, data, images_dir, names, plans, expected, reference, work):
    from medlego.runtime.config import ServeConfig
    from medlego.serving.ray_app import ReplicaShape, start_local, stop_local

    cfg = ServeConfig()
    cfg.base.model, cfg.base.weights, cfg.server.data_dir = args.model, str(weights), str(data)
    cfg.server.host, cfg.server.port, cfg.server.grpc_port = "127.0.0.1", _free_port(), _free_port()
    cfg.engine.slots = 64
    cfg.batching.max_batch, cfg.batching.max_wait_ms = args.max_batch, args.max_wait_ms
    cpus = os.cpu_count() or 2
    # one replica gets what the embedded engine gets; several split the cores
    shape = ReplicaShape(replicas=replicas, cpus=cpus / replicas, torch_threads=max(1, args.torch_threads // replicas))
    label = (f"Ray Serve ({replicas} replica{'s' if replicas > 1 else ''}, {cpus} cores"
             + (", direct ingress)" if args.ray_direct_ingress else ")"))
    # Ray's own processes use CPU even when idle, so the in-process engine is measured with Ray down:
    # right before it starts and right after it stops
    _, before = reference.run()
    floor = reference.batch_ms(args.light_concurrency)
    try:
        start_local(cfg, shape, num_cpus=cpus, grpc=False, direct_ingress=args.ray_direct_ingress)
        url = f"http://127.0.0.1:{cfg.server.port}"
        _warm(url, names, images_dir)
        rounds, light = measured_rounds(label, url, args, plans[0], plans[1], images_dir, expected[0], expected[1],
                                        None, work)
    finally:
        stop_local()
    _, after = reference.run()
    for r in rounds:
        r.update(in_process_before_img_s=round(before, 2), in_process_after_img_s=round(after, 2),
                 ratio_vs_in_process=round(r["throughput_img_s"] / ((before + after) / 2), 3),
                 reference="in-process engine measured right before Ray started and right after it stopped")
    light["engine_batch_ms"] = floor
    return rounds, light


def compare_to_embedded(modes: list[dict]) -> list[dict]:
    """Each other mode against the embedded server: throughput (raw, and with each normalized by
    its own in-process reference) and the light-load p50 difference."""
    embedded = next((m for m in modes if m["mode"].startswith("embedded")), None)
    if embedded is None:
        return []
    out = []
    for m in modes:
        if m is embedded:
            continue
        c = {"mode": m["mode"], "light_p50_delta_ms": round(m["light"]["p50_ms"] - embedded["light"]["p50_ms"], 1)}
        if m["rounds"] and embedded["rounds"]:
            served = float(np.median([r["throughput_img_s"] for r in m["rounds"]]))
            base = float(np.median([r["throughput_img_s"] for r in embedded["rounds"]]))
            c.update(throughput_ratio=round(served / base, 3),
                     normalized_ratio=round(m["median_ratio"] / embedded["median_ratio"], 3))
        out.append(c)
    return out


def _stages(stages: dict) -> str:
    order = ("decode", "queue", "inference", "prepare", "total", "ingress_total", "outside_server")
    return ", ".join(f"{k} {stages[k]}" for k in order if k in stages)


def write_results(report: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    s = report["setup"]
    lines = [
        "# Load benchmark: served vs in-process engine", "",
        f"Base `{s['model']}` at {s['img_size']} px; {s['adapters']} adapters (ranks 2-8) uniformly mixed; "
        f"{s['images']} distinct {s['img_size']}x{s['img_size']} PNGs. Load: a separate client process on loopback, "
        f"closed loop with {s['concurrency']} requests in flight, {s['requests']} requests per round (multipart "
        f"uploads to `/v1/diagnose`); batcher max_batch {s['max_batch']}, max_wait {s['max_wait_ms']} ms; engine "
        f"{s['torch_threads']} torch thread(s), OMP_WAIT_POLICY {s['omp_wait_policy']}. "
        f"In-process reference: `engine.infer` on preprocessed tensors in batches of {s['max_batch']} (no decoding, "
        f"no HTTP), run right before and right after each round (for Ray: before the cluster starts and after it "
        f"stops, since its idle processes use CPU too); the ratio uses their mean. Every answer is "
        f"checked against the in-process answer for its image and adapter (abs tolerance {TOLERANCE}). "
        f"Machine: {s['machine']}; load: the 1-minute load average when the round started (this run's own "
        f"processes included).", "",
        "| mode | round | load | served (img/s) | in-process before / after (img/s) | reference drift | "
        "served / in-process | p50 (ms) | p99 (ms) | errors | mismatches | notes |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for mode in report["modes"]:
        for r in mode["rounds"]:
            notes = []
            if "mean_batch_size" in r:
                notes.append(f"mean batch {r['mean_batch_size']}")
            if "multiplex_hit_ratio" in r:
                notes.append(f"{len(r['replicas'])} replica(s), multiplex hit ratio {r['multiplex_hit_ratio']}")
            b, a = r["in_process_before_img_s"], r["in_process_after_img_s"]
            drift = abs(b - a) / ((b + a) / 2)  # large: the shared machine's load changed during the round
            lines.append(
                f"| {r['mode']} | {r['round']} | {r['load_avg']} | {r['throughput_img_s']:.2f} | {b:.2f} / {a:.2f} | "
                f"{drift:.0%} | {r['ratio_vs_in_process']:.3f} | {r['p50_ms']} | {r['p99_ms']} | "
                f"{r['errors']} | {r['mismatches']} | {', '.join(notes)} |")
    lines += ["", f"Latency under light load ({s['light_concurrency']} in flight, {s['light_requests']} requests); "
              f"engine alone: one in-process `infer` of {s['light_concurrency']} images; stages: the median ms of "
              "the answers' `timings_ms`, `outside_server` = client latency − the server's `total`:", "",
              "| mode | load | p50 (ms) | p99 (ms) | img/s | engine alone (ms) | mean batch | stages (median ms) | "
              "errors | mismatches |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |"]
    for mode in report["modes"]:
        lt = mode["light"]
        lines.append(f"| {mode['mode']} | {lt['load_avg']} | {lt['p50_ms']} | {lt['p99_ms']} | "
                     f"{lt['throughput_img_s']:.2f} | {lt['engine_batch_ms']} | {lt.get('mean_batch_size', '')} | "
                     f"{_stages(lt['stages_ms'])} | {lt['errors']} | {lt['mismatches']} |")
    lines += ["", "The machine is shared with other jobs: a round whose in-process runs before and after differ a lot "
              "(reference drift) saw the load change under it, and its ratio is unreliable.", ""]
    with_rounds = [m for m in report["modes"] if m["median_ratio"] is not None]
    if with_rounds:
        lines.append("Median served / in-process ratio per mode: " + ", ".join(
            f"{m['mode']} {m['median_ratio']:.3f}" for m in with_rounds) + " (goal ≥ 0.9).")
    for c in report["vs_embedded"]:
        throughput = (f"throughput {c['throughput_ratio']:.3f}× (each normalized by its own in-process reference: "
                      f"{c['normalized_ratio']:.3f}×; goal ≥ 0.85× for one replica), " if "throughput_ratio" in c else "")
        lines.append(f"{c['mode']} vs embedded: {throughput}light-load p50 {c['light_p50_delta_ms']:+.1f} ms "
                     "(goal within 5 ms).")
    lines += _baseline_lines(report)
    lines += ["", f"Command: `{report['command']}`", ""]
    out.with_suffix(".md").write_text("\n".join(lines))


def baseline_of(path: Path) -> dict:
    """What a previous run's report contributes to this one's light-load comparison."""
    old = json.loads(path.read_text())
    return {"label": old.get("label") or path.name, "command": old["command"],
            "modes": [{"mode": m["mode"], "light": m["light"]} for m in old["modes"]]}


def _baseline_lines(report: dict) -> list[str]:
    """This run's light-load rows beside those of the --baseline runs (before/after a change)."""
    if not report["baselines"]:
        return []
    lines = ["", "Light load, this run beside earlier runs (`--baseline`; each run's own command below):", "",
             "| run | mode | load | p50 (ms) | p99 (ms) | img/s | mean batch | stages (median ms) |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    runs = [*report["baselines"], {"label": report["label"] or "this run", "command": report["command"],
                                   "modes": report["modes"]}]
    for run in runs:
        for m in run["modes"]:
            lt = m["light"]
            # an older run's report may lack the load average and the stages (not recorded then)
            lines.append(f"| {run['label']} | {m['mode']} | {lt.get('load_avg', 'n/a')} | {lt['p50_ms']} | "
                         f"{lt['p99_ms']} | {lt['throughput_img_s']:.2f} | {lt.get('mean_batch_size', '')} | "
                         f"{_stages(lt.get('stages_ms', {}))} |")
    lines += [""] + [f"* {run['label']}: `{run['command']}`" for run in runs[:-1]]
    return lines


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_tiny_patch16_224")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--adapters", type=int, default=32)
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--requests", type=int, default=384)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--light-requests", type=int, default=64)
    p.add_argument("--light-concurrency", type=int, default=4)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--replicas", default="1",
                   help="Ray engine replicas, one Ray mode per comma-separated count (they split the cores)")
    p.add_argument("--torch-threads", type=int, default=os.cpu_count() or 1,
                   help="engine threads: the in-process reference, the embedded server, one Ray replica")
    p.add_argument("--omp-wait-policy", choices=["passive", "active", "unset"], default="unset",
                   help="OMP_WAIT_POLICY of this process and Ray's (set before torch loads OpenMP)")
    p.add_argument("--modes", default="embedded,ray")
    p.add_argument("--ray-direct-ingress", action="store_true",
                   help="Ray mode: the ingress replica serves the port itself (serving/ray_app.direct_ingress_env)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label", default="", help="what this run is (shown when a later run compares with it)")
    p.add_argument("--baseline", action="append", default=[], type=Path, metavar="JSON",
                   help="an earlier run's results: its light-load rows are shown beside this run's (repeatable)")
    p.add_argument("--out", default=None, metavar="PREFIX", help=OUT_HELP.replace("folder for the results", "path prefix of the result files") + " + /load_bench")
    p.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--url", help=argparse.SUPPRESS)
    p.add_argument("--plan", help=argparse.SUPPRESS)
    p.add_argument("--images-dir", help=argparse.SUPPRESS)
    p.add_argument("--client-out", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.client:
        plan = [tuple(x) for x in json.loads(Path(args.plan).read_text())]
        asyncio.run(_client_main(args.url, plan, Path(args.images_dir), args.concurrency, Path(args.client_out)))
        return 0
    if args.omp_wait_policy != "unset":
        os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy.upper()  # read once, when libgomp loads with torch

    import torch

    torch.set_num_threads(args.torch_threads)
    results = _run_modes(args)
    report = {
        "setup": _setup(args),
        "modes": results,
        "vs_embedded": compare_to_embedded(results),
        "label": args.label,
        "baselines": [baseline_of(path) for path in args.baseline],
        "command": shlex.join(["python", "-m", "medlego.benchmarks.load_bench",
                               *(argv if argv is not None else sys.argv[1:])]),
    }
    out = Path(args.out or results_dir() / "load_bench")
    write_results(report, out)
    print(out.with_suffix(".md").read_text())
    bad = [r for m in results for r in m["rounds"] if r["errors"] or r["mismatches"]]
    bad += [m for m in results if m["light"]["errors"] or m["light"]["mismatches"]]
    return 1 if bad else 0


def _run_modes(args) -> list[dict]:
    """Build the world once, then each mode's rounds and light-load run (embedded first, then one Ray
    mode per replica count), checked against the in-process answers."""
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    runs = [(m, None) for m in modes if m == "embedded"] + [
        ("ray", int(n)) for n in args.replicas.split(",") if "ray" in modes]
    results = []
    with tempfile.TemporaryDirectory(prefix="medlego-load-") as tmp:
        work = Path(tmp)
        weights, data, images_dir, names, plans = build_world(args, work)
        print(f"world: {args.model}@{args.img_size}, {len(names)} adapters, {len(plans[0])} requests per round",
              flush=True)
        reference = InProcess(args, weights, data, images_dir, names, plans[0])
        expected = [reference.run(plans[0])[0], reference.run(plans[1])[0]]
        for mode, replicas in runs:
            world = (weights, data, images_dir, names, plans, expected, reference, work)
            rounds, light = (run_embedded(args, *world) if mode == "embedded" else run_ray(args, replicas, *world))
            ratios = [r["ratio_vs_in_process"] for r in rounds]
            results.append({"mode": light["mode"], "rounds": rounds, "light": light,
                            "median_ratio": round(float(np.median(ratios)), 3) if ratios else None})
    return results


def _setup(args) -> dict:
    import torch

    return {"model": args.model, "img_size": args.img_size, "adapters": args.adapters, "images": args.images,
            "requests": args.requests, "concurrency": args.concurrency, "rounds": args.rounds,
            "light_requests": args.light_requests, "light_concurrency": args.light_concurrency,
            "max_batch": args.max_batch, "max_wait_ms": args.max_wait_ms, "replicas": args.replicas,
            "torch_threads": args.torch_threads, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset"),
            "seed": args.seed,
            "machine": (f"{platform.machine()}, {os.cpu_count()} CPU cores (shared with other jobs), torch "
                        f"{torch.__version__}, no GPU")
            if not torch.cuda.is_available() else torch.cuda.get_device_name(0)}


if __name__ == "__main__":
    sys.exit(main())
