"""Which qkv path the engine runs, per batch bucket: forced by ``--kernel``, or measured once.

``auto`` on CUDA times every available path (fused Triton, split = cuBLAS + Triton shrink/expand,
the PyTorch reference) on the real shapes — the model's first qkv weight, the pool's slot tensors,
a batch of the bucket's size with a different adapter on every image — and keeps the fastest. A
path that raises (e.g. a tile that does not fit this GPU's shared memory) or disagrees with the
reference is left out, so a broken kernel costs speed, never answers. The choice is stored in
``kernel_choice.json`` in the data dir, keyed by the GPU's name, the torch and triton versions,
the shape, the dtype and the bucket, so a restart (or another replica on the same node) does not
measure again, and an upgrade or another GPU does.

``auto`` on the CPU is the reference without measuring: Triton runs there only in its interpreter.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from typing import Callable

import torch

from medlego.kernels import BatchPlan, get_qkv_impl, impl_name, qkv_lora_reference, triton_available

log = logging.getLogger("medlego.kernels")

Timer = Callable[[Callable[[], object]], float]  # seconds per call of the given function
MODES = ("auto", "fused", "split", "torch", "triton")  # triton: the fused kernel's first name
CHECK_TOL = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 5e-2}  # relative, vs the fp32 reference


def batch_bucket(n: int, cap: int) -> int:
    """The smallest power of two ≥ n, capped at ``cap`` (the buckets of kernel choice and CUDA graphs)."""
    b = 1
    while b < n:
        b *= 2
    return min(b, max(cap, n))


def batch_buckets(cap: int) -> list[int]:
    """Every bucket a batch of 1 … cap images can fall into."""
    return sorted({1 << k for k in range(cap.bit_length()) if 1 << k < cap} | {cap})


def cuda_timer(fn: Callable[[], object]) -> float:
    """Median of CUDA-event timings with L2 flushed between calls (triton.testing.do_bench)."""
    import triton.testing

    ms = triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")
    return float(ms) / 1000.0  # type: ignore[arg-type]  (a float for return_mode="median")


def _versions() -> str:
    try:
        import triton

        tv = triton.__version__
    except Exception:
        tv = "none"
    return f"torch {torch.__version__}, triton {tv}"


class KernelChoice:
    """The engine's qkv path per batch bucket, and the record of how it was chosen."""

    def __init__(self, mode: str, device: torch.device, dtype: torch.dtype, *, cache_path: str | os.PathLike | None = None,
                 candidates: tuple[str, ...] | None = None, timer: Timer | None = None, device_name: str | None = None,
                 impls: dict[str, Callable] | None = None):
        mode = "fused" if mode == "triton" else mode
        if mode not in MODES:
            raise ValueError(f"unknown kernel '{mode}' (choose from auto, fused, split, torch)")
        self.mode, self.device, self.dtype = mode, device, dtype
        self.impls = dict(impls or {})  # name -> implementation, beside the built-in names
        self.cache_path = Path(cache_path) if cache_path else None
        on_gpu = device.type == "cuda"
        if candidates is None:
            candidates = ("fused", "split", "torch") if on_gpu and triton_available() else ("torch",)
        self.candidates = candidates
        self.timer = timer or (cuda_timer if on_gpu else None)
        if device_name is None:
            device_name = torch.cuda.get_device_name(device) if on_gpu else "cpu"
        self.device_name = device_name
        self._chosen: dict[int, dict] = {}  # bucket -> {"kernel", "ms", "source"}
        self._fn: dict[int, Callable] = {}  # bucket -> the chosen implementation (the per-batch lookup)
        self._lock = threading.Lock()
        self.forced = self._load(mode) if mode != "auto" else None

    def _load(self, name: str) -> Callable:
        if name in self.impls:
            return self.impls[name]
        try:
            return get_qkv_impl(name)
        except ImportError:  # Triton missing or broken: the reference is always correct
            log.warning("kernel '%s' is not available here (Triton does not import); using the reference", name)
            return qkv_lora_reference

    @property
    def measures(self) -> bool:
        return self.forced is None and len(self.candidates) > 1 and self.timer is not None

    def default(self) -> Callable:
        """The path for work outside the batch buckets (the registration probe, warm-up)."""
        if self.forced is not None:
            return self.forced
        if self._chosen:
            return self._load(next(reversed(self._chosen.values()))["kernel"])
        return self._load(self.candidates[0]) if not self.measures else qkv_lora_reference

    def key(self, dim: int, tokens: int, bucket: int) -> str:
        return (f"{self.device_name} | {_versions()} | D={dim} T={tokens} | "
                f"{str(self.dtype).replace('torch.', '')} | batch {bucket}")

    def for_batch(self, bucket: int, dim: int, tokens: int, case: Callable[[], tuple]) -> Callable:
        """The path for a batch of this bucket; ``case()`` builds the measurement inputs when needed
        (x, weight, bias, lora_a, lora_e, lora_b, plan), called only the first time a bucket is seen."""
        if not self.measures:
            return self.default()
        fn = self._fn.get(bucket)
        if fn is not None:
            return fn
        with self._lock:
            if bucket not in self._fn:
                key = self.key(dim, tokens, bucket)
                got = self._cached(key)
                if got is None:
                    got = self._measure(case())
                    self._store(key, got)
                self._chosen[bucket] = got
                self._fn[bucket] = self._load(got["kernel"])
            return self._fn[bucket]

    def capturable_only(self) -> None:
        """Leave out the paths a CUDA graph cannot capture (the reference's ``nonzero``); a forced one is refused."""
        if self.forced is not None and impl_name(self.forced) == "torch":
            raise ValueError("[engine] cuda_graphs needs a Triton kernel (--kernel auto, fused or split)")
        self.candidates = tuple(c for c in self.candidates if c != "torch")

    def _measure(self, args: tuple) -> dict:
        assert self.timer is not None
        x, weight, bias, a, e, b, plan = args
        want = qkv_lora_reference(x.float(), weight.float(), None if bias is None else bias.float(), a.float(), e.float(),
                                  b.float(), plan)
        ms: dict[str, float] = {}
        refused: dict[str, str] = {}
        for name in self.candidates:
            fn = self._load(name)
            try:
                got = fn(*args)
                err = float((got.float() - want).abs().max() / want.abs().max().clamp_min(1e-30))
                if not err <= CHECK_TOL.get(self.dtype, 5e-2):
                    refused[name] = f"relative error {err:.1e} against the reference"
                    continue
                ms[name] = 1e3 * self.timer(lambda: fn(*args))  # noqa: B023 (timed at once)
            except Exception as e:  # a path that cannot run here is left out, never fatal
                refused[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        for name, why in refused.items():
            log.warning("kernel '%s' left out on %s: %s", name, self.device_name, why)
        if not ms:
            return {"kernel": "torch", "ms": {}, "source": "fallback", "refused": refused}
        best = min(ms, key=ms.__getitem__)
        log.info("kernel choice on %s: %s (%s)", self.device_name, best,
                 ", ".join(f"{k} {v:.3f} ms" for k, v in ms.items()))
        return {"kernel": best, "ms": ms, "source": "measured", **({"refused": refused} if refused else {})}

    # -- the cache file (one JSON object; written whole through a temporary file) ----------------
    def _read(self) -> dict:
        if self.cache_path is None or not self.cache_path.is_file():
            return {}
        try:
            data = json.loads(self.cache_path.read_text())
        except (OSError, ValueError):
            log.warning("kernel choice cache %s is unreadable; measuring again", self.cache_path)
            return {}
        return data if isinstance(data, dict) else {}

    def _cached(self, key: str) -> dict | None:
        got = self._read().get(key)
        if not isinstance(got, dict) or got.get("kernel") not in self.candidates:
            return None
        return {**got, "source": "cache"}

    def _store(self, key: str, choice: dict) -> None:
        if self.cache_path is None or choice["source"] != "measured":
            return
        data = self._read()
        data[key] = {k: v for k, v in choice.items() if k != "source"}
        try:
            self.cache_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.cache_path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
            os.replace(tmp, self.cache_path)
        except OSError as e:  # a read-only data dir costs a re-measure at the next start, nothing more
            log.warning("cannot write the kernel choice cache %s: %s", self.cache_path, e)

    def report(self) -> dict:
        """What /v1/info and ``medlego bench`` show: the mode and, per bucket, the path and its timings."""
        out: dict = {"mode": self.mode, "device": self.device_name}
        if self.forced is not None:
            out["kernel"] = impl_name(self.forced)
        elif not self.measures:
            out["kernel"] = impl_name(self.default())
            out["why"] = "one candidate here" if self.device.type == "cuda" else "CPU: Triton runs only in its interpreter"
        else:
            out["candidates"] = list(self.candidates)
            out["by_batch"] = {str(b): c for b, c in sorted(self._chosen.items())}
            if self.cache_path is not None:
                out["cache"] = str(self.cache_path)
        return out


def measurement_case(weight: torch.Tensor, bias: torch.Tensor | None, slots: int, rank: int, bucket: int,
                     tokens: int, seed: int = 0) -> tuple:
    """Inputs of the real shape: ``bucket`` images of ``tokens`` tokens, a different slot per image of a
    random bank shaped like the pool's (random, so the correctness check sees the low-rank terms)."""
    d = weight.shape[1]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(bucket, tokens, d, generator=g)
    a = torch.randn(slots, 2, rank, d, generator=g) / d ** 0.5
    e = torch.rand(slots, 2, rank, generator=g) + 0.5
    b = torch.randn(slots, 2, d, rank, generator=g) * 0.1
    x, a, e, b = (t.to(weight.device, weight.dtype) for t in (x, a, e, b))
    plan = BatchPlan.build([i % slots for i in range(bucket)], device=weight.device, max_rank=rank)
    return x, weight, bias, a, e, b, plan


__all__ = ["KernelChoice", "batch_bucket", "measurement_case", "cuda_timer", "MODES"]
