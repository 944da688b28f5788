"""Ray Serve's own cost per request, apart from the machine: the load benchmark twice, once where the
model is nearly free and once at the real size.

    python -m medlego.benchmarks.ray_overhead --out benchmarks/results

* **tiny**: ``vit_tiny_patch16_224`` built at 32 px (4 patches: little inference per batch), so at
  light load (one request in flight) the latency is mostly what serving costs. Ray's fixed cost per
  request (HTTP proxy → ingress → replica) is the time a request spends outside the engine's server
  (client latency − the answering server's ``total``) through Ray minus the same through the
  embedded server. The plain difference of the two p50s is reported beside it, but it also carries
  any difference in inference time between the two processes (a Ray replica runs torch with its
  own thread count), which moved it by up to ±7 ms between otherwise alike runs;
* **224**: the same base at 224 px (inference dominates): one replica's throughput against the
  embedded server's, under load.

Each runs ``load_bench`` (embedded, then Ray with one replica; every answer checked against the
in-process engine) with the settings below; the hops inside Ray come from the answers' own timings:
``proxy → ingress`` = client latency − ``ingress_total``, ``ingress → replica`` = ``ingress_total``
− the replica's ``total``. ``--direct-ingress``: the ingress serves the port itself (no proxy hop; the
first column is then the client's HTTP to the ingress). The machine may be shared: the 1-minute load average is recorded beside
every number. Results: ``ray_overhead.{json,md}`` under ``--out``; with ``--label`` (e.g. ``before``
and ``after`` a change, each run from its own checkout) the runs of other labels already in the file
are kept, so one table compares them.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
from pathlib import Path

from medlego.benchmarks import load_bench
from medlego.benchmarks.common import OUT_HELP, results_dir

# (load_bench args) per size; light load: one request in flight, so batching neither helps nor hides
SIZES = {
    "tiny": ["--img-size", "32", "--light-requests", "200", "--light-concurrency", "1", "--requests", "384"],
    "224": ["--img-size", "224", "--light-requests", "48", "--light-concurrency", "1", "--requests", "384"],
}
GOALS = {"fixed_cost_ms": 5.0, "throughput_ratio": 0.85}


def run_size(size: str, rounds: int, work: Path, direct_ingress: bool = False) -> dict:
    """load_bench for one size: its report (embedded + Ray 1 replica), written under `work`."""
    argv = ["--model", "vit_tiny_patch16_224", *SIZES[size], "--rounds", str(rounds), "--modes", "embedded,ray",
            "--replicas", "1", "--label", f"ray_overhead {size}", "--out", str(work / f"load_bench_{size}"),
            *(["--ray-direct-ingress"] if direct_ingress else [])]
    load_bench.main(argv)
    report = json.loads((work / f"load_bench_{size}.json").read_text())
    report["argv"] = argv
    return report


def hops(light: dict) -> dict:
    """The light-load medians (ms) of the hops inside Ray, from the answers' timings and the client's p50."""
    s = light.get("stages_ms", {})
    out = {}
    if "ingress_total" in s and light.get("p50_ms") is not None:
        out["proxy_to_ingress_and_back"] = round(light["p50_ms"] - s["ingress_total"], 1)
    if "ingress_total" in s and "total" in s:
        out["ingress_to_replica_and_back"] = round(s["ingress_total"] - s["total"], 1)
    return out


def outside_engine_cost(embedded_stages: dict, ray_stages: dict) -> float | None:
    """Ray's fixed cost: the light-load median time outside the answering server (client latency −
    its ``total``) through Ray, minus the same through the embedded server."""
    if "outside_server" not in embedded_stages or "outside_server" not in ray_stages:
        return None
    return round(ray_stages["outside_server"] - embedded_stages["outside_server"], 1)


def summarize(size: str, report: dict) -> dict:
    embedded = next(m for m in report["modes"] if m["mode"].startswith("embedded"))
    ray = next(m for m in report["modes"] if m["mode"].startswith("Ray"))
    vs = next((c for c in report["vs_embedded"] if c["mode"] == ray["mode"]), {})
    return {"size": size, "img_size": report["setup"]["img_size"],
            "embedded_light": {k: embedded["light"].get(k) for k in ("p50_ms", "p99_ms", "load_avg", "stages_ms")},
            "ray_light": {k: ray["light"].get(k) for k in ("p50_ms", "p99_ms", "load_avg", "stages_ms")},
            "fixed_cost_ms": outside_engine_cost(embedded["light"].get("stages_ms", {}), ray["light"].get("stages_ms", {})),
            "p50_delta_ms": vs.get("light_p50_delta_ms"), "ray_hops_ms": hops(ray["light"]),
            "throughput_ratio": vs.get("throughput_ratio"), "normalized_ratio": vs.get("normalized_ratio"),
            "embedded_img_s": [r["throughput_img_s"] for r in embedded["rounds"]],
            "ray_img_s": [r["throughput_img_s"] for r in ray["rounds"]],
            "round_loads": [r["load_avg"] for m in (embedded, ray) for r in m["rounds"]],
            "errors": sum(r["errors"] + r["mismatches"] for m in (embedded, ray) for r in m["rounds"])
            + sum(m["light"]["errors"] + m["light"]["mismatches"] for m in (embedded, ray)),
            "command": report["command"]}


def merge_runs(path: Path, label: str, rows: list[dict]) -> list[dict]:
    """The rows of other labels already in `path` (a previous run's file), then this run's."""
    kept = []
    if path.exists():
        kept = [r for r in json.loads(path.read_text()).get("sizes", []) if r.get("label", "") != label]
    return kept + [{**r, "label": label} for r in rows]


def markdown(rows: list[dict], command: str) -> str:
    lines = ["# Ray Serve's fixed cost per request, apart from the machine", "",
             "Light load: one request in flight. Fixed cost = the median time a request spends outside the "
             "answering server (client latency − its `total`) through Ray (1 replica) minus the same through the "
             f"embedded server (goal ≤ {GOALS['fixed_cost_ms']} ms at the tiny size); p50 Δ = the plain difference of "
             "the light-load p50s, which also carries the two processes' different inference times; throughput: one replica / "
             f"embedded under load (goal ≥ {GOALS['throughput_ratio']} at 224 px). Load: 1-minute load average of "
             "the shared 2-core machine when each measurement started (other jobs included): where other jobs' load "
             "changed during the run, the rounds' img/s swing and the ratio measures the machine, not Ray (a ratio "
             "above 1 is such a case). proxy→ingress = client latency − the ingress's `ingress_total`: Ray's HTTP "
             "proxy and the client's own HTTP (the embedded server's `outside_server`, below, is that client part); "
             "ingress→replica = `ingress_total` − the replica's `total`.", "",
             "| run | size | embedded p50 (ms) [load] | Ray p50 (ms) [load] | fixed cost (ms) | p50 Δ (ms) | proxy→ingress (ms) "
             "| ingress→replica (ms) | img/s embedded / Ray (per round) | Ray / embedded | round loads | errors |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | --- | ---: |"]
    for r in rows:
        e, y, h = r["embedded_light"], r["ray_light"], r["ray_hops_ms"]
        lines.append(f"| {r.get('label', '')} | {r['size']} ({r['img_size']} px) | {e['p50_ms']} [{e['load_avg']}] | {y['p50_ms']} "
                     f"[{y['load_avg']}] | {r['fixed_cost_ms']} | {r.get('p50_delta_ms', '')} | "
                     f"{h.get('proxy_to_ingress_and_back', '')} | "
                     f"{h.get('ingress_to_replica_and_back', '')} | {r['embedded_img_s']} / {r['ray_img_s']} | "
                     f"{r['throughput_ratio']} | {r['round_loads']} | {r['errors']} |")
    lines += ["", "Stages (median ms of the answers' `timings_ms`) at light load:", ""]
    for r in rows:
        lines.append(f"* {r.get('label', '')} {r['size']}: embedded {r['embedded_light']['stages_ms']}; "
                     f"Ray {r['ray_light']['stages_ms']}")
    lines += ["", f"Command: `{command}`; each size's load_bench command:", ""]
    lines += [f"* {r.get('label', '')} {r['size']}: `{r['command']}`" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Ray Serve's own cost per request, apart from the machine")
    p.add_argument("--sizes", default="tiny,224", help="which of: " + ", ".join(SIZES))
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", default=None, help=OUT_HELP)
    p.add_argument("--direct-ingress", action="store_true",
                   help="Ray's ingress serves the port itself, without the HTTP proxy (serve --ray --direct-ingress)")
    p.add_argument("--label", default="current",
                   help="this run's name in the results; runs of other labels already there are kept")
    args = p.parse_args(argv)
    out = Path(args.out) if args.out else results_dir()
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="medlego-ray-overhead-") as tmp:  # load_bench's own files: not kept
        rows = [summarize(size, run_size(size, args.rounds, Path(tmp), args.direct_ingress))
                for size in args.sizes.split(",")]
    command = shlex.join(["python", "-m", "medlego.benchmarks.ray_overhead", *(argv if argv is not None else sys.argv[1:])])
    table = merge_runs(out / "ray_overhead.json", args.label, rows)
    (out / "ray_overhead.json").write_text(json.dumps({"goals": GOALS, "sizes": table, "command": command}, indent=1))
    (out / "ray_overhead.md").write_text(markdown(table, command))
    print((out / "ray_overhead.md").read_text())
    return 1 if any(r["errors"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
