"""The adapter pool: device slots, host memory, and the registry's files on disk.

Device tier: the packed tensors the engine (and the kernels) read, preallocated once:
``lora_a [L, S, 2, R, D]``, ``lora_e [L, S, 2, R]``, ``lora_b [L, S, 2, D, R]`` with S slots and
the pool's max rank R. Ranks below R are zero-padded (E = 0 and zero rows/columns), which is
exact — measured cheaper than rank buckets here because the low-rank terms are ~0.2% of the
FLOPs, so one uniform R keeps one plan and one launch per layer. A swap into a slot is a
``copy_``, never an allocation. Least-recently-used slots are evicted; pinned adapters never.

Host tier: the parsed adapter plus its packed factors in (pinned, on CUDA) CPU memory, LRU
bounded. Disk tier: the registry's content-addressed files. Loading from disk happens in the
caller's thread (the servers call :meth:`host` from a worker pool before a request is queued),
so a cold adapter never stalls a batch of resident ones; the batch only does the host → device
copy (on a side stream on CUDA).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import torch

from .adapter import Adapter
from .counters import Counters
from .lora import pack_adapter
from .registry import Entry, Registry


@dataclass
class HostAdapter:
    """An adapter ready in host memory: its value, packed factors and heads."""

    entry: Entry
    adapter: Adapter
    a: torch.Tensor  # [L, 2, r, D] at the adapter's own max rank r (≤ the pool's R)
    e: torch.Tensor  # [L, 2, r]
    b: torch.Tensor  # [L, 2, D, r]
    heads: dict  # task -> (weight [C, D], bias [C]) on the engine's device and dtype

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.a, self.e, self.b))


class AdapterPool:
    def __init__(self, registry: Registry, *, depth: int, dim: int, slots: int = 64, max_rank: int = 16,
                 host_capacity: int = 1024, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 counters: Counters | None = None):
        self.registry = registry
        self.depth, self.dim, self.slots, self.max_rank = depth, dim, slots, max_rank
        self.device, self.dtype = torch.device(device), dtype
        self.host_capacity = host_capacity
        self.counters = counters or Counters()
        self.lora_a = torch.zeros(depth, slots, 2, max_rank, dim, device=self.device, dtype=dtype)
        self.lora_e = torch.zeros(depth, slots, 2, max_rank, device=self.device, dtype=dtype)
        self.lora_b = torch.zeros(depth, slots, 2, dim, max_rank, device=self.device, dtype=dtype)
        self._host: OrderedDict[str, HostAdapter] = OrderedDict()  # sha256 -> host copy, LRU order
        self._slot_of: OrderedDict[str, int] = OrderedDict()  # sha256 -> device slot, LRU order
        self._slot_heads: dict[int, HostAdapter] = {}
        self._free = list(range(slots - 1, -1, -1))
        self._pinned: set[str] = set()
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

    # -- host tier ----------------------------------------------------------------------------
    def host(self, entry: Entry) -> HostAdapter:
        """The host copy of a registered adapter, loading it from disk if needed (thread-safe)."""
        while True:
            with self._lock:
                h = self._host.get(entry.sha256)
                if h is not None:
                    h.entry = entry  # the caller's fresh row: pins and versions change after loading
                    self._host.move_to_end(entry.sha256)
                    self.counters.inc("pool_hits", tier="host")
                    return h
                pending = self._loading.get(entry.sha256)
                if pending is None:
                    self._loading[entry.sha256] = threading.Event()
                    break
            pending.wait()  # another thread is loading the same adapter: share its result
        try:
            t0 = time.perf_counter()
            h = self._load_from_disk(entry)
            with self._lock:
                self._host[entry.sha256] = h
                self.counters.inc("pool_misses", tier="host")
                self.counters.inc("pool_loads", tier="disk")
                self.counters.observe("load_seconds", time.perf_counter() - t0)
                while len(self._host) > self.host_capacity:
                    victim = next((k for k in self._host if k not in self._slot_of and k not in self._pinned), None)
                    if victim is None:
                        break
                    del self._host[victim]
                    self.counters.inc("pool_evictions", tier="host")
            return h
        finally:
            with self._lock:
                self._loading.pop(entry.sha256).set()

    def _load_from_disk(self, entry: Entry) -> HostAdapter:
        from .adapter import parse_adapter

        adapter = parse_adapter(self.registry.read_bytes(entry), expected_base=self.registry.base,
                                max_rank=self.max_rank)
        # packed at its own rank: a smaller host copy, and no zero-fill up to the pool's rank
        a, e, b = pack_adapter(adapter, None, self.dtype, "cpu")
        if self._stream is not None:
            a, e, b = a.pin_memory(), e.pin_memory(), b.pin_memory()
        heads = {name: (h.weight.to(self.device, self.dtype), h.bias.to(self.device, self.dtype))
                 for name, h in adapter.heads.items()}
        return HostAdapter(entry, adapter, a, e, b, heads)

    # -- device tier --------------------------------------------------------------------------
    def pin(self, sha256: str) -> None:
        with self._lock:
            self._pinned.add(sha256)

    def unpin(self, sha256: str) -> None:
        with self._lock:
            self._pinned.discard(sha256)

    def evict(self, sha256: str) -> bool:
        """Drop an adapter from the device tier (and the host tier). False if absent or pinned."""
        with self._lock:
            if sha256 in self._pinned:
                return False
            self._host.pop(sha256, None)
            slot = self._slot_of.pop(sha256, None)
            if slot is None:
                return False
            self._slot_heads.pop(slot, None)
            self._free.append(slot)
            self.counters.inc("pool_evictions", tier="device")
            return True

    def acquire(self, hosts: list[HostAdapter]) -> list[int]:
        """Device slots for the given (distinct) adapters, copying in the missing ones.

        Called by the engine's batch thread only; the slots stay valid until the next acquire.
        """
        if len(hosts) > self.slots:
            raise ValueError(f"a batch needs {len(hosts)} distinct adapters but the pool has {self.slots} slots")
        wanted = {h.entry.sha256 for h in hosts}
        out = []
        copies = []
        with self._lock:
            for h in hosts:
                sha = h.entry.sha256
                slot = self._slot_of.get(sha)
                if slot is not None:
                    self._slot_of.move_to_end(sha)
                    self.counters.inc("pool_hits", tier="device")
                else:
                    slot = self._take_slot(wanted)
                    self._slot_of[sha] = slot
                    self._slot_heads[slot] = h
                    copies.append((slot, h))
                    self.counters.inc("pool_misses", tier="device")
                    self.counters.inc("pool_loads", tier="host")
                if h.entry.pinned:  # the registry's pin flag, as of this request's resolve
                    self._pinned.add(sha)
                else:
                    self._pinned.discard(sha)
                out.append(slot)
        if copies:
            self._copy_in(copies)
        return out

    def _take_slot(self, keep: set[str]) -> int:
        if self._free:
            return self._free.pop()
        for sha in self._slot_of:  # oldest first
            if sha not in self._pinned and sha not in keep:
                slot = self._slot_of.pop(sha)
                self._slot_heads.pop(slot, None)
                self.counters.inc("pool_evictions", tier="device")
                return slot
        raise RuntimeError("every device slot is pinned or in use by this batch; raise the pool's slot count")

    def _copy_in(self, copies: list[tuple[int, HostAdapter]]) -> None:
        def run():
            for slot, h in copies:
                r = h.e.shape[-1]
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

    def heads_of(self, slot: int) -> HostAdapter:
        return self._slot_heads[slot]

    def stats(self) -> dict:
        with self._lock:
            return {"device_slots": self.slots, "device_resident": len(self._slot_of),
                    "device_bytes": self.device_bytes, "bytes_per_slot": self.bytes_per_slot,
                    "host_resident": len(self._host), "host_bytes": sum(h.nbytes for h in self._host.values()),
                    "pinned": len(self._pinned)}
