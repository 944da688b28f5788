"""A serving process's startup heap, kept out of the garbage collector's full collections.

A process that imported torch, timm, the web and gRPC stacks and loaded the model tracks ~450,000
objects; a full (oldest-generation) collection walks all of them and holds the interpreter lock
while it does: 320-330 ms here, during which no request, batch or /healthz makes progress. Those
objects live as long as the process, so once the server is warm they are collected once and then
frozen (``gc.freeze``): later collections only walk what was made since. Reference counting still
frees frozen objects that stop being used; only a reference cycle among them would stay.

Only for a process that is the server (``medlego serve``, a Ray replica): an embedded server
started inside someone else's process (a notebook, a test session) leaves that process's heap alone.
"""

from __future__ import annotations

import gc


def freeze_startup_heap() -> int:
    """Collect once, then freeze every object tracked now; the number of objects frozen (all told)."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
