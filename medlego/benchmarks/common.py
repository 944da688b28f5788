"""Timing and reporting helpers shared by the benchmark scripts."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch


def results_dir() -> Path:
    """Where a benchmark writes when the user names no folder: the checkout's committed
    ``benchmarks/results/`` when this package runs from a checkout, else ``./medlego-results``
    in the working directory (never inside site-packages)."""
    checkout = Path(__file__).resolve().parents[2]
    committed = checkout / "benchmarks" / "results"
    if (checkout / "pyproject.toml").is_file() and committed.is_dir():
        return committed
    return Path.cwd() / "medlego-results"


def sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def time_call(fn, *, repeats: int, warmup: int = 1, device: str = "cpu") -> list[float]:
    """Seconds per call, `repeats` measurements after `warmup` unmeasured calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t0)
    return out


def percentile(values: list[float], p: float) -> float:
    s = sorted(values)
    if not s:
        return float("nan")
    k = (len(s) - 1) * p / 100.0
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summary(seconds: list[float]) -> dict:
    return {"median_s": statistics.median(seconds), "p50_s": percentile(seconds, 50), "p99_s": percentile(seconds, 99),
            "min_s": min(seconds), "n": len(seconds)}


def hardware() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "platform": platform.platform()}
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:
        info["triton"] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def write_json(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1, default=float))
