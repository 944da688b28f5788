"""The audit recorder: every audit row the serving layer writes is built here (runtime/registry/audit.py
owns the table, the buffer and the chain).

One :class:`AuditRecorder` per process that answers requests: the in-process
:class:`~.service.DiagnosisService` and the Ray ingress's :class:`~.ray_frontend.RayFrontend` (whose
rows are the requests refused before any replica saw them). Each row takes the request's id, caller
and API from the context the transport set (``audit.CURRENT``). Without an audit log every method
is a no-op, so callers never test for one.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
from typing import Any, Sequence

from medlego.runtime.errors import BadInputError, answer_of
from medlego.runtime.imaging import sniff_format
from medlego.runtime.registry import audit as audit_log

from . import limits as checks
from .auth import Auth
from .contract import DiagnoseItem

log = logging.getLogger("medlego.serving")


def outcome_of(error: BaseException | None) -> str:
    """The metrics and audit outcome label of a request that ended with `error` (None: it succeeded)."""
    if error is None:
        return "ok"
    if isinstance(error, asyncio.CancelledError):
        return "cancelled"  # the client went away
    return answer_of(error)[2]


def _current() -> dict:
    return audit_log.CURRENT.get() or {}


def _request_id(current: dict) -> str:
    return current.get("id") or uuid.uuid4().hex


class AuditRecorder:
    def __init__(self, log_: "audit_log.AuditLog | None", auth: Auth):
        self.log = log_
        self.auth = auth
        if log_ is not None:
            auth.hooks["refused"] = self.auth_refused
            if auth.tokens_file is not None:  # a revoked or added token is an audit row
                auth.tokens_file.on_change = self.tokens_changed

    def check_room(self) -> None:
        """503 before the work when its row could not be recorded (the buffer is full)."""
        if self.log is not None:
            self.log.check_room()

    def close(self) -> None:
        if self.log is not None:
            self.log.close()  # what is still buffered is written before the process ends

    # -- diagnoses ---------------------------------------------------------------------------------
    def diagnoses(self, items: Sequence[DiagnoseItem], api: str, prepared: Sequence[Any] | None,
                  results: Sequence[Any] | None, error: BaseException | None, t0: float,
                  failed: int | None = None, admitted: bool = True) -> None:
        """One row per item of a request: its diagnosis (`results`), or its refusal (`error`; `failed`:
        the index of the item that failed, the others name it). `prepared[n]`: (engine request, decode
        seconds) of item n, or None where it was never prepared."""
        if self.log is None:
            return
        current = _current()
        rid, caller = _request_id(current), current.get("caller", "")
        latency_ms = round((time.perf_counter() - t0) * 1000, 3)
        for n, item in enumerate(items):
            p = prepared[n] if prepared is not None and n < len(prepared) else None
            row = _diagnosis_row(item, p[0] if isinstance(p, tuple) else None)
            row.update(request_id=rid if len(items) == 1 else f"{rid}/{n}", caller=caller, api=api,
                       latency_ms=latency_ms, outcome=outcome_of(error))
            if results is not None:
                row.update(self._result_fields(results[n]))
            else:
                reason = error if failed is None or failed == n else None
                row["reason"] = str(reason) if reason is not None else f"image {failed} of the request failed"
            self.log.record("diagnosis" if error is None else "refused", admitted=admitted, **row)

    def unrouted(self, item: DiagnoseItem, api: str, error: BaseException, t0: float) -> None:
        """A diagnosis refused before any engine saw it (the Ray ingress: a bad or unknown reference)."""
        self.diagnoses([item], api, None, None, error, t0, admitted=False)

    def _result_fields(self, d) -> dict:
        top = d.top[0] if d.top else None
        out: dict = {"top_label": top[0] if top else None, "top_probability": top[1] if top else None}
        if self.log is not None and self.log.settings.probabilities:
            out["probabilities"] = d.probabilities
        if getattr(d, "rank_truncation", None) is not None:
            out["rank_truncation"] = d.rank_truncation
        return out

    # -- refusals ----------------------------------------------------------------------------------
    def auth_refused(self, caller: str, action: str, reason: str) -> None:
        """The token check's hook (serving/auth.py): a caller refused an action."""
        if self.log is None:
            return
        current = _current()
        self.log.refusal(request_id=_request_id(current), caller=caller, api=current.get("api", ""),
                         action=action, reason=reason, outcome="refused")  # identical ones aggregated

    def refused_at(self, status: int, **fields) -> None:
        """A request answered `status` (>= 400) by a stage no recorder saw (body limit, parsing,
        multipart, v2 tensor checks, routing): once per request, identical ones aggregated.
        Called by the transports' refusal recorder (serving/middleware.py)."""
        current = _current()
        if self.log is None or current.get("audited"):
            return
        try:
            self.log.refusal(request_id=_request_id(current), caller=current.get("caller", ""),
                             api=current.get("api", ""), status=status, **fields,
                             outcome="refused" if status < 500 else "error")
        except Exception:  # recording must never turn an answer into a 500
            log.exception("could not record a refusal")

    # -- admin -------------------------------------------------------------------------------------
    def admin(self, op: str, args: dict | None, before, after, error: BaseException | None) -> None:
        """An admin operation with the state before and after it (or its error)."""
        if self.log is None:
            return
        current = _current()
        adapter = after.get("ref", "") if isinstance(after, dict) else ""
        self.log.record("admin", request_id=_request_id(current), caller=current.get("caller", ""),
                        api=current.get("api", ""), op=op, args=args or {}, before=before, after=after,
                        adapter=adapter, outcome=outcome_of(error), admitted=True,
                        **({"reason": str(error)} if error is not None else {}))

    def tokens_changed(self, added: list, removed: list, changed: list) -> None:
        if self.log is None or self.auth.tokens_file is None:
            return
        self.log.record("admin", admitted=True, request_id=uuid.uuid4().hex, caller="", api="tokens_file",
                        op="tokens", args={"file": str(self.auth.tokens_file.path)},
                        after={"added": added, "revoked": removed, "changed": changed}, outcome="ok")

    # -- reading -----------------------------------------------------------------------------------
    def query(self, index, **filters) -> list[dict]:
        """Audit rows matching the filters (blocking: run it off the event loop); the buffer is written first."""
        check_filters(filters)
        if self.log is not None:
            self.log.flush()
        else:
            audit_log.ensure_schema(index)
        return audit_log.query(index, **filters)


def check_filters(filters: dict) -> None:
    if filters.get("kind") not in (None, *audit_log.KINDS):
        raise BadInputError(f"unknown audit kind {filters['kind']!r}; choose from {', '.join(audit_log.KINDS)}")
    sha = filters.get("image_sha256")
    if sha and not (isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdefABCDEF" for c in sha)):
        raise BadInputError("'image_sha256' must be 64 hex digits")
    for key in ("adapter", "caller"):
        checks.check_text(filters.get(key), key)


def _diagnosis_row(item: DiagnoseItem, request) -> dict:
    """What a diagnosis row says of the item: the adapter it resolved to (if it got that far), what was
    asked for, the task, and the image's sha256 and format (never its content)."""
    adapter = request.adapter if request is not None else None
    return {"adapter": adapter.ref if adapter is not None else "",
            "adapter_sha256": adapter.sha256 if adapter is not None else "",
            "requested": str(item.adapter)[:256],
            "task": request.task.name if request is not None and request.task is not None else (item.task or ""),
            **image_fields(item), **(item.dicom or {})}


def image_fields(item: DiagnoseItem) -> dict:
    """The sha256 of the image bytes as received and their format; never the content."""
    if item.image_audit is not None:
        return item.image_audit
    if item.pixels is not None and not item.image:
        try:
            data = memoryview(item.pixels).tobytes()
        except TypeError:
            data = bytes(getattr(item.pixels, "tobytes", lambda: b"")())
        return {"image_sha256": hashlib.sha256(data).hexdigest(), "image_format": "pixels"}
    data = item.image if isinstance(item.image, (bytes, bytearray)) else b""
    return {"image_sha256": hashlib.sha256(data).hexdigest(), "image_format": sniff_format(bytes(data[:512])) or "unknown",
            "image_bytes": len(data)}
