"""The transport-independent server core that REST, gRPC and the Ray replica all call.

One :class:`DiagnosisService` owns the engine's dynamic batcher, a small thread pool for image
decoding and preprocessing (never on the event loop), the limits, the tokens and the metrics.
Diagnosis: resolve the adapter (loads it to host memory if cold) → decode + preprocess with the
adapter's own preprocessing → queue in the mixed-adapter batcher → answer. Admin: the registry
operations, with the pool kept consistent (pins, evictions) and every upload validated against
the resident base before anything is written.

Every user mistake surfaces as a :class:`MedlegoError` (4xx / 503); the transports map them.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from medlego.runtime.batcher import DynamicBatcher
from medlego.runtime.engine import Diagnosis, Engine, Request
from medlego.runtime.errors import BadInputError, MedlegoError, OverloadedError
from medlego.runtime.imaging import preprocess
from medlego.runtime.registry import parse_ref

from .auth import Auth
from .limits import Limits
from .metrics import metrics_registry, render

log = logging.getLogger("medlego.serving")

OUTCOMES = {200: "ok", 400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
            409: "conflict", 413: "too_large", 422: "invalid", 503: "overloaded"}


def outcome_of(error: BaseException | None) -> str:
    if error is None:
        return "ok"
    if isinstance(error, asyncio.CancelledError):
        return "cancelled"  # the client went away
    return OUTCOMES.get(getattr(error, "status", 500), "error") if isinstance(error, MedlegoError) else "error"


async def call(fn, *args):
    """Await a coroutine function; run a blocking one in the default thread pool (off the event loop)."""
    if inspect.iscoroutinefunction(fn):
        return await fn(*args)
    return await asyncio.get_running_loop().run_in_executor(None, lambda: fn(*args))


def single_threaded_executor(workers: int, name: str) -> ThreadPoolExecutor:
    """A thread pool whose threads run torch ops on one intra-op thread each.

    Decoding and preprocessing are small tensor ops; with torch's default intra-op parallelism
    every decode thread would start its own OpenMP team next to the engine's, and on a busy CPU
    each small op then waits for a descheduled team thread (measured here: 8 ms instead of 0.05 ms
    per elementwise op on a 224 px image). ``torch.set_num_threads`` is global for threads that
    have not used torch yet, so the pool threads are created and set to 1 first, and the global
    default is put back for everyone else (the batcher thread keeps the engine's thread count).
    """
    import torch

    wanted = torch.get_num_threads()

    def init() -> None:
        torch.get_num_threads()  # this thread's own lazy thread-count init happens first…
        torch.set_num_threads(1)  # …so this sticks to the thread

    pool = ThreadPoolExecutor(workers, thread_name_prefix=name, initializer=init)
    barrier = threading.Barrier(workers + 1)
    for _ in range(workers):
        pool.submit(barrier.wait, 30)
    barrier.wait(30)  # every pool thread exists and has run init
    torch.set_num_threads(wanted)
    return pool


@dataclass
class BatchingConfig:
    max_batch: int = 32  # images per engine batch
    max_wait_ms: float = 5.0  # how long the first request of a batch waits for company
    max_queue: int = 1024  # queued requests before new ones get 503
    decode_workers: int = 2  # threads decoding and preprocessing images


@dataclass
class DiagnoseItem:
    """One image to diagnose, as any transport receives it."""

    image: bytes
    adapter: str
    task: str | None = None
    top_k: int | None = None


class DiagnosisService:
    def __init__(self, engine: Engine, *, limits: Limits | None = None, auth: Auth | None = None,
                 batching: BatchingConfig | None = None, replica: str = ""):
        self.engine = engine
        self.registry = engine.registry
        self.limits = limits or Limits()
        self.auth = auth or Auth()
        self.batching = batching or BatchingConfig()
        self.replica = replica  # set in Ray mode: answers say which replica served them
        b = self.batching
        self.batcher = DynamicBatcher(engine, max_batch=b.max_batch, max_wait_ms=b.max_wait_ms, max_queue=b.max_queue)
        self.executor = single_threaded_executor(max(1, b.decode_workers), "medlego-decode")
        # admission bound: everything admitted is decoding, queued or running; beyond it, 503 at once
        self.max_inflight = b.max_queue + 2 * b.max_batch
        self._inflight = 0
        self._inflight_lock = threading.Lock()
        self.metrics = metrics_registry(self)
        self.started = time.time()

    # -- lifecycle ------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return bool(self.engine.ready)

    def warmup(self) -> None:
        t0 = time.perf_counter()
        self.engine.warmup()
        log.info("engine warmed up in %.2fs", time.perf_counter() - t0)

    def close(self) -> None:
        self.batcher.stop()
        self.executor.shutdown(wait=False, cancel_futures=True)

    @property
    def inflight(self) -> int:
        return self._inflight

    def _admit(self, n: int) -> None:
        with self._inflight_lock:
            if self._inflight + n > self.max_inflight:
                self.engine.counters.inc("rejected", reason="overloaded")
                raise OverloadedError(f"server overloaded: {self._inflight} requests in flight (limit "
                                      f"{self.max_inflight}); retry later")
            self._inflight += n

    def _release(self, n: int) -> None:
        with self._inflight_lock:
            self._inflight -= n

    # -- diagnosis ------------------------------------------------------------------------------
    def prepare(self, item: DiagnoseItem) -> tuple[Request, float]:
        """Resolve + decode + preprocess one item (runs in the decode pool; raises its own error).

        Returns the queued-ready request and the seconds spent decoding and preprocessing."""
        if not item.adapter:
            raise BadInputError("'adapter' is required: a registered name, name@version or alias")
        top_k = self.limits.check_top_k(item.top_k)
        resolved = self.engine.resolve(item.adapter)
        task = resolved.task(item.task or None)
        t0 = time.perf_counter()
        image = preprocess(self.limits.decode(item.image), resolved.preprocess)  # [3, S, S]
        decode_s = time.perf_counter() - t0
        self.engine.counters.observe("stage_seconds", decode_s, stage="decode")
        return Request(image, resolved, task, self.engine.config.top_k if top_k is None else top_k), decode_s

    async def diagnose(self, item: DiagnoseItem, api: str = "rest") -> Diagnosis:
        return (await self.diagnose_many([item], api))[0]

    async def diagnose_many(self, items: list[DiagnoseItem], api: str = "rest") -> list[Diagnosis]:
        """All or nothing: the first failing item's error (its index named when several) is raised."""
        if len(items) > 1 or not items:
            self.limits.check_batch(len(items))
        t0 = time.perf_counter()
        self._admit(len(items))
        loop = asyncio.get_running_loop()
        requests: list[Request] = []
        try:
            prepared = await asyncio.gather(*[loop.run_in_executor(self.executor, self.prepare, it) for it in items],
                                            return_exceptions=True)
            for n, r in enumerate(prepared):
                if isinstance(r, BaseException):
                    self._count(items[n], None, r, api)
                    if len(items) > 1 and isinstance(r, MedlegoError):
                        raise type(r)(f"image {n}: {r}") from None
                    raise r
            requests = [r for r, _ in prepared]
            decode_times = [s for _, s in prepared]
            futures = []
            try:
                for r in requests:
                    futures.append(self.batcher.submit_request(r))
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
            results = await asyncio.gather(*[asyncio.wrap_future(f) for f in futures])
        except BaseException as e:
            for r in requests:
                self._count(None, r, e, api)
            raise
        finally:
            self._release(len(items))
        elapsed = time.perf_counter() - t0
        self.engine.counters.observe("request_seconds", elapsed, api=api)
        for r, d, decode_s in zip(requests, results, decode_times):
            d.timings["decode"] = decode_s
            d.timings["total"] = elapsed
            self._count(None, r, None, api)
        return results

    def _count(self, item: DiagnoseItem | None, request: Request | None, error: BaseException | None, api: str) -> None:
        # only resolved names become labels: a user's typo must not create a new time series
        adapter = request.adapter.name if request is not None and request.adapter is not None else ""
        task = request.task.name if request is not None and request.task is not None else ""
        self.engine.counters.inc("requests", adapter=adapter, task=task, outcome=outcome_of(error), api=api)

    def diagnosis_json(self, d: Diagnosis) -> dict:
        out = d.to_json()
        if self.replica:
            out["replica"] = self.replica
        return out

    # -- registry (admin writes need the admin token; the transports check it) -------------------
    def _admin(self, op: str, fn, *args):
        try:
            out = fn(*args)
        except BaseException as e:
            self.engine.counters.inc("admin_operations", op=op, outcome=outcome_of(e))
            raise
        self.engine.counters.inc("admin_operations", op=op, outcome="ok")
        return out

    def register(self, name: str, data: bytes, aliases: list[str] | tuple[str, ...] = ()) -> dict:
        """Validate against the resident base, then write; usable by the next request, no restart."""
        def run():
            self.limits.check_adapter_bytes(data)
            entry = self.registry.register(name, data, tuple(a for a in aliases if a))
            return self.registry.describe(entry.ref)
        return self._admin("register", run)

    def list_adapters(self) -> dict:
        return {"adapters": [e.to_json() for e in self.registry.list()], "aliases": self.registry.aliases()}

    def describe(self, ref: str) -> dict:
        return self.registry.describe(ref)

    def aliases(self) -> dict[str, str]:
        return self.registry.aliases()

    def delete(self, ref: str, all_versions: bool = False) -> list[str]:
        def run():
            name, version = parse_ref(ref)
            if version is None and not all_versions:
                raise BadInputError(f"name the version to delete ('{name}@N'), or ask for every version explicitly")
            gone = self.registry.delete(name, version)
            still_used = {e.sha256 for e in self.registry.list()}
            for e in gone:
                if e.sha256 not in still_used:
                    self.engine.pool.evict(e.sha256)  # in-flight requests keep their own reference
            return [e.ref for e in gone]
        return self._admin("delete", run)

    def pin(self, ref: str) -> dict:
        def run():
            entry = self.registry.pin(ref)
            # a host copy remembers its registry entry as it was when loaded (unpinned): drop it, so the
            # next request reloads the entry as pinned and the pool keeps the adapter on the device
            self.engine.pool.evict(entry.sha256)
            self.engine.pool.pin(entry.sha256)
            return self.registry.describe(entry.ref)
        return self._admin("pin", run)

    def unpin(self, ref: str) -> dict:
        def run():
            entry = self.registry.unpin(ref)
            if not any(e.pinned and e.sha256 == entry.sha256 for e in self.registry.list()):
                self.engine.pool.unpin(entry.sha256)
                # the pool's host copy remembers the entry as it was when loaded (pinned) and would
                # pin it again on its next batch: drop it, the next request reloads a fresh entry
                self.engine.pool.evict(entry.sha256)
            return self.registry.describe(entry.ref)
        return self._admin("unpin", run)

    def set_alias(self, alias: str, target: str) -> dict:
        def run():
            self.registry.set_alias(alias, target)
            return {"alias": alias, "target": target, "resolves_to": self.registry.resolve(alias).ref}
        return self._admin("alias", run)

    def remove_alias(self, alias: str) -> None:
        self._admin("alias", self.registry.remove_alias, alias)

    def merge(self, name: str, sources: list[str], method: str = "med-lego", params: dict | None = None,
              aliases: list[str] | tuple[str, ...] = (), task_names: list[str] | None = None) -> dict:
        """Run the offline merge job (medlego.jobs.merge) on registered adapters; register the result as `name`.

        The merged rank is capped at what this server serves (its max_rank), so the result always registers."""
        from medlego.jobs.merge import merge_adapters

        def run():
            if not isinstance(sources, list) or not sources or not all(isinstance(x, str) for x in sources):
                raise BadInputError("'sources' must be a non-empty list of registered adapter references")
            loaded = [self.registry.load(ref) for ref in sources]
            info = [{"ref": ref, "name": e.name, "version": e.version, "sha256": e.sha256}
                    for ref, (e, _) in zip(sources, loaded)]
            p = dict(params or {})
            if self.registry.max_rank and p.get("max_rank") is None:
                p["max_rank"] = self.registry.max_rank
            try:
                adapter, _ = merge_adapters([a for _, a in loaded], method, p, source_info=info, task_names=task_names)
            except MedlegoError:
                raise
            except (TypeError, ValueError) as e:  # a parameter of the wrong type or range
                raise BadInputError(f"bad parameters for merge method '{method}': {e}") from None
            entry = self.registry.register(name, adapter.to_bytes(), tuple(aliases))
            return self.registry.describe(entry.ref)
        return self._admin("merge", run)

    # -- health and metrics ----------------------------------------------------------------------
    def info(self) -> dict:
        return {**self.health(), **self.engine.stats()}

    def metrics_text(self) -> bytes:
        return render(self.metrics)

    def health(self) -> dict:
        try:
            adapters = len(self.registry)
        except Exception:
            adapters = -1
        return {"alive": True, "ready": self.ready, "adapters": adapters, "device": str(self.engine.device),
                "model": self.engine.base.name, "input_size": self.engine.base.input_size,
                "fingerprint": self.engine.base.fingerprint, "uptime_s": round(time.time() - self.started, 3),
                **({"replica": self.replica} if self.replica else {})}
