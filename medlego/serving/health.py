"""Health: what ``/readyz``, gRPC ``Health`` and ``/v1/info`` report about this process."""

from __future__ import annotations

import time

from medlego.runtime.engine import Engine
from medlego.runtime.errors import MedlegoError


def health_of(engine: Engine, started: float, replica: str = "") -> dict:
    """Alive (always, when this runs), ready (warmed up), the registry's size (-1: its database is
    unreachable: alive, but say so) and the resident base."""
    try:
        adapters = len(engine.registry)
    except MedlegoError:
        adapters = -1
    return {"alive": True, "ready": bool(engine.ready), "adapters": adapters, "device": str(engine.device),
            "model": engine.base.name, "input_size": engine.base.input_size,
            "fingerprint": engine.base.fingerprint, "uptime_s": round(time.time() - started, 3),
            **({"replica": replica} if replica else {})}


def info_of(engine: Engine, started: float, replica: str = "") -> dict:
    """Health plus the engine's pool, batching and kernel statistics."""
    return {**health_of(engine, started, replica), **engine.stats()}
