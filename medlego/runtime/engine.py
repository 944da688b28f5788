"""The batched engine: one frozen base resident on the device, any mix of adapters per batch.

``infer(images, adapter_refs, tasks)``: the trunk runs once for the whole batch; each image's
adapter adds its low-rank Q/V terms inside every block (through the pool's packed slots and one
:class:`BatchPlan` shared by all layers), and each image's task head is applied to its pooled
features. An image with no adapter (ref None) gets the base's pooled features as its
``embedding`` and no probabilities: without an adapter there is no task head.

The engine is the only thing that touches the pool. What the servers need of residency, it
offers as operations: :meth:`pin`, :meth:`unpin`, :meth:`forget`, and :meth:`check_adapter`
(the numeric probe run before a registration writes anything).
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field

import torch

from medlego.kernels import BatchPlan, impl_name
from medlego.kernels.plan import PlanBuffers

from .adapter import Adapter, Preprocess, TaskSpec, check_compatible, truncate_rank
from .base import BaseModel
from .config import EngineConfig
from .counters import Counters
from .errors import (AdapterFormatError, AdapterNumericError, BadInputError, ConflictError, MedlegoError,
                     OverloadedError, StorageUnavailableError)
from .kernel_choice import KernelChoice, batch_bucket, batch_buckets, measurement_case
from .lora import PackedSource, pack_adapter
from .model import AdaptedViT, probabilities
from .vit import qkv_linear, typed
from .pool import AdapterPool, HostAdapter
from .registry import Entry, Registry

PROBE_IMAGES = 4  # images of the registration probe (seeded noise in the normalised input space)
MAX_PENDING_LOADS = 256  # distinct adapters waiting for the loader pool at once; beyond, 503 at once


class AdapterCold(Exception):
    """Raised by ``resolve(ref, load=False)`` for an adapter not in host memory: the caller loads it
    with :meth:`Engine.load_async` (off its own worker) and resolves again. Never reaches a client."""

    def __init__(self, entry: Entry):
        super().__init__(entry.ref)
        self.entry = entry


@dataclass(frozen=True)
class ResolvedAdapter:
    """What a server needs before queueing a request: identity, pin flag, tasks and preprocessing."""

    name: str
    version: int
    sha256: str
    pinned: bool
    host: HostAdapter = field(repr=False, compare=False)

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def tasks(self) -> tuple[TaskSpec, ...]:
        return self.host.tasks

    @property
    def preprocess(self) -> Preprocess:
        return self.host.preprocess

    def task(self, name: str | None) -> TaskSpec:
        return self.host.task(name)


@dataclass
class Diagnosis:
    # None for an image served without an adapter (then `embedding` holds its features)
    adapter: str | None = None
    version: int | None = None
    sha256: str | None = None
    task: str | None = None
    probabilities: dict[str, float] | None = None  # every label of the task -> probability
    top: list[tuple[str, float]] | None = None
    multilabel: bool = False
    embedding: list[float] | None = None  # only for images served without an adapter
    timings: dict[str, float] = field(default_factory=dict)
    rank_truncation: dict | None = None  # served above the server's max_rank: what was dropped (truncate_rank)

    def to_json(self) -> dict:
        out = {"adapter": self.adapter, "version": self.version, "sha256": self.sha256, "task": self.task,
               "multilabel": self.multilabel, "probabilities": self.probabilities,
               "top": None if self.top is None else [{"label": lab, "probability": p} for lab, p in self.top],
               "timings_ms": {k: round(v * 1000, 3) for k, v in self.timings.items()}}
        if self.embedding is not None:
            out["embedding"] = self.embedding
        if self.rank_truncation is not None:
            out["rank_truncation"] = self.rank_truncation
        return out


@dataclass
class Request:
    """One image with its resolved adapter and task (built by :meth:`Engine.request` only)."""

    image: torch.Tensor  # [3, S, S], already preprocessed
    adapter: ResolvedAdapter | None
    task: TaskSpec | None
    top_k: int


class Engine:
    """The resident base with its adapter pool and batch plan. It owns ``base.model``: the model is moved
    to the engine's device and dtype in place (a copy would keep a second base in host memory), so a
    BaseModel serves one engine; a second engine in another dtype needs its own ``load_base``."""

    def __init__(self, base: BaseModel, registry: Registry, config: EngineConfig | None = None):
        self.config = config or EngineConfig()
        if self.config.over_rank not in ("refuse", "truncate"):
            raise BadInputError(f"[engine] over_rank must be 'refuse' or 'truncate', not {self.config.over_rank!r}")
        self.base = base
        self.registry = registry
        self.device = torch.device(self.config.device)
        self.dtype = self.config.torch_dtype()
        self.counters = Counters()
        self.model = AdaptedViT(base)
        self.model.vit.to(self.device, self.dtype)
        self.pool = AdapterPool(base.spec, slots=self.config.slots, max_rank=self.config.max_rank,
                                host_capacity=self.config.host_capacity, device=self.device, dtype=self.dtype,
                                counters=self.counters, over_rank=self.config.over_rank)
        try:
            self.kernels = KernelChoice(self.config.kernel, self.device, self.dtype, cache_path=self.config.kernel_cache)
        except ValueError as e:
            raise BadInputError(str(e)) from None
        self.plans = PlanBuffers(self.config.max_pass_images, self.device)  # the batch plan, at fixed addresses
        graphs = self.config.cuda_graphs
        self.pad_batches = graphs if self.config.pad_batches is None else self.config.pad_batches
        self.graphs = None
        if graphs:
            self.graphs = self._trunk_graphs()
        # the adapted model has one active adapter source at a time: forwards are serialised
        self._forward = threading.Lock()
        # cold adapters are read from the store here, one load per sha256 however many requests want it
        self._loader = ThreadPoolExecutor(max(1, self.config.load_workers), thread_name_prefix="medlego-load")
        self._loads: dict[str, Future] = {}
        self._loads_lock = threading.Lock()
        self.ready = False

    def _trunk_graphs(self):
        from .trunk_graphs import TrunkGraphs

        if self.device.type != "cuda":
            raise BadInputError("[engine] cuda_graphs needs a CUDA device")
        try:
            self.kernels.capturable_only()
        except ValueError as e:
            raise BadInputError(str(e)) from None
        return TrunkGraphs(self.model, (self.pool.lora_a, self.pool.lora_e, self.pool.lora_b),
                           capacity=self.config.max_pass_images, input_size=self.base.input_size, device=self.device,
                           dtype=self.dtype, pool_rank=self.config.max_rank)

    @property
    def qkv_fn(self):
        """The path outside the batch buckets (probe, warm-up); batches use :meth:`qkv_for`."""
        return self.kernels.default()

    def bucket(self, n: int) -> int:
        return batch_bucket(n, self.config.max_pass_images)

    def qkv_for(self, bucket: int):
        """The qkv path for a batch of this bucket: forced, or measured on first use (then cached)."""
        qkv = qkv_linear(typed(self.model.vit).blocks[0])
        tokens = self.base.tokens
        return self.kernels.for_batch(bucket, self.base.spec.embed_dim, tokens, lambda: measurement_case(
            qkv.weight, qkv.bias, self.pool.slots, self.pool.max_rank, bucket, tokens))

    # -- adapters -----------------------------------------------------------------------------
    def resolve(self, ref: str, *, load: bool = True, held: HostAdapter | None = None) -> ResolvedAdapter:
        """Name / name@version / alias → identity and pin flag (fresh from the registry), host copy loaded.

        A cold adapter is loaded by the loader pool (:meth:`load`); this thread waits for it at most
        ``load_timeout_s``, or, with ``load=False``, does not wait at all and raises :class:`AdapterCold`.
        ``held``: a host copy the caller already has (from :meth:`load_async`), used if it is the one resolved."""
        entry: Entry = self.registry.resolve(ref)
        host = held if held is not None and held.sha256 == entry.sha256 else self.pool.held(entry.sha256)
        if host is None:
            if not load:
                raise AdapterCold(entry)
            future = self.load(entry)
            try:
                host = future.result(timeout=self.config.load_timeout_s)
            except FutureTimeout:
                raise self._load_timeout(entry) from None
        return ResolvedAdapter(entry.name, entry.version, entry.sha256, entry.pinned, host)

    def load(self, entry: Entry) -> Future:
        """The loader pool's future of the entry's host copy; concurrent loads of one sha256 share one future.

        Raises :class:`OverloadedError` when ``MAX_PENDING_LOADS`` distinct adapters are already waiting."""
        sha = entry.sha256
        with self._loads_lock:
            future = self._loads.get(sha)
            if future is None:
                if len(self._loads) >= MAX_PENDING_LOADS:
                    raise OverloadedError(f"{len(self._loads)} adapters are being loaded from the store; retry later")
                future = self._loader.submit(self.pool.host, sha, lambda: self._read(entry))
                self._loads[sha] = future
                new = True
            else:
                new = False
        if new:  # outside the lock: a callback on a future already done runs at once, in this thread
            future.add_done_callback(lambda f: self._load_done(sha, f))
        return future

    def _read(self, entry: Entry) -> bytes:
        """A host miss's file, counted by the tier that had it: "node" (this machine's disk) or "store"
        (downloaded: a node-cache miss). The pool counts the host and device tiers itself."""
        t0 = time.perf_counter()
        data, tier = self.registry.read_tiered(entry)
        self.counters.inc("pool_hits", tier=tier)
        if tier == "store":
            self.counters.inc("pool_misses", tier="node")
        self.counters.inc("pool_loaded_bytes", len(data), tier=tier)
        self.counters.observe("pool_load_seconds", time.perf_counter() - t0, tier=tier)
        return data

    def _load_done(self, sha: str, future: Future) -> None:
        with self._loads_lock:
            if self._loads.get(sha) is future:
                del self._loads[sha]

    def _load_timeout(self, entry: Entry) -> StorageUnavailableError:
        return StorageUnavailableError(f"adapter {entry.ref} is not in memory and could not be loaded from the "
                                       f"registry's store within {self.config.load_timeout_s:g} s; retry later")

    async def load_async(self, entry: Entry) -> HostAdapter:
        """:meth:`load`, awaited on the event loop for at most ``load_timeout_s``; a waiter that gives up
        (timeout, client gone) leaves the load running for the others."""
        future = asyncio.wrap_future(self.load(entry))
        try:
            return await asyncio.wait_for(asyncio.shield(future), self.config.load_timeout_s)
        except asyncio.TimeoutError:
            raise self._load_timeout(entry) from None

    def served_form(self, adapter: Adapter) -> tuple[Adapter, dict | None]:
        """The adapter as this server serves it: itself, or (``over_rank = "truncate"``, above ``max_rank``)
        its top ``max_rank`` singular directions and the report of what was dropped."""
        if self.config.over_rank == "truncate":
            return truncate_rank(adapter, self.config.max_rank)
        return adapter, None

    def rank_truncation(self, adapter: Adapter) -> dict | None:
        """What serving `adapter` here drops (None: nothing; it is served as it is, or refused)."""
        return self.served_form(adapter)[1]

    def check_adapter(self, adapter: Adapter) -> None:
        """Everything a registration must pass to be servable here: base, rank, input size, numerics."""
        check_compatible(adapter.base, self.base.spec)
        adapter, _ = self.served_form(adapter)
        if adapter.max_rank > self.config.max_rank:
            raise AdapterFormatError(f"adapter rank {adapter.max_rank} is above this server's maximum "
                                     f"{self.config.max_rank}")
        if adapter.preprocess.input_size != self.base.input_size:
            raise AdapterFormatError(f"adapter preprocess.input_size is {adapter.preprocess.input_size}, but the "
                                     f"base takes {self.base.input_size}")
        self._probe(adapter)

    @torch.inference_mode()
    def _probe(self, adapter: Adapter) -> None:
        """Refuse an adapter whose values overflow the serving dtype or whose logits are not finite."""
        for name, t in adapter.tensors().items():
            if not bool(torch.isfinite(t.to(self.dtype)).all()):
                raise AdapterNumericError(f"tensor '{name}' overflows in {str(self.dtype).replace('torch.', '')}, "
                                          "the dtype this server computes in")
        a, e, b = (t.unsqueeze(1) for t in pack_adapter(adapter, None, self.dtype, self.device))  # one slot
        plan = BatchPlan.build([0] * PROBE_IMAGES, device=self.device, max_rank=adapter.max_rank)
        s = self.base.input_size
        g = torch.Generator().manual_seed(0)
        x = torch.randn(PROBE_IMAGES, 3, s, s, generator=g).to(self.device, self.dtype)
        with self._forward:
            feats = self.model.features(x, PackedSource(a, e, b, plan, self.qkv_fn)).float()
        for task in adapter.tasks:
            head = adapter.heads[task.name]
            logits = torch.nn.functional.linear(feats, head.weight.float().to(self.device),
                                                head.bias.float().to(self.device))
            if not bool(torch.isfinite(logits).all()):
                raise AdapterNumericError(f"task '{task.name}': the adapter's logits overflow on a probe batch "
                                          "(its head or factors are too large)")

    def pin(self, ref: str) -> Entry:
        """Pin in the registry (refused when pins would leave this server too few slots), then keep it resident."""
        entry = self.registry.resolve(ref)
        pinned = {e.sha256 for e in self.registry.list() if e.pinned}
        limit = self.config.slots - self.config.reserved_slots
        if entry.sha256 not in pinned and len(pinned) + 1 > limit:
            raise ConflictError(f"cannot pin {entry.ref}: {len(pinned)} adapters are pinned and at most {limit} of "
                                f"the {self.config.slots} device slots may be (the rest serve every other adapter)")
        entry = self.registry.pin(entry.ref)
        self.pool.set_pinned(entry.sha256, True)
        return entry

    def unpin(self, ref: str) -> Entry:
        entry = self.registry.unpin(ref)
        if not any(e.pinned and e.sha256 == entry.sha256 for e in self.registry.list()):
            self.pool.set_pinned(entry.sha256, False)
        return entry

    def forget(self, sha256: str) -> None:
        """Drop an adapter's content from every tier (after its last registry row is gone)."""
        self.pool.forget(sha256)

    # -- requests -----------------------------------------------------------------------------
    def request(self, image: torch.Tensor, adapter: ResolvedAdapter | str | None, task: str | None = None,
                top_k: int | None = None) -> Request:
        """Resolve (unless resolved already) and validate one request, raising its own error before batching."""
        top_k = self.config.top_k if top_k is None else top_k
        if top_k < 1:
            raise BadInputError("top_k must be at least 1")
        s = self.base.input_size
        if tuple(image.shape) != (3, s, s):
            raise BadInputError(f"image tensor has shape {tuple(image.shape)}, expected (3, {s}, {s})")
        if adapter is None:
            return Request(image, None, None, top_k)
        resolved = self.resolve(adapter) if isinstance(adapter, str) else adapter
        return Request(image, resolved, resolved.task(task), top_k)

    # -- inference ----------------------------------------------------------------------------
    def infer(self, images, adapter_refs: list[str | None], tasks: list[str | None] | None = None,
              top_k: int | None = None) -> list[Diagnosis]:
        """Diagnose a batch; image n uses adapter_refs[n] (None = no adapter) and tasks[n]."""
        images = list(images) if not isinstance(images, torch.Tensor) else list(images.unbind(0))
        if len(adapter_refs) != len(images):
            raise BadInputError(f"{len(images)} images but {len(adapter_refs)} adapter references")
        task_names: list[str | None] = list(tasks) if tasks is not None else [None] * len(images)
        reqs = [self.request(img, ref, t, top_k) for img, ref, t in zip(images, adapter_refs, task_names)]
        out = self.run(reqs)
        for r in out:
            if isinstance(r, Exception):
                raise r
        return out  # type: ignore[return-value]

    def run(self, requests: list[Request]) -> list[Diagnosis | Exception]:
        """Run prepared requests in passes; a failure is returned in that request's place."""
        results: list[Diagnosis | Exception] = []
        for chunk in self._passes(requests):
            try:
                results += self._run_batch(chunk)
            except MedlegoError as e:
                results += [e] * len(chunk)
        return results

    def _passes(self, requests: list[Request]):
        """Consecutive runs of requests that fit one trunk pass: by image count and by free device slots."""
        chunk: list[Request] = []
        shas: set[str] = set()
        for r in requests:
            sha = r.adapter.sha256 if r.adapter is not None else None
            grows = sha is not None and sha not in shas
            full = len(chunk) >= self.config.max_pass_images
            if chunk and (full or (sha is not None and grows and len(shas) + 1 > self.pool.capacity(shas | {sha}))):
                yield chunk
                chunk, shas = [], set()
            chunk.append(r)
            if sha is not None:
                shas.add(sha)
        if chunk:
            yield chunk

    @torch.inference_mode()
    def _run_batch(self, reqs: list[Request]) -> list[Diagnosis | Exception]:
        t0 = time.perf_counter()
        distinct: dict[str, tuple[HostAdapter, bool]] = {}
        for r in reqs:
            if r.adapter is not None:
                distinct.setdefault(r.adapter.sha256, (r.adapter.host, r.adapter.pinned))
        n = len(reqs)
        bucket = self.bucket(n)
        pixels = torch.stack([r.image for r in reqs]).to(self.device, self.dtype, non_blocking=True)
        qkv_fn = self.qkv_for(bucket)
        with self._forward:
            slots = dict(zip(distinct, self.pool.acquire(list(distinct.values()))))
            image_slots = [-1 if r.adapter is None else slots[r.adapter.sha256] for r in reqs]
            batch_rank = max((h.rank for h, _ in distinct.values()), default=0)
            plan = self.plans.fill(image_slots, pad_to=bucket if self.pad_batches else n, max_rank=batch_rank)
            t1 = time.perf_counter()
            graphed = None
            if self.graphs is not None and impl_name(qkv_fn) != "torch":  # the reference cannot be captured
                graphed = self.graphs.run(pixels, plan, qkv_fn)
            if graphed is not None:
                feats = graphed[:n].float().clone()  # the graph's output buffer is reused by the next replay
            else:
                if plan.batch > n:  # padding images: zeros, slot −1 (each image's result is its own)
                    pixels = torch.cat([pixels, pixels.new_zeros(plan.batch - n, *pixels.shape[1:])])
                source = PackedSource(self.pool.lora_a, self.pool.lora_e, self.pool.lora_b, plan, qkv_fn)
                feats = self.model.features(pixels, source if plan.any_active else None)[:n].float()  # [N, D]
        probs = self._heads(reqs, feats, {sha: h for sha, (h, _) in distinct.items()})
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t2 = time.perf_counter()
        self.counters.observe("batch_size", len(reqs))
        self.counters.observe("stage_seconds", t2 - t1, stage="inference")
        self.counters.observe("stage_seconds", t1 - t0, stage="prepare")
        timings = {"prepare": t1 - t0, "inference": t2 - t1}
        return [self._diagnosis(r, feats[n], probs[n], dict(timings)) for n, r in enumerate(reqs)]

    @staticmethod
    def _heads(reqs: list[Request], feats: torch.Tensor, hosts: dict[str, HostAdapter]) -> list[torch.Tensor | None]:
        """Each request's probabilities: one head matmul per (adapter, task) group."""
        probs: list[torch.Tensor | None] = [None] * len(reqs)
        groups: dict[tuple[str, str], list[int]] = {}
        for n, r in enumerate(reqs):
            if r.adapter is not None and r.task is not None:
                groups.setdefault((r.adapter.sha256, r.task.name), []).append(n)
        for (sha, task_name), idx in groups.items():
            w, b = hosts[sha].heads[task_name]
            logits = torch.nn.functional.linear(feats[idx], w.float(), b.float())
            p = probabilities(logits, reqs[idx[0]].task)
            for j, n in enumerate(idx):
                probs[n] = p[j]
        return probs

    def _diagnosis(self, r: Request, feats: torch.Tensor, p: torch.Tensor | None,
                   timings: dict[str, float]) -> Diagnosis | Exception:
        if r.adapter is None or r.task is None or p is None:
            return Diagnosis(embedding=feats.tolist(), timings=timings)  # no adapter: the features alone
        p = p.cpu()
        if not bool(torch.isfinite(p).all()):  # never answer NaN: this adapter is numerically broken here
            return AdapterNumericError(f"adapter {r.adapter.ref} produced non-finite probabilities for task "
                                       f"'{r.task.name}'; it cannot be served in {str(self.dtype).replace('torch.', '')}")
        labels = r.task.labels
        top_v, top_i = torch.topk(p, min(r.top_k, len(labels)))
        self.counters.inc("inferences", adapter=r.adapter.name, task=r.task.name)
        return Diagnosis(
            adapter=r.adapter.name, version=r.adapter.version, sha256=r.adapter.sha256, task=r.task.name,
            probabilities={lab: float(v) for lab, v in zip(labels, p.tolist())},
            top=[(labels[i], float(v)) for v, i in zip(top_v.tolist(), top_i.tolist())],
            multilabel=r.task.multilabel, timings=timings, rank_truncation=getattr(r.adapter.host, "truncation", None))

    def warmup(self) -> None:
        """The kernel choice for every batch bucket (measured or read from the cache), and one forward
        of the base and of the adapter path, so that the first request pays no setup."""
        for bucket in batch_buckets(self.config.max_pass_images):
            self.qkv_for(bucket)
        s = self.base.input_size
        x = torch.zeros(2, 3, s, s, device=self.device, dtype=self.dtype)
        with torch.inference_mode(), self._forward:
            self.model.features(x)
            plan = BatchPlan.build([0, -1], device=self.device, max_rank=self.config.max_rank)
            self.model.features(x, PackedSource(self.pool.lora_a, self.pool.lora_e, self.pool.lora_b, plan,
                                                self.qkv_for(self.bucket(2))))
        self.ready = True

    def pool_stats(self) -> dict:
        """Residency now: slots, resident adapters per tier, bytes, pins (what the metrics export)."""
        return self.pool.stats()

    def stats(self) -> dict:
        return {"pool": self.pool.stats(), "registry_size": len(self.registry), "device": str(self.device),
                "dtype": str(self.dtype).replace("torch.", ""), "kernel": self.kernel_report()}

    def kernel_report(self) -> dict:
        """The qkv path per batch bucket and how it was chosen, plus whether CUDA graphs are on."""
        out = self.kernels.report()
        out["cuda_graphs"] = self.graphs is not None
        if self.graphs is not None:
            out["captured_batches"] = self.graphs.buckets
            if self.graphs.failed:
                out["capture_failed"] = {str(b): why for b, why in self.graphs.failed.items()}
        out["pad_batches"] = bool(self.pad_batches)
        return out
