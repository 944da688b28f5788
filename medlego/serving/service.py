"""The in-process implementation of the serving contract: one engine in this process.

:class:`DiagnosisService` composes the concerns, each a module of its own: admission (a bound on
requests in flight, ``admission.py``), preparation in a decode thread pool (``prepare.py``), the
engine's mixed-adapter batcher, the audit recorder (``audit_recorder.py``), the admin operations
(``admin.py``, as ``service.admin``), the registry reads (``reads.py``) and health (``health.py``).
Diagnosis: admit → resolve the adapter (a cold one is loaded by the engine's loader pool) → decode +
preprocess with the adapter's own preprocessing → queue in the batcher → answer, counted and audited.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Sequence

from medlego.runtime.batcher import DynamicBatcher
from medlego.runtime.config import BatchingConfig, Limits, ServeConfig
from medlego.runtime.engine import AdapterCold, Diagnosis, Engine, Request
from medlego.runtime.errors import BadInputError, OverloadedError
from medlego.runtime.registry import Registry
from medlego.runtime.registry import audit as audit_log
from medlego.runtime.registry.warm import warm_in_background

from . import limits as checks
from .admin import AdminOperations
from .admission import Admission
from .audit_recorder import AuditRecorder, outcome_of
from .auth import Auth
from .contract import DiagnoseItem, item_error
from .health import health_of, info_of
from .metrics import metrics_registry, render
from .prepare import prepare, single_threaded_executor
from .reads import RegistryReads, off_loop

log = logging.getLogger("medlego.serving")


class DiagnosisService(RegistryReads):
    def __init__(self, engine: Engine, *, limits: Limits | None = None, auth: Auth | None = None,
                 batching: BatchingConfig | None = None, replica: str = "",
                 audit: "audit_log.AuditLog | None" = None):
        self.engine = engine
        self.registry = engine.registry
        self.limits = limits or Limits()
        self.auth = auth or Auth()
        b = self.batching = batching or BatchingConfig()
        self.replica = replica  # set in Ray mode: answers say which replica served them
        self._preparing = 0  # admitted, images being decoded: the batcher waits a little for these
        self.batcher = DynamicBatcher(engine, max_batch=b.max_batch, max_wait_ms=b.max_wait_ms, max_queue=b.max_queue,
                                      preparing=lambda: self._preparing)
        self.executor = single_threaded_executor(max(1, b.decode_workers), "medlego-decode")
        self.admission = Admission(b.max_queue + 2 * b.max_batch, engine.counters)
        self.metrics = metrics_registry(self)
        self.started = time.time()
        self.recorder = AuditRecorder(audit, self.auth)  # without an audit log, nothing is recorded
        self.admin = AdminOperations(engine, self.limits, self.recorder)

    @classmethod
    def from_config(cls, cfg: ServeConfig, *, base=None, replica: str = "") -> "DiagnosisService":
        """Load the base (unless given), open the registry, build the engine and the service."""
        from medlego.runtime.base import load_base

        if base is None:
            if not cfg.base.model:
                raise BadInputError("no base model: give --model NAME --weights FILE (or [base] in the config file)")
            base = load_base(cfg.base.model, cfg.base.weights, pretrained=cfg.base.pretrained)
        # truncate: the registry takes any rank; the engine serves the top max_rank directions
        max_rank = None if cfg.engine.over_rank == "truncate" else cfg.engine.max_rank
        registry = Registry(cfg.data_dir, base=base.spec, max_rank=max_rank, input_size=base.input_size,
                            **cfg.registry.registry_kwargs())
        if cfg.engine.kernel_cache is None:  # measured kernel choices outlive a restart
            cfg.engine.kernel_cache = str(cfg.data_dir / "kernel_choice.json")
        engine = Engine(base, registry, cfg.engine)
        if cfg.registry.warm_on_start:
            warm_in_background(registry, base.spec.fingerprint, cfg.engine.load_workers)
        audit = audit_log.AuditLog(registry.index, cfg.audit, store=registry.store) if cfg.audit.enabled else None
        return cls(engine, limits=cfg.limits, auth=Auth.from_config(cfg.auth), batching=cfg.batching,
                   replica=replica, audit=audit)

    # -- lifecycle ------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return bool(self.engine.ready)

    @property
    def audit(self) -> "audit_log.AuditLog | None":
        return self.recorder.log

    @audit.setter
    def audit(self, log_: "audit_log.AuditLog | None") -> None:  # benchmarks/audit_cost.py switches it per round
        self.recorder.log = log_

    @property
    def inflight(self) -> int:
        return self.admission.inflight

    def warmup(self) -> None:
        t0 = time.perf_counter()
        self.engine.warmup()
        log.info("engine warmed up in %.2fs", time.perf_counter() - t0)

    def close(self) -> None:
        self.batcher.stop()
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.recorder.close()

    # -- diagnosis ------------------------------------------------------------------------------
    async def diagnose(self, item: DiagnoseItem, api: str = "rest") -> dict:
        return (await self.diagnose_many([item], api))[0]

    async def diagnose_many(self, items: list[DiagnoseItem], api: str = "rest") -> list[dict]:
        """All or nothing: the first failing item's error (its index named when several) is raised."""
        if len(items) != 1:
            checks.check_batch(self.limits, len(items))
        t0 = time.perf_counter()
        try:
            self.recorder.check_room()  # 503 before the work when its row could not be recorded
            self.admission.admit(len(items))
        except OverloadedError as e:
            # the refusal's rows hash each image: off the loop, which an overload is no time to hold up
            # (to_thread carries the request's context: its id and caller)
            await asyncio.to_thread(self.recorder.diagnoses, items, api, [None] * len(items), None, e, t0)
            raise
        requests: list[Request] = []
        prepared: list[Any] = []
        try:
            prepared = await self._prepare_all(items, api, t0)
            requests = [r for r, _ in prepared]
            results = await self._run(requests)
        except BaseException as e:
            for r in requests:
                self._count(r, e, api)
            if requests:
                self.recorder.diagnoses(items, api, prepared, None, e, t0)
            raise
        finally:
            self.admission.release(len(items))
        elapsed = time.perf_counter() - t0
        self.engine.counters.observe("request_seconds", elapsed, api=api)
        answers = []
        for (r, decode_s), d in zip(prepared, results):
            d.timings["decode"] = decode_s
            d.timings["total"] = elapsed
            self._count(r, None, api)
            answers.append(self._answer(d))
        self.recorder.diagnoses(items, api, prepared, results, None, t0)
        return answers

    async def _prepare_all(self, items: Sequence[DiagnoseItem], api: str, t0: float) -> list[tuple[Request, float]]:
        """Every item prepared concurrently in the decode pool, or the first failure raised (counted, audited)."""
        self._preparing += len(items)  # on the event loop only; the batcher reads it
        try:
            prepared = await asyncio.gather(*[self._prepare(it) for it in items], return_exceptions=True)
        finally:
            self._preparing -= len(items)  # before they are queued: a batch never waits for what is there
        for n, r in enumerate(prepared):
            if isinstance(r, BaseException):
                self._count(None, r, api)
                self.recorder.diagnoses(items, api, [p if not isinstance(p, BaseException) else None
                                                     for p in prepared], None, r, t0, failed=n)
                raise item_error(n, len(items), r) from None
        return prepared  # type: ignore[return-value]

    async def _prepare(self, item: DiagnoseItem) -> tuple[Request, float]:
        """prepare() in the decode pool; a cold adapter is loaded by the engine's loader pool meanwhile,
        so a slow or hung store never holds a decode worker (and adapters in memory keep being served)."""
        loop = asyncio.get_running_loop()
        held = None
        for _ in range(3):  # the reference may move to another cold adapter between two resolves
            try:
                return await loop.run_in_executor(self.executor, prepare, self.engine, self.limits, item, held, False)
            except AdapterCold as cold:
                self._preparing -= 1  # not decoding while it waits: the batcher need not wait for it
                try:
                    held = await self.engine.load_async(cold.entry)
                finally:
                    self._preparing += 1
        raise OverloadedError(f"adapter '{item.adapter}' kept changing while it was loaded; retry")

    async def _run(self, requests: list[Request]) -> list[Diagnosis]:
        """Queue the requests in the batcher and wait for their diagnoses (none stays queued on failure)."""
        futures = []
        try:
            for r in requests:
                futures.append(self.batcher.submit_request(r))
        except BaseException:
            for f in futures:
                f.cancel()
            raise
        return list(await asyncio.gather(*[asyncio.wrap_future(f) for f in futures]))

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

    def refused_at(self, status: int, **fields: Any) -> None:
        """Record a request answered `status` (>= 400) by a stage no recorder saw (audit_recorder.py)."""
        self.recorder.refused_at(status, **fields)

    # -- health and metrics ----------------------------------------------------------------------
    async def health(self) -> dict:
        return await off_loop(health_of, self.engine, self.started, self.replica)

    async def info(self) -> dict:
        return await off_loop(info_of, self.engine, self.started, self.replica)

    async def metrics_text(self) -> bytes:
        return await off_loop(render, self.metrics)
