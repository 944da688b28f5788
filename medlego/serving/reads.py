"""The read half of the contract, straight from a registry: shared by the in-process service and the
Ray ingress (which reads the shared registry itself: a listing or a 404 costs no replica call)."""

from __future__ import annotations

import asyncio
from typing import Any, Callable, TypeVar

from medlego.runtime.registry import Registry
from medlego.runtime.registry.listing import check_filters

from . import limits as checks
from .audit_recorder import AuditRecorder

T = TypeVar("T")


async def off_loop(fn: Callable[..., T], *args) -> T:
    """Run a blocking call in the default thread pool, never on the event loop."""
    return await asyncio.get_running_loop().run_in_executor(None, lambda: fn(*args))


def with_truncation(registry: Registry, engine, desc: dict) -> dict:
    """A description plus, for an adapter above this server's max_rank served truncated, what is dropped
    (``rank_truncation``: the share of singular-value mass, the ranks). `engine`: None where there is
    none (the Ray ingress), and then the description as it is."""
    config = getattr(engine, "config", None)
    if (config is not None and config.over_rank == "truncate"
            and int(desc.get("max_rank") or 0) > config.max_rank):
        _, adapter = registry.load(desc["ref"])
        desc = {**desc, "rank_truncation": engine.rank_truncation(adapter)}
    return desc


class RegistryReads:
    registry: Registry
    recorder: AuditRecorder
    engine = None  # the engine whose serving rules a description reports (None: no engine here)

    async def list_adapters(self, limit: int | None = None, cursor: str | None = None, prefix: str | None = None,
                            task: str | None = None, base: str | None = None) -> dict:
        filters = check_filters(prefix, task, base)  # before the thread pool: a bad filter costs no hop

        def listing():
            page = self.registry.list_page(limit, cursor, filters)
            out: dict = {"adapters": [e.to_json() for e in page.entries], "aliases": page.aliases}
            if page.next_cursor:
                out["next_cursor"] = page.next_cursor
            return out
        return await off_loop(listing)

    async def describe(self, ref: str) -> dict:
        return await off_loop(lambda: with_truncation(
            self.registry, self.engine, self.registry.describe(checks.check_text(ref, "ref", required=True) or "")))

    async def aliases(self) -> dict[str, str]:
        return await off_loop(self.registry.aliases)

    async def audit_rows(self, **filters: Any) -> list[dict]:
        """Audit rows matching the filters (runtime/registry/audit.py); the rows still in the buffer are written first."""
        return await off_loop(lambda: self.recorder.query(self.registry.index, **filters))
