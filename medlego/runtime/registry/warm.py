"""Warming a node: the bytes of registered adapters fetched into the node cache before traffic needs them.

With an S3 store, the first request that names an adapter on a node pays its download (~10 ms
against a loopback S3 here, more against a remote one) on top of the parse; every later cold load
of it reads the node cache (~1.6 ms). A node that is about to take traffic over thousands of
adapters (a new replica, a node after a restart with an empty cache) can pay the downloads up front:
``medlego registry warm``. Versions are walked in listing order (name, version) with the listing's
filters, each object fetched once however many versions share it, ``workers`` downloads at a time,
and no more bytes than the node cache keeps without evicting what the warm-up itself placed.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from .listing import Filters

_log = logging.getLogger(__name__)
PAGE = 500  # versions per listing page: a warm-up of 10,000 versions is 20 statements
MAX_WORKERS = 64


@dataclass
class WarmReport:
    versions: int = 0  # listed versions that matched the filters
    objects: int = 0  # distinct files among them
    cached: int = 0  # already in this node's cache
    fetched: int = 0  # downloaded (verified) into it now
    bytes_fetched: int = 0
    missing: int = 0  # listed, but gone from the store (deleted meanwhile)
    left_out: int = 0  # files not fetched: the node cache has no room left for them
    room_bytes: int | None = None  # what the node cache may hold; None: the store is this machine's folder
    seconds: float = 0.0
    samples: list = field(default_factory=list, repr=False)  # the versions left out, a few, for the message

    def to_json(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "samples"}


def warm(registry, filters: Filters = Filters(), workers: int = 4) -> WarmReport:
    """Fetch every matching version's file into the node cache (see the module's docstring)."""
    if not 1 <= workers <= MAX_WORKERS:
        from ..errors import BadInputError

        raise BadInputError(f"bad number of workers {workers}: 1 to {MAX_WORKERS}")
    t0, report = time.perf_counter(), WarmReport(room_bytes=registry.store.warm_room())
    if report.room_bytes is None:  # a folder store is already on this machine's disk
        report.versions = sum(len(p.entries) for p in _pages(registry, filters))
        report.seconds = time.perf_counter() - t0
        return report
    wanted: dict[str, int] = {}
    left_out: set[str] = set()  # by object: versions that share a file are one file left out
    budget = report.room_bytes
    for page in _pages(registry, filters):
        for e in page.entries:
            report.versions += 1
            if e.sha256 in wanted or e.sha256 in left_out:
                continue
            if e.size > budget:
                left_out.add(e.sha256)
                report.left_out += 1
                if len(report.samples) < 3:
                    report.samples.append(e.ref)
                continue
            wanted[e.sha256], budget = e.size, budget - e.size
    report.objects = len(wanted) + report.left_out
    with ThreadPoolExecutor(workers, thread_name_prefix="medlego-warm") as pool:
        for sha, outcome in zip(wanted, pool.map(registry.store.warm, wanted)):
            if outcome == "fetched":
                report.fetched += 1
                report.bytes_fetched += wanted[sha]
            elif outcome == "cached":
                report.cached += 1
            else:
                report.missing += 1
    report.seconds = time.perf_counter() - t0
    return report


def warm_in_background(registry, base_fingerprint: str, workers: int) -> threading.Thread | None:
    """A server's ``[registry] warm_on_start``: the adapters made for its base fetched into the node cache
    by a daemon thread while it serves (requests that need a file not yet fetched download it as always);
    the outcome is logged. None when the store is this machine's folder (nothing to fetch)."""
    if registry.store.warm_room() is None:
        return None

    def run() -> None:
        try:
            r = warm(registry, Filters(base=base_fingerprint), workers)
        except Exception as e:  # noqa: BLE001 - a warm-up that fails leaves a working server with a cold cache
            _log.warning("warming the node cache %s failed: %s", registry.cache_dir, e)
            return
        _log.info("warmed the node cache %s: %d fetched (%.1f MB), %d already there, %d left out (no room), "
                  "%d missing, in %.1f s", registry.cache_dir, r.fetched, r.bytes_fetched / 1e6, r.cached,
                  r.left_out, r.missing, r.seconds)

    thread = threading.Thread(target=run, name="medlego-warm-on-start", daemon=True)
    thread.start()
    return thread


def _pages(registry, filters: Filters):
    cursor = None
    while True:
        page = registry.list_page(PAGE, cursor, filters)
        yield page
        cursor = page.next_cursor
        if cursor is None:
            return
