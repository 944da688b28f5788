"""The in-process implementation of the serving contract: one engine in this process.

One :class:`DiagnosisService` owns the engine's dynamic batcher, a small thread pool for image
decoding and preprocessing (never on the event loop), the limits, the tokens and the metrics.
Diagnosis: resolve the adapter (loads it to host memory if cold) → decode + preprocess with the
adapter's own preprocessing → queue in the mixed-adapter batcher → answer. Admin: the registry
operations, through the engine where residency follows (pins, forgetting deleted content), with
every upload validated against the resident base before anything is written.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import uuid
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, TypeVar

import numpy as np
import torch

from medlego.runtime.registry import audit as audit_log
from medlego.runtime.adapter_merge import merge_adapters
from medlego.runtime.batcher import DynamicBatcher
from medlego.runtime.config import BatchingConfig, Limits, ServeConfig
from medlego.runtime.engine import AdapterCold, Diagnosis, Engine, Request
from medlego.runtime.errors import BadInputError, MedlegoError, OverloadedError, answer_of
from medlego.runtime.imaging import preprocess, sniff_format
from medlego.runtime.registry import Registry, parse_ref

from . import limits as checks
from .auth import Auth
from .contract import DiagnoseItem, MergeSpec, item_error
from .metrics import metrics_registry, render

log = logging.getLogger("medlego.serving")

T = TypeVar("T")


def outcome_of(error: BaseException | None) -> str:
    """The metrics outcome label of a request that ended with `error` (None: it succeeded)."""
    if error is None:
        return "ok"
    if isinstance(error, asyncio.CancelledError):
        return "cancelled"  # the client went away
    return answer_of(error)[2]


async def off_loop(fn: Callable[..., T], *args) -> T:
    """Run a blocking call in the default thread pool, never on the event loop."""
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


class RegistryReads:
    """The read half of the contract, straight from a registry (shared by the service and the Ray ingress)."""

    registry: Registry

    async def list_adapters(self) -> dict:
        def listing():
            return {"adapters": [e.to_json() for e in self.registry.list()], "aliases": self.registry.aliases()}
        return await off_loop(listing)

    async def describe(self, ref: str) -> dict:
        return await off_loop(self.registry.describe, checks.check_text(ref, "ref", required=True))

    async def aliases(self) -> dict[str, str]:
        return await off_loop(self.registry.aliases)

    async def audit_rows(self, **filters) -> list[dict]:
        """Audit rows matching the filters (runtime/registry/audit.py); the rows still in the buffer are written first."""
        if filters.get("kind") not in (None, *audit_log.KINDS):
            raise BadInputError(f"unknown audit kind {filters['kind']!r}; choose from {', '.join(audit_log.KINDS)}")
        if filters.get("image_sha256") and not _is_hex64(filters["image_sha256"]):
            raise BadInputError("'image_sha256' must be 64 hex digits")
        for key in ("adapter", "caller"):
            checks.check_text(filters.get(key), key)
        log_ = getattr(self, "audit", None)

        def run():
            if log_ is not None:
                log_.flush()
            else:
                audit_log.ensure_schema(self.registry.index)
            return audit_log.query(self.registry.index, **filters)
        return await off_loop(run)


class DiagnosisService(RegistryReads):
    def __init__(self, engine: Engine, *, limits: Limits | None = None, auth: Auth | None = None,
                 batching: BatchingConfig | None = None, replica: str = "",
                 audit: "audit_log.AuditLog | None" = None):
        self.engine = engine
        self.registry = engine.registry
        self.limits = limits or Limits()
        self.auth = auth or Auth()
        self.batching = batching or BatchingConfig()
        self.replica = replica  # set in Ray mode: answers say which replica served them
        b = self.batching
        self._preparing = 0  # admitted, images being decoded: the batcher waits a little for these
        self.batcher = DynamicBatcher(engine, max_batch=b.max_batch, max_wait_ms=b.max_wait_ms, max_queue=b.max_queue,
                                      preparing=lambda: self._preparing)
        self.executor = single_threaded_executor(max(1, b.decode_workers), "medlego-decode")
        # admission bound: everything admitted is decoding, queued or running; beyond it, 503 at once
        self.max_inflight = b.max_queue + 2 * b.max_batch
        self._inflight = 0
        self._inflight_lock = threading.Lock()
        self.metrics = metrics_registry(self)
        self.started = time.time()
        self.audit = audit  # None: nothing is recorded
        if audit is not None:
            self.auth.hooks["refused"] = self._refused
            if self.auth.tokens_file is not None:  # a revoked or added token is an audit row
                self.auth.tokens_file.on_change = self._tokens_changed

    @classmethod
    def from_config(cls, cfg: ServeConfig, *, base=None, replica: str = "") -> "DiagnosisService":
        """Load the base (unless given), open the registry, build the engine and the service."""
        from medlego.runtime.base import load_base

        if base is None:
            if not cfg.base.model:
                raise BadInputError("no base model: give --model NAME --weights FILE (or [base] in the config file)")
            base = load_base(cfg.base.model, cfg.base.weights, pretrained=cfg.base.pretrained)
        registry = Registry(cfg.data_dir, base=base.spec, max_rank=cfg.engine.max_rank, input_size=base.input_size,
                            **cfg.registry.registry_kwargs())
        if cfg.engine.kernel_cache is None:  # measured kernel choices outlive a restart
            cfg.engine.kernel_cache = str(cfg.data_dir / "kernel_choice.json")
        engine = Engine(base, registry, cfg.engine)
        audit = audit_log.AuditLog(registry.index, cfg.audit, store=registry.store) if cfg.audit.enabled else None
        return cls(engine, limits=cfg.limits, auth=Auth.from_config(cfg.auth), batching=cfg.batching,
                   replica=replica, audit=audit)

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
        if self.audit is not None:
            self.audit.close()  # what is still buffered is written before the process ends

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
    def prepare(self, item: DiagnoseItem, held=None, load: bool = True) -> tuple[Request, float]:
        """Resolve + decode + preprocess one item (runs in the decode pool; raises its own error).

        Returns the queue-ready request and the seconds spent decoding and preprocessing. With
        load=False a cold adapter raises AdapterCold instead of waiting (see :meth:`_prepare`);
        ``held`` is the host copy that loading returned."""
        ref = checks.check_text(item.adapter, "adapter")
        if ref is None:
            raise BadInputError("'adapter' is required: a registered name, name@version or alias")
        task = checks.check_text(item.task, "task")
        top_k = checks.check_top_k(self.limits, item.top_k)
        resolved = self.engine.resolve(ref, load=load, held=held)
        resolved.task(task)  # an unknown task is refused before the image is decoded
        t0 = time.perf_counter()
        size = resolved.preprocess.input_size
        if item.pixels is not None:
            image = _preprocessed(item.pixels, size, resolved.ref)
        else:
            image = preprocess(checks.decode(self.limits, item.image, size), resolved.preprocess)  # [3, S, S]
        decode_s = time.perf_counter() - t0
        self.engine.counters.observe("stage_seconds", decode_s, stage="decode")
        return self.engine.request(image, resolved, task, top_k), decode_s

    async def _prepare(self, loop, item: DiagnoseItem) -> tuple[Request, float]:
        """prepare() in the decode pool; a cold adapter is loaded by the engine's loader pool meanwhile,
        so a slow or hung store never holds a decode worker (and adapters in memory keep being served)."""
        held = None
        for _ in range(3):  # the reference may move to another cold adapter between two resolves
            try:
                return await loop.run_in_executor(self.executor, self.prepare, item, held, False)
            except AdapterCold as cold:
                self._preparing -= 1  # not decoding while it waits: the batcher need not wait for it
                try:
                    held = await self.engine.load_async(cold.entry)
                finally:
                    self._preparing += 1
        raise OverloadedError(f"adapter '{item.adapter}' kept changing while it was loaded; retry")

    async def diagnose(self, item: DiagnoseItem, api: str = "rest") -> dict:
        return (await self.diagnose_many([item], api))[0]

    async def diagnose_many(self, items: list[DiagnoseItem], api: str = "rest") -> list[dict]:
        """All or nothing: the first failing item's error (its index named when several) is raised."""
        if len(items) != 1:
            checks.check_batch(self.limits, len(items))
        t0 = time.perf_counter()
        if self.audit is not None:
            try:
                self.audit.check_room()  # 503 before the work when its row could not be recorded
                self._admit(len(items))
            except OverloadedError as e:
                self._audit_items(items, api, [None] * len(items), None, e, t0)
                raise
        else:
            self._admit(len(items))
        loop = asyncio.get_running_loop()
        requests: list[Request] = []
        try:
            self._preparing += len(items)  # on the event loop only; the batcher reads it
            try:
                prepared = await asyncio.gather(*[self._prepare(loop, it)
                                                  for it in items], return_exceptions=True)
            finally:
                self._preparing -= len(items)  # before they are queued: a batch never waits for what is there
            for n, r in enumerate(prepared):
                if isinstance(r, BaseException):
                    self._count(None, r, api)
                    if self.audit is not None:
                        self._audit_items(items, api, [p if not isinstance(p, BaseException) else None
                                                       for p in prepared], None, r, t0, failed=n)
                    raise item_error(n, len(items), r) from None
            requests = [r for r, _ in prepared]  # type: ignore[misc]
            decode_times = [s for _, s in prepared]  # type: ignore[misc]
            futures = []
            try:
                for r in requests:
                    futures.append(self.batcher.submit_request(r))
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
            results: list[Diagnosis] = list(await asyncio.gather(*[asyncio.wrap_future(f) for f in futures]))
        except BaseException as e:
            for r in requests:
                self._count(r, e, api)
            if requests and self.audit is not None:
                self._audit_items(items, api, prepared, None, e, t0)
            raise
        finally:
            self._release(len(items))
        elapsed = time.perf_counter() - t0
        self.engine.counters.observe("request_seconds", elapsed, api=api)
        answers = []
        for r, d, decode_s in zip(requests, results, decode_times):
            d.timings["decode"] = decode_s
            d.timings["total"] = elapsed
            self._count(r, None, api)
            answers.append(self._answer(d))
        if self.audit is not None:
            self._audit_items(items, api, prepared, results, None, t0)
        return answers

    # -- the audit trail (runtime/registry/audit.py) -------------------------------------------------------
    def _audit_items(self, items, api, prepared, results, error, t0, failed: int | None = None) -> None:
        current = audit_log.CURRENT.get() or {}
        rid = current.get("id") or uuid.uuid4().hex
        caller = current.get("caller", "")
        latency_ms = round((time.perf_counter() - t0) * 1000, 3)
        outcome = outcome_of(error)
        for n, item in enumerate(items):
            p = prepared[n] if prepared is not None and n < len(prepared) else None
            r = p[0] if isinstance(p, tuple) else None
            adapter = r.adapter if r is not None else None
            row = {"request_id": rid if len(items) == 1 else f"{rid}/{n}", "caller": caller, "api": api,
                   "adapter": adapter.ref if adapter is not None else "",
                   "adapter_sha256": adapter.sha256 if adapter is not None else "",
                   "requested": str(item.adapter)[:256],
                   "task": r.task.name if r is not None and r.task is not None else (item.task or ""),
                   **image_fields(item), "latency_ms": latency_ms, "outcome": outcome}
            if results is not None:
                d = results[n]
                top = d.top[0] if d.top else None
                row["top_label"], row["top_probability"] = (top[0], top[1]) if top else (None, None)
                if self.audit.settings.probabilities:
                    row["probabilities"] = d.probabilities
            else:
                reason = error if failed is None or failed == n else None
                row["reason"] = str(reason) if reason is not None else f"image {failed} of the request failed"
            self.audit.record("diagnosis" if error is None else "refused", admitted=True, **row)

    def _refused(self, caller: str, action: str, reason: str) -> None:
        current = audit_log.CURRENT.get() or {}
        self.audit.refusal(request_id=current.get("id") or uuid.uuid4().hex, caller=caller, api=current.get("api", ""),
                           action=action, reason=reason, outcome="refused")  # identical ones aggregated

    def _tokens_changed(self, added: list, removed: list, changed: list) -> None:
        self.audit.record("admin", admitted=True, request_id=uuid.uuid4().hex, caller="", api="tokens_file",
                          op="tokens", args={"file": str(self.auth.tokens_file.path)},
                          after={"added": added, "revoked": removed, "changed": changed}, outcome="ok")

    def refused_at(self, status: int, **fields) -> None:
        """Record a request answered `status` (>= 400) by a stage no recorder saw (body limit, parsing,
        multipart, v2 tensor checks, routing): once per request, identical ones aggregated
        (runtime/registry/audit.py). Called by the transports' refusal recorder (serving/app.py)."""
        current = audit_log.CURRENT.get() or {}
        if self.audit is None or current.get("audited"):
            return
        try:
            self.audit.refusal(request_id=current.get("id") or uuid.uuid4().hex, caller=current.get("caller", ""),
                               api=current.get("api", ""), status=status, **fields,
                               outcome="refused" if status < 500 else "error")
        except Exception:  # recording must never turn an answer into a 500
            log.exception("could not record a refusal")

    def _count(self, request: Request | None, error: BaseException | None, api: str) -> None:
        # only resolved names become labels: a user's typo must not create a new time series
        adapter = request.adapter.name if request is not None and request.adapter is not None else ""
        task = request.task.name if request is not None and request.task is not None else ""
        self.engine.counters.inc("requests", adapter=adapter, task=task, outcome=outcome_of(error), api=api)

    def _answer(self, d: Diagnosis) -> dict:
        out = d.to_json()
        if self.replica:
            out["replica"] = self.replica
        return out

    # -- registry writes (the transports check the admin token) ---------------------------------
    async def _admin(self, op: str, fn: Callable[[], T], args: dict | None = None,
                     before: Callable[[], object] | None = None) -> T:
        prior = None
        if self.audit is not None:
            self.audit.check_room()  # 503 before the operation when its row could not be recorded
        if self.audit is not None and before is not None:
            try:
                prior = await off_loop(before)
            except MedlegoError:
                prior = None
        try:
            out = await off_loop(fn)
        except BaseException as e:
            self.engine.counters.inc("admin_operations", op=op, outcome=outcome_of(e))
            self._audit_admin(op, args, prior, None, e)
            raise
        self.engine.counters.inc("admin_operations", op=op, outcome="ok")
        self._audit_admin(op, args, prior, out, None)
        return out

    def _audit_admin(self, op, args, before, after, error) -> None:
        if self.audit is None:
            return
        current = audit_log.CURRENT.get() or {}
        adapter = after.get("ref", "") if isinstance(after, dict) else ""
        self.audit.record("admin", request_id=current.get("id") or uuid.uuid4().hex, caller=current.get("caller", ""),
                          api=current.get("api", ""), op=op, args=args or {}, before=before, after=after,
                          adapter=adapter, outcome=outcome_of(error), admitted=True,
                          **({"reason": str(error)} if error is not None else {}))

    def _register(self, name: str, data: bytes, aliases, move_aliases: bool) -> dict:
        checks.check_adapter_bytes(self.limits, data)
        entry = self.registry.register(checks.check_text(name, "name", required=True) or "", data,
                                       tuple(a for a in aliases if a), move_aliases=move_aliases,
                                       check=self.engine.check_adapter)
        return self.registry.describe(entry.ref)

    async def register(self, name: str, data: bytes, aliases: list[str], move_aliases: bool = False) -> dict:
        """Validate against the resident base, then write; usable by the next request, no restart."""
        return await self._admin("register", lambda: self._register(name, data, aliases, move_aliases),
                                 {"name": name, "aliases": list(aliases), "move_aliases": move_aliases,
                                  "upload_sha256": hashlib.sha256(data).hexdigest(), "upload_bytes": len(data)})

    async def delete(self, ref: str, all_versions: bool = False) -> list[str]:
        def run():
            name, version = parse_ref(checks.check_text(ref, "ref", required=True) or "")
            if version is None and not all_versions:
                raise BadInputError(f"name the version to delete ('{name}@N'), or ask for every version explicitly")
            gone = self.registry.delete(name, version)
            still_used = {e.sha256 for e in self.registry.list()}
            for e in gone:
                if e.sha256 not in still_used:
                    self.engine.forget(e.sha256)  # in-flight requests keep their own reference
            return [e.ref for e in gone]
        return await self._admin("delete", run, {"ref": ref, "all_versions": all_versions},
                                 lambda: [e.to_json() for e in self.registry.list() if e.name == parse_ref(ref)[0]])

    async def pin(self, ref: str) -> dict:
        return await self._admin("pin", lambda: self.registry.describe(self.engine.pin(ref).ref), {"ref": ref},
                                 lambda: self.registry.describe(ref))

    async def unpin(self, ref: str) -> dict:
        return await self._admin("unpin", lambda: self.registry.describe(self.engine.unpin(ref).ref), {"ref": ref},
                                 lambda: self.registry.describe(ref))

    async def set_alias(self, alias: str, target: str) -> dict:
        def run():
            self.registry.set_alias(alias, target)
            return {"alias": alias, "target": target, "resolves_to": self.registry.resolve(alias).ref}
        return await self._admin("alias", run, {"alias": alias, "target": target},
                                 lambda: self.registry.aliases().get(alias))

    async def remove_alias(self, alias: str) -> None:
        await self._admin("alias", lambda: self.registry.remove_alias(alias), {"alias": alias, "removed": True},
                          lambda: self.registry.aliases().get(alias))

    async def merge(self, spec: MergeSpec) -> dict:
        """Merge registered adapters (runtime/adapter_merge.py) and register the result as `spec.name`.

        The merged rank is capped at what this server serves (its max_rank), so the result always registers."""
        def run():
            if not isinstance(spec.sources, list) or not spec.sources or not all(isinstance(x, str) for x in spec.sources):
                raise BadInputError("'sources' must be a non-empty list of registered adapter references")
            if not isinstance(spec.params, dict):
                raise BadInputError("'params' must be an object of method parameters")
            loaded = [self.registry.load(ref) for ref in spec.sources]
            info = [{"ref": ref, "name": e.name, "version": e.version, "sha256": e.sha256}
                    for ref, (e, _) in zip(spec.sources, loaded)]
            params = dict(spec.params)
            if params.get("max_rank") is None:
                params["max_rank"] = self.engine.config.max_rank
            adapter, _ = merge_adapters([a for _, a in loaded], spec.method, params, source_info=info,
                                        task_names=spec.task_names)
            return self._register(spec.name, adapter.to_bytes(), spec.aliases, spec.move_aliases)
        return await self._admin("merge", run, {"name": spec.name, "sources": spec.sources, "method": spec.method,
                                                "params": spec.params, "aliases": spec.aliases})

    # -- health and metrics ----------------------------------------------------------------------
    def _health(self) -> dict:
        try:
            adapters = len(self.registry)
        except MedlegoError:  # the registry's database is unreachable: alive, but say so
            adapters = -1
        return {"alive": True, "ready": self.ready, "adapters": adapters, "device": str(self.engine.device),
                "model": self.engine.base.name, "input_size": self.engine.base.input_size,
                "fingerprint": self.engine.base.fingerprint, "uptime_s": round(time.time() - self.started, 3),
                **({"replica": self.replica} if self.replica else {})}

    async def health(self) -> dict:
        return await off_loop(self._health)

    async def info(self) -> dict:
        return await off_loop(lambda: {**self._health(), **self.engine.stats()})

    async def metrics_text(self) -> bytes:
        return await off_loop(render, self.metrics)


def _preprocessed(pixels, size: int, ref: str) -> torch.Tensor:
    """An item's already-preprocessed pixels as the engine's input, or a one-line error."""
    shape = tuple(getattr(pixels, "shape", ()))
    if shape != (3, size, size):
        raise BadInputError(f"preprocessed pixels of shape {list(shape)}; {ref} takes [3, {size}, {size}] "
                            "(see its 'preprocess')")
    image = torch.from_numpy(np.array(pixels, dtype=np.float32))  # a copy: the wire's buffer is read-only
    if not bool(torch.isfinite(image).all()):
        raise BadInputError("preprocessed pixels contain NaN or infinite values")
    return image



def _is_hex64(text: str) -> bool:
    return isinstance(text, str) and len(text) == 64 and all(c in "0123456789abcdefABCDEF" for c in text)


def image_fields(item: DiagnoseItem) -> dict:
    """The sha256 of the image bytes as received and their format; never the content."""
    if item.pixels is not None and not item.image:
        try:
            data = memoryview(item.pixels).tobytes()
        except TypeError:
            data = bytes(getattr(item.pixels, "tobytes", lambda: b"")())
        return {"image_sha256": hashlib.sha256(data).hexdigest(), "image_format": "pixels"}
    data = item.image if isinstance(item.image, (bytes, bytearray)) else b""
    return {"image_sha256": hashlib.sha256(data).hexdigest(), "image_format": sniff_format(bytes(data[:512])) or "unknown",
            "image_bytes": len(data)}
