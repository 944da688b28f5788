"""CUDA graphs of the adapted trunk, one per batch bucket (1, 2, 4, … up to max_pass_images).

A ViT-B forward at batch 1 is ~200 kernel launches whose CPU cost is of the order of the GPU work,
so batch-1 latency is launch-bound; a graph replays them in one call. What makes one capture valid
for every later batch, whatever its adapters:

* the pixels are copied into a static input buffer (padding images are zeros with slot −1);
* the plan lives in :class:`~medlego.kernels.plan.PlanBuffers` (fixed addresses, refilled with
  ``copy_``) and the adapters in the pool's preallocated slot tensors (a swap is a ``copy_``);
* the captured plan claims every image active and the pool's whole rank, so no host-side branch
  (``any_active``, ``max_rank``) is frozen into the graph: the Triton kernels skip slot −1 images
  and E = 0 ranks themselves. That is why graphs need a Triton path; the reference's ``nonzero``
  cannot be captured.

Off by default (``[engine] cuda_graphs``) until a GPU run shows it faster (benchmarks/kernel_bench.py).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Callable

import torch

from medlego.kernels import BatchPlan

from .lora import PackedSource
from .model import AdaptedViT

log = logging.getLogger("medlego.graphs")


class TrunkGraphs:
    def __init__(self, model: AdaptedViT, lora: tuple[torch.Tensor, torch.Tensor, torch.Tensor], *, capacity: int,
                 input_size: int, device: torch.device, dtype: torch.dtype, pool_rank: int):
        if device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        self.model, self.lora = model, lora
        self.pool_rank = pool_rank
        self.pixels = torch.zeros(capacity, 3, input_size, input_size, device=device, dtype=dtype)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.failed: dict[int, str] = {}  # bucket -> why its capture failed (that bucket then runs eagerly)
        self._mempool = torch.cuda.graph_pool_handle()  # all buckets share one memory pool

    @property
    def buckets(self) -> list[int]:
        return sorted(self._graphs)

    def run(self, pixels: torch.Tensor, plan: BatchPlan, qkv_fn: Callable) -> torch.Tensor | None:
        """Features [plan.batch, D] of ``pixels`` (n ≤ plan.batch images; the plan is padded to its bucket),
        or None when this bucket cannot be captured (the caller then runs the trunk eagerly).

        The result is the graph's static output: read (or clone) it before the next call.
        """
        n, b = pixels.shape[0], plan.batch
        if b in self.failed:
            return None
        graph = self._graphs.get(b)
        if graph is None:
            try:
                graph = self._capture(plan, qkv_fn)
            except Exception as e:  # a capture that fails costs this bucket its graph, never an answer
                torch.cuda.synchronize()
                self.failed[b] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                log.warning("CUDA graph capture for batch %d failed (%s); that batch size runs eagerly", b,
                            self.failed[b])
                return None
        self.pixels[:n].copy_(pixels)
        if b > n:
            self.pixels[n:b].zero_()
        graph[0].replay()
        return graph[1]

    def _capture(self, plan: BatchPlan, qkv_fn: Callable) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        b = plan.batch
        static_plan = replace(plan, num_active=b, max_rank=self.pool_rank)
        source = PackedSource(*self.lora, static_plan, qkv_fn)
        x = self.pixels[:b]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture (Triton compiles, cuBLAS picks algorithms)
            for _ in range(2):
                self.model.features(x, source)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._mempool):
            out = self.model.features(x, source)
        self._graphs[b] = (graph, out)
        log.info("captured the trunk for batch %d", b)
        return graph, out
