"""The batched engine: one frozen base resident on the device, any mix of adapters per batch.

``infer(images, adapter_refs, tasks)``: the trunk runs once for the whole batch; each image's
adapter adds its low-rank Q/V terms inside every block (through the pool's packed slots and one
:class:`BatchPlan` shared by all layers), and each image's task head is applied to its pooled
features. An image with no adapter (ref None) gets the base's pooled features as its
``embedding`` and no probabilities: without an adapter there is no task head.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from medlego.kernels import BatchPlan, get_qkv_impl, qkv_lora_reference

from .adapter import Preprocess, TaskSpec
from .base import BaseModel
from .counters import Counters
from .errors import BadInputError, MedlegoError
from .lora import PackedSource
from .model import AdaptedViT
from .pool import AdapterPool, HostAdapter
from .registry import Entry, Registry


@dataclass
class EngineConfig:
    device: str = "cpu"
    dtype: str | None = None  # None: float32 on CPU, bfloat16 on CUDA
    kernel: str = "auto"  # "auto" (Triton on CUDA), "torch" (reference), "triton"
    slots: int = 64  # device-tier capacity, in adapters
    host_capacity: int = 1024  # host-tier capacity, in adapters
    max_rank: int = 16  # the largest adapter rank the pool serves
    max_batch: int = 64  # larger calls to infer() are split
    top_k: int = 5

    def torch_dtype(self) -> torch.dtype:
        if self.dtype is None:
            return torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                "float16": torch.float16, "fp16": torch.float16}[self.dtype]


@dataclass(frozen=True)
class ResolvedAdapter:
    """What a server needs before queueing a request: identity, tasks and preprocessing."""

    name: str
    version: int
    sha256: str
    tasks: tuple[TaskSpec, ...]
    preprocess: Preprocess
    host: HostAdapter = field(repr=False, compare=False)

    def task(self, name: str | None) -> TaskSpec:
        return self.host.adapter.task(name)


@dataclass
class Diagnosis:
    adapter: str | None
    version: int | None
    sha256: str | None
    task: str | None
    probabilities: dict[str, float] | None  # every label of the task -> probability
    top: list[tuple[str, float]] | None
    multilabel: bool = False
    embedding: list[float] | None = None  # only for images served without an adapter
    timings: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict:
        out = {"adapter": self.adapter, "version": self.version, "sha256": self.sha256, "task": self.task,
               "multilabel": self.multilabel, "probabilities": self.probabilities,
               "top": None if self.top is None else [{"label": lab, "probability": p} for lab, p in self.top],
               "timings_ms": {k: round(v * 1000, 3) for k, v in self.timings.items()}}
        if self.embedding is not None:
            out["embedding"] = self.embedding
        return out


@dataclass
class Request:
    """One image with its resolved adapter and task (the batcher builds these)."""

    image: torch.Tensor  # [3, S, S], already preprocessed
    adapter: ResolvedAdapter | None
    task: TaskSpec | None
    top_k: int = 5


class Engine:
    def __init__(self, base: BaseModel, registry: Registry, config: EngineConfig | None = None):
        self.config = config or EngineConfig()
        self.base = base
        self.device = torch.device(self.config.device)
        self.dtype = self.config.torch_dtype()
        self.counters = Counters()
        if registry.base is None:
            registry.base = base.spec
        if registry.input_size is None:
            registry.input_size = base.input_size
        if registry.max_rank is None:
            registry.max_rank = self.config.max_rank
        self.registry = registry
        self.model = AdaptedViT(base)
        self.model.vit.to(self.device, self.dtype)
        self.pool = AdapterPool(registry, depth=base.depth, dim=base.embed_dim, slots=self.config.slots,
                                max_rank=self.config.max_rank, host_capacity=self.config.host_capacity,
                                device=self.device, dtype=self.dtype, counters=self.counters)
        try:
            self.qkv_fn = get_qkv_impl(self.config.kernel, str(self.device))
        except ImportError:  # Triton missing or broken: the reference is always correct
            self.qkv_fn = qkv_lora_reference
        self.ready = False

    # -- metadata -----------------------------------------------------------------------------
    def resolve(self, ref: str) -> ResolvedAdapter:
        """Name / name@version / alias → identity, tasks, preprocessing; loads it to host memory."""
        entry: Entry = self.registry.resolve(ref)
        host = self.pool.host(entry)
        a = host.adapter
        return ResolvedAdapter(entry.name, entry.version, entry.sha256, a.tasks, a.preprocess, host)

    def request(self, image: torch.Tensor, ref: str | None, task: str | None = None, top_k: int | None = None) -> Request:
        """Resolve and validate one request (raises its own error, before any batching)."""
        top_k = self.config.top_k if top_k is None else top_k
        if top_k < 1:
            raise BadInputError("top_k must be at least 1")
        s = self.base.input_size
        if tuple(image.shape) != (3, s, s):
            raise BadInputError(f"image tensor has shape {tuple(image.shape)}, expected (3, {s}, {s})")
        if ref is None:
            return Request(image, None, None, top_k)
        resolved = self.resolve(ref)
        return Request(image, resolved, resolved.task(task), top_k)

    # -- inference ----------------------------------------------------------------------------
    def infer(self, images, adapter_refs: list[str | None], tasks: list[str | None] | None = None,
              top_k: int | None = None) -> list[Diagnosis]:
        """Diagnose a batch; image n uses adapter_refs[n] (None = no adapter) and tasks[n]."""
        images = list(images) if not isinstance(images, torch.Tensor) else list(images.unbind(0))
        if len(adapter_refs) != len(images):
            raise BadInputError(f"{len(images)} images but {len(adapter_refs)} adapter references")
        tasks = tasks if tasks is not None else [None] * len(images)
        reqs = [self.request(img, ref, t, top_k) for img, ref, t in zip(images, adapter_refs, tasks)]
        out = self.run(reqs)
        for r in out:
            if isinstance(r, Exception):
                raise r
        return out

    def run(self, requests: list[Request]) -> list[Diagnosis | Exception]:
        """Run prepared requests in batches; a failure is returned in that request's place."""
        results: list[Diagnosis | Exception] = []
        step = max(1, min(self.config.max_batch, self.config.slots))
        for i in range(0, len(requests), step):
            chunk = requests[i:i + step]
            try:
                results += self._run_batch(chunk)
            except MedlegoError as e:
                results += [e] * len(chunk)
        return results

    @torch.inference_mode()
    def _run_batch(self, reqs: list[Request]) -> list[Diagnosis]:
        t0 = time.perf_counter()
        distinct: dict[str, HostAdapter] = {}
        for r in reqs:
            if r.adapter is not None:
                distinct.setdefault(r.adapter.sha256, r.adapter.host)
        slots = dict(zip(distinct, self.pool.acquire(list(distinct.values()))))
        image_slots = [-1 if r.adapter is None else slots[r.adapter.sha256] for r in reqs]
        batch_rank = max((h.e.shape[-1] for h in distinct.values()), default=0)
        plan = BatchPlan.build(image_slots, device=self.device, max_rank=batch_rank)
        pixels = torch.stack([r.image for r in reqs]).to(self.device, self.dtype, non_blocking=True)
        source = PackedSource(self.pool.lora_a, self.pool.lora_e, self.pool.lora_b, plan, self.qkv_fn)
        t1 = time.perf_counter()
        feats = self.model.features(pixels, source if plan.any_active else None).float()  # [N, D]
        probs: list[torch.Tensor | None] = [None] * len(reqs)
        groups: dict[tuple[str, str], list[int]] = {}
        for n, r in enumerate(reqs):
            if r.adapter is not None:
                groups.setdefault((r.adapter.sha256, r.task.name), []).append(n)
        for (sha, task_name), idx in groups.items():
            w, b = distinct[sha].heads[task_name]
            logits = torch.nn.functional.linear(feats[idx], w.float(), b.float())
            task = reqs[idx[0]].task
            p = torch.sigmoid(logits) if task.multilabel else torch.softmax(logits, dim=-1)
            for j, n in enumerate(idx):
                probs[n] = p[j]
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t2 = time.perf_counter()
        self.counters.observe("batch_size", len(reqs))
        self.counters.observe("stage_seconds", t2 - t1, stage="inference")
        self.counters.observe("stage_seconds", t1 - t0, stage="prepare")
        out = []
        for n, r in enumerate(reqs):
            timings = {"prepare": t1 - t0, "inference": t2 - t1}
            if r.adapter is None:
                out.append(Diagnosis(None, None, None, None, None, None, embedding=feats[n].tolist(), timings=timings))
                continue
            p = probs[n].cpu()
            labels = r.task.labels
            k = min(r.top_k, len(labels))
            top_v, top_i = torch.topk(p, k)
            out.append(Diagnosis(
                adapter=r.adapter.name, version=r.adapter.version, sha256=r.adapter.sha256, task=r.task.name,
                probabilities={lab: float(v) for lab, v in zip(labels, p.tolist())},
                top=[(labels[i], float(v)) for v, i in zip(top_v.tolist(), top_i.tolist())],
                multilabel=r.task.multilabel, timings=timings))
            self.counters.inc("inferences", adapter=r.adapter.name, task=r.task.name)
        return out

    def warmup(self) -> None:
        """One forward of the base (and of the adapter path) so the first request pays no setup."""
        s = self.base.input_size
        x = torch.zeros(2, 3, s, s, device=self.device, dtype=self.dtype)
        with torch.inference_mode():
            self.model.features(x)
            plan = BatchPlan.build([0, -1], device=self.device, max_rank=self.config.max_rank)
            self.model.features(x, PackedSource(self.pool.lora_a, self.pool.lora_e, self.pool.lora_b, plan, self.qkv_fn))
        self.ready = True

    def stats(self) -> dict:
        return {"pool": self.pool.stats(), "registry_size": len(self.registry), "device": str(self.device),
                "dtype": str(self.dtype).replace("torch.", ""), "kernel": getattr(self.qkv_fn, "__name__", "?")}
