"""The admin operations: the registry writes of the contract (``contract.ADMIN_OPERATIONS``).

Each runs off the event loop through :meth:`AdminOperations._run`, which counts it and records
its audit row with the state before and after (the transports check the admin token first).
Residency follows the registry through the engine (pins, forgetting deleted content), and every
upload and merge result is validated against the resident base before anything is written.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Callable, TypeVar

from medlego.runtime.adapter_merge import merge_adapters
from medlego.runtime.config import Limits
from medlego.runtime.engine import Engine
from medlego.runtime.errors import BadInputError, MedlegoError
from medlego.runtime.registry import parse_ref

from . import limits as checks
from .audit_recorder import AuditRecorder, outcome_of
from .contract import MergeSpec
from .reads import off_loop, with_truncation

log = logging.getLogger("medlego.serving")

T = TypeVar("T")


def check_merge_spec(spec: MergeSpec) -> None:
    """The shape of a merge request (the method and its parameters are checked by the merge itself)."""
    if not isinstance(spec.sources, list) or not spec.sources or not all(isinstance(x, str) for x in spec.sources):
        raise BadInputError("'sources' must be a non-empty list of registered adapter references")
    if not isinstance(spec.params, dict):
        raise BadInputError("'params' must be an object of method parameters")


class AdminOperations:
    def __init__(self, engine: Engine, limits: Limits, recorder: AuditRecorder):
        self.engine = engine
        self.registry = engine.registry
        self.limits = limits
        self.recorder = recorder

    async def _run(self, op: str, fn: Callable[[], T], args: dict | None = None,
                   before: Callable[[], object] | None = None) -> T:
        """`fn` off the event loop, counted and audited with `before()` (when audited) and its answer."""
        self.recorder.check_room()  # 503 before the operation when its row could not be recorded
        prior = None
        if self.recorder.log is not None and before is not None:
            try:
                prior = await off_loop(before)
            except MedlegoError:
                prior = None
        try:
            out = await off_loop(fn)
        except BaseException as e:
            self.engine.counters.inc("admin_operations", op=op, outcome=outcome_of(e))
            self.recorder.admin(op, args, prior, None, e)
            raise
        self.engine.counters.inc("admin_operations", op=op, outcome="ok")
        self.recorder.admin(op, args, prior, out, None)
        return out

    def _register(self, name: str, data: bytes, aliases, move_aliases: bool) -> dict:
        checks.check_adapter_bytes(self.limits, data)
        entry = self.registry.register(checks.check_text(name, "name", required=True) or "", data,
                                       tuple(a for a in aliases if a), move_aliases=move_aliases,
                                       check=self.engine.check_adapter)
        desc = with_truncation(self.registry, self.engine, self.registry.describe(entry.ref))
        if desc.get("rank_truncation"):
            t = desc["rank_truncation"]
            log.warning("registered %s at rank %d: served at rank %d, dropping %.2f%% of its singular-value mass",
                        entry.ref, t["rank"], t["served_rank"], 100 * t["dropped_mass"])
        return desc

    async def register(self, name: str, data: bytes, aliases: list[str], move_aliases: bool = False) -> dict:
        """Validate against the resident base, then write; usable by the next request, no restart."""
        return await self._run("register", lambda: self._register(name, data, aliases, move_aliases),
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
        return await self._run("delete", run, {"ref": ref, "all_versions": all_versions},
                               lambda: [e.to_json() for e in self.registry.list() if e.name == parse_ref(ref)[0]])

    async def pin(self, ref: str) -> dict:
        return await self._run("pin", lambda: self.registry.describe(self.engine.pin(ref).ref), {"ref": ref},
                               lambda: self.registry.describe(ref))

    async def unpin(self, ref: str) -> dict:
        return await self._run("unpin", lambda: self.registry.describe(self.engine.unpin(ref).ref), {"ref": ref},
                               lambda: self.registry.describe(ref))

    async def set_alias(self, alias: str, target: str) -> dict:
        def run():
            self.registry.set_alias(alias, target)
            return {"alias": alias, "target": target, "resolves_to": self.registry.resolve(alias).ref}
        return await self._run("alias", run, {"alias": alias, "target": target},
                               lambda: self.registry.aliases().get(alias))

    async def remove_alias(self, alias: str) -> None:
        await self._run("alias", lambda: self.registry.remove_alias(alias), {"alias": alias, "removed": True},
                        lambda: self.registry.aliases().get(alias))

    async def merge(self, spec: MergeSpec) -> dict:
        """Merge registered adapters (runtime/adapter_merge.py) and register the result as `spec.name`.

        The merged rank is capped at what this server serves (its max_rank), so the result always registers."""
        def run():
            check_merge_spec(spec)
            loaded = [self.registry.load(ref) for ref in spec.sources]
            info = [{"ref": ref, "name": e.name, "version": e.version, "sha256": e.sha256}
                    for ref, (e, _) in zip(spec.sources, loaded)]
            params = dict(spec.params)
            if params.get("max_rank") is None:
                params["max_rank"] = self.engine.config.max_rank
            adapter, _ = merge_adapters([a for _, a in loaded], spec.method, params, source_info=info,
                                        task_names=spec.task_names)
            return self._register(spec.name, adapter.to_bytes(), spec.aliases, spec.move_aliases)
        return await self._run("merge", run, {"name": spec.name, "sources": spec.sources, "method": spec.method,
                                              "params": spec.params, "aliases": spec.aliases})
