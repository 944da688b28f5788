"""The adapter pool: device slots, host memory, and the registry's files behind them.

Device tier: the packed tensors the engine (and the kernels) read, preallocated once:
``lora_a [L, S, 2, R, D]``, ``lora_e [L, S, 2, R]``, ``lora_b [L, S, 2, D, R]`` with S slots and
the pool's max rank R. Ranks below R are zero-padded (E = 0 and zero rows/columns), which is
exact — measured cheaper than rank buckets here because the low-rank terms are ~0.2% of the
FLOPs, so one uniform R keeps one plan and one launch per layer. A swap into a slot is a
``copy_``, never an allocation. Least-recently-used slots are evicted; pinned adapters never.

Host tier: the adapter's tasks and preprocessing plus its packed factors in (pinned, on CUDA) CPU memory, LRU
bounded. Disk tier: the registry's content-addressed files. Loading from disk happens in the
caller's thread — the engine's own bounded loader pool (``Engine.load``), never the servers'
decode workers — before a request is queued, so a cold adapter never stalls a batch of resident
ones; the batch only does the host → device copy (on a side stream on CUDA).

Everything here is keyed by sha256, so content can never be served under a stale name. The pool
owns residency only: which adapters are pinned is the registry's fact, and the pool follows it —
each batch tells :meth:`acquire` the pin flag its requests resolved, and the engine forwards pin
changes made through this server at once (:meth:`set_pinned`).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import torch

from .adapter import BaseSpec, Preprocess, TaskSpec, find_task, parse_adapter, truncate_rank
from .adapter_layout import parse_packed
from .counters import Counters
from .errors import OverloadedError
from .lora import pack_adapter


@dataclass(frozen=True)
class HostAdapter:
    """An adapter ready in host memory: its tasks and preprocessing, packed factors and heads (immutable, by content)."""

    sha256: str
    # the adapter's metadata only: its factors are the packed copy below (the parse's tensors were views of the file)
    tasks: tuple[TaskSpec, ...]
    preprocess: Preprocess
    a: torch.Tensor  # [L, 2, r, D] at the adapter's own max rank r (≤ the pool's R)
    e: torch.Tensor  # [L, 2, r]
    b: torch.Tensor  # [L, 2, D, r]
    heads: dict  # task -> (weight [C, D], bias [C]) on the engine's device and dtype
    truncation: dict | None = None  # served at the pool's rank, its top singular directions (adapter.truncate_rank)

    @property
    def rank(self) -> int:
        return int(self.e.shape[-1])

    def task(self, name: str | None) -> TaskSpec:
        return find_task(self.tasks, name)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.a, self.e, self.b))


class AdapterPool:
    def __init__(self, base: BaseSpec, *, slots: int = 64, max_rank: int = 16,
                 host_capacity: int = 1024, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 counters: Counters | None = None, over_rank: str = "refuse"):
        """``over_rank``: an adapter above ``max_rank`` is refused ("refuse") or served at ``max_rank``
        with its top singular directions ("truncate")."""
        self.base = base
        self.over_rank = over_rank
        self.depth, self.dim, self.slots, self.max_rank = base.depth, base.embed_dim, slots, max_rank
        self.device, self.dtype = torch.device(device), dtype
        self.host_capacity = host_capacity
        self.counters = counters or Counters()
        shape = (self.depth, slots, 2)
        self.lora_a = torch.zeros(*shape, max_rank, self.dim, device=self.device, dtype=dtype)
        self.lora_e = torch.zeros(*shape, max_rank, device=self.device, dtype=dtype)
        self.lora_b = torch.zeros(*shape, self.dim, max_rank, device=self.device, dtype=dtype)
        self._host: OrderedDict[str, HostAdapter] = OrderedDict()  # sha256 -> host copy, LRU order
        self._slot_of: OrderedDict[str, int] = OrderedDict()  # sha256 -> device slot, LRU order
        self._free = list(range(slots - 1, -1, -1))
        self._pinned: set[str] = set()  # the registry's pins as last seen by this pool
        self._lock = threading.RLock()
        self._loading: dict[str, threading.Event] = {}  # concurrent loads of one adapter merge into one
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    # -- sizes --------------------------------------------------------------------------------
    @property
    def bytes_per_slot(self) -> int:
        per = self.depth * 2 * self.max_rank * (2 * self.dim + 1)
        return per * self.lora_a.element_size()

    @property
    def device_bytes(self) -> int:
        return self.slots * self.bytes_per_slot

    def resident(self) -> list[str]:
        with self._lock:
            return list(self._slot_of)

    def host_resident(self) -> list[str]:
        with self._lock:
            return list(self._host)

    def capacity(self, keep: set[str]) -> int:
        """Slots a batch needing the adapters `keep` can use: every slot but those pinned by others."""
        with self._lock:
            return self.slots - len(self._pinned - keep)

    # -- host tier ----------------------------------------------------------------------------
    def held(self, sha256: str) -> HostAdapter | None:
        """The host copy if this pool holds it (a hit, counted), else None; never reads the store."""
        with self._lock:
            return self._host_hit(sha256)

    def _host_hit(self, sha256: str) -> HostAdapter | None:
        """The host copy, marked recently used and counted as a hit (the caller holds the lock)."""
        h = self._host.get(sha256)
        if h is not None:
            self._host.move_to_end(sha256)
            self.counters.inc("pool_hits", tier="host")
        return h

    def host(self, sha256: str, read: Callable[[], bytes | bytearray]) -> HostAdapter:
        """The host copy of an adapter, loaded with ``read()`` (its verified file bytes) if absent (thread-safe)."""
        while True:
            with self._lock:
                h = self._host_hit(sha256)
                if h is not None:
                    return h
                pending = self._loading.get(sha256)
                if pending is None:
                    self._loading[sha256] = threading.Event()
                    break
            pending.wait()  # another thread is loading the same adapter: share its result
        try:
            t0 = time.perf_counter()
            data = read()
            t1 = time.perf_counter()
            h = self._load(sha256, data)
            with self._lock:
                self._host[sha256] = h
                self.counters.inc("pool_misses", tier="host")
                self.counters.inc("pool_loads", tier="disk")
                self.counters.observe("load_seconds", time.perf_counter() - t0)
                # the host tier's own share: parse, validate, pack (the read is its source tier's)
                self.counters.observe("pool_load_seconds", time.perf_counter() - t1, tier="host")
                self.counters.inc("pool_loaded_bytes", h.nbytes, tier="host")
                self._trim_host()
            return h
        finally:
            with self._lock:
                self._loading.pop(sha256).set()

    def _trim_host(self) -> None:
        while len(self._host) > self.host_capacity:
            victim = next((k for k in self._host if k not in self._slot_of and k not in self._pinned), None)
            if victim is None:
                return
            del self._host[victim]
            self.counters.inc("pool_evictions", tier="host")

    def _load(self, sha256: str, data: bytes | bytearray) -> HostAdapter:
        truncate = self.over_rank == "truncate"
        # packed in own memory; the heads are views of the file's bytes, read-only: copied below
        packed = parse_packed(data, expected_base=self.base, max_rank=None if truncate else self.max_rank,
                              dtype=self.dtype)
        a, e, b, heads, truncation = packed.a, packed.e, packed.b, packed.heads, None
        if packed.rank > self.max_rank:  # over_rank = "truncate": its top singular directions
            adapter, truncation = truncate_rank(parse_adapter(data, expected_base=self.base, borrow=True), self.max_rank)
            a, e, b = pack_adapter(adapter, None, self.dtype, "cpu")
            heads = adapter.heads
        if self._stream is not None:
            a, e, b = a.pin_memory(), e.pin_memory(), b.pin_memory()
        heads = {name: (h.weight.to(self.device, self.dtype, copy=True), h.bias.to(self.device, self.dtype, copy=True))
                 for name, h in heads.items()}
        return HostAdapter(sha256, packed.tasks, packed.preprocess, a, e, b, heads, truncation)

    # -- residency policy ------------------------------------------------------------------------
    def set_pinned(self, sha256: str, pinned: bool) -> None:
        with self._lock:
            if pinned:
                self._pinned.add(sha256)
            else:
                self._pinned.discard(sha256)

    def forget(self, sha256: str) -> None:
        """Drop an adapter from both tiers (its last registry row is gone); in-flight batches keep theirs."""
        with self._lock:
            self._pinned.discard(sha256)
            self._host.pop(sha256, None)
            slot = self._slot_of.pop(sha256, None)
            if slot is not None:
                self._free.append(slot)
                self.counters.inc("pool_evictions", tier="device")

    # -- device tier --------------------------------------------------------------------------
    def acquire(self, wanted: list[tuple[HostAdapter, bool]]) -> list[int]:
        """Device slots for the given distinct adapters (with the pin flag each request resolved).

        Called by the engine's batch thread only; the slots stay valid until the next acquire.
        Raises :class:`OverloadedError` when pinned adapters leave too few slots for this batch.
        """
        keep = {h.sha256 for h, _ in wanted}
        out, copies = [], []
        with self._lock:
            for h, pinned in wanted:
                self.set_pinned(h.sha256, pinned)
            if len(wanted) > self.capacity(keep):
                raise OverloadedError(f"a batch needs {len(wanted)} device slots but only {self.capacity(keep)} of "
                                      f"{self.slots} are not pinned by other adapters; retry later")
            for h, _ in wanted:
                slot = self._slot_of.get(h.sha256)
                if slot is not None:
                    self._slot_of.move_to_end(h.sha256)
                    self.counters.inc("pool_hits", tier="device")
                else:
                    slot = self._take_slot(keep)
                    self._slot_of[h.sha256] = slot
                    copies.append((slot, h))
                    self.counters.inc("pool_misses", tier="device")
                    self.counters.inc("pool_loads", tier="host")
                out.append(slot)
        if copies:
            t0 = time.perf_counter()
            self._copy_in(copies)
            per_copy = (time.perf_counter() - t0) / len(copies)  # on CUDA: the enqueueing (the copy is async)
            for _, h in copies:
                self.counters.observe("pool_load_seconds", per_copy, tier="device")
                self.counters.inc("pool_loaded_bytes", h.nbytes, tier="device")
        return out

    def _take_slot(self, keep: set[str]) -> int:
        if self._free:
            return self._free.pop()
        victim = next(sha for sha in self._slot_of if sha not in self._pinned and sha not in keep)  # oldest first
        self.counters.inc("pool_evictions", tier="device")
        return self._slot_of.pop(victim)

    def _copy_in(self, copies: list[tuple[int, HostAdapter]]) -> None:
        def run():
            for slot, h in copies:
                r = h.rank
                # ranks above r keep the previous tenant's (finite) A and B; E = 0 there makes them
                # contribute exactly nothing, so only E needs clearing
                self.lora_a[:, slot, :, :r].copy_(h.a, non_blocking=True)
                self.lora_b[:, slot, :, :, :r].copy_(h.b, non_blocking=True)
                self.lora_e[:, slot, :, :r].copy_(h.e, non_blocking=True)
                if r < self.max_rank:
                    self.lora_e[:, slot, :, r:].zero_()

        if self._stream is None:
            run()
            return
        with torch.cuda.stream(self._stream):
            run()
        torch.cuda.current_stream(self.device).wait_stream(self._stream)

    def stats(self) -> dict:
        with self._lock:
            return {"device_slots": self.slots, "device_resident": len(self._slot_of),
                    "device_bytes": self.device_bytes, "bytes_per_slot": self.bytes_per_slot,
                    "host_resident": len(self._host), "host_bytes": sum(h.nbytes for h in self._host.values()),
                    "pinned": len(self._pinned)}
