"""What both DICOM doors do with one received instance: read its header, route it, diagnose it
through the serving contract (the same admission, decoder, batcher and audit as ``/v1/diagnose``),
build one SR per adapter and store them at the door's destination.

An instance that is not diagnosed (no rule, not an image, broken, too large, refused by the decoder)
gets a failure reason and nothing is sent to the PACS for it; its refusal is an audit row carrying
the instance's UIDs (never patient attributes). Logs name UIDs only where they are needed to find
an instance (an SR that could not be stored).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass, field

from medlego.runtime.errors import MedlegoError
from medlego.runtime.registry import audit as audit_log

from ..contract import DiagnoseItem, DiagnosisAPI
from . import reasons
from .destination import store
from .instance import Instance, InstanceFailure, failure_of, read_instance
from .rules import Rules, Target
from .sr import build_sr, encode

log = logging.getLogger("medlego.dicom")


@dataclass
class Outcome:
    """What became of one instance: diagnosed (``answers``, ``srs``) or failed (``failure`` code)."""

    sop_class: str = ""
    sop_instance: str = ""
    failure: int | None = None
    reason: str = ""
    answers: list[dict] = field(default_factory=list)
    srs: list = field(default_factory=list)  # pydicom Datasets
    stored: str | None = None  # None: nothing to store or no destination; "ok" or the store error

    def sr_files(self) -> list[bytes]:
        return [encode(sr) for sr in self.srs]


class DicomDoor:
    """The routing, diagnosis and SR path both doors share (one per server)."""

    def __init__(self, service: DiagnosisAPI, rules: Rules, ae_title: str = "MEDLEGO"):
        self.service = service
        self.rules = rules
        self.ae_title = ae_title

    async def receive(self, data: bytes | None, *, door: str, calling_ae: str = "",
                      explicit: list[Target] | None = None, size: int = 0, index: int = 0,
                      store_srs: bool = True) -> Outcome:
        """One instance (`data` None: dropped by the reader, `size` bytes) → its :class:`Outcome`.
        `door`: "dicomweb" | "dimse"; `explicit`: the STOW-RS request's own adapter, instead of the rules."""
        _audit_context(door, calling_ae, index)
        try:
            if data is None:
                raise InstanceFailure(reasons.OUT_OF_RESOURCES, f"instance is {size} bytes, above the limit "
                                      f"of {self.service.limits.max_image_bytes}")
            instance = await asyncio.to_thread(read_instance, data, self.service.limits.max_image_bytes)
            targets = explicit or self._route(instance, calling_ae)
            return await self._diagnose(instance, targets, door, calling_ae, store_srs)
        except InstanceFailure as f:
            self._refused(f, calling_ae)
            return Outcome(f.sop_class, f.sop_instance, f.code, f.reason)

    def _route(self, instance: Instance, calling_ae: str) -> list[Target]:
        rule = self.rules.match(instance.routing(calling_ae))
        if rule is None:
            raise InstanceFailure(reasons.NO_RULE, "no routing rule matched the instance (see GET /v1/dicom/rules)",
                                  instance.uid("SOPClassUID"), instance.uid("SOPInstanceUID"), instance.audit())
        return rule.targets

    async def _diagnose(self, instance: Instance, targets: list[Target], door: str, calling_ae: str,
                        store_srs: bool) -> Outcome:
        ids = instance.audit(calling_ae)
        items = [DiagnoseItem(image=instance.data, adapter=t.adapter, task=t.task, dicom=dict(ids)) for t in targets]
        out = Outcome(instance.uid("SOPClassUID"), instance.uid("SOPInstanceUID"))
        try:
            out.answers = await self.service.diagnose_many(items, api=door)  # rows recorded by the service
        except MedlegoError as e:
            out.failure, out.reason = failure_of(e)
            return out
        try:
            out.srs = await asyncio.to_thread(self._build, instance, out.answers)
        except Exception as e:  # a header highdicom refuses as evidence: a failure, never a 500
            # the exception's type only: its message may quote header values (patient attributes)
            log.error("SR of SOP instance %s not built: %s", out.sop_instance, type(e).__name__)
            out.failure, out.reason = reasons.PROCESSING_FAILURE, f"the SR could not be built ({type(e).__name__})"
            return out
        destination = self.rules.destination(door)
        if store_srs and destination is not None:
            try:
                await asyncio.to_thread(store, destination, out.srs, self.ae_title)
                out.stored = "ok"
            except MedlegoError as e:  # the diagnosis stands; the caller sees a warning
                out.stored = str(e)
                log.warning("SR of SOP instance %s not stored at %s: %s", out.sop_instance, destination.name, e)
        return out

    def _build(self, instance: Instance, answers: list[dict]) -> list:
        srs = []
        for answer in answers:
            name = str(answer["adapter"])
            srs.append(build_sr(instance.header, answer, lambda label, n=name: self.rules.code(n, label)))
        return srs

    def _refused(self, f: InstanceFailure, calling_ae: str) -> None:
        """The audit row of an instance refused before any diagnosis: its UIDs when its header was read,
        the calling AE (DIMSE); identical refusals are aggregated by the audit log."""
        ids = {"sop_instance_uid": f.sop_instance, "sop_class_uid": f.sop_class, **f.ids,
               **({"calling_ae": calling_ae} if calling_ae else {})}
        self.service.refused_at(400 if f.code != reasons.OUT_OF_RESOURCES else 413, reason=f.reason,
                                failure_reason=f"0x{f.code:04X}", **ids)


def _audit_context(door: str, calling_ae: str, index: int) -> None:
    """This instance's own audit context (a task-local copy): its request id is the request's plus
    the instance's place in it, and a DIMSE caller is its calling AE title."""
    current = dict(audit_log.CURRENT.get() or {})
    current.pop("audited", None)
    rid = current.get("id") or uuid.uuid4().hex
    current["id"] = f"{rid}/{index}" if door == "dicomweb" else rid
    current["api"] = door
    if door == "dimse":
        current["caller"] = f"ae:{calling_ae}"
    audit_log.CURRENT.set(current)
