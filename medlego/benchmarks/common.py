"""Timing and reporting helpers shared by the benchmark scripts."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch


def results_dir() -> Path:
    """Where a benchmark writes when the user names no folder (``--out``): ``./medlego-results`` in the
    current folder, wherever that is (never inside site-packages, and never the checkout's committed
    ``benchmarks/results/``, which is replaced only by an explicit ``--out benchmarks/results``).
    Resolved when called, so a benchmark's ``--out`` default follows the folder it runs in."""
    return Path.cwd() / "medlego-results"


OUT_HELP = "folder for the results (default: ./medlego-results; the committed ones: --out benchmarks/results)"


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


def uptime() -> str:
    """The machine's load as `uptime` prints it, for the results ("?" where there is no uptime)."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"
