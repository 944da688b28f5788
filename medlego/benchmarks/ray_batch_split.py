"""What the installed Ray Serve does with ``@serve.batch`` on a ``@serve.multiplexed`` deployment.

    python -m medlego.benchmarks.ray_batch_split

A toy deployment (no model: the batch handler only records what it receives) with
``@serve.batch(max_batch_size=B)`` gets R concurrent requests spread uniformly over M multiplexed
model ids, all on one replica. If Ray keeps mixed batches, the handler sees batches of up to B
with several ids; if it splits by model id (as ``ray/serve/batching.py`` reads in recent
versions), every batch holds one id and its size is bounded by R/M. Then the same requests go
to a handler fed by medlego's own :class:`DynamicBatcher` logic (mixed-adapter batches), for
comparison. Results: ``ray_batch_split.{json,md}`` under ``--out`` (default ``./medlego-results/``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from medlego.benchmarks.common import OUT_HELP, results_dir



def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--models", type=int, default=8)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--wait-s", type=float, default=0.05)
    p.add_argument("--out", default=None, metavar="PREFIX", help=OUT_HELP.replace("folder for the results", "path prefix of the result files") + " + /ray_batch_split")
    args = p.parse_args(argv)

    report = _measure(args)
    out_path = Path(args.out or results_dir() / "ray_batch_split")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.with_suffix(".json").write_text(json.dumps(report, indent=1))
    md = _markdown(args, report)
    out_path.with_suffix(".md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


def _toy_deployment(max_batch: int, wait_s: float):
    """The toy deployment: no model, its batch handler records the model ids and size of each batch."""
    from ray import serve

    @serve.deployment(max_ongoing_requests=1024, ray_actor_options={"num_cpus": 0})
    class Toy:
        def __init__(self):
            self.batches = []

        @serve.multiplexed(max_num_models_per_replica=64)
        async def model(self, model_id: str):
            return model_id

        @serve.batch(max_batch_size=max_batch, batch_wait_timeout_s=wait_s)
        async def handle(self, items: list):
            self.batches.append(sorted({m for m, _ in items}) + [len(items)])
            await asyncio.sleep(0.01)  # stands in for one engine call per batch
            return [n for _, n in items]

        async def __call__(self, n: int):
            model_id = serve.get_multiplexed_model_id()
            if model_id:
                await self.model(model_id)
            return await self.handle((model_id or "-", n))

        def stats(self):
            out, self.batches = self.batches, []
            return out

    return Toy


def _measure(args) -> dict:
    """Run the requests with model ids, then without (the control), and summarise the batches Ray made."""
    import ray
    from ray import serve

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        handle = serve.run(_toy_deployment(args.max_batch, args.wait_s).bind(), name="batch_split", route_prefix=None)
        ids = [f"adapter{i}" for i in range(args.models)]

        async def load(multiplexed: bool):
            t0 = time.perf_counter()
            rs = [(handle.options(multiplexed_model_id=ids[n % len(ids)]) if multiplexed else handle).remote(n)
                  for n in range(args.requests)]
            out = [await r for r in rs]
            return out, time.perf_counter() - t0

        out, wall = asyncio.run(load(True))
        assert out == list(range(args.requests))
        batches = handle.stats.remote().result()
        out, control_wall = asyncio.run(load(False))  # same arrival, no model ids: Ray's batches unsplit
        assert out == list(range(args.requests))
        control = [b[-1] for b in handle.stats.remote().result()]
    finally:
        serve.shutdown()
        ray.shutdown()
    sizes = [b[-1] for b in batches]
    ids_per_batch = [len(b) - 1 for b in batches]
    return {
        "ray_version": ray.__version__, "requests": args.requests, "model_ids": args.models, "max_batch_size": args.max_batch,
        "batch_wait_timeout_s": args.wait_s, "batches": len(batches), "mean_batch_size": round(sum(sizes) / len(sizes), 2),
        "max_batch_size_seen": max(sizes), "max_ids_in_one_batch": max(ids_per_batch), "wall_s": round(wall, 3),
        "splits_by_model_id": max(ids_per_batch) == 1,
        "control_without_model_ids": {"batches": len(control), "mean_batch_size": round(sum(control) / len(control), 2),
                                      "max_batch_size_seen": max(control), "wall_s": round(control_wall, 3)},
    }


def _markdown(args, report: dict) -> list[str]:
    return [
        "# Ray Serve `@serve.batch` with `@serve.multiplexed`", "",
        f"Ray {report['ray_version']}: {args.requests} concurrent requests over {args.models} multiplexed model ids on one "
        f"replica, `@serve.batch(max_batch_size={args.max_batch}, batch_wait_timeout_s={args.wait_s})`.", "",
        "| requests | batches | mean batch size | largest batch | most model ids in one batch | wall (s) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        f"| {args.models} model ids, round robin | {report['batches']} | {report['mean_batch_size']} | "
        f"{report['max_batch_size_seen']} | {report['max_ids_in_one_batch']} | {report['wall_s']} |",
        f"| same, no model id (control) | {report['control_without_model_ids']['batches']} | "
        f"{report['control_without_model_ids']['mean_batch_size']} | {report['control_without_model_ids']['max_batch_size_seen']} "
        f"| - | {report['control_without_model_ids']['wall_s']} |",
        "",
        ("Ray splits each batch by multiplexed model id: the handler never sees two adapters in one batch, so a "
         "mixed-adapter engine behind `@serve.batch` would run many small single-adapter batches. medlego's Ray "
         "replica therefore batches with its own `DynamicBatcher`, which mixes adapters in one batch (the control "
         "row shows the batch sizes the same arrivals give when nothing splits them)."
         if report["splits_by_model_id"] else
         "Ray kept batches with several model ids together here."), "",
        "Command: `python -m medlego.benchmarks.ray_batch_split`", ""]


if __name__ == "__main__":
    sys.exit(main())
